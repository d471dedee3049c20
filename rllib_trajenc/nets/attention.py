"""Sliding-window causal attention kernels behind one contract, so the Transformer can swap them."""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from rllib_trajenc.nets.layers import check_probability

try:  # the fused CUDA kernel is optional (the "gpu" extra)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

_warned_fallback = False


def window_mask(tq: int, tk: int, window: int, first_valid: Optional[torch.Tensor],
                device: torch.device) -> torch.Tensor:
    """True where a query may attend a key: [Tq, Tk], or [B, 1, Tq, Tk] if ``first_valid`` is given.

    Queries are the last ``tq`` of the ``tk`` keys (bottom-right aligned): query i sits at key
    index p = tk - tq + i and sees the keys j with p - window < j <= p and j >= first_valid[b].
    """
    p = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)
    mask = (j <= p) & (j > p - window)
    if first_valid is None:
        return mask
    return mask & (j >= first_valid.view(-1, 1, 1, 1))


class SelfAttention(nn.Module, ABC):
    """Maps q [B, H, Tq, dh], k and v [B, H, Tk, dh] (Tk >= Tq) to the output [B, H, Tq, dh].

    Subclasses implement the visibility rule of ``window_mask``; ``first_valid`` ([B] long, None
    meaning all zeros) must leave every query its own key: first_valid[b] <= Tk - Tq.
    The softmax scale is 1 / sqrt(dh); ``dropout_attn`` drops attention weights in training.
    """

    def __init__(self, dropout_attn: float = 0.0):
        super().__init__()
        check_probability(dropout_attn=dropout_attn)
        self.dropout_attn = dropout_attn

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                first_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns the attention output [B, H, Tq, dh]."""


class VanillaAttention(SelfAttention):
    """Explicit softmax(QK^T / sqrt(dh)) V in plain PyTorch: the readable reference kernel."""

    def __init__(self, dropout_attn: float = 0.0):
        super().__init__(dropout_attn)
        self.dropout = nn.Dropout(dropout_attn)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                first_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = window_mask(q.shape[2], k.shape[2], window, first_valid, q.device)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return self.dropout(attn) @ v


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                     softmax_scale: float, window: int) -> torch.Tensor:
    """flash-attn's kernel in its own layout [B, T, H, dh]; it aligns causality bottom-right."""
    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                           causal=True, window_size=(window - 1, 0))


def _can_fuse(q: torch.Tensor, first_valid: Optional[torch.Tensor]) -> bool:
    global _warned_fallback
    if flash_attn_func is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn("FlashAttention: flash-attn is not installed or the inputs are not fp16/bf16 "
                          "CUDA tensors; falling back to torch scaled_dot_product_attention")
        return False
    # flash-attn has no per-row left bound; batches with rows that restarted inside the cache use SDPA.
    return first_valid is None or not bool(first_valid.any())


class FlashAttention(SelfAttention):
    """flash-attn's fused kernel where it applies, else torch's scaled_dot_product_attention."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                first_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        dropout_p = self.dropout_attn if self.training else 0.0
        scale = q.shape[-1] ** -0.5
        if _can_fuse(q, first_valid):
            out = _flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   dropout_p, scale, window)
            return out.transpose(1, 2)
        mask = window_mask(q.shape[2], k.shape[2], window, first_valid, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
