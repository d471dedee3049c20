"""Transformer-specific tests: options, windowed semantics, the KV cache, σReparam, attention kernels.

The generic encoder contract (stepping == whole, reset rows, autocast, gradients) is in
test_encoder_contract.py; here the same invariants are checked across the Transformer's options.
"""
from __future__ import annotations

import itertools
import re
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import rllib_trajenc.nets.attention as attention_module
import rllib_trajenc.nets.transformer as transformer_module
from conftest import MAX_SEQ_LEN as W, TSTEP_DIM, episode_inputs
from rllib_trajenc.nets.attention import FlashAttention, RingKeys, SelfAttention, VanillaAttention, ring_steps, steps_mask
from rllib_trajenc.nets.layers import ACTIVATIONS, NORMS
from rllib_trajenc.nets.sigma_reparam import SigmaReparamLinear
from rllib_trajenc.nets.transformer import TformerTrajEncoder
from rllib_trajenc.rllib.rollout_state import layer_first  # how env runners keep the ring

TOL = 1e-5
LONG = int(2.5 * W)
pytestmark = pytest.mark.filterwarnings("ignore:FlashAttention")  # the expected CPU fallback notice


def make(**kwargs) -> TformerTrajEncoder:
    small = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout_ff=0.0, dropout_emb=0.0)
    return TformerTrajEncoder(TSTEP_DIM, W, **{**small, **kwargs}).eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def run_in_chunks(enc: TformerTrajEncoder, seq: torch.Tensor, t: torch.Tensor,
                  cuts: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """Runs the episode from a fresh state, cutting it into chunks at ``cuts``."""
    state = enc.init_hidden_state(seq.shape[0], seq.device)
    bounds, outs = (0, *cuts, seq.shape[1]), []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out, state = enc(seq[:, lo:hi], t[:, lo:hi], hidden_state=state)
        outs.append(out)
    return torch.cat(outs, 1), state


def stepping_error(enc: TformerTrajEncoder, steps: int = LONG) -> float:
    seq, t = episode_inputs(2, steps)
    with torch.no_grad():
        whole, _ = enc(seq, t)
    stepped, _ = run_in_chunks(enc, seq, t, tuple(range(1, steps)))
    assert torch.isfinite(whole).all()
    return max_err(stepped, whole)


# ---------------------------------------------------------------- options

@torch.no_grad()
def test_one_layer_matches_a_hand_written_reference():
    """Pins the wiring: pre-norm residuals, NormFormer norms and head scales, final norm."""
    enc = make(n_layers=1, sigma_reparam=False)
    for p in enc.parameters():  # move every parameter off its neutral init (norm gains, head scales)
        p.add_(0.1 * torch.randn_like(p))
    seq, t = episode_inputs(2, W)
    B, T, D, H = 2, W, 32, 4
    block = enc.blocks[0]
    angle = t.float() * 10000.0 ** (-torch.arange(D // 2) / (D // 2))
    x = enc.inp(seq) + torch.cat([angle.sin(), angle.cos()], dim=-1)
    q, k, v = (z.view(B, T, H, D // H).transpose(1, 2) for z in block.attn.qkv(block.norm1(x)).split(D, -1))
    scores = (q @ k.transpose(-1, -2) / (D // H) ** 0.5).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf)
    heads = (scores.softmax(-1) @ v) * block.attn.head_scale.view(H, 1, 1)
    x = x + block.attn.post_norm(block.attn.out(heads.transpose(1, 2).reshape(B, T, D)))
    x = x + block.ff.down(block.ff.mid_norm(F.leaky_relu(block.ff.up(block.norm2(x)))))
    assert max_err(enc(seq, t)[0], enc.out_norm(x)) <= TOL


@pytest.mark.parametrize("sigma_reparam, normformer_norms, head_scaling, pos_emb",
                         list(itertools.product([True, False], [True, False], [True, False],
                                                ["fixed", "learned", "rope"])))
def test_every_option_combination_steps_like_whole(sigma_reparam, normformer_norms, head_scaling, pos_emb):
    enc = make(sigma_reparam=sigma_reparam, normformer_norms=normformer_norms,
               head_scaling=head_scaling, pos_emb=pos_emb)
    assert stepping_error(enc) <= TOL


@pytest.mark.parametrize("activation, norm", [(a, "layer") for a in ACTIVATIONS] + [("gelu", n) for n in NORMS])
def test_activations_and_norms(activation, norm):
    assert stepping_error(make(activation=activation, norm=norm)) <= TOL


def test_options_shape_the_model():
    full = make(pos_emb="learned")
    bare = make(sigma_reparam=False, normformer_norms=False, head_scaling=False, pos_emb="rope")
    block, bare_block = full.blocks[0], bare.blocks[0]
    assert isinstance(block.attn.qkv, SigmaReparamLinear) and isinstance(block.ff.up, SigmaReparamLinear)
    assert type(bare_block.attn.qkv) is nn.Linear and type(bare_block.ff.down) is nn.Linear
    assert isinstance(block.attn.post_norm, nn.LayerNorm) and isinstance(block.ff.mid_norm, nn.LayerNorm)
    assert isinstance(bare_block.attn.post_norm, nn.Identity) and isinstance(bare_block.ff.mid_norm, nn.Identity)
    assert block.attn.head_scale.shape == (4,) and bare_block.attn.head_scale is None
    assert full.pos_table.weight.shape == (W, 32) and not hasattr(bare, "pos_table")
    assert full.emb_dim == 32


def test_head_scales_and_normformer_norms_learn():
    enc = make().train()
    seq, t = episode_inputs(2, LONG)
    enc(seq, t)[0].pow(2).mean().backward()
    for block in enc.blocks:
        for p in (block.attn.head_scale, block.attn.post_norm.weight, block.ff.mid_norm.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert torch.equal(block.attn.head_scale.detach(), torch.ones(4))  # NormFormer init


@pytest.mark.parametrize("pos_emb, shift, invariant", [
    ("rope", 37, True),      # attention sees only time differences
    ("learned", W, True),    # the table is indexed by time % max_seq_len
    ("learned", 3, False),
    ("fixed", 37, False),
])
@torch.no_grad()
def test_time_shifts(pos_emb, shift, invariant):
    enc = make(pos_emb=pos_emb)
    seq, t = episode_inputs(2, 12)
    err = max_err(enc(seq, t)[0], enc(seq, t + shift)[0])
    assert (err <= 1e-4) == invariant, err


@torch.no_grad()
def test_head_scale_scales_one_head():
    """Scaling head 0 by zero is the same as zeroing head 0's values (checks the qkv head layout)."""
    enc = make(sigma_reparam=False)
    seq, t = episode_inputs(2, LONG)
    silenced = make(sigma_reparam=False)
    silenced.load_state_dict(enc.state_dict())
    for block, silent in zip(enc.blocks, silenced.blocks):
        block.attn.head_scale[0] = 0.0
        head0_values = slice(2 * 32, 2 * 32 + 8)  # qkv rows are [q | k | v], each [head, dh]
        silent.attn.qkv.weight[head0_values] = 0.0
        silent.attn.qkv.bias[head0_values] = 0.0
    assert max_err(enc(seq, t)[0], silenced(seq, t)[0]) <= TOL


# ---------------------------------------------------------------- windowed semantics

@pytest.mark.parametrize("pos_emb", ["fixed", "learned", "rope"])
@torch.no_grad()
def test_one_layer_output_is_attention_over_the_last_window(pos_emb):
    """Brute force: for one layer, step s of the episode equals a fresh run on steps s-W+1 .. s."""
    enc = make(n_layers=1, pos_emb=pos_emb)
    seq, t = episode_inputs(2, LONG)
    whole, _ = enc(seq, t)
    for s in range(LONG):
        lo = max(0, s - W + 1)
        window_only, _ = enc(seq[:, lo:s + 1], t[:, lo:s + 1])
        assert max_err(window_only[:, -1], whole[:, s]) <= TOL, s
    # Deeper models see further back (that is why stepping is compared with the banded whole path).
    deep = make(n_layers=2, pos_emb=pos_emb)
    s = LONG - 1
    assert max_err(deep(seq[:, s - W + 1:], t[:, s - W + 1:])[0][:, -1], deep(seq, t)[0][:, s]) > 1e-3


@pytest.mark.parametrize("n_layers", [1, 2])
@torch.no_grad()
def test_receptive_field_is_n_layers_windows(n_layers):
    enc = make(n_layers=n_layers)
    seq, t = episode_inputs(1, LONG)
    out, _ = enc(seq, t)
    last = LONG - 1
    oldest_seen = last - n_layers * (W - 1)
    for step, seen in ((oldest_seen, True), (oldest_seen - 1, False)):
        poked = seq.clone()
        poked[:, step] += 1.0
        changed = max_err(enc(poked, t)[0][:, last], out[:, last]) > 1e-4
        assert changed == seen, step


# ---------------------------------------------------------------- hidden state

def test_state_is_a_ring_of_the_last_window():
    enc = make()
    seq, t = episode_inputs(3, LONG)
    fresh = enc.init_hidden_state(3, seq.device)
    assert fresh["k"].shape == fresh["v"].shape == (3, 2, 4, W, 8) and fresh["k"].dtype == torch.float32
    assert torch.equal(fresh["n"], torch.zeros(3, dtype=torch.long))
    _, early = run_in_chunks(enc, seq[:, :3], t[:, :3], (1, 2))
    assert torch.equal(early["n"], torch.full((3,), 3))
    assert early["k"][..., :3, :].abs().min() > 0 and not early["k"][..., 3:, :].any()  # slots 0, 1, 2
    _, stepped = run_in_chunks(enc, seq, t, tuple(range(1, LONG)))
    _, chunked = run_in_chunks(enc, seq, t, (2, 13))  # one chunk longer than the window
    assert stepped["k"].shape == fresh["k"].shape
    assert torch.equal(stepped["n"], torch.full((3,), LONG))
    for key in stepped:
        assert max_err(stepped[key].float(), chunked[key].float()) <= TOL, key


@torch.no_grad()
def test_ring_slots_hold_the_last_window_of_keys():
    """Slot s % W holds step s's key: the first layer's keys are a function of that step alone."""
    enc = make(pos_emb="rope")
    seq, t = episode_inputs(2, LONG)
    _, state = run_in_chunks(enc, seq, t, (3, 7))
    layer = enc.blocks[0]
    x, angles = enc._embed_steps(seq, t[..., 0])
    keys = layer.attn.qkv(layer.norm1(x)).view(2, LONG, 3, 4, 8)[:, :, 1].transpose(1, 2)
    keys = transformer_module.rotate(keys, angles)
    for s in range(LONG - W, LONG):
        assert max_err(state["k"][:, 0, :, s % W], keys[:, :, s]) <= TOL, s


@torch.no_grad()
def test_in_place_step_writes_one_slot_per_layer_and_computes_the_same():
    enc = make()
    seq, t = episode_inputs(3, LONG)
    _, state = run_in_chunks(enc, seq[:, :-1], t[:, :-1], (4, 9))
    before = {key: value.clone() for key, value in state.items()}
    copied_out, copied_state = enc(seq[:, -1:], t[:, -1:], hidden_state=state)
    assert all(torch.equal(state[key], before[key]) for key in state)  # the copying path keeps its input
    out, updated = enc(seq[:, -1:], t[:, -1:], hidden_state=state, in_place=True)
    assert updated["k"] is state["k"] and updated["v"] is state["v"]
    # The same function; not bit for bit, since the copy's contiguous rings take the explicit
    # CPU rollout kernel and the strided rings in place take SDPA (FlashAttention.forward).
    torch.testing.assert_close(out, copied_out, rtol=TOL, atol=TOL)
    for key in updated:
        torch.testing.assert_close(updated[key], copied_state[key], rtol=TOL, atol=TOL)
    changed = (state["k"] != before["k"]).any(dim=-1)  # [B, layers, heads, W]
    slot = (LONG - 1) % W
    assert changed[..., slot].all() and not changed[..., [j for j in range(W) if j != slot]].any()


def test_bfloat16_model_and_autocast_keep_the_state_dtype():
    seq, t = episode_inputs(2, 4)
    enc = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = enc(seq, t, hidden_state=enc.init_hidden_state(2, seq.device))
    assert out.dtype == torch.bfloat16 and state["k"].dtype == torch.float32
    enc = enc.to(torch.bfloat16)
    out, state = enc(seq.bfloat16(), t, hidden_state=enc.init_hidden_state(2, seq.device))
    assert out.dtype == state["v"].dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------- attention kernels

def reference_attention(q, k, v, visible):
    """Loop-per-query softmax over the keys that ``visible(b, i, j)`` allows."""
    B, H, Tq, _ = q.shape
    out = torch.empty_like(q)
    for b, h, i in itertools.product(range(B), range(H), range(Tq)):
        seen = [j for j in range(k.shape[2]) if visible(b, i, j)]
        w = torch.softmax(k[b, h, seen] @ q[b, h, i] / q.shape[-1] ** 0.5, dim=0)
        out[b, h, i] = w @ v[b, h, seen]
    return out


@pytest.mark.parametrize("window", [1, 4, 100])
@pytest.mark.parametrize("kernel", [VanillaAttention, FlashAttention])
def test_kernels_match_brute_force_on_keys_in_time_order(kernel, window):
    q, k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 12, 4), torch.randn(3, 2, 12, 4)
    got = kernel(0.0)(q, k, v, window)
    expected = reference_attention(q, k, v, lambda b, i, j: 7 + i - window < j <= 7 + i)
    assert max_err(got, expected) <= TOL


@pytest.mark.parametrize("window", [1, 4, 9])
@pytest.mark.parametrize("kernel", [VanillaAttention, FlashAttention])
def test_kernels_match_brute_force_on_a_ring_of_keys(kernel, window):
    """Keys in slot order (a ring), some slots empty (negative steps), a different count per row."""
    q, k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 9, 4), torch.randn(3, 2, 9, 4)
    n = torch.tensor([2, 9, 23])  # steps seen, this step included
    key_steps = ring_steps(n, 9)
    query_steps = (n - 1).unsqueeze(1)
    got = kernel(0.0)(q, k, v, window, steps_mask(query_steps, key_steps, window))
    s = query_steps[:, 0]
    expected = reference_attention(
        q, k, v, lambda b, i, j: s[b] - window < key_steps[b, j] <= s[b] and key_steps[b, j] >= 0)
    assert max_err(got, expected) <= TOL
    assert sorted(key_steps[2].tolist()) == list(range(14, 23)) and (key_steps[0] < 0).sum() == 7


def test_ring_keys_are_the_mask_rule_and_the_slots_of_the_step():
    n, W, H = torch.tensor([0, 3, 9, 23]), 9, 2  # steps seen before this one
    keys = RingKeys(n, W, H)
    mask = steps_mask(n.unsqueeze(1), ring_steps(n + 1, W), W)
    assert torch.equal(keys.mask, mask)
    assert keys.bias.shape == (4 * H, 1, W)
    assert torch.equal(keys.bias.view(4, H, 1, W) == 0, mask.expand(4, H, 1, W))
    assert torch.equal(keys.bias.view(4, H, 1, W)[~mask.expand(4, H, 1, W)].unique(), torch.tensor([float("-inf")]))
    k, v = torch.randn(4, H, 1, 5), torch.randn(4, H, 1, 5)
    expected = transformer_module.KVCache(torch.randn(4, H, W, 5), torch.randn(4, H, W, 5))
    contiguous = expected.clone()
    batch_first = torch.randn(4, 3, H, W, 5)  # a strided layer of a ring stored batch first
    strided = transformer_module.KVCache(batch_first[:, 1], batch_first[:, 2])
    strided.k.copy_(expected.k), strided.v.copy_(expected.v)
    expected.write(k, v, n.unsqueeze(1))
    for cache in (contiguous, strided):
        cache.write_step(k, v, keys)
        assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)


@pytest.mark.parametrize("kernel", [VanillaAttention, FlashAttention])
@pytest.mark.parametrize("grad", [False, True])
def test_kernels_attend_a_ring_step_like_brute_force(kernel, grad, monkeypatch):
    """FlashAttention's CPU rollout step (no autograd, contiguous ring) takes ring_attention."""
    calls = []
    fused = attention_module.ring_attention
    monkeypatch.setattr(attention_module, "ring_attention", lambda *a: calls.append(1) or fused(*a))
    n, W, H = torch.tensor([1, 8, 22]), 9, 2  # steps seen before this one
    q, k, v = torch.randn(3, H, 1, 4), torch.randn(3, H, W, 4), torch.randn(3, H, W, 4)
    key_steps, s = ring_steps(n + 1, W), n
    with torch.set_grad_enabled(grad):
        got = kernel(0.0).attend_ring(q, k, v, RingKeys(n, W, H))
    expected = reference_attention(q, k, v, lambda b, i, j: s[b] - W < key_steps[b, j] <= s[b] and key_steps[b, j] >= 0)
    assert max_err(got, expected) <= TOL
    assert len(calls) == (kernel is FlashAttention and not grad)


@pytest.mark.parametrize("kernel", [VanillaAttention, FlashAttention])
def test_attention_dropout_acts_only_in_training(kernel):
    q, k, v = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
    attn = kernel(0.5)
    assert not torch.equal(attn.train()(q, k, v, 6), attn.eval()(q, k, v, 6))
    assert torch.equal(attn(q, k, v, 6), attn(q, k, v, 6))


@pytest.mark.parametrize("pos_emb", ["fixed", "rope"])
def test_vanilla_and_flash_encoders_agree(pos_emb):
    flash = make(attention_type=FlashAttention, pos_emb=pos_emb)
    vanilla = make(attention_type=VanillaAttention, pos_emb=pos_emb)
    vanilla.load_state_dict(flash.state_dict())
    seq, t = episode_inputs(2, LONG)
    with torch.no_grad():
        assert max_err(flash(seq, t)[0], vanilla(seq, t)[0]) <= TOL
    assert max_err(run_in_chunks(flash, seq, t, (1, 5, 6))[0], run_in_chunks(vanilla, seq, t, (1, 5, 6))[0]) <= TOL


def test_flash_attention_on_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(attention_module, "_warned_fallback", False)
    q = torch.randn(1, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            FlashAttention(0.0)(q, q, q, 2)
        VanillaAttention(0.0)(q, q, q, 2)
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1


# ---------------------------------------------------------------- σReparam

def test_sigma_estimate_matches_the_spectral_norm():
    layer = SigmaReparamLinear(32, 64)
    norm = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    # Right after __init__'s power steps: u^T W v never overshoots; a random init's top singular
    # values nearly tie, so it converges slowly (median 1% low); separated ones converge fast:
    assert 0.85 * norm <= layer.sigma() <= norm + 1e-5
    u, _ = torch.linalg.qr(torch.randn(64, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    spectrum = torch.linspace(1.0, 0.1, 32)
    spectrum[0] = 3.0
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(spectrum) @ v.T)
    layer.train()
    x = torch.randn(4, 32)
    for _ in range(10):
        layer(x)
    assert abs(layer.sigma().item() - 3.0) <= 1e-4
    effective = layer.gamma / layer.sigma() * layer.weight
    assert abs(torch.linalg.matrix_norm(effective.detach(), 2).item() - 1.0) <= 1e-4


def test_sigma_reparam_eval_never_updates_and_train_uses_the_pre_update_vectors():
    layer = SigmaReparamLinear(16, 24, init_steps=2)  # far from converged: every step moves u, v
    x = torch.randn(5, 16)
    before = {k: b.clone() for k, b in layer.named_buffers()}
    eval_out = layer.eval()(x)
    assert all(torch.equal(before[k], b) for k, b in layer.named_buffers())
    expected = F.linear(x, layer.gamma / (before["u"] @ layer.weight @ before["v"]) * layer.weight, layer.bias)
    assert max_err(eval_out, expected) <= TOL

    first = layer.train()(x)
    assert torch.equal(first, eval_out)  # computed with the buffers as they were
    after_first = {k: b.clone() for k, b in layer.named_buffers()}
    assert not torch.equal(after_first["u"], before["u"])  # ... and only then stepped
    second = layer(x)
    assert not torch.equal(second, first)
    second.sum().backward()  # the in-place step after the forward did not break autograd
    assert layer.gamma.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.load_state_dict({**layer.state_dict(), **after_first})
    assert torch.equal(layer.eval()(x), second)


def test_inference_reuses_the_scaled_weight_until_a_parameter_changes(monkeypatch):
    layer = SigmaReparamLinear(16, 24).eval()
    x = torch.randn(5, 16)
    calls = []
    real_sigma = SigmaReparamLinear.sigma
    monkeypatch.setattr(SigmaReparamLinear, "sigma", lambda self: calls.append(1) or real_sigma(self))

    def fresh() -> torch.Tensor:  # what the layer computes without any reuse
        return F.linear(x, layer.gamma / real_sigma(layer) * layer.weight, layer.bias).detach()

    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert len(calls) == 1 and torch.equal(first, second) and max_err(first, fresh()) <= TOL
    layer(x).sum().backward()  # eval with autograd: no reuse, gradients reach gamma
    assert layer.gamma.grad is not None and len(calls) == 2
    torch.optim.SGD(layer.parameters(), lr=0.5).step()  # an optimizer step, in place
    with torch.no_grad():
        assert max_err(layer(x), fresh()) <= TOL and not torch.equal(layer(x), first)
    assert len(calls) == 3  # recomputed once after the step, then reused
    other = SigmaReparamLinear(16, 24)
    layer.load_state_dict(other.state_dict())  # as env runners receive new weights
    with torch.no_grad():
        assert max_err(layer(x), other.eval()(x)) <= TOL
        layer.to(torch.float64)  # a move replaces the tensors
        assert layer(x.double()).dtype == torch.float64


def test_inference_mode_and_no_grad_share_the_reused_weight():
    layer = SigmaReparamLinear(8, 8).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        inside = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), inside)


def test_a_train_forward_equals_the_eval_forward_just_before_it():
    """Rollout (eval) and learner (train, no dropout) compute the same function."""
    enc = make()
    seq, t = episode_inputs(2, LONG)
    with torch.no_grad():
        rollout, _ = enc(seq, t)
    learner, _ = enc.train()(seq, t)
    assert torch.equal(rollout, learner)


# ---------------------------------------------------------------- arguments and logging

@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
    (dict(n_heads=0), "n_heads=0 must be a positive int"),
    (dict(d_model=-32), "d_model=-32 must be a positive int"),
    (dict(d_ff=0), "d_ff=0 must be a positive int"),
    (dict(n_layers=0), "n_layers=0 must be a positive int"),
    (dict(dropout_ff=1.0), "dropout_ff=1.0"),
    (dict(dropout_emb=-0.1), "dropout_emb=-0.1"),
    (dict(dropout_attn=1.5), "dropout_attn=1.5"),
    (dict(dropout_qkv=2.0), "dropout_qkv=2.0"),
    (dict(activation="swish"), "activation='swish'"),
    (dict(norm="batch"), "norm='batch'"),
    (dict(pos_emb="alibi"), "pos_emb='alibi'"),
    (dict(d_model=12, n_heads=4, pos_emb="rope"), "pos_emb='rope' needs an even head dim"),
    (dict(attention_type=nn.MultiheadAttention), "attention_type must be a subclass of SelfAttention"),
    (dict(attention_type=VanillaAttention(0.0)), "attention_type must be a subclass of SelfAttention"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**kwargs)


@pytest.mark.parametrize("time_idxs", [None, torch.zeros(2, 6), torch.zeros(2, 5, 1), torch.zeros(2, 6, 2)])
def test_bad_time_idxs_are_rejected(time_idxs):
    seq, _ = episode_inputs(2, 6)
    with pytest.raises(ValueError, match=re.escape("time_idxs must have shape [batch, time, 1]")):
        make()(seq, time_idxs)


def test_custom_attention_types_plug_in():
    class Doubled(VanillaAttention):
        def forward(self, q, k, v, window, mask=None):
            return 2 * super().forward(q, k, v, window, mask)

    assert issubclass(Doubled, SelfAttention)
    assert stepping_error(make(attention_type=Doubled)) <= TOL


@pytest.mark.parametrize("sigma_reparam", [True, False])
def test_log_dict_gets_cheap_detached_scalars(sigma_reparam):
    enc = make(sigma_reparam=sigma_reparam).train()
    seq, t = episode_inputs(2, 6)
    logs = {}
    enc(seq, t, log_dict=logs)
    expected = {"transformer/residual_norm"} | ({"transformer/sigma_reparam_scale"} if sigma_reparam else set())
    assert set(logs) == expected
    for value in logs.values():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)


@torch.no_grad()
def test_rollout_step_over_a_layer_first_ring_uses_explicit_attention_and_equals_sdpa(monkeypatch):
    """Env runners keep the ring layer first (RolloutState), where FlashAttention's CPU rollout
    step takes two matmuls instead of SDPA: the same outputs and states as over a batch-first
    ring, which keeps SDPA."""
    enc = make().eval()
    seq, t = episode_inputs(4, W + 3)  # the ring has wrapped around
    _, state = enc(seq[:, :W], t[:, :W], hidden_state=enc.init_hidden_state(4, seq.device))
    _, state = enc(seq[:, W:], t[:, W:], hidden_state=state)
    stored_layer_first = {key: layer_first(value) for key, value in state.items()}
    calls = []
    explicit = attention_module.ring_attention
    monkeypatch.setattr(attention_module, "ring_attention", lambda *a, **kw: calls.append(1) or explicit(*a, **kw))
    step, t_step = torch.randn(4, 1, TSTEP_DIM), torch.full((4, 1, 1), W + 3)
    out_sdpa, _ = enc(step, t_step, hidden_state=state, in_place=True)
    assert not calls
    out_explicit, _ = enc(step, t_step, hidden_state=stored_layer_first, in_place=True)
    assert len(calls) == enc.n_layers
    torch.testing.assert_close(out_explicit, out_sdpa, rtol=TOL, atol=TOL)
    for key in state:
        torch.testing.assert_close(stored_layer_first[key], state[key], rtol=TOL, atol=TOL)
