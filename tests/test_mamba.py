"""Mamba: the parallel scan against a plain loop, the causal conv, and state carrying end to end."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import rllib_trajenc.nets.selective_scan as ss
from rllib_trajenc.nets.mamba import MambaTrajEncoder

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


def zero_state_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    """Stand-in with mamba-ssm's ``selective_scan_fn`` contract: zero initial state, and no
    gradient through the last state."""
    out = ss.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, return_last_state)
    return (out[0], out[1].detach()) if return_last_state else out


def causal_conv1d_fn_stand_in(x, weight, bias=None, seq_idx=None, initial_states=None,
                              return_final_states=False, final_states_out=None, activation=None):
    """Stand-in with causal-conv1d's ``causal_conv1d_fn`` contract."""
    assert seq_idx is None and final_states_out is None and activation is None
    return ss.causal_conv1d(x, weight, bias, initial_states, return_final_states)


@pytest.mark.parametrize("length", [1, 300])
def test_fused_adapter_adds_the_initial_state_in_values_and_gradients(length):
    """The adapter's initial-state term gives the outputs, and their gradients (the initial
    state's included), of a scan that starts from that state."""
    args, kwargs = scan_inputs(length, full=True, delta_mean=3.0)
    y, last = ss.fused_selective_scan(zero_state_scan, *args, **kwargs, return_last_state=True)
    y_ref, last_ref = ss.selective_scan(*args, **kwargs, return_last_state=True)
    assert max_err(y, y_ref) <= TOL and max_err(last, last_ref) <= TOL
    leaves = [t for t in [*args, *kwargs.values()] if torch.is_tensor(t)]
    gy = torch.randn_like(y)  # through y only: the kernel's last state has no gradient by contract
    for g, g_ref in zip(torch.autograd.grad((y * gy).sum(), leaves),
                        torch.autograd.grad((y_ref * gy).sum(), leaves)):
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


def use_stand_in_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Dispatches to CPU stand-ins of the fused kernels as if on CUDA; the list names each call."""
    calls: list[str] = []

    def scan(*args, **kwargs):
        calls.append("scan")
        return zero_state_scan(*args, **kwargs)

    def conv(*args, **kwargs):
        calls.append("conv")
        return causal_conv1d_fn_stand_in(*args, **kwargs)

    monkeypatch.setattr(ss, "SCAN_KERNEL", scan)
    monkeypatch.setattr(ss, "CONV_KERNEL", conv)
    monkeypatch.setattr(ss, "FUSED_DEVICES", ("cpu",))
    return calls


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
    calls = use_stand_in_kernels(monkeypatch)
    assert all(max_err(a, b) <= TOL for a, b in zip(inference(), outs))
    assert "scan" in calls
    calls.clear()
    for g, g_ref in zip(gradients(), grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=TOL)
    assert {"scan", "conv"} <= set(calls)


def test_state_that_needs_gradients_stays_off_the_scan_kernel(monkeypatch):
    """mamba-ssm's kernel gives its last state no gradient, so a chunk that carries state while
    gradients are on takes the PyTorch path (whose gradients the chunked test above checks)."""
    encoder, seq = make_encoder(CONFIGS[0]), torch.randn(2, 6, TSTEP_DIM)
    calls = use_stand_in_kernels(monkeypatch)
    _, state = encoder(seq, hidden_state=encoder.init_hidden_state(2, seq.device))
    assert "scan" not in calls and state["ssm"].requires_grad
    with torch.no_grad():
        encoder(seq, hidden_state=state)
    assert "scan" in calls


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
