"""Shared fixtures and helpers: small encoders and modules, a seeded RNG, a local Ray, and the
learner-recomputes-the-rollout check. Test modules import the helpers from here, never from
each other."""
from __future__ import annotations

from typing import Any, Iterator

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole

import rllib_trajenc as rt
from rllib_trajenc.rllib import TrajEncoderRLModule, with_traj_encoder

# Tests use tiny tensors: one thread avoids two threads waiting on each other on 2-core CI.
torch.set_num_threads(1)

TSTEP_DIM = 5
MAX_SEQ_LEN = 8

# Small sizes so the whole suite runs on 2 CPU cores; dropout off so eval and train agree.
SMALL_ENCODERS = {
    "ff": lambda: rt.FFTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=32, n_layers=2),
    "gru": lambda: rt.GRUTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_hidden=24, n_layers=2, d_output=32),
    "mamba": lambda: rt.MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=32, d_state=8, n_layers=2),
    "transformer": lambda: rt.TformerTrajEncoder(
        TSTEP_DIM, MAX_SEQ_LEN, d_model=32, n_heads=4, d_ff=64, n_layers=2,
        dropout_ff=0.0, dropout_emb=0.0),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=list(SMALL_ENCODERS))
def encoder_name(request) -> str:
    return request.param


@pytest.fixture
def encoder(encoder_name: str) -> rt.TrajEncoder:
    return SMALL_ENCODERS[encoder_name]().eval()


@pytest.fixture(params=[name for name in SMALL_ENCODERS if name != "ff"])
def stateful_encoder(request) -> rt.TrajEncoder:
    return SMALL_ENCODERS[request.param]().eval()


def episode_inputs(batch: int, steps: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random timestep embeddings and their episode time indices [B, T, 1]."""
    seq = torch.randn(batch, steps, TSTEP_DIM)
    time_idxs = (start + torch.arange(steps)).view(1, steps, 1).expand(batch, steps, 1)
    return seq, time_idxs


# The RLlib module's small sizes, so every test runs in seconds on 2 CPU cores. Dropout is zero
# everywhere: the learner runs forward_train in train mode and the env runner runs in eval mode,
# so any dropout would make the learner's log-probs differ from the rollout's by construction.
ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "ff": dict(d_model=16, d_ff=32, dropout=0.0),
    "gru": dict(d_hidden=16, n_layers=1, d_output=16),
    "mamba": dict(d_model=16, d_state=4, n_layers=2),
    "transformer": dict(d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout_ff=0.0, dropout_emb=0.0),
}
ENCODERS = list(ENCODER_CONFIGS)
SMALL_NETS = dict(tstep_dim=16, tstep_hiddens=[16], head_hiddens=[16])

CARTPOLE_OBS = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


def model_config(encoder: str = "gru", **overrides: Any) -> dict[str, Any]:
    return {"traj_encoder": encoder, "traj_encoder_config": ENCODER_CONFIGS[encoder],
            "max_seq_len": MAX_SEQ_LEN, **SMALL_NETS, **overrides}


def build_module(obs_space: gym.Space = CARTPOLE_OBS, action_space: gym.Space = gym.spaces.Discrete(2),
                 **config: Any) -> TrajEncoderRLModule:
    return RLModuleSpec(module_class=TrajEncoderRLModule, observation_space=obs_space,
                        action_space=action_space, model_config=model_config(**config)).build()


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    # A Ray of our own: without address="local", ray.init joins any cluster running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def ppo_config() -> PPOConfig:
    """A local-only PPO (env runner and learner in this process) on StatelessCartPole."""
    return (
        PPOConfig()
        .environment(StatelessCartPole)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=3)
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
        .debugging(seed=0)
    )


def with_small_encoder(config: AlgorithmConfig, encoder: str) -> AlgorithmConfig:
    """``config`` with a TrajEncoderRLModule of ``encoder`` at this file's small sizes."""
    return with_traj_encoder(config, encoder, max_seq_len=MAX_SEQ_LEN,
                             encoder_config=ENCODER_CONFIGS[encoder], **SMALL_NETS)


def logp_error(module: TrajEncoderRLModule, batch: dict[str, Any]) -> float:
    """Max |learner log-prob - rollout log-prob| over the steps the loss uses."""
    out = module.forward_train(batch)
    logp = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS]).logp(batch[Columns.ACTIONS])
    diff = (logp - batch[Columns.ACTION_LOGP]).abs()
    # A stateless module's batch has no time dim and so no padding to mask.
    return diff[batch[Columns.LOSS_MASK].bool()].max().item() if Columns.LOSS_MASK in batch else diff.max().item()


def sample_and_recompute(algo: Algorithm) -> tuple[list, dict[str, Any], TrajEncoderRLModule]:
    """Samples with the env runner and turns the episodes into the learner's train batch."""
    episodes = [e for _ in range(5) for e in algo.env_runner.sample(num_timesteps=30, explore=True)]
    learner = algo.learner_group._learner
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes,
                                       shared_data={}, metrics=learner.metrics)
    return episodes, batch[DEFAULT_MODULE_ID], learner.module[DEFAULT_MODULE_ID]
