"""Recomputing encoder states from an earlier stored state, as the env runner computed them.

With several learners RLlib shards sampled episode chunks by cutting them at arbitrary steps,
so a learner may receive a piece whose ``max_seq_len`` rows start between two stored
snapshots. The state at such a row start is the stored state before it, run through the
observations in between: the module's inference pass (eval mode, no gradient), i.e. exactly
what the env runner ran, on at most ``max_seq_len - 1`` steps per row.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.spaces.space_utils import batch, unbatch
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

State = dict[str, np.ndarray]


def replay(module: RLModule, states: list[State], observations: list[Any]) -> list[State]:
    """The module's states after running each of ``observations`` (same-length [T, ...] sequences,
    numpy structs or lists of per-step observations) from the matching entry of ``states``."""
    rows = [batch(obs) if isinstance(obs, list) else obs for obs in observations]
    device = next(module.parameters()).device
    inputs = convert_to_torch_tensor({Columns.OBS: batch(rows), Columns.STATE_IN: batch(states)},
                                     device=device)
    state_out = module.forward_inference(inputs)[Columns.STATE_OUT]
    return unbatch(convert_to_numpy(state_out))
