"""CPU stand-ins with flash-attn 2's documented contracts for ``flash_attn_func`` and
``flash_attn_varlen_func``, written from that contract (not from its code).

Contract: q (total_q, H, dh), k and v (total_k, H_k, dh) packed by int32 cu_seqlens [batch + 1];
fp16/bf16 only, one dtype for q, k and v; dh <= 256; H divisible by H_k. With ``causal``, query i
of a sequence sees keys j <= i + seqlen_k - seqlen_q (bottom-right aligned); ``window_size=(l, r)``
keeps keys in [i + seqlen_k - seqlen_q - l, i + seqlen_k - seqlen_q + r] (-1: unbounded). Packed
rows past cu_seqlens[-1] are never read. Computed here in fp32 and returned in q's dtype.

``ALLOW_FP32`` admits fp32 inputs, which the real kernels refuse: only exactness tests set it,
so that the packing around the kernel can be compared with the reference path to 1e-5.
"""
from __future__ import annotations

import pytest
import torch

import rllib_trajenc.nets.attention as attention

ALLOW_FP32 = False


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
    dtypes = (torch.float16, torch.bfloat16, *((torch.float32,) if ALLOW_FP32 else ()))
    if q.dtype not in dtypes:
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type, got {q.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError("query, key and value must have the same dtype")
    if q.shape[-1] > 256:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
    if q.shape[-2] % k.shape[-2] or k.shape[-2] != v.shape[-2]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    if dropout_p:
        raise NotImplementedError("the stand-in has no dropout")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
            window: tuple[int, int]) -> torch.Tensor:
    """One sequence: q [sq, H, dh], k, v [sk, H_k, dh] -> [sq, H, dh] in fp32."""
    sq, sk = q.shape[0], k.shape[0]
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    diag = torch.arange(sq).unsqueeze(1) + sk - sq            # each query's own key index
    j = torch.arange(sk)
    left, right = window
    right = 0 if causal else right
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        visible &= j <= diag + right
    if left >= 0:
        visible &= j >= diag - left
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", weights, v.float())


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    _check(q, k, v, dropout_p)
    for cu in (cu_seqlens_q, cu_seqlens_k):
        if cu.dtype != torch.int32 or cu.dim() != 1:
            raise RuntimeError(f"cu_seqlens must be a 1-D int32 tensor, got {cu.dtype} of {cu.dim()} dims")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have batch + 1 entries each")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q, dtype=torch.float32)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[b:b + 2], bounds_k[b:b + 2]
        if q1 - q0 > max_seqlen_q or k1 - k0 > max_seqlen_k:
            raise RuntimeError("a sequence is longer than max_seqlen")
        out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, window_size)
    return out.to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, Tq, H, dh], k, v [B, Tk, H_k, dh]: the varlen contract with equal lengths."""
    B, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    cu_q, cu_k = (torch.arange(B + 1, dtype=torch.int32) * t for t in (tq, tk))
    out = flash_attn_varlen_func(q.reshape(B * tq, *q.shape[2:]), k.reshape(B * tk, *k.shape[2:]),
                                 v.reshape(B * tk, *v.shape[2:]), cu_q, cu_k, tq, tk, dropout_p,
                                 softmax_scale, causal, window_size)
    return out.view(q.shape)


def install(monkeypatch: pytest.MonkeyPatch, allow_fp32: bool = True) -> list[str]:
    """flash-attn's kernels replaced by these stand-ins, used on CPU; the list names each call."""
    calls: list[str] = []

    def recorded(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(attention, "flash_attn_func", recorded("flash_attn", flash_attn_func))
    monkeypatch.setattr(attention, "flash_attn_varlen_func", recorded("flash_attn_varlen", flash_attn_varlen_func))
    monkeypatch.setattr(attention, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setitem(globals(), "ALLOW_FP32", allow_fp32)
    if allow_fp32:
        monkeypatch.setattr(attention, "FLASH_DTYPES", (*attention.FLASH_DTYPES, torch.float32))
    return calls
