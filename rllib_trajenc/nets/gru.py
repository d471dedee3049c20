"""GRU encoder: the classic recurrent memory, with a linear + norm read-out."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rllib_trajenc.nets.base import HiddenState, TrajEncoder
from rllib_trajenc.nets.layers import check_positive, make_norm


class GRUTrajEncoder(TrajEncoder):
    """Multi-layer GRU. State: ``{"h": [B, n_layers, d_hidden]}`` (batch first, unlike nn.GRU)."""

    def __init__(self, tstep_dim: int, max_seq_len: int, d_hidden: int = 256, n_layers: int = 2,
                 d_output: int = 256, norm: str = "layer"):
        super().__init__(tstep_dim, max_seq_len)
        check_positive(d_hidden=d_hidden, n_layers=n_layers, d_output=d_output)
        self.d_hidden, self.n_layers, self.d_output = d_hidden, n_layers, d_output
        self.rnn = nn.GRU(tstep_dim, d_hidden, num_layers=n_layers, batch_first=True)
        self.out = nn.Linear(d_hidden, d_output)
        self.out_norm = make_norm(norm, d_output)

    @property
    def emb_dim(self) -> int:
        return self.d_output

    def init_hidden_state(self, batch_size: int, device: torch.device) -> HiddenState:
        return {"h": torch.zeros(batch_size, self.n_layers, self.d_hidden, device=device)}

    def forward(self, seq: torch.Tensor, time_idxs: Optional[torch.Tensor] = None,
                hidden_state: Optional[HiddenState] = None, log_dict: Optional[dict] = None,
                *, in_place: bool = False) -> tuple[torch.Tensor, Optional[HiddenState]]:
        self.check_input(seq, in_place)
        h0 = None if hidden_state is None else hidden_state["h"].transpose(0, 1).contiguous()
        if in_place and h0 is not None:
            # An env runner's step: nn.GRU's own forward re-checks its arguments and weights
            # (~15% of this step) around the op it calls, which is called directly here.
            rnn = self.rnn
            out, h = torch._VF.gru(seq, h0, rnn._flat_weights, rnn.bias, rnn.num_layers, 0.0, False, False, True)
        else:
            out, h = self.rnn(seq, h0)
        out = self.out_norm(self.out(out))
        return out, (None if hidden_state is None else {"h": h.transpose(0, 1)})
