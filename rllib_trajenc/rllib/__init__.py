"""The RLlib adapter: trajectory encoders as a stateful RLModule for RLlib's new API stack."""
from rllib_trajenc.rllib.config import TrajEncoderModelConfig, encoder_names
from rllib_trajenc.rllib.entry_point import (
    TrajEncoderRLModule, register_traj_encoder, with_traj_encoder,
)

__all__ = [
    "TrajEncoderRLModule", "TrajEncoderModelConfig", "encoder_names", "register_traj_encoder",
    "with_traj_encoder",
]
