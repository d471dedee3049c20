"""Why Mamba misses the long recall: its SSM initialisation, probed without RL.

Three initialisations of recall_supervised.py's Mamba (SMALL_ENCODERS sizes), re-initialised
after construction:

- paper: the package's (step sizes log-uniform in [1e-3, 1e-1], A = -(1, ..., 16) per channel);
  a channel that forgets slowly (small step) also writes weakly, so little of the cue is kept;
- long memory: step sizes in [1e-2, 1] and A log-spaced over [1e-3, 1] across each channel's
  state, so a channel can write strongly and still forget slowly; B and C projections x3;
- long memory, high-pass: that, plus half the channels' causal conv a difference filter (this
  input minus the last, no bias) and step sizes independent of the input at first (zero
  dt_proj weights): in those channels a constant input writes nothing, so the blank steps'
  sum does not bury the cue.

For each, on DelayedRecall with its two noise features and without them: cue_signal.py's
measure (median and range over the seeds), and recall_supervised.py's episodes until 95% of
the last 100 are answered right. Usage:

    python benchmarks/mamba_init.py [--delay 100] [--budget 4000] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from cue_signal import cue_signal_of
from recall_supervised import build_encoder, seeded_env, train_to_recall
from rllib_trajenc.nets import MambaTrajEncoder
from rllib_trajenc.nets.mamba import MambaMixer


def long_memory_(encoder: MambaTrajEncoder) -> None:
    """New mixers with step sizes in [1e-2, 1], A log-spaced over [1e-3, 1], B and C x3."""
    d_model, d_state, d_inner = encoder.d_model, encoder.d_state, encoder.d_inner
    encoder.mixers = nn.ModuleList(
        MambaMixer(d_model, d_state, encoder.d_conv, d_inner // d_model, dt_min=1e-2, dt_max=1.0)
        for _ in encoder.mixers)
    with torch.no_grad():
        for mixer in encoder.mixers:
            mixer.A_log.copy_(torch.linspace(np.log(1e-3), 0.0, d_state).expand(d_inner, -1))
            mixer.x_proj.weight[mixer.dt_rank:] *= 3.0


def long_memory_high_pass_(encoder: MambaTrajEncoder) -> None:
    """long_memory_, then half of each mixer's conv channels differentiate; step sizes input-free."""
    long_memory_(encoder)
    with torch.no_grad():
        for mixer in encoder.mixers:
            half = mixer.conv.out_channels // 2
            mixer.conv.weight[:half] = 0.0
            mixer.conv.weight[:half, 0, -1] = 1.0   # this step's input ...
            mixer.conv.weight[:half, 0, -2] = -1.0  # ... minus the last one's
            mixer.conv.bias[:half] = 0.0
            mixer.dt_proj.weight.zero_()


INITS: dict[str, Callable[[MambaTrajEncoder], None]] = {
    "paper": lambda encoder: None,
    "long memory": long_memory_,
    "long memory, high-pass": long_memory_high_pass_,
}


def mamba(init: str) -> MambaTrajEncoder:
    encoder = build_encoder("mamba")
    INITS[init](encoder)
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=int, default=100)
    parser.add_argument("--budget", type=int, default=4000, help="episodes per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; "
          f"delay {args.delay}, budget {args.budget:,} episodes\n")
    print(f"| initialisation | noise features | cue signal: median (min-max) "
          f"| episodes to 95% right, seeds {', '.join(map(str, args.seeds))} | s |\n|---|---:|---:|---|---:|")
    for init in INITS:
        for n_noise in (2, 0):
            start = time.time()
            signals = [cue_signal_of(seeded_env(args.delay, seed, n_noise), mamba(init)) for seed in args.seeds]
            seen = [train_to_recall(seeded_env(args.delay, seed, n_noise), mamba(init), args.budget)
                    for seed in args.seeds]
            print(f"| {init} | {n_noise} | {np.median(signals):.1e} ({min(signals):.1e}-{max(signals):.1e}) "
                  f"| {', '.join('not reached' if s is None else f'{s:,}' for s in seen)} "
                  f"| {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
