"""Trajectory encoders (FF, GRU, Mamba, Transformer) as stateful RLlib RLModules.

The networks import without Ray; the RLlib adapter's names load Ray on first use.
"""
from typing import Any

from rllib_trajenc.nets import (
    FFTrajEncoder, FlashAttention, GRUTrajEncoder, HiddenState, MambaTrajEncoder, SelfAttention,
    TformerTrajEncoder, TrajEncoder, VanillaAttention,
)

__version__ = "0.1.0"

_RLLIB_NAMES = ("TrajEncoderRLModule", "register_traj_encoder", "with_traj_encoder")

__all__ = [
    "TrajEncoder", "HiddenState", "FFTrajEncoder", "GRUTrajEncoder", "MambaTrajEncoder",
    "TformerTrajEncoder", "SelfAttention", "VanillaAttention", "FlashAttention", *_RLLIB_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _RLLIB_NAMES:
        from rllib_trajenc.rllib import entry_point
        return getattr(entry_point, name)
    raise AttributeError(f"module 'rllib_trajenc' has no attribute {name!r}")
