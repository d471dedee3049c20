"""The running encoder state of an env runner's envs, kept in one batch that steps update in place.

RLlib's own way is to pass STATE_IN through the env-to-module pipeline every step: per-episode
rows, stacked into a new batch. For a spec-default Transformer that is 1.5 MB per env of fresh
memory at every env step, and the stacking alone cost several times the model's arithmetic.
Instead, the module keeps a ``RolloutState`` between steps, one row per env; the compact-state
connector piece claims a row for each episode (loading its state when a new episode, or one
that was running elsewhere, takes the row) and sends only the row index as STATE_IN.
"""
from __future__ import annotations

from typing import Any, Hashable, Optional

import numpy as np
import torch

State = dict[str, np.ndarray]


class RolloutState:
    """``n_rows`` module states ({key: tensor [n_rows, ...]}) and the episode each row belongs to."""

    def __init__(self, initial: State, n_rows: int, device: torch.device):
        self.initial = initial
        self.tensors = {key: torch.as_tensor(value).to(device).repeat(n_rows, *[1] * value.ndim)
                        for key, value in initial.items()}
        self.owners: list[Optional[Hashable]] = [None] * n_rows

    @property
    def n_rows(self) -> int:
        return len(self.owners)

    def claim(self, row: int, owner: Hashable, state: Optional[State]) -> bool:
        """Makes ``row`` hold ``owner``'s state; loads ``state`` (None: a fresh episode) and returns
        True if the row held another episode until now."""
        if self.owners[row] == owner:
            return False
        source = self.initial if state is None else state
        for key, tensor in self.tensors.items():
            tensor[row].copy_(torch.as_tensor(np.asarray(source[key])))
        self.owners[row] = owner
        return True

    def update(self, state: dict[str, torch.Tensor]) -> None:
        """Makes every row hold ``state`` (all rows' states after a step); tensors the encoder
        already updated in place are the rows themselves and are skipped."""
        for key, tensor in self.tensors.items():
            if state[key] is not tensor:
                tensor.copy_(state[key])

    def row(self, row: int) -> dict[str, torch.Tensor]:
        """Views of one row: they follow the row as steps update it."""
        return {key: tensor[row] for key, tensor in self.tensors.items()}


def copy_to_numpy(state: dict[str, Any]) -> State:
    """An own copy of a (row view of a) state, as numpy arrays that can be shipped."""
    return {key: (value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)).copy()
            for key, value in state.items()}
