"""Compact state storage: the learner still recomputes the rollout, with far fewer bytes."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rllib_trajenc.rllib import TrajEncoderRLModule
from rllib_trajenc.rllib.compact_state import STORE_KEY, StateStore, chunk_store, stored_state_bytes
from conftest import MAX_SEQ_LEN, logp_error, ppo_config, sample_and_recompute, with_small_encoder

STATEFUL = ["gru", "mamba", "transformer"]


def state_bytes_per_step(episodes: list) -> float:
    return sum(stored_state_bytes(e) for e in episodes) / sum(len(e) for e in episodes)


@pytest.mark.parametrize("encoder", STATEFUL)
def test_compact_store_is_exact_and_smaller_than_rllib_default(ray_session, encoder):
    """Same rollout, same learner log-probs; the store holds a fraction of RLlib's per-step state."""
    compact = with_small_encoder(ppo_config(), encoder).build_algo()
    model_config = compact.config.rl_module_spec.model_config
    default = ppo_config().rl_module(rl_module_spec=RLModuleSpec(
        module_class=TrajEncoderRLModule, model_config=model_config)).build_algo()
    try:
        measured = {}
        for name, algo in (("compact", compact), ("default", default)):
            episodes, batch, module = sample_and_recompute(algo)
            assert logp_error(module, batch) <= 1e-4, name
            measured[name] = state_bytes_per_step(episodes)
        stored = [e for e in episodes if Columns.STATE_OUT in e.extra_model_outputs]
        assert stored, "RLlib's default path stores STATE_OUT every step"
        print(f"{encoder}: state bytes/step compact {measured['compact']:.0f}, "
              f"RLlib default {measured['default']:.0f}")
        assert measured["compact"] < measured["default"] / 2
    finally:
        compact.stop()
        default.stop()


def test_snapshots_sit_where_the_learner_starts_its_rows(ray_session):
    algo = with_small_encoder(ppo_config(), "gru").build_algo()
    try:
        episodes = [e for _ in range(4) for e in algo.env_runner.sample(num_timesteps=40, explore=True)]
    finally:
        algo.stop()
    for episode in episodes:
        store = episode.custom_data[STORE_KEY]
        # One per learner row, plus the bootstrap row's start when the length is a multiple.
        assert sorted(store.snapshots) == list(range(0, len(episode) + 1, MAX_SEQ_LEN))
        # The fresh-episode state is never stored; every other snapshot is.
        assert (store.snapshots[0] is None) == (episode.t_started == 0)
        assert all(store.snapshots[o] is not None for o in store.snapshots if o > 0)
        # The running state stays on the env runner: a learner receives snapshots only.
        shipped = pickle.loads(pickle.dumps(episode))
        assert shipped.custom_data[STORE_KEY].running is None
        assert sorted(shipped.custom_data[STORE_KEY].snapshots) == sorted(store.snapshots)


def test_cutting_an_episode_starts_the_successor_from_the_state_at_the_cut():
    """RLlib cuts by deep-copying custom_data, before the successor's first step updates the
    running row in place: the copy's record of it becomes the successor's snapshot 0."""
    running = {"h": np.ones(3, np.float32)}
    store = StateStore(t_started=5, running=running)
    store.snapshots[0] = {"h": np.zeros(3, np.float32)}
    copied = copy.deepcopy({STORE_KEY: store})[STORE_KEY]
    assert copied.running is store.running and copied.snapshots == store.snapshots
    running["h"] += 1.0  # the successor's first step
    successor = SingleAgentEpisode(t_started=9)
    successor.custom_data[STORE_KEY] = copied
    started = chunk_store(successor)
    assert started.t_started == 9 and sorted(started.snapshots) == [0]
    assert started.state_before(0)["h"].tolist() == [1.0, 1.0, 1.0] and started.running is running


def test_missing_snapshot_is_reported():
    store = StateStore(t_started=0)
    store.snapshot(0, 8)
    store.snapshot(3, 8)  # no learner row starts at step 3
    assert store.snapshots == {0: None} and store.state_before(0) is None
    with pytest.raises(ValueError, match=r"no stored encoder state before step 8 .* offsets: \[0\]"):
        store.state_before(8)


class CountCalls(ConnectorV2):
    calls = 0

    def __call__(self, *, batch, **kwargs):
        CountCalls.calls += 1
        return batch


def test_user_connectors_are_kept_and_installing_twice_does_not_nest(ray_session):
    config = ppo_config().env_runners(env_to_module_connector=lambda env, spaces, device: CountCalls())
    for _ in range(2):
        config = with_small_encoder(config, "gru")
    pieces = config.build_env_to_module_connector(spaces=None).connectors
    names = [type(p).__name__ for p in pieces]
    assert names[0] == "CountCalls" and names.count("AddStatesFromEpisodeStore") == 1


def test_several_learners_keep_rllibs_per_step_state():
    """RLlib splits episode chunks to shard them across learners; splits drop custom_data."""
    config = with_small_encoder(ppo_config().learners(num_learners=2), "gru")
    assert config._module_to_env_connector is None and config._learner_connector is None


def test_a_chunk_without_store_gets_a_clear_error(ray_session):
    algo = with_small_encoder(ppo_config(), "gru").build_algo()
    try:
        episodes = algo.env_runner.sample(num_timesteps=30, explore=True)
        split = episodes[0].slice(slice(1, None))  # what RLlib's learner sharding makes
        learner = algo.learner_group._learner
        with pytest.raises(ValueError, match="set config.learners\\(num_learners=...\\) before"):
            learner._learner_connector(rl_module=learner.module, batch={}, episodes=[split],
                                       shared_data={}, metrics=learner.metrics)
    finally:
        algo.stop()
