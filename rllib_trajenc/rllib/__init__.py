"""The RLlib adapter: trajectory encoders as a stateful RLModule for RLlib's new API stack."""
from rllib_trajenc.rllib.config import (
    TrajEncoderModelConfig, encoder_names, register_traj_encoder, with_traj_encoder,
)
from rllib_trajenc.rllib.module import TrajEncoderRLModule

__all__ = [
    "TrajEncoderRLModule", "TrajEncoderModelConfig", "encoder_names", "register_traj_encoder",
    "with_traj_encoder",
]
