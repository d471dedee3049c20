"""The user-facing entry point: ``with_traj_encoder`` wires the module and its connectors into an
AlgorithmConfig. It sits above every other file of the adapter and nothing in the adapter imports it.
"""
from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_trajenc.rllib.config import (
    EncoderChoice, TrajEncoderModelConfig, encoder_names, keeps_state, register_traj_encoder,
)
from rllib_trajenc.rllib.connectors import install_connectors
from rllib_trajenc.rllib.module import TrajEncoderRLModule

if TYPE_CHECKING:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

__all__ = ["TrajEncoderRLModule", "register_traj_encoder", "with_traj_encoder"]

_WARNED: set[str] = set()  # dropout warnings already given: once per process is enough


# A policy's entry in a multi-agent with_traj_encoder: its encoder, or a dict of with_traj_encoder's
# keyword arguments ("encoder" required, "encoder_config", "max_seq_len", model_config keys).
PolicyEncoders = Mapping[str, Union[EncoderChoice, Mapping[str, Any]]]


def with_traj_encoder(config: AlgorithmConfig, encoder: Union[EncoderChoice, PolicyEncoders], *,
                      max_seq_len: int, encoder_config: Optional[Mapping[str, Any]] = None,
                      **model_config: Any) -> AlgorithmConfig:
    """Sets ``config``'s RLModule to a TrajEncoderRLModule and installs its connector pieces
    (compact state storage for any number of learners, previous action/reward; see
    connectors.py); bad settings raise ValueError here.

    ``model_config`` takes the other keys of TrajEncoderModelConfig (tstep_dim, head_hiddens, ...).
    Set ``minibatch_size`` (>= max_seq_len), ``batch_mode`` and ``seed`` first. The encoder's
    dropouts default to 0 here (see ``_dropouts_off``).

    Multi-agent: call ``config.multi_agent(policies=..., policy_mapping_fn=...)`` first; every
    policy gets a TrajEncoderRLModule of its own (in a MultiRLModuleSpec), and agents mapped to
    one policy share it. ``encoder`` is then one encoder for every policy, or a dict by policy id
    whose entries are an encoder or a dict of this function's keyword arguments for that policy,
    which override the shared ones given here::

        with_traj_encoder(config, {"scout": "gru",
                                   "guard": {"encoder": "transformer", "encoder_config": {"d_model": 64},
                                             "tstep_dim": 32}},
                          max_seq_len=32, head_hiddens=[64])

    All policies must agree on ``prev_action`` and ``prev_reward``, which shape every agent's
    observations.
    """
    # Imported here: AlgorithmConfig loads most of RLlib, which env runners and learners that
    # import this package for the module alone do not need.
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    if not isinstance(config, AlgorithmConfig):
        raise ValueError(f"config={config!r} must be an AlgorithmConfig instance such as PPOConfig()")
    if config.batch_mode == "complete_episodes" and config.seed is not None:
        # RLlib 2.60's SingleAgentEnvRunner samples this mode as num_envs whole episodes per
        # sample(), re-seeding its envs with config.seed before each (tests/test_episode_sampling.py).
        raise ValueError(
            f"batch_mode='complete_episodes' with seed={config.seed} replays the same episodes at every "
            "sample(): RLlib's env runner resets its envs with that seed each time, so a memory-free "
            "policy can learn them by heart. Keep batch_mode='truncate_episodes' (with fixed-length "
            "episodes, a rollout_fragment_length that is a multiple of their length keeps them whole), "
            "or set debugging(seed=None)")
    shared = {"encoder": encoder, "encoder_config": encoder_config, "max_seq_len": max_seq_len, **model_config}
    if not config.is_multi_agent:
        if isinstance(encoder, Mapping):
            raise ValueError(f"encoder={dict(encoder)!r} gives encoders by policy, but the config is "
                             "single-agent: call config.multi_agent(policies=...) first or pass one encoder")
        model_config, model = _checked_model_config(config, **shared)
        spec = RLModuleSpec(module_class=TrajEncoderRLModule, model_config=model_config)
        return install_connectors(config.rl_module(rl_module_spec=spec), model)
    models = {policy: _checked_policy(config, policy, shared, encoder) for policy in _policies(config, encoder)}
    _check_same_inputs({policy: model for policy, (_, model) in models.items()})
    spec = MultiRLModuleSpec(rl_module_specs={
        policy: RLModuleSpec(module_class=TrajEncoderRLModule, model_config=model_config)
        for policy, (model_config, _) in models.items()})
    return install_connectors(config.rl_module(rl_module_spec=spec), next(iter(models.values()))[1])


def _policies(config: AlgorithmConfig, encoder: Union[EncoderChoice, PolicyEncoders]) -> list[str]:
    """The config's policy ids; a dict of encoders must name exactly those."""
    policies = sorted(config.policies)
    if isinstance(encoder, Mapping) and set(encoder) != set(policies):
        raise ValueError(f"encoder gives encoders for policies {sorted(encoder)}, but the config has "
                         f"policies {policies}: give one entry per policy (or one encoder for all)")
    return policies


def _checked_policy(config: AlgorithmConfig, policy: str, shared: dict[str, Any],
                    encoder: Union[EncoderChoice, PolicyEncoders]) -> tuple[dict[str, Any], TrajEncoderModelConfig]:
    """One policy's checked model_config; errors name the policy."""
    entry = encoder[policy] if isinstance(encoder, Mapping) else encoder
    if not isinstance(entry, Mapping):
        entry = {"encoder": entry}
    if "encoder" not in entry:
        raise ValueError(f"policy {policy!r}: encoder entry {dict(entry)!r} needs an 'encoder' "
                         f"(one of {encoder_names()} or a TrajEncoder subclass)")
    try:
        return _checked_model_config(config, **{**shared, **entry})
    except ValueError as error:
        raise ValueError(f"policy {policy!r}: {error}") from error


def _check_same_inputs(models: dict[str, TrajEncoderModelConfig]) -> None:
    """prev_action/prev_reward rewrite every agent's observations, whichever policy it maps to."""
    for key in ("prev_action", "prev_reward"):
        values = {policy: getattr(model, key) for policy, model in models.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"{key} must be the same for every policy, got {values}: it adds the "
                             "input to every agent's observations")


def _checked_model_config(config: AlgorithmConfig, encoder: EncoderChoice, max_seq_len: int,
                          encoder_config: Optional[Mapping[str, Any]],
                          **model_config: Any) -> tuple[dict[str, Any], TrajEncoderModelConfig]:
    """The module's model_config from with_traj_encoder's arguments, and its checked form."""
    if not isinstance(encoder_config, (Mapping, type(None))):
        raise ValueError(f"encoder_config={encoder_config!r} must be a dict of the encoder's kwargs or None")
    model_config = {"traj_encoder": encoder, "traj_encoder_config": dict(encoder_config or {}),
                    "max_seq_len": max_seq_len, **model_config}
    model = TrajEncoderModelConfig.from_model_config(model_config)
    # Building the encoder once also catches bad values of its kwargs (sizes, norms, ...).
    stateful = keeps_state(model.build_traj_encoder())
    model_config["traj_encoder_config"] = _dropouts_off(config, model)
    minibatch_size = getattr(config, "minibatch_size", None)
    if stateful and minibatch_size is not None and minibatch_size < model.max_seq_len:
        # RLlib cuts a stateful module's minibatches from whole max_seq_len rows, about
        # minibatch_size / max_seq_len of them: fewer than one row leaves minibatches empty.
        raise ValueError(
            f"minibatch_size={minibatch_size} is smaller than max_seq_len={model.max_seq_len}; "
            f"RLlib trains a stateful module on whole max_seq_len rows, so set "
            f"config.training(minibatch_size=...) to a multiple of {model.max_seq_len} first")
    return model_config, model


def _dropouts_off(config: AlgorithmConfig, model: TrajEncoderModelConfig) -> dict[str, Any]:
    """The encoder's kwargs with every ``dropout*`` argument the user left out set to 0.

    RLlib's learner runs ``forward_train`` in train mode, env runners act in eval mode: with
    dropout on, the learner's log-probs are not the rollout's, and an on-policy algorithm's
    importance ratio (PPO, APPO, IMPALA) starts as noise. A dropout the user sets stays, with a
    warning for those algorithms.
    """
    from ray.rllib.algorithms.impala import IMPALAConfig  # APPOConfig is one too
    from ray.rllib.algorithms.ppo import PPOConfig

    chosen = dict(model.traj_encoder_config)
    params = inspect.signature(model.traj_encoder_cls.__init__).parameters
    dropouts = [name for name in params if name.startswith("dropout")]
    noisy = sorted(name for name in dropouts if chosen.get(name, 0) > 0)
    message = (f"traj_encoder_config sets {', '.join(f'{n}={chosen[n]}' for n in noisy)} for the "
               f"on-policy {type(config).__name__}: the learner trains with dropout on while env runners "
               "act with it off, so its log-probs differ from the rollout's; 0 keeps them equal")
    if noisy and isinstance(config, (PPOConfig, IMPALAConfig)) and message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return {**{name: 0.0 for name in dropouts}, **chosen}
