"""How episodes reach the learner on a long-memory task: whole, and never the same ones twice.

A learner row cut from an episode's middle starts from the state the env runner stored, through
which no gradient reaches the steps before the cut; delayed_recall_400 keeps each 402-step episode
whole with fragments of exactly that length. RLlib's own way to whole episodes,
batch_mode="complete_episodes", replays the same seeded episodes at every sample(), which
with_traj_encoder refuses.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from examples.tasks import TASKS, register
from rllib_trajenc import with_traj_encoder
from rllib_trajenc.envs import DelayedRecall

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def first_obs(episodes) -> list[np.ndarray]:
    return [np.asarray(e.get_observations(0)) for e in episodes]


def test_rllib_replays_seeded_episodes_under_complete_episodes():
    """The upstream behaviour the refusal below guards against (fails once RLlib changes it)."""
    config = (PPOConfig().environment(DelayedRecall, env_config={"delay": 3})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=2, batch_mode="complete_episodes")
              .debugging(seed=0))
    runner = SingleAgentEnvRunner(config=config)
    try:
        first, second = runner.sample(), runner.sample()
        assert len(first) == len(second) == 2
        for a, b in zip(first, second):
            np.testing.assert_array_equal(np.asarray(a.get_observations()), np.asarray(b.get_observations()))
    finally:
        runner.stop()


def test_complete_episodes_with_a_seed_is_refused():
    config = PPOConfig().env_runners(batch_mode="complete_episodes").debugging(seed=3)
    with pytest.raises(ValueError, match=r"batch_mode='complete_episodes' with seed=3 replays the same episodes"):
        with_traj_encoder(config, "gru", max_seq_len=8)
    with_traj_encoder(config.debugging(seed=None), "gru", max_seq_len=8)


def test_delayed_recall_400_samples_whole_fresh_episodes():
    from vs_rllib_lstm import build  # the config the comparison in BENCHMARKS.md ran

    task = TASKS["delayed_recall_400"]
    register(task)
    runner = SingleAgentEnvRunner(config=build(task, "ff", seed=0, envs=2))
    episode_len = task.env_config["delay"] + 2
    try:
        samples = [runner.sample() for _ in range(3)]
        for episodes in samples:
            assert [(e.t_started, len(e), e.is_done) for e in episodes] == [(0, episode_len, True)] * 2
        # The third sample's episodes are new ones, not the first's again.
        assert not any(np.array_equal(a, b) for a, b in zip(first_obs(samples[0]), first_obs(samples[2])))
    finally:
        runner.stop()
