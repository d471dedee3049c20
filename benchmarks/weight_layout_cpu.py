"""Linear weights stored as nn.Linear keeps them, or transposed, on an env runner's CPU step.

``F.linear(x, W, b)`` multiplies x by W^T. Stored as nn.Linear keeps it ([out, in], contiguous),
W^T is a strided matrix; stored transposed (``store_weights_transposed``, what env runners' modules
do at their first step on CPU), W^T is contiguous. Two tables, each at 2 and 1 torch threads (Ray
gives an env-runner actor one CPU, hence one thread, by default), every pair measured in
interleaved rounds in one process, median:
1. One linear layer at a batch of 16 rows, for the layer shapes of the spec-default encoders,
   with their error against a float64 product.
2. The module env runners build (profile_rollout.module_step: 16 envs, CartPole, spec-default
   sizes), one forward_exploration step in place, with the two layouts.
Usage: python benchmarks/weight_layout_cpu.py [--rounds 400]
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F
from ray.rllib.core.rl_module.rl_module import RLModule

from encoders_cpu import ENCODERS, N_ENVS  # same folder
from profile_rollout import module_and_step
from rllib_trajenc.nets.layers import store_weights_transposed
from sampling_cpu import MLP

# (in, out) of the layers in the spec-default modules: the timestep encoder, the FF/Transformer
# blocks (256 -> 1024 -> 256, qkv 256 -> 768), Mamba's projections, the GRU's gates, the heads.
SHAPES = [(64, 256), (256, 256), (256, 768), (256, 1024), (1024, 256), (512, 1024), (256, 2)]
LAYOUTS = ("as nn.Linear", "transposed")


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median µs per call of each callable, timed ``inner`` calls at a time in alternating rounds."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    for call in calls.values():  # warm-up
        for _ in range(inner):
            call()
    for _ in range(rounds):
        for label, call in calls.items():
            start = time.perf_counter()
            for _ in range(inner):
                call()
            times[label].append((time.perf_counter() - start) / inner)
    return {label: 1e6 * sorted(v)[len(v) // 2] for label, v in times.items()}


@torch.no_grad()
def linear_table(rounds: int) -> None:
    print("\n| layer (in -> out) | as nn.Linear (µs) | transposed (µs) | transposed / as nn.Linear "
          "| max error vs float64: as nn.Linear / transposed |")
    print("|---|---:|---:|---:|---:|")
    for d_in, d_out in SHAPES:
        layer = torch.nn.Linear(d_in, d_out)
        weight, bias, x = layer.weight, layer.bias, torch.randn(N_ENVS, d_in)
        transposed = weight.t().contiguous().t()
        calls = {LAYOUTS[0]: lambda: F.linear(x, weight, bias), LAYOUTS[1]: lambda: F.linear(x, transposed, bias)}
        us = interleaved(calls, rounds // 4, 20)
        exact = F.linear(x.double(), weight.double(), bias.double())
        errors = [(call().double() - exact).abs().max().item() for call in calls.values()]
        print(f"| {d_in} -> {d_out} | {us[LAYOUTS[0]]:.1f} | {us[LAYOUTS[1]]:.1f} "
              f"| {us[LAYOUTS[1]] / us[LAYOUTS[0]]:.2f} | {errors[0]:.1e} / {errors[1]:.1e} |", flush=True)


def module_with_layout(contender: str, layout: str) -> tuple[RLModule, Callable[[], None]]:
    """``contender``'s env-runner module after its first step, its weights stored as ``layout``
    says, and ``module_step``'s closure over it."""
    module, step = module_and_step(contender)
    step()  # this package's modules store their weights transposed at their first step
    with torch.no_grad():
        if layout == LAYOUTS[0]:
            for p in module.parameters():
                p.data = p.data.contiguous()
        else:  # also RLlib's MLP, for comparison
            store_weights_transposed(module)
    return module, step


def module_table(rounds: int) -> None:
    print(f"\n| contender | as nn.Linear (ms per step of {N_ENVS} envs) | transposed (ms) | transposed / as nn.Linear |")
    print("|---|---:|---:|---:|")
    for contender in [MLP, *ENCODERS]:
        steps = {layout: module_with_layout(contender, layout)[1] for layout in LAYOUTS}
        ms = {label: us / 1e3 for label, us in interleaved(steps, rounds, 5).items()}
        print(f"| {contender} | {ms[LAYOUTS[0]]:.3f} | {ms[LAYOUTS[1]]:.3f} | {ms[LAYOUTS[1]] / ms[LAYOUTS[0]]:.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400, help="alternating rounds per pair")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        print(f"\n## {threads} torch thread{'s' if threads > 1 else ''}")
        linear_table(args.rounds)
        module_table(args.rounds)


if __name__ == "__main__":
    main()
