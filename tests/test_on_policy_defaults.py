"""What with_traj_encoder does with nothing but an encoder name: the learner reproduces the
rollout at the first minibatch under PPO, APPO and IMPALA (dropouts default to 0), a dropout the
user sets is kept with a warning, and multi-agent configs get a module per policy (see
test_multi_agent.py) but must be made multi-agent before with_traj_encoder."""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import pytest
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.impala import IMPALAConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.examples.envs.classes.multi_agent import MultiAgentCartPole
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole

from conftest import ENCODERS, MAX_SEQ_LEN, logp_error, sample_and_recompute
from rllib_trajenc import TformerTrajEncoder, with_traj_encoder

ALGORITHMS: dict[str, Callable[[], AlgorithmConfig]] = {"ppo": PPOConfig, "appo": APPOConfig, "impala": IMPALAConfig}


def local(config: AlgorithmConfig) -> AlgorithmConfig:
    return (config.environment(StatelessCartPole)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=2, rollout_fragment_length=16)
            .learners(num_learners=0)
            .training(train_batch_size_per_learner=64, minibatch_size=32)
            .debugging(seed=0))


@pytest.mark.parametrize("algorithm, encoder", [("ppo", name) for name in ENCODERS]
                         + [("appo", "transformer"), ("impala", "transformer")])
def test_defaults_reproduce_the_rollout_at_the_first_minibatch(ray_session, algorithm, encoder):
    """Nothing but the encoder's name (and the window): the encoder's own default sizes."""
    algo = with_traj_encoder(local(ALGORITHMS[algorithm]()), encoder, max_seq_len=MAX_SEQ_LEN).build_algo()
    try:
        _, batch, module = sample_and_recompute(algo)
        with torch.no_grad():
            assert logp_error(module, batch) <= 1e-4  # forward_train runs in train mode
    finally:
        algo.stop()


def test_transformer_dropouts_default_to_zero_and_a_users_own_is_kept_with_one_warning():
    seed_defaults = inspect.signature(TformerTrajEncoder).parameters
    assert seed_defaults["dropout_ff"].default > 0 and seed_defaults["dropout_emb"].default > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a dropout of the user's
        config = with_traj_encoder(PPOConfig(), "transformer", max_seq_len=8)
    chosen = config.rl_module_spec.model_config["traj_encoder_config"]
    assert chosen == {"dropout_ff": 0.0, "dropout_emb": 0.0, "dropout_attn": 0.0, "dropout_qkv": 0.0}

    with pytest.warns(UserWarning, match=r"sets dropout_ff=0\.1 for the on-policy PPOConfig: the learner "
                                         r"trains with dropout on while env runners act with it off"):
        config = with_traj_encoder(PPOConfig(), "transformer", max_seq_len=8, encoder_config={"dropout_ff": 0.1})
    assert config.rl_module_spec.model_config["traj_encoder_config"]["dropout_ff"] == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        with_traj_encoder(PPOConfig(), "transformer", max_seq_len=8, encoder_config={"dropout_ff": 0.1})


def test_multi_agent_configs_get_one_module_per_policy_and_multi_agent_first():
    multi = PPOConfig().multi_agent(policies={"p0", "p1"}, policy_mapping_fn=lambda agent, *_, **__: f"p{agent}")
    spec = with_traj_encoder(multi, "gru", max_seq_len=8).rl_module_spec
    assert isinstance(spec, MultiRLModuleSpec) and set(spec.rl_module_specs) == {"p0", "p1"}
    assert spec.rl_module_specs["p0"].model_config == spec.rl_module_specs["p1"].model_config
    # .multi_agent() after with_traj_encoder: the single-agent pieces are refused when env
    # runners build their pipelines.
    config = with_traj_encoder(PPOConfig(), "gru", max_seq_len=8)
    with pytest.raises(ValueError, match=r"steps the multi-agent env .*, but with_traj_encoder was given a "
                                         r"single-agent config: call config.multi_agent\(...\) before"):
        config.build_env_to_module_connector(env=MultiAgentCartPole({"num_agents": 2}), spaces=None)


def test_the_seeds_dropouts_would_make_the_learner_differ_from_the_rollout(ray_session):
    """Why the default matters: with the Transformer's own dropouts (0.05) the learner's first
    forward_train (train mode) no longer reproduces the env runner's (eval mode) log-probs."""
    seed_dropouts = {name: p.default for name, p in inspect.signature(TformerTrajEncoder.__init__).parameters.items()
                     if name.startswith("dropout")}
    with pytest.warns(UserWarning, match="on-policy PPOConfig"):
        config = with_traj_encoder(local(PPOConfig()), "transformer", max_seq_len=MAX_SEQ_LEN,
                                   encoder_config=seed_dropouts)
    algo = config.build_algo()
    try:
        _, batch, module = sample_and_recompute(algo)
        with torch.no_grad():
            assert logp_error(module, batch) > 1e-3
    finally:
        algo.stop()
