"""torch.compile on the env runner's encoder step, on CPU: does a compiled step reach the floor?

Each encoder at the spec's default sizes takes one rollout step of 16 envs at episode step 300
(in place, no autograd, as env runners take it), timed eager, under dynamo with the "eager"
backend (the captured graph replayed without nn.Module and Python overhead, no C++ compiler
needed) and under inductor (fused C++ kernels; needs a compiler on every env-runner node),
side by side in one run; the first two compiled calls' wall time is the compile cost.
Usage: python benchmarks/compile_rollout_cpu.py [--encoders ff gru mamba transformer] [--repeats 100]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch
import torch._dynamo

from encoders_cpu import ENCODERS, MAX_SEQ_LEN, N_ENVS, TSTEP_DIM, rollout_step, timed  # same folder

EPISODE_STEP = 300
BACKENDS = ("eager", "inductor")


def row(name: str, repeats: int) -> str:
    encoder = ENCODERS[name](TSTEP_DIM, MAX_SEQ_LEN).eval()
    eager_ms = 1e3 * timed(rollout_step(encoder, EPISODE_STEP), repeats)
    cells = [f"{eager_ms:.2f}"]
    for backend in BACKENDS:
        torch._dynamo.reset()
        step = rollout_step(torch.compile(encoder, backend=backend, dynamic=False), EPISODE_STEP)
        start = time.perf_counter()
        step(), step()
        compile_s = time.perf_counter() - start
        ms = 1e3 * timed(step, repeats)
        cells.append(f"{ms:.2f} ({ms / eager_ms:.2f}x, {compile_s:.1f} s)")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="FlashAttention")  # the CPU fallback's notice
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; {N_ENVS} envs at episode step {EPISODE_STEP}, spec-default sizes")
    print("\n| encoder | eager (ms per step) | dynamo, eager backend (ms; vs eager; compile) "
          "| inductor (ms; vs eager; compile) |\n|---|---:|---:|---:|")
    for name in args.encoders:
        print(row(name, args.repeats), flush=True)


if __name__ == "__main__":
    main()
