"""Several learners: LearnerGroup.update shards the sampled episode chunks by cutting them at
arbitrary steps. Every learner still starts every row from the rollout's state, and the state
shipped stays the compact store's."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData

from conftest import ENCODERS, MAX_SEQ_LEN, logp_error, ppo_config, with_small_encoder
from rllib_trajenc.rllib.compact_state import STORE_COLUMN, shipped_state_bytes


def shard(episodes: list, num_learners: int, lookback: int) -> list[list]:
    """Exactly the split LearnerGroup.update makes, each shard shipped as Ray ships it."""
    shards = TrainingData(episodes=episodes).shard(num_shards=num_learners, len_lookback_buffer=lookback,
                                                  minibatch_size=32)
    return [pickle.loads(pickle.dumps(part.episodes)) for part, _ in shards]


def offset(piece) -> int:
    """Where ``piece`` starts in the episode chunk it was cut from."""
    return piece.t_started - piece.get_extra_model_outputs(STORE_COLUMN, 0).t_started


@pytest.mark.parametrize("encoder", [name for name in ENCODERS if name != "ff"])  # FF keeps no state
def test_every_learner_recomputes_the_rollout_on_its_shard(ray_session, encoder):
    algo = with_small_encoder(ppo_config(), encoder).build_algo()
    try:
        # As the driver receives them: several sample() calls, so chunks continue episodes.
        episodes = pickle.loads(pickle.dumps(
            [e for _ in range(4) for e in algo.env_runner.sample(num_timesteps=60, explore=True)]))
        learner = algo.learner_group._learner
        unsharded = shipped_state_bytes(episodes)
        for num_learners in (2, 4):
            shards = shard(episodes, num_learners, algo.config.episode_lookback_horizon)
            # The hard case for sure: a chunk that continues an episode, cut mid-row.
            chunk = max((e for e in episodes if e.t_started > 0 and len(e) // num_learners % MAX_SEQ_LEN),
                        key=len)
            pieces = shard([chunk], num_learners, algo.config.episode_lookback_horizon)
            mid_row = [any(offset(e) % MAX_SEQ_LEN for e in part) for part in shards + pieces]
            assert any(mid_row)
            for part, starts_mid_row in zip(shards + pieces, mid_row):
                # Each learner holds its own module: a train-mode forward may change it (the
                # Transformer's sigma-reparam steps its power iteration).
                module = copy.deepcopy(learner.module)
                batch = learner._learner_connector(rl_module=module, batch={}, episodes=part,
                                                   shared_data={}, metrics=learner.metrics)[DEFAULT_MODULE_ID]
                with torch.no_grad():
                    assert logp_error(module[DEFAULT_MODULE_ID], batch) <= 1e-4
                    if starts_mid_row:  # teeth: the replayed states matter
                        zeros = {k: torch.zeros_like(v) for k, v in batch[Columns.STATE_IN].items()}
                        fresh = copy.deepcopy(learner.module)[DEFAULT_MODULE_ID]
                        assert logp_error(fresh, {**batch, Columns.STATE_IN: zeros}) > 1e-3
            # Each cut chunk's store travels with each of its pieces, nothing per step: the
            # shards together carry about what the whole chunks did.
            sharded = sum(shipped_state_bytes(part) for part in shards)
            print(f"{encoder}, {num_learners} learners: {sharded} state bytes shipped, {unsharded} unsharded")
            assert sharded <= 1.3 * unsharded + 500 * num_learners
    finally:
        algo.stop()
