"""Mamba: the parallel scan against a plain loop, the causal conv, and state carrying end to end."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import rllib_trajenc.nets.selective_scan as ss
from rllib_trajenc.nets.mamba import MambaTrajEncoder
from tests.stand_ins import mamba_kernels

TOL = 1e-5
TSTEP_DIM, MAX_SEQ_LEN = 5, 8


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    initial_state=None):
    """The recurrence exactly as written, one step at a time: the reference for the scan."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = initial_state if initial_state is not None else u.new_zeros(u.shape[0], *A.shape)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def scan_inputs(length: int, full: bool, batch: int = 2, d_inner: int = 5, d_state: int = 3,
                delta_mean: float = 0.0) -> tuple[list[torch.Tensor], dict]:
    """Random leaf tensors for one scan; ``full`` adds D, z, delta_bias and an initial state."""
    args = [torch.randn(batch, d_inner, length), torch.randn(batch, d_inner, length) + delta_mean,
            -torch.exp(torch.randn(d_inner, d_state)), torch.randn(batch, d_state, length),
            torch.randn(batch, d_state, length)]
    kwargs = dict(delta_softplus=True)
    if full:
        kwargs.update(D=torch.randn(d_inner), z=torch.randn(batch, d_inner, length),
                      delta_bias=torch.randn(d_inner), initial_state=torch.randn(batch, d_inner, d_state))
    for t in [*args, *kwargs.values()]:
        if torch.is_tensor(t):
            t.requires_grad_(True)
    return args, kwargs


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few steps, so sequences of a test's size cross chunk borders."""
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4 * 2 * 5 * 3 * 3)  # 3 steps of the default scan_inputs


@pytest.mark.parametrize("length", [1, 2, 7, 33])
@pytest.mark.parametrize("full", [False, True])
def test_parallel_scan_matches_sequential_loop(small_chunks, length, full):
    args, kwargs = scan_inputs(length, full)
    y, last = ss.selective_scan(*args, **kwargs, return_last_state=True)
    y_ref, last_ref = sequential_scan(*args, **kwargs)
    assert max_err(y, y_ref) <= TOL and max_err(last, last_ref) <= TOL
    leaves = [t for t in [*args, *kwargs.values()] if torch.is_tensor(t)]
    gy, glast = torch.randn_like(y), torch.randn_like(last)
    grads = torch.autograd.grad((y * gy).sum() + (last * glast).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (last_ref * glast).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=TOL)


def test_long_sequence_with_large_steps_stays_finite_and_exact():
    args, kwargs = scan_inputs(1000, full=True, d_state=16, delta_mean=5.0)  # Δ up to ~20
    y, last = ss.selective_scan(*args, **kwargs, return_last_state=True)
    y.sum().backward()
    y_ref, last_ref = sequential_scan(*[t.detach() for t in args],
                                      **{k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(t.grad).all() for t in [*args, *kwargs.values()] if torch.is_tensor(t))
    torch.testing.assert_close(y, y_ref, rtol=TOL, atol=TOL)
    torch.testing.assert_close(last, last_ref, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("length", [1, 7, 64, 256])
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("large_A", [False, True])
def test_fused_scan_equals_reference_in_values_and_gradients(length, carried, large_A):
    """The pseudo-step prefix gives the outputs, last state and every gradient (the initial
    state's included) of a scan from that state. With |A_0| = 1000 and Δ ~3, a fixed prefix step
    of 1e-2 would overflow: u_0's compensation exp(1e-2 * 1000 * 15) is inf in fp32."""
    d_state = 16 if large_A else 3
    args, kwargs = scan_inputs(length, full=True, d_state=d_state, delta_mean=3.0 if large_A else 0.0)
    if large_A:
        args[2] = (-torch.logspace(3, -1, d_state)).repeat(5, 1).requires_grad_(True)  # |A_0| = 1000
    if not carried:
        del kwargs["initial_state"]
    y, last = ss.fused_selective_scan(mamba_kernels.selective_scan_fn, *args, **kwargs, return_last_state=True)
    y_ref, last_ref = ss.selective_scan(*args, **kwargs, return_last_state=True)
    assert max_err(y, y_ref) <= TOL and max_err(last, last_ref) <= TOL
    leaves = [t for t in [*args, *kwargs.values()] if torch.is_tensor(t)]
    gy = torch.randn_like(y)  # through y only: the kernel's last state has no gradient by contract
    for g, g_ref in zip(torch.autograd.grad((y * gy).sum(), leaves),
                        torch.autograd.grad((y_ref * gy).sum(), leaves)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=TOL)


def test_backprop_into_the_fused_last_state_raises():
    """The kernel drops the last state's gradient; rather than lose it silently, backward raises."""
    args, kwargs = scan_inputs(6, full=True)
    y, last = ss.fused_selective_scan(mamba_kernels.selective_scan_fn, *args, **kwargs, return_last_state=True)
    with pytest.raises(RuntimeError, match="last state of mamba-ssm's fused selective scan has no gradient"):
        (y.sum() + last.sum()).backward()


def largest_saved_numel(fn) -> int:
    """The numel of the largest tensor autograd saves for backward while ``fn()`` runs."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_fused_scan_from_a_state_saves_nothing_state_sized():
    """batch * d_inner * L * d_state = 65536 elements, while every legit saved tensor has at most
    batch * d_inner * (d_state + L) = 5120: the check fails on any [batch, d_inner, L, d_state]
    tensor kept for backward, as the old adapter's exp(A cumsum Δ) h0 term was (shown below)."""
    batch, d_inner, length, d_state = 2, 32, 64, 16
    args, kwargs = scan_inputs(length, full=True, batch=batch, d_inner=d_inner, d_state=d_state)
    limit = batch * d_inner * length * d_state
    fused = largest_saved_numel(lambda: ss.fused_selective_scan(mamba_kernels.selective_scan_fn, *args, **kwargs))
    assert 0 < fused < limit
    u, delta, A, B, C = args

    def state_sized_term() -> torch.Tensor:
        carried = torch.exp(F.softplus(delta).cumsum(-1).unsqueeze(-1) * A[:, None]) * kwargs["initial_state"][:, :, None]
        return (carried * C.mT[:, None]).sum(-1)

    assert largest_saved_numel(state_sized_term) >= limit


def test_fused_scan_from_a_state_runs_in_fp32_under_autocast():
    """With a state the kernel gets fp32 inputs under autocast too, so fp32 inputs give the
    reference's fp32 outputs and state."""
    args, kwargs = scan_inputs(9, full=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, last = ss.fused_selective_scan(mamba_kernels.selective_scan_fn, *args, **kwargs, return_last_state=True)
    y_ref, last_ref = ss.selective_scan(*args, **kwargs, return_last_state=True)
    assert y.dtype == last.dtype == torch.float32
    assert max_err(y, y_ref) <= TOL and max_err(last, last_ref) <= TOL


def scan_kernel_args(**change) -> list:
    """Positional arguments of ``selective_scan_fn`` that the kernel takes, with some changed."""
    u, delta, A, B, C = (t.detach() for t in scan_inputs(4, full=False)[0])
    kw = dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.ones(5), z=torch.randn(2, 5, 4), delta_bias=torch.zeros(5))
    kw.update({k: f(kw) for k, f in change.items()})
    return list(kw.values())


@pytest.mark.parametrize("change", [
    dict(u=lambda kw: kw["u"].double(), delta=lambda kw: kw["delta"].double(), B=lambda kw: kw["B"].double(),
         C=lambda kw: kw["C"].double(), z=lambda kw: kw["z"].double()),
    dict(delta=lambda kw: kw["delta"].bfloat16()),
    dict(B=lambda kw: kw["B"].half()),
    dict(z=lambda kw: kw["z"].bfloat16()),
    dict(A=lambda kw: kw["A"].bfloat16()),
    dict(D=lambda kw: kw["D"].half()),
    dict(delta_bias=lambda kw: kw["delta_bias"].bfloat16()),
    dict(A=lambda kw: torch.randn(5, 257), B=lambda kw: torch.randn(2, 257, 4), C=lambda kw: torch.randn(2, 257, 4)),
], ids=["fp64", "delta", "B", "z", "A", "D", "delta_bias", "d_state>256"])
def test_stand_in_scan_refuses_what_the_kernel_refuses(change):
    mamba_kernels.selective_scan_fn(*scan_kernel_args())  # the unchanged arguments pass
    with pytest.raises(RuntimeError):
        mamba_kernels.selective_scan_fn(*scan_kernel_args(**change))


def channel_last(batch: int, dim: int, length: int, pad: int = 0) -> torch.Tensor:
    """x [batch, dim, length] with stride(1) == 1, cut from a [batch, length, dim + pad] tensor."""
    return torch.randn(batch, length, dim + pad)[..., :dim].mT


@pytest.mark.parametrize("call, error", [
    (lambda: mamba_kernels.causal_conv1d_fn(torch.randn(2, 8, 5), torch.randn(8, 1)), RuntimeError),
    (lambda: mamba_kernels.causal_conv1d_fn(torch.randn(2, 8, 5), torch.randn(8, 5)), RuntimeError),
    (lambda: mamba_kernels.causal_conv1d_fn(torch.randn(2, 8, 5), torch.randn(8, 3),
                                            initial_states=torch.randn(2, 8, 2)), RuntimeError),
    (lambda: mamba_kernels.causal_conv1d_fn(torch.randn(2, 8, 5), torch.randn(8, 3),
                                            return_final_states=True), AssertionError),
    (lambda: mamba_kernels.causal_conv1d_fn(channel_last(2, 8, 5, pad=1), torch.randn(8, 3),
                                            return_final_states=True), RuntimeError),
    (lambda: mamba_kernels.causal_conv1d_fn(channel_last(2, 12, 5), torch.randn(12, 3),
                                            return_final_states=True), RuntimeError),
    (lambda: mamba_kernels.causal_conv1d_fn(channel_last(2, 8, 5), torch.randn(8, 3),
                                            initial_states=channel_last(2, 8, 2).bfloat16()), RuntimeError),
    (lambda: mamba_kernels.causal_conv1d_fn(channel_last(2, 8, 5), torch.randn(8, 3),
                                            torch.randn(8).half()), RuntimeError),
], ids=["width 1", "width 5", "state channel-first", "final state channel-first", "stride not 8k",
        "dim not 8k", "state dtype", "bias dtype"])
def test_stand_in_conv_refuses_what_the_kernel_refuses(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["channel_last", "contiguous", "odd_strides"])
def test_conv_with_states_on_the_stand_in_kernel_equals_reference(monkeypatch, width, layout):
    """run_causal_conv1d builds the kernel's channel-last layouts from any input, and its outputs,
    final state and gradients (the initial state's included) are the PyTorch conv's."""
    x = {"channel_last": channel_last(2, 16, 7), "contiguous": torch.randn(2, 16, 7),
         "odd_strides": channel_last(2, 16, 7, pad=3)}[layout].requires_grad_(True)
    weight, bias = torch.randn(16, width, requires_grad=True), torch.randn(16, requires_grad=True)
    state = torch.randn(2, 16, width - 1, requires_grad=True)
    out_ref, final_ref = ss.run_causal_conv1d(x, weight, bias, state, return_final_state=True)
    calls = mamba_kernels.install(monkeypatch)
    out, final = ss.run_causal_conv1d(x, weight, bias, state, return_final_state=True)
    assert calls == ["conv"] and final.stride(1) == 1
    assert max_err(out, out_ref) <= TOL and torch.equal(final, final_ref)
    go, gf = torch.randn_like(out), torch.randn_like(final)
    leaves = [x, weight, bias, state]
    for g, g_ref in zip(torch.autograd.grad((out * go).sum() + (final * gf).sum(), leaves),
                        torch.autograd.grad((out_ref * go).sum() + (final_ref * gf).sum(), leaves)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=TOL)


def test_scan_runs_in_fp32_under_autocast():
    args, kwargs = scan_inputs(9, full=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ss.selective_scan(*args, **kwargs)
    assert y.dtype == torch.float32
    assert max_err(y, ss.selective_scan(*args, **kwargs)) <= TOL


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("first", [1, 6])
def test_causal_conv_with_state_equals_conv_over_the_whole_sequence(width, first):
    x = torch.randn(2, 3, 10)
    weight, bias = torch.randn(3, width), torch.randn(3)
    whole = ss.causal_conv1d(x, weight, bias)
    head, state = ss.causal_conv1d(x[..., :first], weight, bias, return_final_state=True)
    tail, final = ss.causal_conv1d(x[..., first:], weight, bias, initial_state=state, return_final_state=True)
    assert max_err(torch.cat([head, tail], -1), whole) <= TOL
    assert torch.equal(final, x[..., x.shape[-1] - (width - 1):])  # the last W-1 inputs
    # and it is a causal convolution: output t sees inputs t-W+1..t only
    ref = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=3)
    assert max_err(whole, ref) <= TOL


CONFIGS = [dict(d_model=16, d_state=4, n_layers=2),
           dict(d_model=24, d_state=3, d_conv=1, expand=1, n_layers=1, norm="rms"),
           dict(d_model=8, d_state=5, d_conv=3, expand=3, n_layers=3, norm="none", ssm_init="long_memory")]


def make_encoder(config: dict) -> MambaTrajEncoder:
    return MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, **config).eval()


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS)
def test_step_by_step_equals_whole_sequence(monkeypatch, config):
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)  # the whole-sequence pass crosses chunk borders
    encoder, steps = make_encoder(config), 3 * MAX_SEQ_LEN
    seq = torch.randn(3, steps, TSTEP_DIM)
    whole, none_state = encoder(seq)
    assert none_state is None
    state, outs = encoder.init_hidden_state(3, seq.device), []
    for t in range(steps):
        out, state = encoder(seq[:, t:t + 1], hidden_state=state)
        outs.append(out)
    assert max_err(torch.cat(outs, 1), whole) <= TOL


@pytest.mark.parametrize("config", CONFIGS)
def test_chunks_carrying_state_equal_whole_in_values_and_gradients(config):
    """Chunks may carry state with gradients attached: both outputs and gradients must match."""
    encoder, seq = make_encoder(config), torch.randn(2, 19, TSTEP_DIM)
    whole, _ = encoder(seq)
    weights = torch.randn_like(whole)
    grads = torch.autograd.grad((whole * weights).sum(), list(encoder.parameters()))
    state, outs = encoder.init_hidden_state(2, seq.device), []
    for lo, hi in [(0, 2), (2, 3), (3, 11), (11, 19)]:
        out, state = encoder(seq[:, lo:hi], hidden_state=state)
        outs.append(out)
    chunked = torch.cat(outs, 1)
    assert max_err(chunked, whole) <= TOL
    chunked_grads = torch.autograd.grad((chunked * weights).sum(), list(encoder.parameters()))
    for g, g_ref in zip(chunked_grads, grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=TOL)


def test_fused_path_with_stand_in_kernels_equals_pytorch_path(monkeypatch):
    """The dispatch to the fused kernels (layouts, initial-state correction) checked on CPU with
    stand-ins: the outputs and states of inference in chunks, and the gradients of a pass from
    episode starts, the training pass that runs through the kernels."""
    encoder, seq = make_encoder(CONFIGS[0]), torch.randn(2, 13, TSTEP_DIM)
    weights = torch.randn(2, 13, encoder.emb_dim)  # a plain sum of LayerNorm outputs has ~0 gradient

    def inference() -> list[torch.Tensor]:
        state, outs = encoder.init_hidden_state(2, seq.device), []
        with torch.no_grad():
            for lo, hi in [(0, 5), (5, 6), (6, 13)]:
                out, state = encoder(seq[:, lo:hi], hidden_state=state)
                outs += [out, *state.values()]
        return outs

    def gradients() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad((encoder(seq)[0] * weights).sum(), list(encoder.parameters()))

    outs, grads = inference(), gradients()
    calls = mamba_kernels.install(monkeypatch)
    assert all(max_err(a, b) <= TOL for a, b in zip(inference(), outs))
    assert "scan" in calls
    calls.clear()
    for g, g_ref in zip(gradients(), grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=TOL)
    assert {"scan", "conv"} <= set(calls)


KERNELS = {"scan_backend": "mamba_ssm", "conv_backend": "causal_conv1d"}
REFERENCE = {"scan_backend": "pytorch", "conv_backend": "pytorch"}


def carried_training_pass(encoder: MambaTrajEncoder, seq: torch.Tensor, state: dict,
                          weights: torch.Tensor) -> list[torch.Tensor]:
    """A learner's pass from a carried state that needs gradients: the outputs, the state after,
    and the gradients of the parameters and of the incoming state."""
    state = {k: v.detach().requires_grad_(True) for k, v in state.items()}
    out, new = encoder(seq, hidden_state=state)
    leaves = [*encoder.parameters(), *state.values()]
    return [out, *new.values(), *torch.autograd.grad((out * weights).sum(), leaves)]


@pytest.mark.parametrize("length", [1, 7, 64, 256])
@pytest.mark.parametrize("config", CONFIGS[:2], ids=["conv kernel", "d_conv=1"])
def test_training_from_a_carried_state_runs_the_kernels_and_equals_reference(monkeypatch, config, length):
    """Every learner row starts from a carried state: that pass runs the scan kernel (and the conv
    kernel where its widths allow) and computes what the reference path computes."""
    torch.manual_seed(0)
    encoder, seq = make_encoder(config), torch.randn(2, length, TSTEP_DIM)
    state = {k: torch.randn_like(v) for k, v in encoder.init_hidden_state(2, seq.device).items()}
    weights = torch.randn(2, length, encoder.emb_dim)
    reference = carried_training_pass(encoder, seq, state, weights)
    assert encoder.last_backends == REFERENCE  # no kernels installed
    calls = mamba_kernels.install(monkeypatch)
    encoder.fused_kernels = False  # read at forward time, by every mixer
    for a, b in zip(carried_training_pass(encoder, seq, state, weights), reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert encoder.last_backends == REFERENCE and calls == []
    encoder.fused_kernels = True
    fused = carried_training_pass(encoder, seq, state, weights)
    expected = KERNELS if config.get("d_conv", 4) > 1 else {**KERNELS, "conv_backend": "pytorch"}
    assert encoder.last_backends == expected
    assert calls.count("scan") == config["n_layers"] and ("conv" in calls) == (expected == KERNELS)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=TOL)


def test_kernel_backends_and_repr_name_what_a_training_pass_picks(monkeypatch):
    encoder = make_encoder(CONFIGS[0])
    cpu = torch.device("cpu")
    assert encoder.kernel_backends(cpu, torch.float32) == REFERENCE
    mamba_kernels.install(monkeypatch)  # kernels "on CPU" only
    assert encoder.kernel_backends(cpu, torch.bfloat16) == KERNELS
    assert encoder.kernel_backends(cpu, torch.float64) == REFERENCE  # dtypes the kernels refuse
    assert encoder.kernel_backends(torch.device("cuda"), torch.float32) == REFERENCE
    assert make_encoder(CONFIGS[1]).kernel_backends(cpu, torch.float32) == {**KERNELS, "conv_backend": "pytorch"}
    assert repr(encoder).splitlines()[1] == (
        "  fused_kernels=True, backends: cuda={'scan_backend': 'pytorch', 'conv_backend': "
        "'pytorch'}, cpu={'scan_backend': 'mamba_ssm', 'conv_backend': 'causal_conv1d'}")
    encoder.fused_kernels = False
    assert encoder.kernel_backends(cpu, torch.float32) == REFERENCE


@pytest.mark.parametrize("carried", [False, True])
def test_kernels_take_the_encoders_inputs_under_autocast(monkeypatch, carried):
    """Under bf16 autocast the inputs the mixers hand the kernels meet their dtype contracts, and
    the result stays near the reference path's (bf16 matmuls differ in rounding only)."""
    torch.manual_seed(0)
    encoder, seq = make_encoder(CONFIGS[0]), torch.randn(2, 9, TSTEP_DIM)
    state = encoder.init_hidden_state(2, seq.device) if carried else None
    calls = mamba_kernels.install(monkeypatch)
    outs = []
    for fused in (True, False):
        encoder.fused_kernels = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = encoder(seq, hidden_state=state)
        out.float().square().sum().backward()
        outs.append(out.float())
    assert {"scan", "conv"} <= set(calls)
    torch.testing.assert_close(outs[0], outs[1], rtol=0.05, atol=0.05)


@torch.no_grad()
def test_hidden_state_layout():
    encoder = make_encoder(dict(d_model=16, d_state=4, d_conv=4, expand=2, n_layers=2))
    state = encoder.init_hidden_state(3, torch.device("cpu"))
    assert state["conv"].shape == (3, 2, 32, 3) and state["ssm"].shape == (3, 2, 32, 4)
    assert not any(v.any() for v in state.values())
    seq = torch.randn(3, 6, TSTEP_DIM)
    _, new = encoder(seq, hidden_state=state)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    # The conv state holds the last d_conv-1 inputs of each layer's conv (here layer 0).
    mixer = encoder.mixers[0]
    conv_in = mixer.in_proj(encoder.norms[0](encoder.inp(seq))).chunk(2, dim=-1)[0]
    assert max_err(new["conv"][:, 0], conv_in[:, -3:].mT) <= TOL


def test_initialisation_follows_the_paper():
    mixer = make_encoder(dict(d_model=40, d_state=6, n_layers=1)).mixers[0]
    assert mixer.dt_rank == math.ceil(40 / 16)
    assert torch.allclose(-torch.exp(mixer.A_log), -torch.arange(1.0, 7.0).expand(80, 6))
    assert torch.equal(mixer.D, torch.ones(80))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)


def test_long_memory_init_spreads_forgetting_across_the_state_and_steps_up_to_one():
    for mixer in make_encoder(dict(d_model=16, d_state=6, n_layers=2, ssm_init="long_memory")).mixers:
        A = torch.exp(mixer.A_log)
        torch.testing.assert_close(A[:, 0], torch.full_like(A[:, 0], 1e-3))
        torch.testing.assert_close(A[:, -1], torch.ones_like(A[:, -1]))
        dt = F.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-2 * (1 - 1e-4) and dt.max() <= 1.0 + 1e-4


@torch.no_grad()
def test_long_memory_init_high_pass_channels_write_nothing_for_a_constant_input():
    """After the first step of a constant input, layer 0's high-pass half only decays; the other
    half keeps writing it."""
    torch.manual_seed(0)
    encoder = make_encoder(dict(d_model=16, d_state=4, n_layers=2, ssm_init="long_memory"))
    mixer, half = encoder.mixers[0], encoder.d_inner // 2
    decay = torch.exp(F.softplus(mixer.dt_proj.bias)[:, None] * -torch.exp(mixer.A_log))
    state = encoder.init_hidden_state(1, torch.device("cpu"))
    step = torch.randn(1, 1, TSTEP_DIM)
    encoder(step, hidden_state=state, in_place=True)
    assert state["ssm"][0, 0, :half].abs().min() > 0  # the first step is written
    for _ in range(5):
        before = state["ssm"][0, 0].clone()
        encoder(step, hidden_state=state, in_place=True)
        after = state["ssm"][0, 0]
        torch.testing.assert_close(after[:half], before[:half] * decay[:half])
        assert not torch.allclose(after[half:], before[half:] * decay[half:])


def test_log_dict_gets_the_mean_step_size_per_layer():
    encoder, log = make_encoder(CONFIGS[0]), {}
    encoder(torch.randn(2, 4, TSTEP_DIM), log_dict=log)
    assert sorted(log) == ["mamba/mean_delta_layer0", "mamba/mean_delta_layer1"]
    assert all(0 < v.item() < 1 for v in log.values())


@pytest.mark.parametrize("arg", ["d_model", "d_state", "d_conv", "expand", "n_layers"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_sizes_are_rejected(arg, value):
    with pytest.raises(ValueError, match=f"{arg}={value} must be a positive int"):
        MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, **{arg: value})


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="norm='batch' is not supported"):
        MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=8, norm="batch")


def test_unknown_ssm_init_is_rejected():
    with pytest.raises(ValueError, match=re.escape("ssm_init='s4d' is not supported; choose one of ['paper', 'long_memory']")):
        MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=8, ssm_init="s4d")


def test_bad_input_shape_is_rejected():
    encoder = make_encoder(CONFIGS[0])
    with pytest.raises(ValueError, match=f"tstep_dim={TSTEP_DIM}"):
        encoder(torch.randn(2, 4, TSTEP_DIM + 1))


def test_rollout_step_gives_the_same_values_from_a_channel_last_or_a_contiguous_conv_state():
    """init_hidden_state keeps the conv state channel last, the layout the in-place step reads along
    channels; a contiguous state (e.g. one a scan returned) must step to exactly the same values."""
    torch.manual_seed(0)
    enc = MambaTrajEncoder(6, 16, d_model=8, d_state=4, n_layers=2).eval()
    fresh = enc.init_hidden_state(3, torch.device("cpu"))
    assert fresh["conv"].shape == (3, 2, 16, 3) and fresh["conv"].mT.is_contiguous()
    with torch.no_grad():
        _, state = enc(torch.randn(3, 5, 6), None, hidden_state=fresh)  # a scan: contiguous states
        assert state["conv"].is_contiguous()
        channel_last = {key: value.clone() for key, value in state.items()}
        channel_last["conv"] = state["conv"].mT.contiguous().mT
        step = torch.randn(3, 1, 6)
        out_contiguous, after_contiguous = enc(step, None, hidden_state=state, in_place=True)
        out_channel_last, after_channel_last = enc(step, None, hidden_state=channel_last, in_place=True)
    assert torch.equal(out_contiguous, out_channel_last)
    for key in state:
        assert torch.equal(after_contiguous[key], after_channel_last[key])
