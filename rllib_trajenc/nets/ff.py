"""Memory-free encoder, built like a Transformer with the attention taken out."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rllib_trajenc.nets.base import HiddenState, TrajEncoder
from rllib_trajenc.nets.layers import activation as get_activation
from rllib_trajenc.nets.layers import check_positive, check_probability, make_norm


class FeedForward(nn.Module):
    """The Transformer's position-wise MLP: d_model -> d_ff -> act -> d_model, with dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str,
                 linear: type[nn.Module] = nn.Linear, mid_norm: Optional[nn.Module] = None):
        super().__init__()
        self.up = linear(d_model, d_ff)
        self.act = get_activation(activation)
        self.mid_norm = mid_norm if mid_norm is not None else nn.Identity()
        self.down = linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.mid_norm(self.act(self.up(x))))
        return self.dropout(self.down(x))


class FFTrajEncoder(TrajEncoder):
    """Residual feed-forward blocks per timestep: the 'no memory' ablation of the Transformer."""

    def __init__(self, tstep_dim: int, max_seq_len: int, d_model: int = 256,
                 d_ff: Optional[int] = None, n_layers: int = 1, dropout: float = 0.0,
                 activation: str = "leaky_relu", norm: str = "layer"):
        super().__init__(tstep_dim, max_seq_len)
        d_ff = 4 * d_model if d_ff is None else d_ff
        check_positive(d_model=d_model, d_ff=d_ff, n_layers=n_layers)
        check_probability(dropout=dropout)
        get_activation(activation)
        self.d_model = d_model
        self.inp = nn.Linear(tstep_dim, d_model)
        self.norms = nn.ModuleList(make_norm(norm, d_model) for _ in range(n_layers))
        self.blocks = nn.ModuleList(FeedForward(d_model, d_ff, dropout, activation) for _ in range(n_layers))
        self.out_norm = make_norm(norm, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    @property
    def emb_dim(self) -> int:
        return self.d_model

    def forward(self, seq: torch.Tensor, time_idxs: Optional[torch.Tensor] = None,
                hidden_state: Optional[HiddenState] = None, log_dict: Optional[dict] = None,
                *, in_place: bool = False) -> tuple[torch.Tensor, Optional[HiddenState]]:
        self.check_input(seq, in_place)
        x = self.dropout(self.inp(seq))
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.dropout(self.out(self.out_norm(x))), hidden_state
