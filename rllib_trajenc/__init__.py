"""Trajectory encoders (FF, GRU, Mamba, Transformer) as stateful RLlib RLModules.

The networks import without Ray; the RLlib adapter is loaded on first use of its names.
"""
from rllib_trajenc.nets import (
    FFTrajEncoder, FlashAttention, GRUTrajEncoder, HiddenState, MambaTrajEncoder, SelfAttention,
    TformerTrajEncoder, TrajEncoder, VanillaAttention,
)

__version__ = "0.1.0"

__all__ = [
    "TrajEncoder", "HiddenState", "FFTrajEncoder", "GRUTrajEncoder", "MambaTrajEncoder",
    "TformerTrajEncoder", "SelfAttention", "VanillaAttention", "FlashAttention",
]
