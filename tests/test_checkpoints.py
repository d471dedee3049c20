"""Checkpoints: a restored Algorithm or RLModule acts exactly like the one that was saved."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from rllib_trajenc.rllib import TrajEncoderRLModule
from rllib_trajenc.rllib.compact_state import STORE_KEY
from rllib_trajenc.rllib.connectors import _UserPiecesThen
from conftest import logp_error, ppo_config, sample_and_recompute, with_small_encoder

Outputs = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", params=["mamba", "transformer"])
def saved(request, ray_session, tmp_path_factory) -> Iterator[tuple[Algorithm, Path]]:
    """A PPO trained for one iteration (so its weights are not the seeded initial ones), saved."""
    algo = with_small_encoder(ppo_config(), request.param).build_algo()
    algo.train()
    path = algo.save(tmp_path_factory.mktemp(request.param)).checkpoint.path
    yield algo, Path(path)
    algo.stop()


def act(module: TrajEncoderRLModule, obs: torch.Tensor, state: dict[str, torch.Tensor]) -> Outputs:
    """(action logits, deterministic actions, STATE_OUT) for obs [B, 1, ...] after ``state``."""
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state})
    logits = out[Columns.ACTION_DIST_INPUTS]
    actions = module.get_inference_action_dist_cls().from_logits(logits).to_deterministic().sample()
    return logits, actions, out[Columns.STATE_OUT]


def mid_episode_inputs(module: TrajEncoderRLModule, n_envs: int = 3, steps: int = 5) -> tuple[torch.Tensor, dict]:
    """An observation and the state after ``steps`` random steps of ``n_envs`` episodes."""
    torch.manual_seed(1)
    state = {k: torch.as_tensor(v).expand(n_envs, *v.shape) for k, v in module.get_initial_state().items()}
    for _ in range(steps):
        state = act(module, torch.randn(n_envs, 1, 2), state)[2]
    return torch.randn(n_envs, 1, 2), state


def assert_same_outputs(restored: TrajEncoderRLModule, original: TrajEncoderRLModule) -> None:
    obs, state = mid_episode_inputs(original)
    (logits, actions, state_out), expected = act(restored, obs, state), act(original, obs, state)
    assert torch.equal(logits, expected[0]) and torch.equal(actions, expected[1])
    assert state_out.keys() == expected[2].keys()
    assert all(torch.equal(state_out[k], expected[2][k]) for k in state_out)


def test_algorithm_round_trip(saved):
    algo, path = saved
    restored = Algorithm.from_checkpoint(path)
    try:
        assert_same_outputs(restored.get_module(), algo.get_module())
        # The pickled config still brings the compact state pieces, on both sides: the restored
        # env runner fills the stores and the restored learner recomputes the rollout from them.
        assert isinstance(restored.config._env_to_module_connector, _UserPiecesThen)
        episodes, batch, module = sample_and_recompute(restored)
        assert all(STORE_KEY in e.custom_data and Columns.STATE_OUT not in e.extra_model_outputs
                   for e in episodes)
        assert logp_error(module, batch) <= 1e-4
    finally:
        restored.stop()


def test_rl_module_round_trip(saved):
    algo, path = saved
    restored = RLModule.from_checkpoint(
        path / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE / DEFAULT_MODULE_ID)
    assert isinstance(restored, TrajEncoderRLModule)
    assert_same_outputs(restored, algo.learner_group._learner.module[DEFAULT_MODULE_ID])
