"""Compact state storage: the learner still recomputes the rollout, with far fewer bytes, and
the store stays honest through RLlib's cuts, deep copies and pickling."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rllib_trajenc.rllib import TrajEncoderRLModule
from rllib_trajenc.rllib.compact_state import (
    STORE_COLUMN, STORE_KEY, StateStore, chunk_store, shipped_state_bytes,
)
from conftest import MAX_SEQ_LEN, logp_error, ppo_config, sample_and_recompute, with_small_encoder

STATEFUL = ["gru", "mamba", "transformer"]


def state_bytes_per_step(episodes: list) -> float:
    return shipped_state_bytes(episodes) / sum(len(e) for e in episodes)


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


def sample(algo, calls: int = 4) -> list:
    """Several sample() calls, so that chunks continue episodes."""
    return [e for _ in range(calls) for e in algo.env_runner.sample(num_timesteps=40, explore=True)]


def snapshot_bytes(store: StateStore) -> int:
    return sum(value.nbytes for state in store.snapshots.values() if state is not None
               for value in state.values())


def test_snapshots_sit_where_the_learner_starts_its_rows_and_pickling_ships_only_those(ray_session):
    algo = with_small_encoder(ppo_config(), "gru").build_algo()
    try:
        episodes = sample(algo)
    finally:
        algo.stop()
    for episode in episodes:
        store = episode.custom_data[STORE_KEY]
        # One per learner row (and, on the env runner, one where a bootstrap row would start).
        assert sorted(store.snapshots) == list(range(0, len(episode) + 1, MAX_SEQ_LEN))
        # The fresh-episode state is never stored; every other snapshot is.
        assert (store.snapshots[0] is None) == (episode.t_started == 0)
        assert all(store.snapshots[o] is not None for o in store.snapshots if o > 0)
        # Every step refers to the store: that is what RLlib's slices keep.
        assert all(ref is store for ref in episode.get_extra_model_outputs(STORE_COLUMN))

        shipped = pickle.loads(pickle.dumps(episode))
        kept = shipped.custom_data[STORE_KEY]
        # Snapshots before the chunk's own steps (the state after its last step is the
        # successor's start, shipped there); no running state; the episode's own observations.
        assert sorted(kept.snapshots) == list(range(0, len(episode), MAX_SEQ_LEN))
        assert kept.running is None and kept.state_at_copy is None
        assert kept.observations.data is shipped.observations.data
        assert shipped.get_extra_model_outputs(STORE_COLUMN, 0) is kept
        # So the store costs its snapshots plus a reference per step, not a second copy of the
        # observations (pickle's memo ships the shared array once).
        extra = shipped_state_bytes([episode]) - snapshot_bytes(kept)
        assert 0 <= extra <= 400 + 8 * len(episode), extra
        assert episode.observations.data.nbytes > 8 * len(episode)  # a copy would show


def test_deep_copies_keep_their_own_stores_and_the_learner_recomputes_from_them(ray_session):
    algo = with_small_encoder(ppo_config(), "gru").build_algo()
    try:
        episodes = sample(algo)
        copies = copy.deepcopy(episodes)
        for original, copied in zip(episodes, copies):
            store, kept = original.custom_data[STORE_KEY], copied.custom_data[STORE_KEY]
            assert kept is not store and sorted(kept.snapshots) == sorted(store.snapshots)
            for offset, state in store.snapshots.items():
                if state is not None:
                    assert all(kept.snapshots[offset][k] is not v and np.array_equal(kept.snapshots[offset][k], v)
                               for k, v in state.items())
            assert kept.observations.data is copied.observations.data  # the copy's own
            assert all(ref is kept for ref in copied.get_extra_model_outputs(STORE_COLUMN))
        learner = algo.learner_group._learner
        batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=copies,
                                           shared_data={}, metrics=learner.metrics)
        assert logp_error(learner.module[DEFAULT_MODULE_ID], batch[DEFAULT_MODULE_ID]) <= 1e-4
    finally:
        algo.stop()


def test_a_cut_starts_a_fresh_store_from_the_state_at_the_cut():
    """RLlib cuts by deep-copying custom_data, before the successor's first step updates the
    running row in place: the copy's record of it becomes the successor's snapshot 0, and the
    successor's lookback steps refer to its own store, not to the predecessor's."""
    running = {"h": np.zeros(3, np.float32)}
    episode = SingleAgentEpisode()
    episode.add_env_reset(observation=np.zeros(2, np.float32))
    for t in range(3):
        episode.add_env_step(observation=np.full(2, t + 1, np.float32), action=0, reward=0.0)
        store = chunk_store(episode)
        store.running = running
        running["h"] += 1.0  # the next step, in place
    successor = episode.cut(len_lookback_buffer=2)
    running["h"] += 1.0  # the successor's first step
    successor.add_env_step(observation=np.zeros(2, np.float32), action=0, reward=0.0)
    started = chunk_store(successor)
    assert started is not store and started.t_started == 3 and sorted(started.snapshots) == [0]
    assert started.snapshots[0]["h"].tolist() == [3.0, 3.0, 3.0] and started.running is running
    column = successor.extra_model_outputs[STORE_COLUMN]
    assert column.lookback == 2 and all(ref is started for ref in column.data)
    assert store.t_started == 0 and episode.custom_data[STORE_KEY] is store  # the predecessor's stays


def test_a_row_too_far_from_any_snapshot_is_reported():
    store = StateStore(t_started=0)
    store.snapshots[0] = None
    with pytest.raises(ValueError, match=r"no stored encoder state within max_seq_len=8 steps before "
                                         r"step 9 of an episode chunk; stored offsets: \[0\]"):
        store.states_before([9], module=None, max_seq_len=8)


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


def test_a_chunk_without_store_gets_a_clear_error(ray_session):
    algo = with_small_encoder(ppo_config(), "gru").build_algo()
    try:
        episode = algo.env_runner.sample(num_timesteps=30, explore=True)[0].slice(slice(1, None))
        del episode.extra_model_outputs[STORE_COLUMN]  # sampled without with_traj_encoder's pieces
        learner = algo.learner_group._learner
        with pytest.raises(ValueError, match="carries no rllib_trajenc encoder state: it was not sampled"):
            learner._learner_connector(rl_module=learner.module, batch={}, episodes=[episode],
                                       shared_data={}, metrics=learner.metrics)
    finally:
        algo.stop()
