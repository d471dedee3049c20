"""Sliding-window causal attention kernels behind one contract, so the Transformer can swap them."""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from rllib_trajenc.nets.layers import check_probability

try:  # the fused CUDA kernels are optional (the "gpu" extra)
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

# Where flash-attn's kernels are used: device types (tests point this at "cpu" with stand-ins),
# the input dtypes they take, and their largest head dim.
FUSED_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256

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


def ring_steps(n: torch.Tensor, window: int) -> torch.Tensor:
    """The episode step each slot of a KV-cache ring holds after n [B] steps (step s lives in slot
    s % window): [B, window], negative for empty slots."""
    j = torch.arange(window, device=n.device)
    last = n.unsqueeze(1) - 1
    return last - torch.remainder(last - j, window)


@dataclass
class CarriedKeys:
    """Which keys the queries of a chunk continued from a KV-cache ring see, in two forms.

    Row b has seen ``n[b]`` steps; its ``T`` queries (steps n..n+T-1) see, within the window W,
    its last m = min(n, W-1) cached steps and its own chunk. ``packing()`` lays those keys out
    for a varlen kernel; ``mask()`` is ``steps_mask`` over (ring slots, chunk) for every other
    kernel. Each is built on first use and shared by every layer.
    """

    n: torch.Tensor
    steps: int
    window: int
    _packing: Optional[VarlenPacking] = None
    _mask: Optional[torch.Tensor] = None

    def packing(self) -> VarlenPacking:
        if self._packing is None:
            self._packing = VarlenPacking.of(self.n, self.steps, self.window)
        return self._packing

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            chunk = self.n.unsqueeze(1) + torch.arange(self.steps, device=self.n.device)
            self._mask = steps_mask(chunk, torch.cat([ring_steps(self.n, self.window), chunk], 1), self.window)
        return self._mask


@dataclass
class RingKeys:
    """Which ring slots the one query per row of a rollout step sees, and where its key goes.

    Row b has seen ``n[b]`` steps before this one; its step n[b] writes ring slot n[b] % W and then
    attends over the W slots under ``steps_mask``'s rule. Each form is built on first use, once
    per step, and shared by every layer: ``mask`` [B, 1, 1, W] for any kernel, ``bias`` [B*H, 1, W]
    (0 where visible, -inf elsewhere) which adds the mask to the scores inside their matmul, and
    ``slots`` [B*H], the rows of a contiguous ring [B, H, W, dh] seen as [B*H*W, dh] that the
    step's keys and values go to.
    """

    n: torch.Tensor
    window: int
    heads: int

    @cached_property
    def mask(self) -> torch.Tensor:
        return steps_mask(self.n.unsqueeze(1), ring_steps(self.n + 1, self.window), self.window)

    @cached_property
    def bias(self) -> torch.Tensor:
        B, W = self.n.shape[0], self.window
        bias = torch.zeros(B, self.heads, 1, W, device=self.n.device).masked_fill_(~self.mask, float("-inf"))
        return bias.view(B * self.heads, 1, W)

    @cached_property
    def slots(self) -> torch.Tensor:
        B, H, W = self.n.shape[0], self.heads, self.window
        first_of_head = torch.arange(B * H, device=self.n.device).view(B, H) * W
        return (first_of_head + (self.n % W).unsqueeze(1)).view(-1)


@dataclass
class VarlenPacking:
    """flash-attn's varlen layout of carried chunks, built on device with no host sync.

    Keys of row b (its valid cache entries in time order, then its chunk) occupy packed rows
    cu_k[b]..cu_k[b+1]; queries occupy b*T..(b+1)*T. The packed key tensor has the host-known
    upper bound B*(W-1+T) rows (the kernel reads none past cu_k[-1]) and is gathered with
    ``index`` from the flattened [B*(W+T), H, dh] concatenation of (ring, chunk).
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    index: torch.Tensor
    max_q: int
    max_k: int

    @staticmethod
    def of(n: torch.Tensor, steps: int, window: int) -> VarlenPacking:
        B, W, device = n.shape[0], window, n.device
        m = n.clamp(max=W - 1)                                  # cached steps any query sees
        cu_k = F.pad((m + steps).cumsum(0), (1, 0))
        p = torch.arange(B * (W - 1 + steps), device=device)
        row = torch.searchsorted(cu_k[1:], p, right=True).clamp(max=B - 1)
        j, m_row = p - cu_k[row], m[row]                        # position within row's keys
        cached = torch.remainder(n[row] - m_row + j, W)          # ring slot of step n-m+j
        fresh = W + (j - m_row).clamp(0, steps - 1)              # (rows past the total: any valid)
        index = row * (W + steps) + torch.where(j < m_row, cached, fresh)
        cu_q = torch.arange(B + 1, device=device, dtype=torch.int32) * steps
        return VarlenPacking(cu_q, cu_k.int(), index, steps, W - 1 + steps)


class SelfAttention(nn.Module, ABC):
    """Maps q [B, H, Tq, dh], k and v [B, H, Tk, dh] (Tk >= Tq) to the output [B, H, Tq, dh].

    Which keys a query sees: ``mask`` [B, 1, Tq, Tk] (True = visible, at least one per query;
    see ``steps_mask``) when given, else the sliding-window causal rule of ``window_mask`` with
    keys in time order, which is what fused kernels take without a mask.
    The softmax scale is 1 / sqrt(dh); ``dropout_attn`` drops attention weights in training.
    ``fused_kernels`` (set by the encoder) allows fused kernels; ``last_backend`` names what the
    last call ran (the class name unless a subclass says more).
    """

    def __init__(self, dropout_attn: float = 0.0):
        super().__init__()
        check_probability(dropout_attn=dropout_attn)
        self.dropout_attn = dropout_attn
        self.fused_kernels = True
        self.last_backend = type(self).__name__

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns the attention output [B, H, Tq, dh]."""

    def attend_carried(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor, keys: CarriedKeys) -> torch.Tensor:
        """A chunk q, k, v [B, H, T, dh] continued from a ring cache [B, H, W, dh] (before the
        chunk's write): by default ``forward`` over (ring, chunk) with ``keys.mask()``."""
        all_k, all_v = torch.cat([cache_k.to(k.dtype), k], 2), torch.cat([cache_v.to(v.dtype), v], 2)
        return self(q, all_k, all_v, keys.window, keys.mask())

    def attend_ring(self, q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, keys: RingKeys) -> torch.Tensor:
        """A rollout step's queries q [B, H, 1, dh] over the ring [B, H, W, dh] after the step's
        write: by default ``forward`` with ``keys.mask``."""
        return self(q, ring_k, ring_v, keys.window, keys.mask)


class VanillaAttention(SelfAttention):
    """Explicit softmax(QK^T / sqrt(dh)) V in plain PyTorch: the readable reference kernel."""

    def __init__(self, dropout_attn: float = 0.0):
        super().__init__(dropout_attn)
        self.dropout = nn.Dropout(dropout_attn)
        self.last_backend = "vanilla"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = window_mask(q.shape[2], k.shape[2], window, q.device)
        return explicit_attention(q, k, v, mask, self.dropout)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(dh)) V over the keys ``mask`` shows, as two batched matmuls."""
    # Scaling q instead of the scores, and masking the fresh scores in place, spares two passes
    # over [B, H, Tq, Tk].
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
    return (attn if dropout is None else dropout(attn)) @ v


def ring_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``explicit_attention`` of queries q [B, H, 1, dh] over a contiguous ring [B, H, W, dh],
    the mask given as ``RingKeys.bias``: the scale, the mask and the scores are one baddbmm."""
    B, H, _, dh = q.shape
    scores = torch.baddbmm(bias, q.reshape(B * H, 1, dh), ring_k.view(B * H, -1, dh).transpose(1, 2),
                           alpha=dh ** -0.5)
    return torch.bmm(scores.softmax(dim=-1), ring_v.view(B * H, -1, dh)).view(B, H, 1, dh)


def flash_applies(device: torch.device, dtype: torch.dtype, head_dim: int, fused: bool, varlen: bool) -> bool:
    """Whether flash-attn's kernel (varlen or not) is installed and takes such queries."""
    kernel = flash_attn_varlen_func if varlen else flash_attn_func
    return (fused and kernel is not None and device.type in FUSED_DEVICES and dtype in FLASH_DTYPES
            and head_dim <= FLASH_MAX_HEAD_DIM)


def flash_backend(q: torch.Tensor, fused: bool, varlen: bool) -> str:
    """"flash_attn" / "flash_attn_varlen" where flash-attn's kernel takes q, else "sdpa"."""
    if flash_applies(q.device, q.dtype, q.shape[-1], fused, varlen):
        return "flash_attn_varlen" if varlen else "flash_attn"
    _warn_fallback_once()
    return "sdpa"


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn("FlashAttention: flash-attn is not installed or the inputs are not fp16/bf16 "
                      "CUDA tensors; falling back to torch scaled_dot_product_attention")


class FlashAttention(SelfAttention):
    """flash-attn's fused kernels where they apply, else torch's scaled_dot_product_attention.

    Chunks from an episode start go to ``flash_attn_func``; chunks continued from the KV cache
    (every RLlib learner row) to ``flash_attn_varlen_func``, one call per layer over each row's
    valid cache entries and chunk (``VarlenPacking``), with no mask.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dropout_p, scale = self._dropout_p(), q.shape[-1] ** -0.5
        # keys out of time order (a ring) come with a mask, which flash-attn cannot take
        self.last_backend = "sdpa" if mask is not None else flash_backend(q, self.fused_kernels, varlen=False)
        if self.last_backend == "flash_attn":
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                  softmax_scale=scale, causal=True, window_size=(window - 1, 0))
            return out.transpose(1, 2)
        if mask is None:
            mask = window_mask(q.shape[2], k.shape[2], window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)

    def attend_ring(self, q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, keys: RingKeys) -> torch.Tensor:
        if q.device.type == "cpu" and ring_k.is_contiguous() and ring_v.is_contiguous() and not torch.is_grad_enabled():
            # On CPU over a ring stored layer first (an env runner's RolloutState): two batched
            # matrix-vector products beat torch's CPU SDPA kernel there, which tiles for many
            # queries; on strided rings the matmuls would copy, and SDPA is faster
            # (benchmarks/rollout_step_cpu.py).
            return ring_attention(q, ring_k, ring_v, keys.bias)
        return super().attend_ring(q, ring_k, ring_v, keys)

    def attend_carried(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor, keys: CarriedKeys) -> torch.Tensor:
        if flash_backend(q, self.fused_kernels, varlen=True) != "flash_attn_varlen":
            return super().attend_carried(q, k, v, cache_k, cache_v, keys)
        self.last_backend = "flash_attn_varlen"
        B, H, T, dh = q.shape
        packing = keys.packing()

        def packed(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            rows = torch.cat([cache.to(new.dtype), new], 2).transpose(1, 2).reshape(-1, H, dh)
            return rows.index_select(0, packing.index)

        out = flash_attn_varlen_func(q.transpose(1, 2).reshape(B * T, H, dh), packed(cache_k, k), packed(cache_v, v),
                                     packing.cu_q, packing.cu_k, packing.max_q, packing.max_k,
                                     dropout_p=self._dropout_p(), softmax_scale=dh ** -0.5, causal=True,
                                     window_size=(keys.window - 1, 0))
        return out.view(B, T, H, dh).transpose(1, 2)

    def _dropout_p(self) -> float:
        return self.dropout_attn if self.training else 0.0
