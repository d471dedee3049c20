"""The running encoder state of an env runner's envs, kept in one batch that steps update in place.

RLlib's own way is to pass STATE_IN through the env-to-module pipeline every step: per-episode
rows, stacked into a new batch. For a spec-default Transformer that is 1.5 MB per env of fresh
memory at every env step, and the stacking alone cost several times the model's arithmetic.
Instead, the module keeps a ``RolloutState`` between steps, one row per env; the compact-state
connector piece claims a row for each episode (loading its state when a new episode, or one
that was running elsewhere, takes the row) and sends only the row index as STATE_IN.

Multi-agent env runners step only some agents at a time, so a step may name any subset of the
rows: those rows are gathered, stepped and written back (``select``/``update``), while the whole
batch in row order keeps the in-place path. Rows go to (env, agent) episodes as they first act
and are reused once their owner is gone (``row_for``); more agents than rows grow the batch.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any, Hashable, Optional

import numpy as np
import torch

State = dict[str, np.ndarray]


class RolloutState:
    """``n_rows`` module states ({key: tensor [n_rows, ...]}) and the episode each row belongs to."""

    def __init__(self, initial: State, n_rows: int, device: torch.device):
        self.initial = initial
        # A fresh episode's state is zeros for this package's encoders: zeroing a row writes it
        # without reading a copy (1.5 MB per new episode for a default Transformer).
        self._zero_initial = {key for key, value in initial.items() if not np.any(value)}
        self.tensors = {key: _rows_of(torch.as_tensor(value).to(device), n_rows) for key, value in initial.items()}
        self.owners: list[Optional[Hashable]] = [None] * n_rows
        self._row_of: dict[Hashable, int] = {}  # owners' rows, for row_for
        self._all_rows = torch.arange(n_rows)

    @property
    def n_rows(self) -> int:
        return len(self.owners)

    @property
    def all_rows(self) -> torch.Tensor:
        """0, 1, ..., n_rows - 1 (CPU): what STATE_IN names when a step takes every row in order;
        kept, as it is compared at every env step."""
        if self._all_rows.shape[0] != self.n_rows:
            self._all_rows = torch.arange(self.n_rows)
        return self._all_rows

    def claim(self, row: int, owner: Hashable, state: Optional[State]) -> bool:
        """Makes ``row`` hold ``owner``'s state; loads ``state`` (None: a fresh episode) and returns
        True if the row held another episode until now."""
        if self.owners[row] == owner:
            return False
        source = self.initial if state is None else state
        for key, tensor in self.tensors.items():
            if state is None and key in self._zero_initial:
                tensor[row].zero_()
            else:
                tensor[row].copy_(torch.as_tensor(np.asarray(source[key])))
        self._row_of.pop(self.owners[row], None)
        self.owners[row], self._row_of[owner] = owner, row
        return True

    def row_for(self, owner: Hashable, position: int, live: Collection[Hashable],
                taken: Collection[int]) -> int:
        """The row ``owner`` holds, else a free one (not ``taken`` in this step, its owner not
        ``live``), ``position`` first so that a batch in row order keeps the in-place path; the
        batch grows by a row when none is free."""
        if owner in self._row_of:
            return self._row_of[owner]
        free = [row for row, held in enumerate(self.owners) if row not in taken and held not in live]
        if free:
            return position if position in free else free[0]
        self.grow(self.n_rows + 1)
        return self.n_rows - 1

    def grow(self, n_rows: int) -> None:
        """At least ``n_rows`` rows; new ones hold the initial state and no owner."""
        extra = n_rows - self.n_rows
        if extra > 0:
            grown = {key: _rows_of(tensor.new_tensor(np.asarray(self.initial[key])), n_rows)
                     for key, tensor in self.tensors.items()}
            for key, tensor in self.tensors.items():
                grown[key][:len(self.owners)].copy_(tensor)
            self.tensors = grown
            self.owners += [None] * extra

    def select(self, rows: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The states of ``rows`` (None: all rows, the tensors themselves; else copies)."""
        return self.tensors if rows is None else {key: tensor[rows] for key, tensor in self.tensors.items()}

    def update(self, state: dict[str, torch.Tensor], rows: Optional[torch.Tensor] = None) -> None:
        """Makes ``rows`` (None: every row) hold ``state``, their states after a step; tensors the
        encoder already updated in place are the rows themselves and are skipped."""
        for key, tensor in self.tensors.items():
            if rows is not None:
                tensor[rows] = state[key].to(tensor.dtype)
            elif state[key] is not tensor:
                tensor.copy_(state[key])

    def row(self, row: int) -> RowView:
        """Views of one row: they follow the row as steps update it and the batch grows."""
        return RowView(self, row)


def layer_first(rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``rows`` [n_rows, n_layers, ...] stored layer first (tensors of fewer dims: a
    contiguous copy): a step then reads and updates each layer's state of all rows as one
    contiguous block (Mamba's per-layer states, the Transformer's per-layer ring) instead of
    n_rows strided pieces. Within a row's layer, the dims keep the memory order they have in
    ``rows`` (Mamba's conv state is kept channel last, which its step and kernel read fastest)."""
    if rows.dim() < 3:
        return rows.clone(memory_format=torch.contiguous_format)
    inner_shape, inner_strides = rows.shape[2:], rows.stride()[2:]  # one row's layer
    order = sorted(range(len(inner_shape)), key=lambda d: -inner_strides[d])  # outermost in memory first
    stored = rows.new_empty((rows.shape[1], rows.shape[0], *(inner_shape[d] for d in order)))
    inverse = [order.index(d) for d in range(len(inner_shape))]
    return stored.permute(1, 0, *(2 + d for d in inverse)).copy_(rows)


def _rows_of(value: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``n_rows`` copies of one row's ``value`` as a tensor [n_rows, *value.shape], layer first."""
    return layer_first(value.expand(n_rows, *value.shape))


def copy_to_numpy(state: Mapping[str, Any]) -> State:
    """An own copy of a (row view of a) state, as numpy arrays that can be shipped."""
    return {key: (value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)).copy()
            for key, value in state.items()}


class RowView(Mapping):
    """``{key: view of one row}``, read anew at each access: the views stay right when the
    RolloutState grows (its tensors are then new ones)."""

    def __init__(self, rows: RolloutState, row: int):
        self.rows, self.index = rows, row

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.rows.tensors[key][self.index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows.tensors)

    def __len__(self) -> int:
        return len(self.rows.tensors)
