"""Pre-norm Transformer encoder with sliding-window causal attention and a fixed-size KV cache."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rllib_trajenc.nets.attention import (
    CarriedKeys, FlashAttention, RingKeys, SelfAttention, VanillaAttention, flash_applies,
)
from rllib_trajenc.nets.base import Backends, HiddenState, TrajEncoder
from rllib_trajenc.nets.ff import FeedForward
from rllib_trajenc.nets.layers import NORMS, activation as get_activation
from rllib_trajenc.nets.layers import check_choice, check_positive, check_probability, make_norm
from rllib_trajenc.nets.sigma_reparam import SigmaReparamLinear

POS_EMBS = ("fixed", "learned", "rope")

def _angles(t: torch.Tensor, n: int) -> torch.Tensor:
    """Sinusoid phases [B, T, n] of the time indices t [B, T], periods geometric in 2pi .. 2pi*1e4."""
    freqs = 10000.0 ** (-torch.arange(n, device=t.device, dtype=torch.float32) / n)
    return t.unsqueeze(-1).float() * freqs


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed position embedding [B, T, dim] of any (unbounded) time index."""
    angles = _angles(t, (dim + 1) // 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[..., :dim]


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE: turns the pairs (x_i, x_{i + dh/2}) of x [B, H, T, dh] by angles [B, 1, T, dh/2]."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """One layer's ring of the last W keys and values [B, H, W, dh], where step s lives in slot s % W.

    Written in place: a step costs O(d_model) bytes written per layer, not a copy of the cache.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def write(self, k: torch.Tensor, v: torch.Tensor, steps: torch.Tensor) -> None:
        """Stores keys/values [B, H, T, dh] of the episode steps [B, T] (the last W of them)."""
        W = self.k.shape[2]
        k, v, steps = k[:, :, -W:], v[:, :, -W:], steps[:, -W:]
        rows = torch.arange(steps.shape[0], device=steps.device).unsqueeze(1)
        slots = steps % W
        # Advanced indices (rows, slots) around a slice put their dims first: [B, T, H, dh].
        self.k[rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)

    def write_step(self, k: torch.Tensor, v: torch.Tensor, keys: RingKeys) -> None:
        """Stores a rollout step's keys/values [B, H, 1, dh]: one row copy per head where the ring
        is contiguous (an env runner's, layer first), else ``write``."""
        if self.k.is_contiguous() and self.v.is_contiguous():
            dh = self.k.shape[-1]
            self.k.view(-1, dh).index_copy_(0, keys.slots, k.reshape(-1, dh).to(self.k.dtype))
            self.v.view(-1, dh).index_copy_(0, keys.slots, v.reshape(-1, dh).to(self.v.dtype))
        else:
            self.write(k, v, keys.n.unsqueeze(1))

    def clone(self) -> KVCache:
        return KVCache(self.k.clone(), self.v.clone())


def _rollout_step(steps: int) -> bool:
    """Whether a pass of ``steps`` steps from a state is an env runner's step (one step, no
    autograd): it attends over the ring with a mask and records no backend."""
    return steps == 1 and not torch.is_grad_enabled()


class AttentionLayer(nn.Module):
    """Multi-head self-attention sublayer with NormFormer's head scales and post-attention norm."""

    def __init__(self, d_model: int, n_heads: int, attention: SelfAttention, linear: type[nn.Module],
                 post_norm: nn.Module, head_scaling: bool, dropout_qkv: float, dropout_ff: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = linear(d_model, 3 * d_model)
        self.dropout_qkv = nn.Dropout(dropout_qkv)
        self.attention = attention
        self.head_scale = nn.Parameter(torch.ones(n_heads)) if head_scaling else None
        self.out = linear(d_model, d_model)
        self.post_norm = post_norm
        self.dropout = nn.Dropout(dropout_ff)

    def forward(self, x: torch.Tensor, window: int, angles: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, steps: Optional[torch.Tensor] = None,
                keys: Optional[CarriedKeys | RingKeys] = None) -> torch.Tensor:
        """Attends x [B, T, D] to itself (an episode's start) or, given a ``cache``, to the cache and
        itself, writing x's keys/values into the cache (x holds episode ``steps`` [B, T]). ``keys``
        says which keys each query sees: the CarriedKeys of a chunk, or the RingKeys of a
        rollout step."""
        B, T, D = x.shape
        qkv = self.dropout_qkv(self.qkv(x)).view(B, T, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, dh]
        if angles is not None:
            q, k = rotate(q, angles), rotate(k, angles)
        if cache is None:
            out = self.attention(q, k, v, window)
        elif isinstance(keys, CarriedKeys):
            out = self.attention.attend_carried(q, k, v, cache.k, cache.v, keys)
            cache.write(k, v, steps)
        else:  # a rollout step: the new key joins the ring in place of the step leaving it
            cache.write_step(k, v, keys)
            out = self.attention.attend_ring(q, cache.k.to(q.dtype), cache.v.to(q.dtype), keys)
        if self.head_scale is not None:
            out = out * self.head_scale.view(-1, 1, 1)
        out = self.out(out.transpose(1, 2).reshape(B, T, D))
        return self.dropout(self.post_norm(out))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, attn: AttentionLayer, ff: FeedForward, norm: str, d_model: int):
        super().__init__()
        self.norm1, self.attn = make_norm(norm, d_model), attn
        self.norm2, self.ff = make_norm(norm, d_model), ff

    def forward(self, x: torch.Tensor, window: int, angles: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, steps: Optional[torch.Tensor] = None,
                keys: Optional[CarriedKeys | RingKeys] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), window, angles, cache, steps, keys)
        return x + self.ff(self.norm2(x))


class TformerTrajEncoder(TrajEncoder):
    """Decoder-only pre-norm Transformer over timesteps, with sliding-window causal attention.

    Windowed semantics: with W = max_seq_len, the output at episode step t attends, at every
    layer, to the keys of steps max(0, t - W + 1) .. t. A whole-sequence forward
    (``hidden_state=None``, the sequence starting an episode, any length, also > W) applies this
    banded mask, so it computes exactly what stepping through the episode with a state computes.

    State (fixed size, bounded by W): ``{"k", "v": [B, n_layers, n_heads, W, d_model // n_heads],
    "n": [B] long}``, the keys/values of the last W steps per layer in a ring: after n steps,
    slot j holds the latest step s < n with s % W == j (empty while s < 0). A step writes one
    slot per layer and attends over W slots: O(W) work, O(d_model) bytes written, at any step.
    With ``in_place=True`` (inference, no autograd) the state passed in is updated and returned
    instead of copied; callers that still need the old state pass a copy.

    pos_emb: "fixed" adds sinusoids of the episode time index (any time); "learned" adds a
    trainable vector per ``time_idx % W`` (bounded table; the W keys of a window still get W
    distinct vectors); "rope" rotates q and k by the time index (keys are cached rotated).
    """

    def __init__(self, tstep_dim: int, max_seq_len: int, d_model: int = 256, n_heads: int = 8,
                 d_ff: int = 1024, n_layers: int = 3, dropout_ff: float = 0.05, dropout_emb: float = 0.05,
                 dropout_attn: float = 0.0, dropout_qkv: float = 0.0, activation: str = "leaky_relu",
                 norm: str = "layer", pos_emb: str = "fixed", sigma_reparam: bool = True,
                 normformer_norms: bool = True, head_scaling: bool = True,
                 attention_type: type[SelfAttention] = FlashAttention):
        super().__init__(tstep_dim, max_seq_len)
        check_positive(d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_layers=n_layers)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} "
                             "(each head gets d_model // n_heads dims)")
        check_probability(dropout_ff=dropout_ff, dropout_emb=dropout_emb,
                          dropout_attn=dropout_attn, dropout_qkv=dropout_qkv)
        get_activation(activation)
        check_choice("norm", norm, NORMS)
        check_choice("pos_emb", pos_emb, POS_EMBS)
        if pos_emb == "rope" and (d_model // n_heads) % 2:
            raise ValueError(f"pos_emb='rope' needs an even head dim d_model // n_heads, got {d_model // n_heads}")
        if not (isinstance(attention_type, type) and issubclass(attention_type, SelfAttention)):
            raise ValueError("attention_type must be a subclass of SelfAttention (the class itself), "
                             f"got {attention_type!r}")
        self.d_model, self.n_heads, self.n_layers, self.pos_emb = d_model, n_heads, n_layers, pos_emb
        self.head_dim = d_model // n_heads
        linear = SigmaReparamLinear if sigma_reparam else nn.Linear

        def normformer(dim: int) -> nn.Module:
            return make_norm(norm, dim) if normformer_norms else nn.Identity()

        self.inp = nn.Linear(tstep_dim, d_model)
        if pos_emb == "learned":
            self.pos_table = nn.Embedding(max_seq_len, d_model)
        self.dropout = nn.Dropout(dropout_emb)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                AttentionLayer(d_model, n_heads, attention_type(dropout_attn), linear, normformer(d_model),
                               head_scaling, dropout_qkv, dropout_ff),
                FeedForward(d_model, d_ff, dropout_ff, activation, linear=linear, mid_norm=normformer(d_ff)),
                norm, d_model)
            for _ in range(n_layers))
        self.out_norm = make_norm(norm, d_model)

    @property
    def emb_dim(self) -> int:
        return self.d_model

    @property
    def fused_kernels(self) -> bool:
        return self._fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, allowed: bool) -> None:
        # Passed on to the attention kernels, which read it, when it is set (not at every forward).
        self._fused_kernels = allowed
        for block in getattr(self, "blocks", ()):  # none yet while TrajEncoder.__init__ sets it
            block.attn.attention.fused_kernels = allowed

    def init_hidden_state(self, batch_size: int, device: torch.device) -> HiddenState:
        shape = (batch_size, self.n_layers, self.n_heads, self.max_seq_len, self.head_dim)
        kv = dict(dtype=self.inp.weight.dtype, device=device)
        return {"k": torch.zeros(shape, **kv), "v": torch.zeros(shape, **kv),
                "n": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def _embed_steps(self, seq: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Input embedding + additive position embedding; RoPE angles [B, 1, T, dh/2] if rope."""
        x = self.inp(seq)
        if self.pos_emb == "rope":
            return x, _angles(t, self.head_dim // 2).unsqueeze(1)
        pos = sinusoid(t, self.d_model) if self.pos_emb == "fixed" else self.pos_table(t % self.max_seq_len)
        return x + pos.to(x.dtype), None

    def forward(self, seq: torch.Tensor, time_idxs: Optional[torch.Tensor],
                hidden_state: Optional[HiddenState] = None, log_dict: Optional[dict] = None,
                *, in_place: bool = False) -> tuple[torch.Tensor, Optional[HiddenState]]:
        self.check_input(seq, in_place)
        if time_idxs is None or tuple(time_idxs.shape) != (*seq.shape[:2], 1):
            got = None if time_idxs is None else tuple(time_idxs.shape)
            raise ValueError(f"time_idxs must have shape [batch, time, 1] = {(*seq.shape[:2], 1)}, got {got}")
        x, angles = self._embed_steps(seq, time_idxs[..., 0].long())
        x = self.dropout(x)
        W = self.max_seq_len
        if hidden_state is None:
            for block in self.blocks:
                x = block(x, W, angles)
            state = None
        else:
            x, state = self._continue(x, angles, hidden_state, in_place)
        if hidden_state is None or not _rollout_step(x.shape[1]):
            self.last_backends = {"attention_backend": self.blocks[0].attn.attention.last_backend}
        if log_dict is not None:
            self._log(x, log_dict)
        return self.out_norm(x), state

    def _continue(self, x: torch.Tensor, angles: Optional[torch.Tensor], state: HiddenState,
                  in_place: bool) -> tuple[torch.Tensor, HiddenState]:
        """Runs x [B, T, D] on from ``state``; returns the output and the state after it."""
        W, n, T = self.max_seq_len, state["n"], x.shape[1]
        steps = n.unsqueeze(1) + torch.arange(T, device=n.device)
        if _rollout_step(T):  # it attends over the W ring slots
            keys = RingKeys(n, W, self.n_heads)
        else:  # a chunk (a learner row): the kernel picks a packing or a mask, shared by every layer
            keys = CarriedKeys(n, T, W)
        caches = [KVCache(k, v) for k, v in zip(state["k"].unbind(1), state["v"].unbind(1))]
        if not in_place:
            caches = [cache.clone() for cache in caches]
        for block, cache in zip(self.blocks, caches):
            x = block(x, W, angles, cache, steps, keys)
        k, v = (state["k"], state["v"]) if in_place else (
            torch.stack([c.k for c in caches], 1), torch.stack([c.v for c in caches], 1))
        return x, {"k": k, "v": v, "n": n + T}

    def kernel_backends(self, device: torch.device, dtype: torch.dtype) -> Backends:
        attention = self.blocks[0].attn.attention
        if isinstance(attention, FlashAttention):
            fused = flash_applies(device, dtype, self.head_dim, self.fused_kernels, varlen=True)
            return {"attention_backend": "flash_attn_varlen" if fused else "sdpa"}
        return {"attention_backend": "vanilla" if isinstance(attention, VanillaAttention) else type(attention).__name__}

    def extra_repr(self) -> str:
        cuda, cpu = (self.kernel_backends(torch.device(d), t) for d, t in (("cuda", torch.bfloat16), ("cpu", torch.float32)))
        return f"fused_kernels={self.fused_kernels}, backends: cuda/bf16={cuda}, cpu/fp32={cpu}"

    @torch.no_grad()
    def _log(self, x: torch.Tensor, log_dict: dict) -> None:
        """Cheap health signals as detached 0-dim tensors: residual-stream size, σReparam scales."""
        log_dict["transformer/residual_norm"] = x.norm(dim=-1).mean()
        scales = [m.gamma / m.sigma() for m in self.modules() if isinstance(m, SigmaReparamLinear)]
        if scales:
            log_dict["transformer/sigma_reparam_scale"] = torch.stack(scales).mean()
