"""The Transformer on flash-attn's kernels, checked on CPU against stand-ins of their contracts
(tests/stand_ins/flash_attn.py): carried chunks through the varlen kernel without masks, equal
to the reference path in outputs, state and every gradient."""
from __future__ import annotations

import pytest
import torch

import rllib_trajenc.nets.attention as attention_module
import rllib_trajenc.nets.transformer as transformer_module
from conftest import TSTEP_DIM
from rllib_trajenc.nets.attention import VanillaAttention
from rllib_trajenc.nets.transformer import TformerTrajEncoder
from stand_ins import flash_attn as stand_in

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:FlashAttention")
N_LAYERS = 2


def pair(window: int, **kwargs) -> tuple[TformerTrajEncoder, TformerTrajEncoder]:
    """Two equal encoders, fused kernels allowed and forced off."""
    small = dict(d_model=16, n_heads=2, d_ff=32, n_layers=N_LAYERS, dropout_ff=0.0, dropout_emb=0.0)
    fused = TformerTrajEncoder(TSTEP_DIM, window, **{**small, **kwargs})
    reference = TformerTrajEncoder(TSTEP_DIM, window, **{**small, **kwargs})
    reference.load_state_dict(fused.state_dict())
    reference.fused_kernels = False
    return fused, reference


def carried_inputs(enc: TformerTrajEncoder, steps: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rows that start an episode beside rows deep in one: n in {0, W-3, W, 3W+5}, random caches
    (slots of negative steps must be ignored), keys and values that want gradients."""
    W = enc.max_seq_len
    n = torch.tensor([0, max(W - 3, 0), W, 3 * W + 5])
    state = enc.init_hidden_state(4, torch.device("cpu"))
    state = {"k": torch.randn_like(state["k"]).requires_grad_(), "v": torch.randn_like(state["v"]).requires_grad_(),
             "n": n}
    seq = torch.randn(4, steps, TSTEP_DIM)
    t = (n.view(-1, 1) + torch.arange(steps)).unsqueeze(-1)
    return seq, t, state


def outputs_and_grads(enc: TformerTrajEncoder, seq, t, state) -> list[torch.Tensor]:
    out, new = enc(seq, t, hidden_state=state)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [*enc.parameters(), state["k"], state["v"]]
    grads = torch.autograd.grad((out * weights).sum() + new["k"].sum() + new["v"].square().sum(), leaves)
    return [out, new["k"], new["v"], *grads]


@pytest.mark.parametrize("window", [5, 300])  # shorter and longer than the chunks
@pytest.mark.parametrize("steps", [1, 7, 64, 256])
@pytest.mark.parametrize("pos_emb", ["fixed", "rope", "learned"])
def test_carried_chunk_on_the_varlen_kernel_equals_reference(monkeypatch, window, steps, pos_emb):
    if pos_emb != "fixed" and steps not in (7, 64):
        pytest.skip("position embeddings need not be crossed with every length")
    fused, reference = pair(window, pos_emb=pos_emb)
    seq, t, state = carried_inputs(fused, steps)
    expected = outputs_and_grads(reference, seq, t, state)
    assert reference.last_backends == {"attention_backend": "sdpa"}
    calls = stand_in.install(monkeypatch, allow_fp32=True)
    got = outputs_and_grads(fused, seq, t, state)
    assert fused.last_backends == {"attention_backend": "flash_attn_varlen"}
    assert calls == ["flash_attn_varlen"] * N_LAYERS  # one call per layer, no fallback
    for a, b in zip(got, expected):
        # Relative to each tensor's scale: a weight's gradient sums terms of every position (it
        # reaches 1e2 at 256 steps), and float32 round-off there is ~1e-5 of its largest entry.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=TOL * max(1.0, b.abs().max().item()))


def test_varlen_path_builds_no_mask(monkeypatch):
    fused, _ = pair(8)
    seq, t, state = carried_inputs(fused, 8)
    stand_in.install(monkeypatch)

    def no_masks(*args, **kwargs):
        raise AssertionError("a [B, 1, Tq, Tk] mask was built")

    monkeypatch.setattr(attention_module, "steps_mask", no_masks)
    out, _ = fused(seq, t, hidden_state=state)
    assert torch.isfinite(out).all()
    monkeypatch.setattr(fused, "fused_kernels", False)  # the reference path needs the mask: the check bites
    with pytest.raises(AssertionError, match="mask was built"):
        fused(seq, t, hidden_state=state)


def test_episode_start_on_flash_attn_func_equals_reference(monkeypatch):
    fused, reference = pair(6)
    seq = torch.randn(3, 20, TSTEP_DIM)
    t = torch.arange(20).view(1, -1, 1).expand(3, -1, -1)
    expected = reference(seq, t)[0]
    calls = stand_in.install(monkeypatch)
    torch.testing.assert_close(fused(seq, t)[0], expected, rtol=1e-4, atol=TOL)
    assert fused.last_backends == {"attention_backend": "flash_attn"} and calls == ["flash_attn"] * N_LAYERS


def test_bf16_autocast_runs_the_strict_kernel_close_to_fp32(monkeypatch):
    fused, reference = pair(16)
    seq, t, state = carried_inputs(fused, 16)
    expected = reference(seq, t, hidden_state=state)[0]
    calls = stand_in.install(monkeypatch, allow_fp32=False)  # fp32 would be refused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(seq, t, hidden_state=state)[0]
    assert calls == ["flash_attn_varlen"] * N_LAYERS
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_without_bf16_the_strict_kernel_is_not_called(monkeypatch):
    fused, _ = pair(8)
    calls = stand_in.install(monkeypatch, allow_fp32=False)
    fused(*carried_inputs(fused, 8)[:2], hidden_state=carried_inputs(fused, 8)[2])
    assert calls == [] and fused.last_backends == {"attention_backend": "sdpa"}


def test_vanilla_attention_reports_itself():
    enc = TformerTrajEncoder(TSTEP_DIM, 4, d_model=16, n_heads=2, n_layers=1, attention_type=VanillaAttention)
    enc(*carried_inputs(enc, 3)[:2], hidden_state=carried_inputs(enc, 3)[2])
    assert enc.last_backends == {"attention_backend": "vanilla"}
    assert enc.kernel_backends(torch.device("cuda"), torch.bfloat16) == {"attention_backend": "vanilla"}


def test_kernel_backends_and_repr(monkeypatch):
    fused, reference = pair(8)
    assert fused.kernel_backends(torch.device("cpu"), torch.float32) == {"attention_backend": "sdpa"}
    stand_in.install(monkeypatch, allow_fp32=False)
    assert fused.kernel_backends(torch.device("cpu"), torch.bfloat16) == {"attention_backend": "flash_attn_varlen"}
    assert reference.kernel_backends(torch.device("cpu"), torch.bfloat16) == {"attention_backend": "sdpa"}
    assert "fused_kernels=False" in repr(reference) and "attention_backend" in repr(reference)


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).bfloat16()


@pytest.mark.parametrize("make_args, message", [
    (lambda: (torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)),
     "only support fp16 and bf16"),
    (lambda: (bf16(4, 2, 8), bf16(4, 2, 8).half(), bf16(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)),
     "same dtype"),
    (lambda: (bf16(4, 2, 264), bf16(4, 2, 264), bf16(4, 2, 264), torch.tensor([0, 4], dtype=torch.int32)),
     "at most 256"),
    (lambda: (bf16(4, 3, 8), bf16(4, 2, 8), bf16(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)),
     "must divide"),
    (lambda: (bf16(4, 2, 8), bf16(4, 2, 8), bf16(4, 2, 8), torch.tensor([0, 4])), "int32"),
])
def test_stand_in_refuses_what_the_kernel_refuses(make_args, message):
    q, k, v, cu = make_args()
    with pytest.raises(RuntimeError, match=message):
        stand_in.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)
