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


def window_mask(tq: int, tk: int, window: int, device: torch.device) -> torch.Tensor:
    """True where a query may attend a key [Tq, Tk], queries being the last ``tq`` of ``tk`` steps.

    Query i sits at key index p = tk - tq + i (bottom-right aligned) and sees the keys j with
    p - window < j <= p: causal attention over a sliding window of ``window`` steps.
    """
    p = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)
    return (j <= p) & (j > p - window)


def steps_mask(query_steps: torch.Tensor, key_steps: torch.Tensor, window: int) -> torch.Tensor:
    """The same rule by episode step, for keys in any order: [B, 1, Tq, Tk] from steps [B, Tq], [B, Tk].

    The query at step s sees the keys of steps s - window < j <= s; keys at negative steps are
    empty cache slots. The Transformer's KV cache is a ring, so its keys are not in time order.
    """
    q, k = query_steps.unsqueeze(-1), key_steps.unsqueeze(-2)
    return ((k <= q) & (k > q - window) & (k >= 0)).unsqueeze(1)


class SelfAttention(nn.Module, ABC):
    """Maps q [B, H, Tq, dh], k and v [B, H, Tk, dh] (Tk >= Tq) to the output [B, H, Tq, dh].

    Which keys a query sees: ``mask`` [B, 1, Tq, Tk] (True = visible, at least one per query;
    see ``steps_mask``) when given, else the sliding-window causal rule of ``window_mask`` with
    keys in time order, which is what fused kernels take without a mask.
    The softmax scale is 1 / sqrt(dh); ``dropout_attn`` drops attention weights in training.
    """

    def __init__(self, dropout_attn: float = 0.0):
        super().__init__()
        check_probability(dropout_attn=dropout_attn)
        self.dropout_attn = dropout_attn

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns the attention output [B, H, Tq, dh]."""


class VanillaAttention(SelfAttention):
    """Explicit softmax(QK^T / sqrt(dh)) V in plain PyTorch: the readable reference kernel."""

    def __init__(self, dropout_attn: float = 0.0):
        super().__init__(dropout_attn)
        self.dropout = nn.Dropout(dropout_attn)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = window_mask(q.shape[2], k.shape[2], window, q.device)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return self.dropout(attn) @ v


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                     softmax_scale: float, window: int) -> torch.Tensor:
    """flash-attn's kernel in its own layout [B, T, H, dh]; it aligns causality bottom-right."""
    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                           causal=True, window_size=(window - 1, 0))


def _can_fuse(q: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    global _warned_fallback
    if mask is not None:  # keys out of time order (the KV cache): flash-attn takes no mask
        return False
    if flash_attn_func is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn("FlashAttention: flash-attn is not installed or the inputs are not fp16/bf16 "
                          "CUDA tensors; falling back to torch scaled_dot_product_attention")
        return False
    return True


class FlashAttention(SelfAttention):
    """flash-attn's fused kernel where it applies, else torch's scaled_dot_product_attention."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dropout_p = self.dropout_attn if self.training else 0.0
        scale = q.shape[-1] ** -0.5
        if _can_fuse(q, mask):
            out = _flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   dropout_p, scale, window)
            return out.transpose(1, 2)
        if mask is None:
            mask = window_mask(q.shape[2], k.shape[2], window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
