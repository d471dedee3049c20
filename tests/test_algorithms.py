"""IMPALA and APPO train every encoder, the encoder's diagnostics reach ``algo.train()``, and the
learner's gradients reach earlier steps through the encoder's state."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.impala import IMPALAConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole
from ray.rllib.utils.metrics import LEARNER_RESULTS

from conftest import (
    ENCODERS, build_module, logp_error, ppo_config, sample_and_recompute, with_small_encoder,
)

# Each algorithm with the loss terms its Learner reports.
ALGORITHMS: dict[str, tuple[Callable[[], AlgorithmConfig], tuple[str, ...]]] = {
    "impala": (IMPALAConfig, ("mean_pi_loss", "mean_vf_loss")),
    # The KL term makes the loss use the target networks (forward_target).
    "appo": (lambda: APPOConfig().training(use_kl_loss=True), ("policy_loss", "vf_loss", "mean_kl_loss")),
}


def build(config: AlgorithmConfig, encoder: str, **learners: Any) -> Algorithm:
    """A local-only algorithm (env runner and learner in this process) on StatelessCartPole."""
    config = (
        config.environment(StatelessCartPole)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2, rollout_fragment_length=16)
        .learners(num_learners=0, **learners)
        .training(train_batch_size_per_learner=32)
        .reporting(min_time_s_per_iteration=0)
        .debugging(seed=0)
    )
    return with_small_encoder(config, encoder).build_algo()


def train_until_reported(algo: Algorithm, key: str, min_iters: int = 2, max_iters: int = 10) -> dict[str, Any]:
    """Trains at least ``min_iters`` iterations, and on until the learner reports ``key``:
    IMPALA and APPO learn in a background thread, so an iteration may end before its update."""
    for i in range(max_iters):
        stats = algo.train().get(LEARNER_RESULTS, {}).get(DEFAULT_MODULE_ID, {})
        if i + 1 >= min_iters and key in stats:
            return stats
    raise AssertionError(f"no {key!r} in the learner results after {max_iters} iterations")


def diagnostic_names(encoder: str) -> set[str]:
    """The names a traj encoder of this kind writes into a log_dict."""
    traj_encoder = build_module(encoder=encoder).traj_encoder
    log_dict: dict[str, torch.Tensor] = {}
    traj_encoder(torch.zeros(1, 1, traj_encoder.tstep_dim), torch.zeros(1, 1, 1, dtype=torch.long), log_dict=log_dict)
    return set(log_dict)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_trains(ray_session, algorithm, encoder):
    make_config, loss_keys = ALGORITHMS[algorithm]
    algo = build(make_config(), encoder)
    try:
        # V-trace's importance weights start at exactly 1: the learner recomputes the rollout.
        _, batch, module = sample_and_recompute(algo)
        assert logp_error(module, batch) <= 1e-4
        before = [p.detach().clone() for p in module.traj_encoder.parameters()]
        stats = train_until_reported(algo, loss_keys[0])
        assert all(np.isfinite(stats[key]) for key in loss_keys), stats
        assert any(not torch.equal(a, b) for a, b in zip(before, module.traj_encoder.parameters()))
        assert diagnostic_names(encoder) <= set(stats)
        if algorithm == "appo":
            assert len(module.get_target_network_pairs()) == 3
    finally:
        algo.stop()


def test_impala_with_an_aggregator_actor(ray_session):
    """The aggregator builds the train batch in another process, from the episodes' stores."""
    algo = build(IMPALAConfig(), "transformer", num_aggregator_actors_per_learner=1)
    try:
        stats = train_until_reported(algo, "mean_pi_loss", max_iters=20)
        assert np.isfinite(stats["mean_pi_loss"]) and np.isfinite(stats["transformer/residual_norm"])
    finally:
        algo.stop()


def test_diagnostics_reach_ppo_results(ray_session):
    algo = with_small_encoder(ppo_config(), "transformer").build_algo()
    try:
        stats = algo.train()[LEARNER_RESULTS][DEFAULT_MODULE_ID]
    finally:
        algo.stop()
    for name in ("transformer/residual_norm", "transformer/sigma_reparam_scale"):
        assert np.isfinite(stats[name]) and stats[name] > 0, name


@pytest.mark.parametrize("encoder", [name for name in ENCODERS if name != "ff"])
def test_learner_gradients_reach_earlier_steps_through_the_state(ray_session, encoder):
    """On PPO's train batch, the action at the last step of a learner row gets a gradient from
    the row's first observation: the loss trains the memory, not only the current step."""
    algo = with_small_encoder(ppo_config(), encoder).build_algo()
    try:
        _, batch, module = sample_and_recompute(algo)
    finally:
        algo.stop()
    full_rows = batch[Columns.LOSS_MASK].bool().all(dim=1)
    assert full_rows.any(), "no learner row without padding"
    obs = batch[Columns.OBS].detach().requires_grad_(True)
    logits = module.forward_train({**batch, Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    (grad,) = torch.autograd.grad(logits[full_rows, -1].sum(), obs)
    assert (grad[full_rows, 0].abs().amax(dim=-1) > 0).all()
