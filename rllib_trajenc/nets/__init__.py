"""The sequence models. Imports torch and numpy only (never ray), so they run anywhere."""
from rllib_trajenc.nets.attention import FlashAttention, SelfAttention, VanillaAttention
from rllib_trajenc.nets.base import HiddenState, TrajEncoder
from rllib_trajenc.nets.ff import FFTrajEncoder
from rllib_trajenc.nets.gru import GRUTrajEncoder
from rllib_trajenc.nets.mamba import MambaTrajEncoder
from rllib_trajenc.nets.transformer import TformerTrajEncoder

__all__ = [
    "TrajEncoder", "HiddenState", "FFTrajEncoder", "GRUTrajEncoder", "MambaTrajEncoder",
    "TformerTrajEncoder", "SelfAttention", "VanillaAttention", "FlashAttention",
]
