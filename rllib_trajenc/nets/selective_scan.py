"""Mamba's two sequence primitives in pure PyTorch, with optional fused CUDA kernels.

* ``selective_scan``: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t·h_t + D u_t,  y *= silu(z).
  The recurrence is linear in h, so it is computed as a parallel associative scan (log-depth,
  vectorised over time) instead of a Python loop over steps, over cache-sized time chunks that
  carry the state, with a hand-written backward pass (the same scan, run in reverse).
* ``causal_conv1d``: depthwise causal convolution that can start from the previous inputs.

Both accept an initial state, so a sequence cut into chunks that carry state computes exactly what
one whole pass computes. ``run_selective_scan`` / ``run_causal_conv1d`` switch to mamba-ssm's and
causal-conv1d's kernels when those are installed, the tensors live on CUDA and the kernels' contracts
allow (``scan_backend`` / ``conv_backend`` name the choice), with states in and out as well: the
scan kernel, which always starts from zero, is handed the initial state through d_state prepended
pseudo-steps (``fused_selective_scan``), and the conv kernel takes states in its channel-last
layout. Everywhere else, or with ``fused=False``, the pure-PyTorch code runs.
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
# Activation dtypes both kernels take.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
    else:  # in place on views rather than out= views, which torch.compile cannot trace
        h[:, 0].copy_(b[:, 0]).addcmul_(a[:, 0], h0)
    if length > 1:
        a_even, a_odd, b_even, b_odd = a[:, 0:2 * m:2], a[:, 1::2], b[:, 0:2 * m:2], b[:, 1::2]
        h[:, 1::2] = odd = _scan(a_even * a_odd, torch.addcmul(b_odd, a_odd, b_even), h0)
        h[:, 2::2].copy_(b[:, 2::2]).addcmul_(a[:, 2::2], odd[:, :(length - 1) // 2])
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


LAST_STATE_GRADIENT_ERROR = (
    "the last state of mamba-ssm's fused selective scan has no gradient (the kernel drops it): "
    "backpropagating through it would silently lose that gradient. Detach it, or set the "
    "encoder's fused_kernels = False to backpropagate through chunks.")


class _RefuseGradient(torch.autograd.Function):
    """Identity on a fused kernel's last state. The kernel drops that state's gradient, so one
    reaching it would be lost without a trace; backward raises instead. ``anchor`` (a kernel
    input) makes the output require grad whenever the inputs do, even if the kernel's does not."""

    @staticmethod
    def forward(ctx, state: Tensor, anchor: Tensor) -> Tensor:
        return state.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(LAST_STATE_GRADIENT_ERROR)


def _state_prefix(h0: Tensor, A: Tensor, delta_bias: Optional[Tensor],
                  delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """u, delta [batch, d_inner, d_state] and B [batch, d_state, d_state] of d_state pseudo-steps
    that leave a zero-state scan's state equal to h0 (fp32). Pseudo-step j writes state j alone
    (B = e_j) with step size c, and u_j pre-compensates the decay exp(c A_j) of the d_state-1-j
    pseudo-steps after it.

    c = 1 / max(100, d_state * max_n |A_n|) per channel keeps every compensation factor
    exp(c |A_j| (d_state-1-j)) below e, so u_j = h0_j e^{...} / c is finite for any A <= 0 (a
    fixed c would overflow once c |A| d_state > 88); the cap at 1e-2 just keeps c finite where
    A ~ 0 (any small c is exact). The kernel steps by f(delta + delta_bias), f = softplus or the
    identity, so delta = f^-1(c) - delta_bias with delta_bias attached: the bias' gradients from
    the pseudo-steps cancel exactly. u_j divides by the step the kernel actually takes (that sum,
    rounded as the kernel rounds it). c is detached, since the prefix is exact for any c, so
    autograd through u_j gives exact gradients to h0 and A (A's from the pseudo-steps cancel).
    """
    batch, _, n = h0.shape
    c = (A.detach().abs().amax(-1) * n).clamp(min=100.0).reciprocal()          # [d_inner]
    delta = torch.log(torch.expm1(c)) if delta_softplus else c
    step = delta
    if delta_bias is not None:
        delta = delta - delta_bias
        step = delta.detach() + delta_bias.detach()
    step = (F.softplus(step) if delta_softplus else step)[:, None]
    later = torch.arange(n - 1, -1, -1, device=h0.device, dtype=torch.float32)  # d_state-1-j
    u = h0 * (torch.exp(-step * A * later) / step)
    B = torch.eye(n, device=h0.device).expand(batch, n, n)
    return u, delta[:, None].expand_as(u), B


def fused_selective_scan(scan_fn: Callable[..., Tensor | tuple[Tensor, Tensor]],
                         u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         initial_state: Optional[Tensor] = None,
                         return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_scan`` on a zero-state kernel with ``selective_scan_fn``'s contract (3-D B/C).

    An initial state is written by d_state pseudo-steps prepended to every row (``_state_prefix``;
    C = 0 and z = 0 there, and their outputs are dropped), so the kernel computes the carried scan
    exactly, and its own backward gives every gradient, h0's included, without saving anything of
    size [batch, d_inner, L, d_state]. Fresh rows pay nothing; carried rows pay d_state steps.

    Dtypes follow the kernel's contract: u, delta, z, B, C share one dtype (u's for fresh rows,
    fp32 with a state: u_j in bf16 would perturb the state by ~0.4%), A, D, delta_bias are fp32,
    autocast is off. y comes back in u's dtype. The last state (fp32) has no gradient: backward
    through it raises RuntimeError (``LAST_STATE_GRADIENT_ERROR``) rather than dropping it.
    """
    dtype, d_state = u.dtype, A.shape[1]
    with torch.autocast(u.device.type, enabled=False):
        A, D, delta_bias = (None if t is None else t.float() for t in (A, D, delta_bias))
        kind = dtype if initial_state is None else torch.float32
        u, delta, B, C, z = (None if t is None else t.to(kind) for t in (u, delta, B, C, z))
        if initial_state is not None:
            u0, delta0, B0 = _state_prefix(initial_state.float(), A, delta_bias, delta_softplus)
            u, delta, B = torch.cat([u0, u], -1), torch.cat([delta0, delta], -1), torch.cat([B0, B], -1)
            C = torch.cat([torch.zeros_like(B0), C], -1)
            z = None if z is None else torch.cat([torch.zeros_like(u0), z], -1)
        out = scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                      delta_softplus=delta_softplus, return_last_state=return_last_state)
    y, last = out if return_last_state else (out, None)
    y = (y if initial_state is None else y[..., d_state:]).to(dtype)
    return (y, _RefuseGradient.apply(last, u)) if return_last_state else y


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


def scan_backend(device_type: str, dtype: torch.dtype, d_state: int, fused: bool = True) -> str:
    """"mamba_ssm" where its kernel is installed and takes these inputs, else "pytorch"."""
    use = (fused and SCAN_KERNEL is not None and device_type in FUSED_DEVICES
           and dtype in KERNEL_DTYPES and d_state <= 256)
    return "mamba_ssm" if use else "pytorch"


def conv_backend(device_type: str, dtype: torch.dtype, dim: int, width: int, stateful: bool,
                 fused: bool = True) -> str:
    """"causal_conv1d" where its kernel is installed and takes these inputs, else "pytorch".
    It takes widths 2-4 only, and states only in a channel-last layout, which needs dim % 8 == 0."""
    use = (fused and CONV_KERNEL is not None and device_type in FUSED_DEVICES
           and dtype in KERNEL_DTYPES and 2 <= width <= 4 and (not stateful or dim % 8 == 0))
    return "causal_conv1d" if use else "pytorch"


def run_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       initial_state: Optional[Tensor] = None, return_last_state: bool = False,
                       fused: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_scan``, through mamba-ssm's kernel (``fused_selective_scan``) wherever
    ``scan_backend`` picks it, from a carried state too; ``fused=False`` forces the PyTorch path."""
    use_kernel = scan_backend(u.device.type, u.dtype, A.shape[1], fused) == "mamba_ssm"
    scan = partial(fused_selective_scan, SCAN_KERNEL) if use_kernel else selective_scan
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)


def _channel_last(t: Tensor) -> Tensor:
    """t [batch, dim, n] as causal-conv1d's channel-last layout wants it: stride(1) == 1 and
    strides 0 and 2 multiples of 8 (a copy, transposed from [batch, n, dim], unless it is so)."""
    if t.stride(1) == 1 and t.stride(2) > 1 and t.stride(0) % 8 == 0 and t.stride(2) % 8 == 0:
        return t
    return t.new_empty(t.shape[0], t.shape[2], t.shape[1]).copy_(t.mT).mT


def run_causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      initial_state: Optional[Tensor] = None, return_final_state: bool = False,
                      fused: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """``causal_conv1d``, through causal-conv1d's kernel wherever ``conv_backend`` picks it;
    ``fused=False`` forces the PyTorch path. States go through the kernel's channel-last layout
    (x [batch, dim, L] with stride(1) == 1, e.g. the transpose of a [batch, L, dim] projection);
    the final state, [batch, dim, W-1] like ``causal_conv1d``'s, comes back in that layout."""
    stateful = initial_state is not None or return_final_state
    if conv_backend(x.device.type, x.dtype, x.shape[1], weight.shape[1], stateful, fused) == "pytorch":
        return causal_conv1d(x, weight, bias, initial_state, return_final_state)
    bias = None if bias is None else bias.to(weight.dtype)
    if not stateful:
        return CONV_KERNEL(x.contiguous(), weight, bias)
    if initial_state is not None:
        initial_state = _channel_last(initial_state.to(x.dtype))
    return CONV_KERNEL(_channel_last(x), weight, bias, initial_states=initial_state,
                       return_final_states=return_final_state)
