"""Mamba's two sequence primitives in pure PyTorch, with optional fused CUDA kernels.

* ``selective_scan``: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t·h_t + D u_t,  y *= silu(z).
  The recurrence is linear in h, so it is computed as a parallel associative scan (log-depth,
  vectorised over time) instead of a Python loop over steps, over cache-sized time chunks that
  carry the state, with a hand-written backward pass (the same scan, run in reverse).
* ``causal_conv1d``: depthwise causal convolution that can start from the previous inputs.

Both accept an initial state, so a sequence cut into chunks that carry state computes exactly what
one whole pass computes. ``run_selective_scan`` / ``run_causal_conv1d`` switch to mamba-ssm's and
causal-conv1d's kernels when those are installed and the tensors live on CUDA; everywhere else the
pure-PyTorch code runs.
"""
from __future__ import annotations

from functools import partial
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
# The scan runs over time chunks sized so one [batch, steps, d_inner, d_state] fp32 tensor stays
# under this many bytes: the CPU allocator recycles blocks this small, whereas bigger ones come
# fresh from the OS on every call and their page faults made a whole-sequence scan ~2-4x slower.
CHUNK_BYTES = 8 * 2**20


def _scan(a: Tensor, b: Tensor, h0: Optional[Tensor]) -> Tensor:
    """All h_t = a_t h_{t-1} + b_t along dim 1, with h_{-1} = h0 (zero if None); no autograd.

    A parallel associative scan over the pairs (a, b), (a1, b1)∘(a2, b2) = (a1 a2, a2 b1 + b2),
    in its work-efficient odd-even form: fold each pair of neighbouring steps into one, scan the
    half-length sequence recursively (which yields the odd steps), then fill in the even steps
    from their odd predecessors. log2(L) levels of vectorised ops and O(L) work in all, which on
    a CPU beats the O(L log L) Hillis-Steele doubling (it is memory-bound). Only products of
    decays <= 1 appear, so nothing can overflow however long the sequence.
    """
    length, m = a.shape[1], a.shape[1] // 2
    h = torch.empty_like(b)
    if h0 is None:
        h[:, 0] = b[:, 0]
    else:
        torch.addcmul(b[:, 0], a[:, 0], h0, out=h[:, 0])
    if length > 1:
        a_even, a_odd, b_even, b_odd = a[:, 0:2 * m:2], a[:, 1::2], b[:, 0:2 * m:2], b[:, 1::2]
        h[:, 1::2] = odd = _scan(a_even * a_odd, torch.addcmul(b_odd, a_odd, b_even), h0)
        torch.addcmul(b[:, 2::2], a[:, 2::2], odd[:, :(length - 1) // 2], out=h[:, 2::2])
    return h


def _reverse_scan(a: Tensor, g: Tensor) -> Tensor:
    """All G_t = g_t + a_{t+1} G_{t+1} along dim 1, with G_L = 0: ``_scan`` on reversed time."""
    reverse = torch.arange(a.shape[1] - 1, -1, -1, device=a.device)
    # Reversed step s decays by a_{L-s}; step 0 starts from zero, so its decay is never used.
    return _scan(a.index_select(1, reverse.roll(1)), g.index_select(1, reverse), None).index_select(1, reverse)


def _chunk_states(delta: Tensor, u: Tensor, A: Tensor, B: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Decays exp(Δ_t A) and states h_t [batch, steps, d_inner, d_state] of one time chunk."""
    decay = torch.mul(delta.unsqueeze(-1), A).exp_()
    return decay, _scan(decay, (delta * u).unsqueeze(-1) * B.unsqueeze(-2), h0)


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t·h_t with h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, on time-major fp32 tensors,
    run over time chunks that carry the state; returns (y, last state).

    Backward keeps only each chunk's entry state, recomputes the chunk's states, and runs the
    adjoint recurrence dL/dh_t = C_t dL/dy_t + exp(Δ_{t+1} A) dL/dh_{t+1} with the same scan in
    reverse, chunk by chunk from the end, so no [batch, L, d_inner, d_state] tensor is ever built.
    """

    @staticmethod
    def forward(ctx, delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor,
                steps: int) -> tuple[Tensor, Tensor]:
        ys, entries, h = [], [], h0
        for start in range(0, delta.shape[1], steps):
            t = slice(start, start + steps)
            entries.append(h)
            _, states = _chunk_states(delta[:, t], u[:, t], A, B[:, t], h)
            ys.append((states @ C[:, t].unsqueeze(-1)).squeeze(-1))
            h = states[:, -1].clone()  # a view would keep the whole chunk alive
        ctx.steps = steps
        ctx.save_for_backward(delta, u, A, B, C, *entries)
        return torch.cat(ys, 1) if len(ys) > 1 else ys[0], h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_last: Tensor):
        delta, u, A, B, C, *entries = ctx.saved_tensors
        grad_delta, grad_u, grad_B, grad_C = map(torch.empty_like, (delta, u, B, C))
        grad_A = torch.zeros_like(A)
        carry = grad_last  # dL/dh at the end of the chunk, from all later steps
        for k in reversed(range(len(entries))):
            t = slice(k * ctx.steps, (k + 1) * ctx.steps)
            dt, ut, Bt, gy, h0 = delta[:, t], u[:, t], B[:, t], grad_y[:, t], entries[k]
            decay, states = _chunk_states(dt, ut, A, Bt, h0)
            grad_h = gy.unsqueeze(-1) * C[:, t].unsqueeze(-2)
            grad_h[:, -1] += carry
            grad_h = _reverse_scan(decay, grad_h)                            # dL/dh_t
            grad_C[:, t] = (states.mT @ gy.unsqueeze(-1)).squeeze(-1)
            grad_B[:, t] = (grad_h.mT @ (dt * ut).unsqueeze(-1)).squeeze(-1)
            grad_du = (grad_h @ Bt.unsqueeze(-1)).squeeze(-1)
            carry = decay[:, 0] * grad_h[:, 0]
            # dL/d(Δ_t A) = dL/dh_t * h_{t-1} * exp(Δ_t A), built in place in grad_h's buffer
            grad_log_decay = grad_h.mul_(decay)
            grad_log_decay[:, 1:] *= states[:, :-1]
            grad_log_decay[:, 0] *= h0
            grad_delta[:, t] = grad_du * ut + (grad_log_decay * A).sum(-1)
            grad_u[:, t] = grad_du * dt
            grad_A += grad_log_decay.mul_(dt.unsqueeze(-1)).sum((0, 1))
        return grad_delta, grad_u, grad_A, grad_B, grad_C, carry, None


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None,
                   return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_fn`` contract (3-D B/C only) plus ``initial_state``.

    u, delta, z: [batch, d_inner, L]; A: [d_inner, d_state]; B, C: [batch, d_state, L];
    D, delta_bias: [d_inner]; initial_state: [batch, d_inner, d_state] (zeros if None).
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
        h0 = u.new_zeros(u.shape[0], *A.shape) if initial_state is None else initial_state.float()
        steps = max(1, CHUNK_BYTES // (4 * h0.numel()))
        y, last = _SelectiveScan.apply(delta, u, A.float(), B, C, h0, steps)  # y: [batch, L, d_inner]
        if D is not None:
            y = y + D.float() * u
        if z is not None:
            y = y * F.silu(z.float().mT)
    y = y.mT.to(dtype)
    return (y, last) if return_last_state else y


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
    # exp of a non-positive number: underflows to 0 for long sequences, never overflows. Only
    # elementwise ops and a sum, so autocast cannot lower their precision.
    carried = torch.exp(dt.cumsum(-1).unsqueeze(-1) * A.float()[:, None]) * initial_state.float()[:, :, None]
    extra = (carried * C.float().mT[:, None]).sum(-1)                     # carried: [b, d_inner, L, d_state]
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
    """
    past = (x.new_zeros(x.shape[0], x.shape[1], weight.shape[1] - 1) if initial_state is None
            else initial_state.to(x.dtype))
    padded = torch.cat([past, x], -1)                                     # [batch, dim, W-1+L]
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=weight.shape[0])
    return (out, padded[..., x.shape[-1]:]) if return_final_state else out


def run_selective_scan(u: Tensor, *args, return_last_state: bool = False,
                       **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_scan``, through mamba-ssm's kernel when it is installed and u is on CUDA.
    That kernel gives its last state no gradient, so a state that may carry gradients (a chunk
    continued from a state during training) takes the PyTorch path."""
    fused = (SCAN_KERNEL is not None and u.device.type in FUSED_DEVICES
             and not (return_last_state and torch.is_grad_enabled()))
    scan = partial(fused_selective_scan, SCAN_KERNEL) if fused else selective_scan
    return scan(u, *args, return_last_state=return_last_state, **kwargs)


def run_causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      initial_state: Optional[Tensor] = None,
                      return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``causal_conv1d``, through causal-conv1d's kernel when it is installed, x is on CUDA and
    no state goes in or out (the kernel's state arguments need channel-last layouts and it only
    takes widths 2-4); with states, the PyTorch path is cheap anyway."""
    if (CONV_KERNEL is not None and x.device.type in FUSED_DEVICES and initial_state is None
            and not return_final_state and 2 <= weight.shape[1] <= 4):
        return CONV_KERNEL(x.contiguous(), weight, bias)
    return causal_conv1d(x, weight, bias, initial_state, return_final_state)
