"""The module's ``model_config``: its keys, their checks, the encoder registry, and a config helper.

Everything here fails early with a message that lists what is accepted, so a typo surfaces when
the config is written rather than inside a remote learner or env runner.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_trajenc.nets import (
    FFTrajEncoder, GRUTrajEncoder, MambaTrajEncoder, TformerTrajEncoder, TrajEncoder,
)
from rllib_trajenc.nets.layers import ACTIVATIONS, check_choice, check_positive

if TYPE_CHECKING:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

_ENCODERS: dict[str, type[TrajEncoder]] = {
    "ff": FFTrajEncoder,
    "gru": GRUTrajEncoder,
    "mamba": MambaTrajEncoder,
    "transformer": TformerTrajEncoder,
}

# Algorithms merge their own model settings (e.g. PPO's ``vf_share_layers``) and any
# ``DefaultModelConfig`` the user set into every module's model_config, so RLlib's own keys
# must pass; they configure RLlib's default models and have no meaning here.
_RLLIB_KEYS = frozenset(f.name for f in dataclasses.fields(DefaultModelConfig)) - {"max_seq_len"}

EncoderChoice = Union[str, type[TrajEncoder]]


def register_traj_encoder(name: str, cls: type[TrajEncoder]) -> None:
    """Makes ``model_config["traj_encoder"] = name`` build ``cls``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty str, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, TrajEncoder)):
        raise ValueError(f"{cls!r} is not a subclass of rllib_trajenc.TrajEncoder")
    if _ENCODERS.get(name, cls) is not cls:
        raise ValueError(f"encoder name {name!r} is already registered for {_ENCODERS[name].__name__}")
    _ENCODERS[name] = cls


def encoder_names() -> list[str]:
    return sorted(_ENCODERS)


@dataclasses.dataclass(frozen=True)
class TrajEncoderModelConfig:
    """The checked form of ``model_config``, whose keys are these fields' names, except that
    ``traj_encoder`` (a registered name or a TrajEncoder subclass) stands for ``traj_encoder_cls``."""

    traj_encoder_cls: type[TrajEncoder]
    max_seq_len: int
    traj_encoder_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tstep_dim: int = 64  # size of the per-timestep vector fed to the trajectory encoder
    tstep_hiddens: tuple[int, ...] = (64,)  # MLP between the flattened observation and tstep_dim
    head_hiddens: tuple[int, ...] = (64,)  # MLP of the actor head and of the critic head
    activation: str = "leaky_relu"
    # RL^2-style inputs: the previous action / reward join each observation (through a connector
    # piece that with_traj_encoder installs), and t / time_scale (t = episode step) joins the
    # timestep features; a time_scale near the episode-length limit keeps that feature in [0, 1].
    prev_action: bool = False
    prev_reward: bool = False
    time_scale: Optional[float] = None

    @classmethod
    def valid_keys(cls) -> list[str]:
        return ["traj_encoder"] + [f.name for f in dataclasses.fields(cls) if f.name != "traj_encoder_cls"]

    @classmethod
    def from_model_config(cls, model_config: Optional[Mapping[str, Any]]) -> TrajEncoderModelConfig:
        if not isinstance(model_config, Mapping):
            raise ValueError(f"model_config must be a dict with keys {cls.valid_keys()}, got {model_config!r}")
        unknown = sorted(set(model_config) - set(cls.valid_keys()) - _RLLIB_KEYS)
        if unknown:
            raise ValueError(f"unknown model_config keys {unknown}; valid keys are {cls.valid_keys()}")
        for required in ("traj_encoder", "max_seq_len"):
            if required not in model_config:
                raise ValueError(f"model_config needs {required!r}; valid keys are {cls.valid_keys()}")
        own = {k: v for k, v in model_config.items() if k in cls.valid_keys() and k != "traj_encoder"}
        for key in ("tstep_hiddens", "head_hiddens"):
            if key in own:
                own[key] = _int_tuple(key, own[key])
        return cls(traj_encoder_cls=_resolve_encoder(model_config["traj_encoder"]), **own)

    def __post_init__(self) -> None:
        check_positive(max_seq_len=self.max_seq_len, tstep_dim=self.tstep_dim)
        check_positive(**{f"tstep_hiddens[{i}]": h for i, h in enumerate(self.tstep_hiddens)})
        check_positive(**{f"head_hiddens[{i}]": h for i, h in enumerate(self.head_hiddens)})
        check_choice("activation", self.activation, ACTIVATIONS)
        for key in ("prev_action", "prev_reward"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} must be True or False")
        if self.time_scale is not None and (isinstance(self.time_scale, bool)
                                            or not isinstance(self.time_scale, (int, float))
                                            or not self.time_scale > 0):
            raise ValueError(f"time_scale={self.time_scale!r} must be a positive number "
                             "(about the episode-length limit) or None for no time feature")
        _check_encoder_kwargs(self.traj_encoder_cls, self.traj_encoder_config)

    def build_traj_encoder(self) -> TrajEncoder:
        encoder = self.traj_encoder_cls(self.tstep_dim, self.max_seq_len, **self.traj_encoder_config)
        if self.time_scale is not None and not keeps_state(encoder):
            # A stateless module gets no STATE_IN, so it never learns the episode step.
            raise ValueError(f"time_scale={self.time_scale!r} needs an encoder with memory; "
                             f"{self.traj_encoder_cls.__name__} keeps no state")
        return encoder


def keeps_state(encoder: TrajEncoder) -> bool:
    """Whether ``encoder`` carries memory across steps (FF does not, making the module stateless)."""
    return encoder.init_hidden_state(1, torch.device("cpu")) is not None


def _resolve_encoder(choice: EncoderChoice) -> type[TrajEncoder]:
    if isinstance(choice, type) and issubclass(choice, TrajEncoder):
        return choice
    if isinstance(choice, str) and choice in _ENCODERS:
        return _ENCODERS[choice]
    raise ValueError(
        f"traj_encoder={choice!r} is not supported; choose one of {encoder_names()} "
        "(see register_traj_encoder) or pass a TrajEncoder subclass"
    )


def _int_tuple(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}={value!r} must be a list of positive ints")
    return tuple(value)


def _check_encoder_kwargs(cls: type[TrajEncoder], kwargs: Mapping[str, Any]) -> None:
    """Names the accepted arguments instead of letting a bare TypeError escape the constructor."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"traj_encoder_config must be a dict of {cls.__name__} kwargs, got {kwargs!r}")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items()
                if n not in ("self", "tstep_dim", "max_seq_len") and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"traj_encoder_config has unknown {cls.__name__} args {unknown}; accepted: {accepted} "
            "(tstep_dim and max_seq_len come from model_config)"
        )


def with_traj_encoder(config: AlgorithmConfig, encoder: EncoderChoice, *, max_seq_len: int,
                      encoder_config: Optional[Mapping[str, Any]] = None,
                      **model_config: Any) -> AlgorithmConfig:
    """Sets ``config``'s RLModule to a TrajEncoderRLModule and installs its connector pieces
    (compact state storage, previous action/reward; see connectors.py); bad settings raise
    ValueError here.

    ``model_config`` takes the other keys of TrajEncoderModelConfig (tstep_dim, head_hiddens, ...).
    Set ``config.learners(num_learners=...)`` and ``minibatch_size`` (>= max_seq_len) first:
    with several learners RLlib splits episode chunks at arbitrary steps, so the state is then
    stored at every step as RLlib does itself.
    """
    # Imported here: the module imports this file for its config checks, and AlgorithmConfig
    # would load most of RLlib with this package.
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
    from rllib_trajenc.rllib.connectors import install_connectors
    from rllib_trajenc.rllib.module import TrajEncoderRLModule

    if not isinstance(config, AlgorithmConfig):
        raise ValueError(f"config={config!r} must be an AlgorithmConfig instance such as PPOConfig()")
    if not isinstance(encoder_config, (Mapping, type(None))):
        raise ValueError(f"encoder_config={encoder_config!r} must be a dict of the encoder's kwargs or None")
    model_config = {"traj_encoder": encoder, "traj_encoder_config": dict(encoder_config or {}),
                    "max_seq_len": max_seq_len, **model_config}
    model = TrajEncoderModelConfig.from_model_config(model_config)
    # Building the encoder once also catches bad values of its kwargs (sizes, norms, ...).
    stateful = keeps_state(model.build_traj_encoder())
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
