"""Carried-cache attention without flash-attn, on CPU: torch SDPA with a mask against FlexAttention.

A learner row continued from the Transformer's KV-cache ring attends to (ring of W slots, its
chunk of T steps) under ``steps_mask``'s rule. Measured side by side, fwd+bwd, at the spec's
default attention size (8 heads x 32 dims): SDPA with the boolean [B, 1, T, W+T] mask (what
``FlashAttention`` falls back to), ``VanillaAttention``, and FlexAttention with the same rule
as a block mask, eager and compiled (torch 2.13 refuses FlexAttention on CPU for inputs that
need gradients, which the table prints). Rows start at random episode steps, a quarter fresh.
Usage: python benchmarks/attention_cpu.py [--threads N]
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from learner_gpu import median_seconds  # same folder
from rllib_trajenc.nets.attention import VanillaAttention, ring_steps, steps_mask

HEADS, HEAD_DIM = 8, 32


def rows(batch: int, steps: int, window: int):
    """q, k, v [B, H, T, dh], the ring [B, H, W, dh] and the steps of (ring, chunk) per row."""
    torch.manual_seed(0)
    n = torch.randint(0, 4 * window, (batch,))
    n[: batch // 4] = 0                                              # episode starts: empty rings
    chunk = n.unsqueeze(1) + torch.arange(steps)
    keys = torch.cat([ring_steps(n, window), chunk], 1)
    q, k, v = (torch.randn(batch, HEADS, steps, HEAD_DIM, requires_grad=True) for _ in range(3))
    ring_k, ring_v = (torch.randn(batch, HEADS, window, HEAD_DIM) for _ in range(2))
    return q, torch.cat([ring_k, k], 2), torch.cat([ring_v, v], 2), chunk, keys


def flex_rule(chunk: torch.Tensor, keys: torch.Tensor, window: int):
    def visible(b, h, q_idx, kv_idx):
        qs, ks = chunk[b, q_idx], keys[b, kv_idx]
        return (ks <= qs) & (ks > qs - window) & (ks >= 0)
    return visible


def cell(attend, reference: torch.Tensor, timesteps: int) -> str:
    """fwd+bwd timesteps/s of one path, after checking its output against SDPA's."""
    try:
        err = (attend().detach() - reference).abs().max().item()
        assert err < 1e-4, f"output differs from SDPA's by {err:.1e}"
        seconds = median_seconds(lambda: attend().square().sum().backward(), torch.device("cpu"),
                                 warmup=2, repeats=5)
    except NotImplementedError as refusal:  # FlexAttention refuses inputs that need grad on CPU
        return f"refused: {str(refusal).split('.')[0]}"
    return f"{timesteps / seconds:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {args.threads} torch threads; torch {torch.__version__}")
    compiled_flex = torch.compile(flex_attention)
    print("\n| B x T (W = T) | SDPA + mask | vanilla | FlexAttention eager | FlexAttention compiled |")
    print("|---|---:|---:|---:|---:|")
    for batch, steps in ((64, 64), (16, 256)):
        q, k, v, chunk, keys = rows(batch, steps, steps)
        block = create_block_mask(flex_rule(chunk, keys, steps), batch, None, steps, k.shape[2], device="cpu")
        mask = steps_mask(chunk, keys, steps)
        vanilla = VanillaAttention()
        paths = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "vanilla": lambda: vanilla(q, k, v, steps, mask),
            "flex": lambda: flex_attention(q, k, v, block_mask=block),
            "flex_compiled": lambda: compiled_flex(q, k, v, block_mask=block),
        }
        reference = paths["sdpa"]().detach()
        cells = [cell(attend, reference, batch * steps) for attend in paths.values()]
        print(f"| {batch} x {steps} | " + " | ".join(cells) + " |", flush=True)
    print("\n(fwd+bwd query timesteps/s, median of 5; each path's output checked against SDPA's)")


if __name__ == "__main__":
    main()
