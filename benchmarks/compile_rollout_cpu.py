"""torch.compile on the env runner's encoder step, on CPU: does a compiled step reach the floor?

Each encoder at the spec's default sizes takes one rollout step of 16 envs at episode step 300
(in place, no autograd, as env runners take it), timed eager, under dynamo with the "eager"
backend (the captured graph replayed without nn.Module and Python overhead, no C++ compiler
needed) and under inductor (fused C++ kernels; needs a compiler on every env-runner node),
side by side in one run; the first two compiled calls' wall time is the compile cost. Encoders
that take model_config["compile_rollout"] (Mamba) get one more column: the encoder eager, its
in-place step alone compiled, as env runners run it with that setting. Run with a fresh
TORCHINDUCTOR_CACHE_DIR for cold compile times.
Usage: python benchmarks/compile_rollout_cpu.py [--encoders ff gru mamba transformer] [--repeats 100]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from typing import Callable

import torch
import torch._dynamo

from encoders_cpu import ENCODERS, MAX_SEQ_LEN, N_ENVS, TSTEP_DIM, rollout_step, timed  # same folder

EPISODE_STEP = 300
BACKENDS = ("eager", "inductor")


def timed_with_compile(step: Callable[[], object], eager_ms: float, repeats: int) -> str:
    """"ms (vs eager ratio, seconds of the first two calls: the compile)" of a compiled step."""
    start = time.perf_counter()
    step(), step()
    compile_s = time.perf_counter() - start
    ms = 1e3 * timed(step, repeats)
    return f"{ms:.2f} ({ms / eager_ms:.2f}x, {compile_s:.1f} s)"


def compiled_rollout_cell(encoder: torch.nn.Module, eager_ms: float, repeats: int) -> str:
    torch._dynamo.reset()
    encoder.compile_rollout = True
    try:
        return timed_with_compile(rollout_step(encoder, EPISODE_STEP), eager_ms, repeats)
    finally:
        encoder.compile_rollout = False


def row(name: str, repeats: int) -> str:
    encoder = ENCODERS[name](TSTEP_DIM, MAX_SEQ_LEN).eval()
    eager_ms = 1e3 * timed(rollout_step(encoder, EPISODE_STEP), repeats)
    # first, so that a fresh TORCHINDUCTOR_CACHE_DIR gives its cold compile time
    rollout_cell = compiled_rollout_cell(encoder, eager_ms, repeats) if encoder.compiles_rollout_step else "-"
    cells = [f"{eager_ms:.2f}"]
    for backend in BACKENDS:
        torch._dynamo.reset()
        step = rollout_step(torch.compile(encoder, backend=backend, dynamic=False), EPISODE_STEP)
        cells.append(timed_with_compile(step, eager_ms, repeats))
    return f"| {name} | " + " | ".join([*cells, rollout_cell]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="FlashAttention")  # the CPU fallback's notice
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; {N_ENVS} envs at episode step {EPISODE_STEP}, spec-default sizes")
    print("\n| encoder | eager (ms per step) | dynamo, eager backend (ms; vs eager; compile) "
          "| inductor (ms; vs eager; compile) | compile_rollout: the step alone (ms; vs eager; compile) |"
          "\n|---|---:|---:|---:|---:|")
    for name in args.encoders:
        print(row(name, args.repeats), flush=True)


if __name__ == "__main__":
    main()
