"""Mamba's two sequence primitives in pure PyTorch, with optional fused CUDA kernels.

* ``selective_scan``: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t·h_t + D u_t,  y *= silu(z).
  The recurrence is linear in h, so it is computed as a parallel associative scan (log-depth,
  vectorised over time) instead of a Python loop over steps.
* ``causal_conv1d``: depthwise causal convolution that can start from the previous inputs.

Both accept an initial state, so a sequence cut into chunks that carry state computes exactly what
one whole pass computes. ``run_selective_scan`` / ``run_causal_conv1d`` switch to mamba-ssm's and
causal-conv1d's kernels when those are installed and the tensors live on CUDA; everywhere else the
pure-PyTorch code runs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # fused kernels are optional (the "gpu" extra); their absence just means the PyTorch path
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as SCAN_KERNEL
except (ImportError, OSError):
    SCAN_KERNEL = None
try:
    from causal_conv1d import causal_conv1d_fn as CONV_KERNEL
except (ImportError, OSError):
    CONV_KERNEL = None

# Device types on which the fused kernels above are used (tests point this at "cpu" with stand-ins).
FUSED_DEVICES = ("cuda",)
# Time steps per block of the blocked scan: log2(SCAN_CHUNK) doubling steps over the whole tensor,
# then a (much smaller) scan over the block ends. Chosen by timing fwd+bwd on CPU.
SCAN_CHUNK = 16


def _doubling_scan(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Hillis-Steele inclusive scan along dim 1 of the pairs (a_t, b_t) under
    (a1, b1)∘(a2, b2) = (a1 a2, a2 b1 + b2). Returns (prod_{s<=t} a_s, h_t from a zero state).

    Only products of decays <= 1 appear, so nothing can overflow however long the sequence.
    """
    a, b = a.clone(), b.clone()
    k = 1
    while k < a.shape[1]:
        # The right-hand sides are materialised before the slice assignment, so no aliasing.
        b[:, k:] += a[:, k:] * b[:, :-k]
        a[:, k:] = a[:, k:] * a[:, :-k]
        k *= 2
    return a, b


def _blocked_scan(a: Tensor, b: Tensor, h0: Optional[Tensor], chunk: int) -> Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 with h_{-1} = h0 (zero if None).

    Every block of ``chunk`` steps is scanned from zero in parallel; the states at the block ends
    are then scanned recursively (a sequence ``chunk`` times shorter), and each block adds its
    entering state times its cumulative decay.
    """
    batch, length, rest = a.shape[0], a.shape[1], a.shape[2:]
    chunk = min(chunk, length)
    n_blocks = -(-length // chunk)
    pad = n_blocks * chunk - length
    if pad:  # identity elements (a=1, b=0) leave the scan unchanged
        a = torch.cat([a, a.new_ones(batch, pad, *rest)], 1)
        b = torch.cat([b, b.new_zeros(batch, pad, *rest)], 1)
    decay, h = (t.view(batch, n_blocks, chunk, *rest) for t in _doubling_scan(
        a.reshape(batch * n_blocks, chunk, *rest), b.reshape(batch * n_blocks, chunk, *rest)))
    if n_blocks == 1:
        entering = h0
    else:
        ends = _blocked_scan(decay[:, :, -1], h[:, :, -1], h0, chunk)
        first = h0 if h0 is not None else torch.zeros_like(ends[:, 0])
        entering = torch.cat([first.unsqueeze(1), ends[:, :-1]], 1)
    if entering is not None:
        h.addcmul_(decay, entering.view(batch, n_blocks, 1, *rest))
    h = h.view(batch, n_blocks * chunk, *rest)
    return h[:, :length] if pad else h


class _LinearScan(torch.autograd.Function):
    """Autograd for h_t = a_t h_{t-1} + b_t: the backward pass is the same scan run in reverse
    (dL/dh_t = g_t + a_{t+1} dL/dh_{t+1}), so only a and h are kept instead of every
    intermediate of the doubling steps."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Optional[Tensor], chunk: int) -> Tensor:
        h = _blocked_scan(a, b, h0, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):
        a, h, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        grad_b = _blocked_scan(a_next.flip(1), grad_h.flip(1), None, ctx.chunk).flip(1)
        h_prev = torch.cat([(h0 if h0 is not None else torch.zeros_like(h[:, 0])).unsqueeze(1),
                            h[:, :-1]], 1)
        grad_h0 = a[:, 0] * grad_b[:, 0] if h0 is not None else None
        return grad_b * h_prev, grad_b, grad_h0, None


def linear_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None, chunk: int = SCAN_CHUNK) -> Tensor:
    """All states of h_t = a_t h_{t-1} + b_t (time on dim 1, h_{-1} = h0 or zero)."""
    return _LinearScan.apply(a, b, h0, chunk)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None,
                   return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_fn`` contract (3-D B/C only) plus ``initial_state``.

    u, delta, z: [batch, d_inner, L]; A: [d_inner, d_state]; B, C: [batch, d_state, L];
    D, delta_bias: [d_inner]; initial_state: [batch, d_inner, d_state].
    Returns y [batch, d_inner, L] in u's dtype (and the fp32 last state if asked).
    """
    dtype = u.dtype
    # The scan always runs in fp32, also under autocast: inputs are cast up and autocast is off
    # here, because products of many bf16 decays and the C·h contraction lose too much precision.
    with torch.autocast(u.device.type, enabled=False):
        u, delta, B, C = (t.float().mT for t in (u, delta, B, C))  # time-major: [batch, L, ...]
        if delta_bias is not None:
            delta = delta + delta_bias.float()
        if delta_softplus:
            delta = F.softplus(delta)
        decay = torch.exp(delta.unsqueeze(-1) * A.float())               # [batch, L, d_inner, d_state]
        drive = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)               # [batch, L, d_inner, d_state]
        h0 = None if initial_state is None else initial_state.float()
        h = linear_scan(decay, drive, h0)
        y = (h @ C.unsqueeze(-1)).squeeze(-1)                             # [batch, L, d_inner]
        if D is not None:
            y = y + D.float() * u
        if z is not None:
            y = y * F.silu(z.float().mT)
    y = y.mT.to(dtype)
    return (y, h[:, -1]) if return_last_state else y


def fused_selective_scan(scan_fn: Callable[..., Tensor | tuple[Tensor, Tensor]],
                         u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         initial_state: Optional[Tensor] = None,
                         return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_scan`` on top of a zero-state kernel with ``selective_scan_fn``'s contract.

    The state is linear in h0, so its contribution is added afterwards: step t sees
    exp(A·sum_{s<=t} Δ_s) h0 on top of the kernel's state, read out by C_t and gated by silu(z).
    (mamba-ssm's kernel gives its last state no gradient; the h0 part here does get one.)
    """
    out = scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, return_last_state=return_last_state)
    if initial_state is None:
        return out
    y, last = out if return_last_state else (out, None)
    dt = delta.float() + (0.0 if delta_bias is None else delta_bias.float()[:, None])
    dt = F.softplus(dt) if delta_softplus else dt
    # exp of a non-positive number: underflows to 0 for long sequences, never overflows.
    carried = torch.exp(dt.cumsum(-1).unsqueeze(-1) * A.float()[:, None]) * initial_state.float()[:, :, None]
    extra = torch.einsum("bdln,bnl->bdl", carried, C.float())             # carried: [b, d_inner, L, d_state]
    if z is not None:
        extra = extra * F.silu(z.float())
    y = y + extra.to(y.dtype)
    return (y, last + carried[:, :, -1]) if return_last_state else y


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  initial_state: Optional[Tensor] = None,
                  return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv: out_t = bias + sum_k weight[:, k] x_{t-W+1+k}.

    x: [batch, dim, L]; weight: [dim, W]; initial_state: [batch, dim, W-1], the W-1 inputs
    before x (zeros = start of the sequence). The final state is the last W-1 inputs.
    Computed time-major as W shifted multiply-adds: cheap for Mamba's small W and for L = 1.
    """
    width, length = weight.shape[1], x.shape[-1]
    xt = x.mT                                                             # [batch, L, dim]
    past = (xt.new_zeros(xt.shape[0], width - 1, xt.shape[2]) if initial_state is None
            else initial_state.mT.to(xt.dtype))
    padded = torch.cat([past, xt], 1)                                     # [batch, W-1+L, dim]
    out = sum((padded[:, k:k + length] * weight[:, k] for k in range(width)), 0 if bias is None else bias).mT
    return (out, padded[:, length:].mT) if return_final_state else out


def run_selective_scan(*args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_scan``, through mamba-ssm's kernel when installed and the input is on CUDA."""
    if SCAN_KERNEL is not None and args[0].device.type in FUSED_DEVICES:
        return fused_selective_scan(SCAN_KERNEL, *args, **kwargs)
    return selective_scan(*args, **kwargs)


def run_causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      initial_state: Optional[Tensor] = None,
                      return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``causal_conv1d``, through causal-conv1d's kernel when installed and x is on CUDA.
    The kernel returns final states only for channel-last x (stride(1) == 1), which is the
    layout of a Linear output transposed to [batch, dim, L]."""
    if CONV_KERNEL is not None and x.device.type in FUSED_DEVICES:
        state = None if initial_state is None else initial_state.to(x.dtype)
        return CONV_KERNEL(x, weight, bias, initial_states=state, return_final_states=return_final_state)
    return causal_conv1d(x, weight, bias, initial_state, return_final_state)
