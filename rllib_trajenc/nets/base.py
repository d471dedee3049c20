"""The trajectory-encoder contract every sequence model in this package follows."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Optional

import numpy as np
import torch
from torch import nn

from rllib_trajenc.nets.layers import check_positive

# Every stateful encoder keeps its memory as a flat dict of tensors whose first dim is the
# batch (one row per parallel env). That one shape lets the base class reset rows, and lets
# the RLlib adapter pass the state through STATE_IN/STATE_OUT without knowing the model.
HiddenState = dict[str, torch.Tensor]

# Where an encoder runs a fused CUDA kernel, ``last_backends`` names what its last forward used,
# under these keys: "scan_backend" ("mamba_ssm" | "pytorch"), "conv_backend" ("causal_conv1d" |
# "pytorch"), "attention_backend" ("flash_attn" | "flash_attn_varlen" | "sdpa" | "vanilla").
Backends = dict[str, str]


class TrajEncoder(nn.Module, ABC):
    """Maps a sequence of timestep embeddings [B, T, tstep_dim] to [B, T, emb_dim].

    ``forward`` runs in one of two modes:
      * ``hidden_state=None``: the sequence starts at the beginning of an episode; no state is
        returned (training on whole episodes, as in the AMAGO API this follows);
      * ``hidden_state`` given: the sequence (one step or a chunk of many) continues from that
        state, and the state after the last step is returned. Running a sequence in chunks that
        carry state computes exactly what one whole forward computes. The RLlib module always
        takes this path, on env runners and learners alike (learner rows start from STATE_IN).
    ``in_place=True`` (keyword, inference only) lets the encoder update the state passed in and
    return it instead of a new one, so a rollout step need not copy a large state (the
    Transformer's KV cache); the caller must not reuse the state it passed.

    ``fused_kernels`` (default True) lets an encoder use optional fused kernels (mamba-ssm,
    causal-conv1d, flash-attn) where they are installed and the inputs suit them; False forces the
    pure-PyTorch reference path, which computes the same function. ``last_backends`` names the
    backends the last forward ran (see ``Backends``); ``kernel_backends`` those a training forward
    would pick for a device and dtype.

    ``compile_rollout`` (default False) runs the in-place one-step update through torch.compile,
    in encoders where that is measured to be faster (``compiles_rollout_step``).
    """

    # Whether torch.compile speeds up this encoder's in-place rollout step
    # (benchmarks/compile_rollout_cpu.py); model_config["compile_rollout"] refuses the others.
    compiles_rollout_step: ClassVar[bool] = False

    def __init__(self, tstep_dim: int, max_seq_len: int):
        super().__init__()
        check_positive(tstep_dim=tstep_dim, max_seq_len=max_seq_len)
        self.tstep_dim = tstep_dim
        self.max_seq_len = max_seq_len
        self.fused_kernels = True
        self.compile_rollout = False
        self.last_backends: Backends = {}

    def kernel_backends(self, device: torch.device, dtype: torch.dtype) -> Backends:
        """The backends a training forward from a carried state would use on ``device`` with
        activations of ``dtype`` ({} for encoders without fused kernels)."""
        return {}

    @property
    @abstractmethod
    def emb_dim(self) -> int:
        """Size of the last dim of the output; actor and critic heads take this as input."""

    @abstractmethod
    def forward(
        self,
        seq: torch.Tensor,
        time_idxs: Optional[torch.Tensor],
        hidden_state: Optional[HiddenState] = None,
        log_dict: Optional[dict] = None,
        *,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, Optional[HiddenState]]:
        """Returns ``(output [B, T, emb_dim], state after the last step or None)``."""

    def init_hidden_state(self, batch_size: int, device: torch.device) -> Optional[HiddenState]:
        """The state of ``batch_size`` fresh episodes; None for memory-free encoders."""
        return None

    def reset_hidden_state(
        self, hidden_state: Optional[HiddenState], dones: np.ndarray | torch.Tensor
    ) -> Optional[HiddenState]:
        """Rows where ``dones`` is True restart from the fresh-episode state; others are kept."""
        if hidden_state is None:
            return None
        some = next(iter(hidden_state.values()))
        dones = torch.as_tensor(np.asarray(dones) if not torch.is_tensor(dones) else dones,
                                dtype=torch.bool, device=some.device).reshape(-1)
        if dones.shape[0] != some.shape[0]:
            raise ValueError(
                f"dones has {dones.shape[0]} entries but the hidden state holds {some.shape[0]} rows"
            )
        fresh = self.init_hidden_state(some.shape[0], some.device)
        return {
            key: torch.where(dones.view(-1, *([1] * (value.dim() - 1))), fresh[key].to(value.dtype), value)
            for key, value in hidden_state.items()
        }

    def check_input(self, seq: torch.Tensor, in_place: bool = False) -> None:
        """Rejects inputs whose rank or feature size this encoder was not built for, and
        ``in_place`` updates while autograd records (it would need the values overwritten)."""
        if seq.dim() != 3 or seq.shape[-1] != self.tstep_dim:
            raise ValueError(
                f"seq must have shape [batch, time, tstep_dim={self.tstep_dim}], got {tuple(seq.shape)}"
            )
        if in_place and torch.is_grad_enabled():
            raise ValueError("in_place=True is for inference: run it under torch.no_grad() or "
                             "torch.inference_mode(); autograd needs the state values it would overwrite")
