"""CPU stand-ins of mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn``.

Each computes what its kernel computes, refuses (RuntimeError, like the kernels' TORCH_CHECKs, or
AssertionError, like their Python wrappers) the inputs the kernel refuses, and has its gradient
contract: the scan starts from zero, drops its last state's gradient and saves no
[batch, d_inner, L, d_state] tensor for backward; the conv gives the initial states' gradient.
Only the options this repository uses are implemented (3-D B/C; no seq_idx, final_states_out or
activation).
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import rllib_trajenc.nets.selective_scan as ss

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _require(ok: bool, message: str) -> None:
    """A TORCH_CHECK: the kernels' C++ side raises RuntimeError."""
    if not ok:
        raise RuntimeError(message)


def _check_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    """selective_scan_cuda.fwd's checks (those that apply to 3-D B/C)."""
    _require(u.dtype in FLOATS, f"u must be fp32, fp16 or bf16, got {u.dtype}")
    _require(A.dtype == torch.float32, f"A must be fp32, got {A.dtype}")
    _require(B.dim() == 3 and C.dim() == 3, "the stand-in takes 3-D (variable) B and C only")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        _require(t is None or t.dtype == u.dtype, f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        _require(t is None or t.dtype == torch.float32, f"{name} must be fp32, got {t.dtype}")
    (batch, dim, length), dstate = u.shape, A.shape[1]
    _require(dstate <= 256, "selective_scan only supports state dimension <= 256")
    _require(delta.shape == u.shape and (z is None or z.shape == u.shape) and A.shape[0] == dim
             and B.shape == C.shape == (batch, dstate, length), "shape mismatch")


class _ZeroStateScan(torch.autograd.Function):
    """``ss.selective_scan`` from a zero state that saves only its inputs and recomputes in
    backward, as the kernel does; the last state's gradient is dropped, as the kernel drops it."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        return ss.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, True)

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_last: Tensor):
        inputs = [None if t is None else t.detach().requires_grad_(needs)
                  for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            out = ss.selective_scan(*inputs, ctx.delta_softplus)
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None)


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                      delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's kernel: out in u's dtype (and the fp32 last state, without gradient)."""
    _check_scan(u, delta, A, B, C, D, z, delta_bias)
    out, last = _ZeroStateScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def _check_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor]) -> None:
    """causal_conv1d_fwd's checks; channel-last means x.stride(1) == 1 and x.stride(2) > 1."""
    (batch, dim, _), width = x.shape, weight.shape[1]
    _require(x.dtype in FLOATS and weight.dtype in FLOATS, "x and weight must be fp32, fp16 or bf16")
    _require(bias is None or bias.dtype == weight.dtype, "bias must have weight's dtype")
    _require(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _require(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
        _require(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "causal_conv1d with channel last "
                 "layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8")
    if initial_states is not None:
        _require(channel_last, "initial_states is only supported for channel last layout")
        _require(initial_states.dtype == x.dtype, "initial_states must have x's dtype")
        _require(initial_states.shape == (batch, dim, width - 1), "initial_states shape mismatch")
        _require(initial_states.stride(1) == 1, "initial_states must have stride(1) == 1")


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, seq_idx=None,
                     initial_states: Optional[Tensor] = None, return_final_states: bool = False,
                     final_states_out=None, activation=None) -> Tensor | tuple[Tensor, Tensor]:
    """causal-conv1d's kernel: out in x's dtype, computed in fp32; final states (batch, dim, W-1)
    with stride(1) == 1 (a transpose of (batch, W-1, dim))."""
    if seq_idx is not None or final_states_out is not None or activation is not None:
        raise NotImplementedError("the stand-in takes no seq_idx, final_states_out or activation")
    if x.stride(2) != 1 and x.stride(1) != 1:  # the Python wrapper's own fix-ups and assert
        x = x.contiguous()
    if initial_states is not None and initial_states.stride(2) != 1 and initial_states.stride(1) != 1:
        initial_states = initial_states.contiguous()
    assert not return_final_states or x.stride(1) == 1, \
        "Only channel-last layout support returning final_states_out"
    _check_conv(x, weight, bias, initial_states)
    (batch, dim, length), width = x.shape, weight.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        past = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states
        padded = torch.cat([past, x], -1).float()
        out = F.conv1d(padded, weight.float().unsqueeze(1), None if bias is None else bias.float(),
                       groups=dim).to(x.dtype)
    if not return_final_states:
        return out
    return out, padded[..., length:].to(x.dtype).mT.contiguous().mT


def install(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Dispatches to these stand-ins as if on CUDA; the returned list names each call ("scan",
    "conv")."""
    calls: list[str] = []

    def scan(*args, **kwargs):
        calls.append("scan")
        return selective_scan_fn(*args, **kwargs)

    def conv(*args, **kwargs):
        calls.append("conv")
        return causal_conv1d_fn(*args, **kwargs)

    monkeypatch.setattr(ss, "SCAN_KERNEL", scan)
    monkeypatch.setattr(ss, "CONV_KERNEL", conv)
    monkeypatch.setattr(ss, "FUSED_DEVICES", ("cpu",))
    return calls
