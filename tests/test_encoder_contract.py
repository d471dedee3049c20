"""The TrajEncoder contract, checked for every encoder: one function, however it is run."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import rllib_trajenc as rt
from conftest import MAX_SEQ_LEN, TSTEP_DIM, episode_inputs

TOL = 1e-5
LONG = int(2.5 * MAX_SEQ_LEN)  # longer than the window, so the windowed semantics are exercised


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_step_by_step_equals_whole_sequence(encoder):
    seq, t = episode_inputs(3, LONG)
    whole, none_state = encoder(seq, t)
    assert none_state is None
    state = encoder.init_hidden_state(3, seq.device)
    steps = []
    for i in range(LONG):
        out, state = encoder(seq[:, i:i + 1], t[:, i:i + 1], hidden_state=state)
        steps.append(out)
    assert max_err(torch.cat(steps, 1), whole) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("cuts", [(3,), (5, 13), (1, 2, 11, 19)])
def test_chunks_with_state_equal_whole(encoder, cuts):
    seq, t = episode_inputs(2, LONG)
    whole, _ = encoder(seq, t)
    state = encoder.init_hidden_state(2, seq.device)
    outs, bounds = [], (0, *cuts, LONG)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out, state = encoder(seq[:, lo:hi], t[:, lo:hi], hidden_state=state)
        outs.append(out)
    assert max_err(torch.cat(outs, 1), whole) <= TOL


# The state tensors a rollout step updates in place rather than copying.
IN_PLACE_KEYS = {"mamba": ("conv", "ssm"), "transformer": ("k", "v")}


@torch.inference_mode()
def test_in_place_stepping_equals_whole_sequence(encoder_name, encoder):
    """The rollout path (in_place=True, as env runners run it) computes the whole-sequence function
    in the state's own memory, also after rows restart (reset) mid-way."""
    seq, t = episode_inputs(3, LONG)
    whole, _ = encoder(seq, t)
    state = encoder.init_hidden_state(3, seq.device)
    memory = {key: state[key].data_ptr() for key in IN_PLACE_KEYS.get(encoder_name, ())}
    steps = []
    for i in range(LONG):
        out, state = encoder(seq[:, i:i + 1], t[:, i:i + 1], hidden_state=state, in_place=True)
        steps.append(out)
    assert max_err(torch.cat(steps, 1), whole) <= TOL
    assert all(state[key].data_ptr() == ptr for key, ptr in memory.items())
    if state is not None:  # restart row 1: it must compute the episode start again
        state = encoder.reset_hidden_state(state, [False, True, False])
        out, _ = encoder(seq[:, :1], t[:, :1], hidden_state=state, in_place=True)
        assert max_err(out[1], whole[1, :1]) <= TOL


def test_in_place_refuses_autograd(encoder):
    seq, t = episode_inputs(2, 1)
    with pytest.raises(ValueError, match="in_place=True is for inference"):
        encoder(seq, t, hidden_state=encoder.init_hidden_state(2, seq.device), in_place=True)


def test_chunk_from_state_passes_gradients_through_the_state(stateful_encoder):
    encoder = stateful_encoder
    seq, t = episode_inputs(2, 6)
    first = seq[:, :3].clone().requires_grad_(True)
    _, state = encoder(first, t[:, :3], hidden_state=encoder.init_hidden_state(2, seq.device))
    out, new_state = encoder(seq[:, 3:], t[:, 3:], hidden_state=state)
    out.sum().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert set(new_state) == set(state)


def test_memory_free_encoder_has_no_state():
    ff = rt.FFTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN)
    assert ff.init_hidden_state(4, torch.device("cpu")) is None
    assert ff.reset_hidden_state(None, np.ones(4, bool)) is None


@torch.no_grad()
def test_reset_restarts_exactly_the_done_rows(stateful_encoder):
    encoder = stateful_encoder
    seq, t = episode_inputs(4, 12)
    state = encoder.init_hidden_state(4, seq.device)
    _, state = encoder(seq[:, :7], t[:, :7], hidden_state=state)
    dones = np.array([True, False, True, False])
    reset = encoder.reset_hidden_state(state, dones)
    fresh = encoder.init_hidden_state(4, seq.device)
    for key in state:
        assert torch.equal(reset[key][dones], fresh[key][dones]), key
        assert torch.equal(reset[key][~dones], state[key][~dones]), key
    # A reset row now behaves like a new episode; the others carry on.
    seq2, _ = episode_inputs(4, 5)
    t2 = torch.where(torch.as_tensor(dones).view(4, 1, 1), t[:, :5], t[:, 7:12])
    out, _ = encoder(seq2, t2, hidden_state=reset)
    fresh_out, _ = encoder(seq2[dones], t2[dones])
    assert max_err(out[dones], fresh_out) <= TOL
    carried, _ = encoder(seq2[~dones], t2[~dones], hidden_state={k: v[~dones] for k, v in state.items()})
    assert max_err(out[~dones], carried) <= TOL


def test_reset_rejects_a_mask_of_the_wrong_size(stateful_encoder):
    state = stateful_encoder.init_hidden_state(3, torch.device("cpu"))
    with pytest.raises(ValueError, match="dones has 2 entries"):
        stateful_encoder.reset_hidden_state(state, np.array([True, False]))


def test_output_shape_and_emb_dim(encoder):
    seq, t = episode_inputs(2, 6)
    out, _ = encoder(seq, t)
    assert out.shape == (2, 6, encoder.emb_dim)


def test_gradients_reach_every_parameter(encoder):
    encoder.train()
    seq, t = episode_inputs(2, LONG)
    out, _ = encoder(seq, t)
    out.pow(2).mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu(encoder, dtype):
    seq, t = episode_inputs(2, 6)
    try:
        with torch.autocast("cpu", dtype=dtype):
            out, _ = encoder(seq, t)
            stepped, _ = encoder(seq[:, :1], t[:, :1], hidden_state=encoder.init_hidden_state(2, seq.device))
    except RuntimeError as err:  # fp16 autocast is not supported on CPU by every PyTorch build
        if dtype == torch.float16 and "autocast" in str(err).lower():
            pytest.skip(f"this PyTorch has no CPU fp16 autocast: {err}")
        raise
    full, _ = encoder(seq, t)
    assert torch.isfinite(out).all()
    assert (out.float() - full).abs().max() < 0.1
    assert stepped.shape == (2, 1, encoder.emb_dim)


@pytest.mark.parametrize("bad", [
    lambda s, t: (s[0], t[0]),                                    # rank 2
    lambda s, t: (torch.randn(2, 6, TSTEP_DIM + 1), t),           # wrong feature size
])
def test_bad_input_shape(encoder, bad):
    seq, t = episode_inputs(2, 6)
    with pytest.raises(ValueError, match=f"tstep_dim={TSTEP_DIM}"):
        encoder(*bad(seq, t))


@pytest.mark.parametrize("cls", [rt.FFTrajEncoder, rt.GRUTrajEncoder, rt.MambaTrajEncoder,
                                 rt.TformerTrajEncoder])
@pytest.mark.parametrize("arg", ["tstep_dim", "max_seq_len"])
def test_non_positive_sizes_are_rejected(cls, arg):
    kwargs = {"tstep_dim": TSTEP_DIM, "max_seq_len": MAX_SEQ_LEN, arg: 0}
    with pytest.raises(ValueError, match=f"{arg}=0 must be a positive int"):
        cls(**kwargs)


# The constructor signatures of ../shared/spec/traj_encoders_api.txt, default for default.
SPEC_SIGNATURES = {
    rt.FFTrajEncoder: dict(d_model=256, d_ff=None, n_layers=1, dropout=0.0,
                           activation="leaky_relu", norm="layer"),
    rt.GRUTrajEncoder: dict(d_hidden=256, n_layers=2, d_output=256, norm="layer"),
    rt.MambaTrajEncoder: dict(d_model=256, d_state=16, d_conv=4, expand=2, n_layers=3, norm="layer"),
    rt.TformerTrajEncoder: dict(
        d_model=256, n_heads=8, d_ff=1024, n_layers=3, dropout_ff=0.05, dropout_emb=0.05,
        dropout_attn=0.0, dropout_qkv=0.0, activation="leaky_relu", norm="layer", pos_emb="fixed",
        sigma_reparam=True, normformer_norms=True, head_scaling=True,
        attention_type=rt.FlashAttention),
}


# Options beyond the spec: keyword-only, so the spec's positional order and defaults stay as they are.
KEYWORD_ONLY_EXTENSIONS = {rt.MambaTrajEncoder: dict(ssm_init="paper")}


@pytest.mark.parametrize("cls", list(SPEC_SIGNATURES), ids=lambda c: c.__name__)
def test_signature_matches_spec(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["tstep_dim", "max_seq_len"]
    assert all(p.default is inspect.Parameter.empty for p in params[:2])
    spec = [p for p in params[2:] if p.kind is not p.KEYWORD_ONLY]
    assert {p.name: p.default for p in spec} == SPEC_SIGNATURES[cls]
    extensions = [p for p in params[2:] if p.kind is p.KEYWORD_ONLY]
    assert {p.name: p.default for p in extensions} == KEYWORD_ONLY_EXTENSIONS.get(cls, {})


def test_base_class_api():
    assert inspect.isabstract(rt.TrajEncoder)
    params = inspect.signature(rt.TrajEncoder.forward).parameters
    assert list(params)[:5] == ["self", "seq", "time_idxs", "hidden_state", "log_dict"]
    assert list(params)[5:] == ["in_place"] and params["in_place"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(rt.TrajEncoder.init_hidden_state).parameters) == [
        "self", "batch_size", "device"]
    assert list(inspect.signature(rt.TrajEncoder.reset_hidden_state).parameters) == [
        "self", "hidden_state", "dones"]
    for cls in SPEC_SIGNATURES:
        assert issubclass(cls, rt.TrajEncoder)
    assert issubclass(rt.VanillaAttention, rt.SelfAttention)
    assert issubclass(rt.FlashAttention, rt.SelfAttention)


def test_networks_do_not_import_ray():
    import subprocess
    import sys
    code = "import sys, rllib_trajenc; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
