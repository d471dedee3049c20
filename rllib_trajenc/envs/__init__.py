"""Memory tasks written for this package (gymnasium only; no Ray import)."""
from rllib_trajenc.envs.delayed_recall import DelayedRecall

__all__ = ["DelayedRecall"]
