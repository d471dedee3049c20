"""The module's ``model_config``: its keys, their checks, and the encoder registry.

Everything here fails early with a message that lists what is accepted, so a typo surfaces when
the config is written rather than inside a remote learner or env runner.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Optional, Union

import torch
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

from rllib_trajenc.nets import (
    FFTrajEncoder, GRUTrajEncoder, MambaTrajEncoder, TformerTrajEncoder, TrajEncoder,
)
from rllib_trajenc.nets.layers import ACTIVATIONS, check_choice, check_positive

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

# model_config["amp"]: the autocast dtype of the learner's encoder pass, by name.
AMP_MODES: dict[Optional[str], Optional[torch.dtype]] = {None: None, "bf16": torch.bfloat16}


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
    # The timestep encoder's first layer learns this many times faster (tstep_encoder.MLP's
    # input_gain), for inputs where a few features matter among noisy ones.
    tstep_input_gain: float = 1.0
    # "bf16": the learner runs the trajectory encoder under bf16 autocast (the scans keep fp32
    # state; heads, values and the loss stay fp32); env runners always act in fp32.
    amp: Optional[str] = None
    # False forces the pure-PyTorch reference path even where fused kernels are installed.
    fused_kernels: bool = True
    # True: env runners run the encoder's one-step update through torch.compile (Mamba only: the
    # one encoder it speeds up), compiled on each env runner's first step; on CPU it needs a C++
    # compiler on every node that builds the module.
    compile_rollout: bool = False

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
        for key in ("prev_action", "prev_reward", "fused_kernels", "compile_rollout"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} must be True or False")
        if self.time_scale is not None:
            _check_positive_number("time_scale", self.time_scale,
                                   "(about the episode-length limit) or None for no time feature")
        _check_positive_number("tstep_input_gain", self.tstep_input_gain,
                               "(1.0: the timestep encoder learns at the optimizer's rate)")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp={self.amp!r} is not supported; choose one of {list(AMP_MODES)} "
                             "(None: fp32 everywhere; 'bf16': the learner's encoder under bf16 autocast)")
        _check_encoder_kwargs(self.traj_encoder_cls, self.traj_encoder_config)
        if self.compile_rollout:
            _check_rollout_compiles(self.traj_encoder_cls)

    def build_traj_encoder(self) -> TrajEncoder:
        encoder = self.traj_encoder_cls(self.tstep_dim, self.max_seq_len, **self.traj_encoder_config)
        encoder.fused_kernels = self.fused_kernels
        encoder.compile_rollout = self.compile_rollout
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


def _check_positive_number(key: str, value: Any, what_else: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}={value!r} must be a positive number {what_else}")


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


def _check_rollout_compiles(cls: type[TrajEncoder]) -> None:
    """compile_rollout=True needs an encoder whose step gains from it and a C++ compiler for
    inductor's CPU kernels; without one, the first env step would fail on a remote env runner."""
    if not cls.compiles_rollout_step:
        supported = [name for name, enc in sorted(_ENCODERS.items()) if enc.compiles_rollout_step]
        raise ValueError(f"compile_rollout=True is supported for the encoders {supported} only: "
                         f"torch.compile does not speed up {cls.__name__}'s rollout step "
                         "(benchmarks/compile_rollout_cpu.py); leave compile_rollout=False")
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ValueError("compile_rollout=True needs a C++ compiler for torch.compile's CPU kernels "
                         "and found none (it looks for g++, or $CXX): install one on every node, "
                         "or set compile_rollout=False") from None
