"""Scaling out: cluster.yaml passes Ray's validator, and on a 3-node Ray cluster (one machine)
actors land on their labelled nodes, 2 DDP learners stay equal and each recomputes the rollout
on its shard, and a killed env runner comes back while the stateful encoder resumes correctly."""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchDDPRLModule
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole
from conftest import ENCODER_CONFIGS, MAX_SEQ_LEN, SMALL_NETS, logp_error

from examples.scaling import (
    DRIVER_RESOURCE, ENV_RUNNER_RESOURCE, LABEL_SHARE, LEARNER_RESOURCE, add_scaling_args, apply_scaling,
)
from rllib_trajenc.rllib import with_traj_encoder
from rllib_trajenc.rllib.compact_state import shipped_state_bytes

ROOT = Path(__file__).resolve().parents[1]
GRU_HIDDEN = 128
TESTS = Path(__file__).resolve().parent


def test_cluster_yaml_passes_ray_validation():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # What `ray up` runs before it talks to AWS (commands._bootstrap_config): defaults merged
    # in, per-type worker bounds filled, then the JSON-schema and consistency checks.
    full = prepare_config(config)
    validate_config(full)

    types = full["available_node_types"]
    labels = {name: set(t["resources"]) - {"CPU", "GPU", "memory"} for name, t in types.items()}
    assert all(len(found) == 1 for found in labels.values())  # one role per node type
    by_label = {label: name for name, found in labels.items() for label in found}
    # The labels examples/scaling.py documents, the driver's on the head.
    assert set(by_label) == {DRIVER_RESOURCE, LEARNER_RESOURCE, ENV_RUNNER_RESOURCE}
    assert by_label[DRIVER_RESOURCE] == full["head_node_type"]

    # The GPU type's own setup list replaces the global one: it must repeat the common steps,
    # and only it builds the CUDA extras.
    gpu_setup = " ".join(types[by_label[LEARNER_RESOURCE]]["worker_setup_commands"])
    assert "[gpu,examples]" in gpu_setup and "--no-build-isolation" in gpu_setup
    assert "FLASH_ATTENTION_FORCE_BUILD" in gpu_setup
    for common in ("venv", "ray[default"):
        assert common in gpu_setup
    for other in ("head_setup_commands", "worker_setup_commands"):
        assert "[gpu" not in " ".join(full[other]) and "FORCE_BUILD" not in " ".join(full[other])
        assert "rllib-trajenc[examples]" in " ".join(full[other])


# The scaling flags of docs/cluster.md's `ray job submit` command.
CLUSTER_FLAGS = ["--num-learners", "2", "--gpus-per-learner", "1", "--num-env-runners", "32",
                 "--learner-resource", LEARNER_RESOURCE, "--env-runner-resource", ENV_RUNNER_RESOURCE,
                 "--driver-resource", DRIVER_RESOURCE]


def test_tune_reserves_every_actor_on_its_node_type():
    """examples/train.py runs under Tune, which reserves the whole job as one placement group
    (driver first, then env runners, then learners); the autoscaler launches nodes to fit it."""
    args = add_scaling_args(argparse.ArgumentParser()).parse_args(CLUSTER_FLAGS)
    config = apply_scaling(PPOConfig().environment(StatelessCartPole), args)
    bundles = [{k: v for k, v in b.items() if v} for b in PPO.default_resource_request(config).bundles]
    assert bundles == ([{"CPU": 1, DRIVER_RESOURCE: LABEL_SHARE}]
                       + [{"CPU": 1, ENV_RUNNER_RESOURCE: LABEL_SHARE}] * 32
                       + [{"GPU": 1, LEARNER_RESOURCE: LABEL_SHARE}] * 2)


@pytest.mark.parametrize("flags, message", [
    (["--num-learners", "-1"], "--num-learners must be an int >= 0, got -1"),
    (["--num-env-runners", "1.5"], "--num-env-runners must be an int >= 0, got '1.5'"),
    (["--envs-per-runner", "0"], "--envs-per-runner must be an int >= 1, got 0"),
    (["--gpus-per-learner", "1.5"], "--gpus-per-learner must be at most 1 or a whole number"),
    (["--cpus-per-env-runner", "nan"], "--cpus-per-env-runner must be a positive number, got nan"),
    (["--learner-resource", "GPU"], "--learner-resource must be a custom resource name"),
    (["--learner-resource", LEARNER_RESOURCE], "--learner-resource needs --num-learners >= 1"),
    (["--num-env-runners", "0", "--env-runner-resource", ENV_RUNNER_RESOURCE],
     "--env-runner-resource needs --num-env-runners >= 1"),
])
def test_bad_scaling_flags_name_the_flag(flags, message, capsys):
    parser = add_scaling_args(argparse.ArgumentParser())
    try:
        args = parser.parse_args(flags)
    except SystemExit:  # argparse prints "argument --flag: <what the check says>"
        assert message.replace(" ", ": ", 1) in capsys.readouterr().err
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_scaling(PPOConfig(), args)


def test_apply_scaling_checks_values_that_skipped_the_parser():
    args = add_scaling_args(argparse.ArgumentParser()).parse_args([])
    args.num_learners = True
    with pytest.raises(ValueError, match="--num-learners must be an int >= 0, got True"):
        apply_scaling(PPOConfig(), args)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Head + a learner node + a rollout node, as separate raylets on this machine.

    CPU counts are logical: they only bound how many actors Ray places on each node (enough
    here for both tests' algorithms at once). The head has CPUs too, so an unpinned actor
    could land there and the placement check has teeth.
    """
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    learner_node = cluster.add_node(num_cpus=2, resources={LEARNER_RESOURCE: 2})
    rollout_node = cluster.add_node(num_cpus=4, resources={ENV_RUNNER_RESOURCE: 2})
    # Actors unpickle this module's helpers by reference, so they must find tests/ too.
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ray.shutdown()  # leave any Ray session an earlier test module started (a no-op otherwise)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        yield {"learner": learner_node.node_id, "rollout": rollout_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def build_ppo(*scaling_flags: str) -> Algorithm:
    """PPO + a small GRU encoder on StatelessCartPole, sized and placed by examples/scaling.py."""
    config = (
        PPOConfig()
        .environment(StatelessCartPole)
        .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
        .fault_tolerance(restart_failed_env_runners=True)  # RLlib's default, relied on below
        .debugging(seed=0)
    )
    args = add_scaling_args(argparse.ArgumentParser()).parse_args(
        ["--num-env-runners", "2", "--envs-per-runner", "2", "--env-runner-resource", ENV_RUNNER_RESOURCE,
         *scaling_flags])
    # A GRU state of 520 bytes: large enough for the bytes shipped to tell compact from per-step.
    return with_traj_encoder(apply_scaling(config, args), "gru", max_seq_len=MAX_SEQ_LEN,
                             encoder_config={**ENCODER_CONFIGS["gru"], "d_hidden": GRU_HIDDEN},
                             **SMALL_NETS).build_algo()


@pytest.fixture(scope="module")
def ddp_algo(cluster) -> Iterator[Algorithm]:
    """2 DDP learners pinned to the learner node, 2 env runners pinned to the rollout node."""
    algo = build_ppo("--num-learners", "2", "--learner-resource", LEARNER_RESOURCE)
    yield algo
    algo.stop()


def _node_id(_: Any) -> str:
    return ray.get_runtime_context().get_node_id()


def _ddp_setup(learner: Learner) -> tuple[bool, str, int]:
    return isinstance(learner.module[DEFAULT_MODULE_ID], TorchDDPRLModule), dist.get_backend(), dist.get_world_size()


def _weights(learner: Learner) -> dict[str, np.ndarray]:
    state = learner.module[DEFAULT_MODULE_ID].unwrapped().state_dict()
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


def _recompute_logp_error(learner: Learner, episodes: list) -> float:
    """What the PPO loss starts from: the learner's log-probs minus the rollout's, on ``episodes``."""
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes,
                                       shared_data={}, metrics=learner.metrics)
    with torch.no_grad():
        return logp_error(learner.module[DEFAULT_MODULE_ID].unwrapped(), batch[DEFAULT_MODULE_ID])


def _sample(runner: EnvRunner) -> list:
    """Several sample() calls, so chunks continue episodes from the previous call."""
    return [e for _ in range(4) for e in runner.sample(num_timesteps=60, explore=True)]


def _on_learners(algo: Algorithm, func, **kwargs) -> list:
    results = list(algo.learner_group.foreach_learner(func, **kwargs))
    for result in results:
        if not result.ok:
            raise result.get()
    return [result.get() for result in results]


def _on_runners(algo: Algorithm, func, **kwargs) -> list:
    return algo.env_runner_group.foreach_env_runner(func, local_env_runner=False, **kwargs)


def test_actors_run_on_their_labelled_nodes_and_ddp_keeps_learners_equal(cluster, ddp_algo):
    assert _on_runners(ddp_algo, _node_id) == [cluster["rollout"]] * 2
    assert _on_learners(ddp_algo, _node_id) == [cluster["learner"]] * 2
    # Ray 2.60's TorchLearner wraps the module in DDP when num_learners > 1, and Ray Train's
    # torch backend picks gloo when the learners have no GPU.
    assert _on_learners(ddp_algo, _ddp_setup) == [(True, "gloo", 2)] * 2

    before = _on_learners(ddp_algo, _weights)[0]
    for _ in range(2):
        result = ddp_algo.train()
    assert np.isfinite(result["learners"][DEFAULT_MODULE_ID]["total_loss"])
    first, second = _on_learners(ddp_algo, _weights)
    assert any(not np.array_equal(before[k], first[k]) for k in first)  # they did learn
    # Each learner trained on its own shard; DDP's gradient all-reduce keeps them equal.
    for name in first:
        np.testing.assert_allclose(first[name], second[name], rtol=0, atol=1e-6, err_msg=name)


def test_each_learner_recomputes_rollout_logp_on_its_shard(ddp_algo):
    """With 2+ learners, LearnerGroup.update shards the episodes by length and cuts a chunk in
    two where a shard is full. Both pieces must still start from the right encoder state, which
    the compact store gives them (replaying from a snapshot where a row starts mid-row)."""
    episodes = [e for per_runner in _on_runners(ddp_algo, _sample) for e in per_runner]
    # The hard case: a chunk that continues an episode, cut in the middle of a learner row.
    chunk = max((e for e in episodes if e.t_started > 0 and len(e) // 2 % MAX_SEQ_LEN), key=len)
    # Exactly the split LearnerGroup.update makes before it sends the shards to the learners.
    shards = [shard.episodes for shard, _ in TrainingData(episodes=[chunk]).shard(
        num_shards=2, len_lookback_buffer=ddp_algo.config.episode_lookback_horizon, minibatch_size=32)]
    assert [(e.t_started, len(e)) for [e] in shards] == [
        (chunk.t_started, len(chunk) // 2), (chunk.t_started + len(chunk) // 2, len(chunk) - len(chunk) // 2)]
    for shard in shards:
        assert max(_on_learners(ddp_algo, _recompute_logp_error, episodes=shard)) <= 1e-4

    # Compact storage with several learners, by the bytes shipped: the shards of the whole
    # sample carry a snapshot every MAX_SEQ_LEN steps and one per continued chunk, not a state per step.
    shards = [shard.episodes for shard, _ in TrainingData(episodes=episodes).shard(
        num_shards=2, len_lookback_buffer=ddp_algo.config.episode_lookback_horizon, minibatch_size=32)]
    assert not any(Columns.STATE_OUT in e.extra_model_outputs for shard in shards for e in shard)
    full_state = 4 * GRU_HIDDEN + 8  # float32 h, int64 t
    per_step = sum(shipped_state_bytes(shard) for shard in shards) / sum(len(e) for e in episodes)
    assert per_step < full_state / 3, (per_step, full_state)


def test_killed_env_runner_restarts_and_stateful_encoder_resumes(cluster):
    # One learner in the driver: this test is about env runners (sharding is tested above).
    algo = build_ppo("--num-learners", "0")
    try:
        ids = algo.env_runner_group.healthy_worker_ids()
        victim = ids[-1]
        pids = dict(zip(ids, _on_runners(algo, lambda _: os.getpid())))
        ray.kill(algo.env_runner_group._worker_manager.actors()[victim], no_restart=False)

        # Training goes on with the other runner until Ray has restarted the victim (a new
        # process has to import torch and build its env and module) and RLlib's health probe
        # at the start of an iteration brings it back; then 2 more iterations with both.
        deadline = time.monotonic() + 90
        algo.train()
        while algo.env_runner_group.healthy_worker_ids() != ids:
            assert time.monotonic() < deadline, "the killed env runner never came back"
            algo.train()
        for _ in range(2):
            result = algo.train()
            assert np.isfinite(result["learners"][DEFAULT_MODULE_ID]["total_loss"])
        # A new process, on the rollout node again.
        new_pids = dict(zip(ids, _on_runners(algo, lambda _: os.getpid())))
        assert new_pids[victim] != pids[victim] and new_pids[ids[0]] == pids[ids[0]]
        assert _on_runners(algo, _node_id, remote_worker_ids=[victim]) == [cluster["rollout"]]

        # The new process began its episodes from the initial state (the compact store lives
        # in each episode, so nothing of the old process is needed) and has the learner's
        # weights: the learner recomputes its rollout log-probs, including chunks that
        # continue an episode across sample() calls, whose state comes from the store.
        [episodes] = _on_runners(algo, _sample, remote_worker_ids=[victim])
        assert any(e.t_started > 0 for e in episodes) and any(e.t_started == 0 for e in episodes)
        assert _on_learners(algo, _recompute_logp_error, episodes=episodes)[0] <= 1e-4
    finally:
        algo.stop()
