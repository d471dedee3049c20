"""The user-facing entry point: ``with_traj_encoder`` wires the module and its connectors into an
AlgorithmConfig. It sits above every other file of the adapter and nothing in the adapter imports it.
"""
from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_trajenc.rllib.config import (
    EncoderChoice, TrajEncoderModelConfig, keeps_state, register_traj_encoder,
)
from rllib_trajenc.rllib.connectors import install_connectors
from rllib_trajenc.rllib.module import TrajEncoderRLModule

if TYPE_CHECKING:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

__all__ = ["TrajEncoderRLModule", "register_traj_encoder", "with_traj_encoder"]

_WARNED: set[str] = set()  # dropout warnings already given: once per process is enough


def with_traj_encoder(config: AlgorithmConfig, encoder: EncoderChoice, *, max_seq_len: int,
                      encoder_config: Optional[Mapping[str, Any]] = None,
                      **model_config: Any) -> AlgorithmConfig:
    """Sets ``config``'s RLModule to a TrajEncoderRLModule and installs its connector pieces
    (compact state storage for any number of learners, previous action/reward; see
    connectors.py); bad settings raise ValueError here.

    ``model_config`` takes the other keys of TrajEncoderModelConfig (tstep_dim, head_hiddens, ...).
    Set ``minibatch_size`` (>= max_seq_len), ``batch_mode`` and ``seed`` first. The encoder's
    dropouts default to 0 here (see ``_dropouts_off``). Single-agent configs only.
    """
    # Imported here: AlgorithmConfig loads most of RLlib, which env runners and learners that
    # import this package for the module alone do not need.
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    if not isinstance(config, AlgorithmConfig):
        raise ValueError(f"config={config!r} must be an AlgorithmConfig instance such as PPOConfig()")
    if config.is_multi_agent:
        raise ValueError(f"with_traj_encoder supports single-agent configs only; this config has "
                         f"policies {sorted(config.policies)}")
    if not isinstance(encoder_config, (Mapping, type(None))):
        raise ValueError(f"encoder_config={encoder_config!r} must be a dict of the encoder's kwargs or None")
    if config.batch_mode == "complete_episodes" and config.seed is not None:
        # RLlib 2.60's SingleAgentEnvRunner samples this mode as num_envs whole episodes per
        # sample(), re-seeding its envs with config.seed before each (tests/test_episode_sampling.py).
        raise ValueError(
            f"batch_mode='complete_episodes' with seed={config.seed} replays the same episodes at every "
            "sample(): RLlib's env runner resets its envs with that seed each time, so a memory-free "
            "policy can learn them by heart. Keep batch_mode='truncate_episodes' (with fixed-length "
            "episodes, a rollout_fragment_length that is a multiple of their length keeps them whole), "
            "or set debugging(seed=None)")
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
    config = config.rl_module(
        rl_module_spec=RLModuleSpec(module_class=TrajEncoderRLModule, model_config=model_config)
    )
    return install_connectors(config, model)


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
