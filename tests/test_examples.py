"""Smoke test: every example task runs one training iteration end to end and writes its outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import pytest
import ray

from examples import train
from examples.tasks import TASKS, register

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# Each task with one encoder, so that every encoder runs through the example script too.
RUNS = [(task, ["gru", "transformer", "mamba", "ff"][i % 4]) for i, task in enumerate(sorted(TASKS))]


@pytest.fixture(scope="module", autouse=True)
def shutdown_ray_afterwards() -> Iterator[None]:
    """train.main starts Ray and leaves it running, as a script may."""
    yield
    ray.shutdown()


@pytest.mark.parametrize("task,encoder", RUNS)
def test_example_runs_one_iteration(tmp_path, task, encoder):
    summary = train.main(["--task", task, "--encoder", encoder, "--smoke", "--out", str(tmp_path),
                          "--num-env-runners", "0", "--envs-per-runner", "2"])
    out = tmp_path / f"{task}-{encoder}-seed0"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["env_steps"] > 0 and summary["final_return"] is not None
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert list(out.glob("tune/*/checkpoint_*")), "no checkpoint written"


def test_bad_flags_fail_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--encoder", "lstm"])
    assert "invalid choice: 'lstm'" in capsys.readouterr().err


def test_a_tasks_module_settings_reach_the_module_in_both_scripts():
    """delayed_recall_400's linear timestep encoder and heads, as train.py and the comparison in
    BENCHMARKS.md build them (benchmarks/vs_rllib_lstm.py), not the module's one-hidden-layer MLPs."""
    from vs_rllib_lstm import build

    task = TASKS["delayed_recall_400"]
    assert task.module == {"tstep_hiddens": [], "head_hiddens": []}
    register(task)
    env = task.make_env(task.env_config)
    args = train.parse_args(["--task", "delayed_recall_400", "--encoder", "transformer"])
    for config in (train.build_config(task, args), build(task, "transformer", seed=0, envs=2)):
        spec = config.rl_module_spec
        spec.observation_space, spec.action_space = env.observation_space, env.action_space
        module = spec.build()
        assert [len(net.layers) for net in (module.tstep_encoder.mlp, module.pi, module.vf)] == [1, 1, 1]
        assert spec.model_config["traj_encoder_config"]["pos_emb"] == "rope"
        assert module.tstep_encoder.mlp.input_gain == 1.0
    spec = build(task, "mamba", seed=0, envs=2).rl_module_spec
    spec.observation_space, spec.action_space = env.observation_space, env.action_space
    assert spec.build().tstep_encoder.mlp.input_gain == 10.0
    assert spec.model_config["traj_encoder_config"]["ssm_init"] == "long_memory"


@pytest.mark.parametrize("answer_right, expected", [(True, 2.0), (False, -2.0)])
def test_recall_each_other_scores_repeating_the_others_first_action(answer_right, expected):
    from examples.recall_each_other import RecallEachOther

    env = RecallEachOther({"delay": 3, "n_actions": 3})
    obs, _ = env.reset(seed=0)
    first = {"a": 1, "b": 2}
    obs, *_ = env.step(first)
    assert obs["a"][:3].tolist() == [0, 0, 1] and obs["b"][:3].tolist() == [0, 1, 0]  # the other's choice
    total, done = 0.0, False
    while not done:
        query = obs["a"][3] == 1
        actions = {"a": 2, "b": 1} if query and answer_right else {"a": 0, "b": 0}
        obs, rewards, terminateds, _, _ = env.step(actions)
        total, done = total + sum(rewards.values()), terminateds["__all__"]
    assert total == expected
    with pytest.raises(ValueError, match="unknown RecallEachOther options"):
        RecallEachOther({"dealy": 3})
