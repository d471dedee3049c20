"""The encoder's env-runner step on CPU: how its state is laid out, and which attention kernel.

An env runner keeps its envs' states as one batch (rollout_state.py) that every step updates in
place. Stored batch first ([B, n_layers, ...], as RLlib stacks states), each layer's state is B
strided pieces; stored layer first (what RolloutState allocates), each layer's state of all rows
is one block. For the Transformer also the kernel of its one-query step over the ring: torch's
SDPA against the explicit two matmuls FlashAttention uses for it on CPU when the ring is stored
layer first (batch-first rings, strided, keep SDPA). Interleaved
rounds in one process, median ms per step of 16 envs at episode step 300, spec-default sizes,
at 1 and 2 torch threads. Usage: python benchmarks/rollout_step_cpu.py [--rounds 200]
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from encoders_cpu import ENCODERS, MAX_SEQ_LEN, N_ENVS, TSTEP_DIM, state_at  # same folder
from rllib_trajenc.nets import attention
from rllib_trajenc.rllib.rollout_state import layer_first  # what env runners keep

EXPLICIT = attention.ring_attention


def sdpa(q, k, v, bias):
    """torch's SDPA in place of ring_attention, with the same additive mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(*q.shape[:2], 1, -1))


def variants(name: str) -> dict[str, tuple[Callable, Callable]]:
    """Label -> (state layout, attention kernel used by the rollout step)."""
    out = {"batch first": (torch.Tensor.clone, EXPLICIT), "layer first": (layer_first, EXPLICIT)}
    if name == "transformer":
        out = {"batch first (SDPA)": (torch.Tensor.clone, EXPLICIT), "layer first, SDPA": (layer_first, sdpa),
               "layer first, explicit": (layer_first, EXPLICIT)}
    return out


@torch.no_grad()
def row(name: str, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    enc = ENCODERS[name](TSTEP_DIM, MAX_SEQ_LEN).eval()
    start = state_at(enc, 300)
    obs, t = torch.randn(N_ENVS, 1, TSTEP_DIM), torch.full((N_ENVS, 1, 1), 300)
    cases = variants(name)
    states = {label: {k: layout(v) for k, v in start.items()} for label, (layout, _) in cases.items()}
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(rounds):
        for label, (_, kernel) in cases.items():
            attention.ring_attention = kernel
            begin = time.perf_counter()
            enc(obs, t, hidden_state=states[label], in_place=True)
            times[label].append(time.perf_counter() - begin)
    attention.ring_attention = EXPLICIT
    return {label: 1e3 * sorted(v)[len(v) // 2] for label, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__}; {N_ENVS} envs, spec-default sizes\n")
    print("| encoder | torch threads | variant | ms per step | vs the first variant |\n|---|---:|---|---:|---:|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name in ("gru", "mamba", "transformer"):
            ms = row(name, args.rounds)
            first = next(iter(ms.values()))
            for label, value in ms.items():
                print(f"| {name} | {threads} | {label} | {value:.2f} | {value / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
