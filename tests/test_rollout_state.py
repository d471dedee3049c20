"""Rollout steps update the encoder state in place only where the batch owns it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rllib_trajenc.rllib.module import FRESH_STATE_IN, TrajEncoderRLModule
from test_rllib_module import (  # noqa: F401 (ray_session is a fixture)
    build_module, logp_error, ppo_config, ray_session, sample_and_recompute, with_small_encoder,
)

IN_PLACE = ["mamba", "transformer"]


def initial_views(module: TrajEncoderRLModule, n: int) -> dict[str, torch.Tensor]:
    """STATE_IN as a hand-written inference loop builds it: views of the cached initial state."""
    return {k: torch.from_numpy(np.expand_dims(v, 0)).expand(n, *v.shape) if n > 1
            else torch.from_numpy(np.expand_dims(v, 0)) for k, v in module.get_initial_state().items()}


def fresh_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("encoder", IN_PLACE)
def test_env_runner_steps_update_the_state_in_place_and_stay_exact(ray_session, encoder):
    algo = with_small_encoder(ppo_config(), encoder).build_algo()
    try:
        traj_encoder = algo.env_runner.module.traj_encoder
        calls: list[bool] = []
        original = traj_encoder.forward

        def spy(*args, **kwargs):
            calls.append(kwargs.get("in_place", False))
            return original(*args, **kwargs)

        traj_encoder.forward = spy
        episodes, batch, module = sample_and_recompute(algo)
        assert calls and all(calls), "every rollout step takes the in-place path"
        assert logp_error(module, batch) <= 1e-4
    finally:
        algo.stop()


@pytest.mark.parametrize("encoder", IN_PLACE)
def test_a_callers_state_is_left_alone(encoder):
    module = build_module(encoder=encoder)
    obs, state = torch.randn(3, 1, 2), fresh_copy(initial_views(module, 3))
    first = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state})
    second = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state})
    assert torch.equal(first[Columns.ACTION_DIST_INPUTS], second[Columns.ACTION_DIST_INPUTS])
    assert all(not v.any() for k, v in state.items())  # still the fresh-episode state
    assert all(first[Columns.STATE_OUT][k] is not state[k] for k in state)


@pytest.mark.parametrize("encoder", IN_PLACE)
@pytest.mark.parametrize("n_envs", [1, 3])
def test_a_fresh_state_in_is_updated_in_place_but_never_the_cached_initial_state(encoder, n_envs):
    module = build_module(encoder=encoder)
    obs = torch.randn(n_envs, 1, 2)
    expected = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: initial_views(module, n_envs)})
    views = initial_views(module, n_envs)
    out = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: views, FRESH_STATE_IN: [True]})
    assert all(not np.any(v) for v in module.get_initial_state().values())
    owned = fresh_copy(views)
    out_owned = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: owned, FRESH_STATE_IN: [True]})
    big = max(owned, key=lambda k: owned[k].numel())
    assert out_owned[Columns.STATE_OUT][big] is owned[big]  # no copy of the large state
    for result in (out, out_owned):  # Mamba's single-step recurrence vs its scan: rounding only
        torch.testing.assert_close(result[Columns.ACTION_DIST_INPUTS], expected[Columns.ACTION_DIST_INPUTS],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(result[Columns.STATE_OUT], expected[Columns.STATE_OUT], atol=1e-5, rtol=0)
