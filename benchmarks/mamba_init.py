"""Why Mamba missed the long recall, and what its long_recall config changes, probed without RL.

recall_supervised.py's Mamba (SMALL_ENCODERS sizes) three ways, each with the spec's default norm
before every block ("layer") and without one ("none"):

- paper: ``ssm_init="paper"`` (step sizes log-uniform in [1e-3, 1e-1], A = -(1, ..., 16) per
  channel); a channel that forgets slowly (small step) also writes weakly, so little of the cue is kept;
- long memory: that, then every mixer's ``long_horizons_()`` (step sizes in [1e-2, 1], A
  log-spaced over [1e-3, 1] across each channel's state, B and C x3), so a channel can write
  strongly and still forget slowly;
- long memory, high-pass: ``ssm_init="long_memory"``, which adds ``high_pass_()``: half the
  channels' causal conv a difference filter (this input minus the last, no bias) and step sizes
  independent of the input at first (zero dt_proj weights); in those channels a constant input
  writes nothing, so the blank steps' sum does not bury the cue.

For each, on DelayedRecall with its two noise features and without them: cue_signal.py's
measure (median and range over the seeds), and recall_supervised.py's episodes until 95% of
the last 100 are answered right. Usage:

    python benchmarks/mamba_init.py [--delay 100] [--budget 4000] [--seeds 0 1 2] [--norms layer none]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable, Optional

import numpy as np
import torch

from cue_signal import cue_signal_of
from recall_supervised import build_encoder, seeded_env, train_to_recall
from rllib_trajenc.nets import MambaTrajEncoder


def long_horizons_(encoder: MambaTrajEncoder) -> None:
    for mixer in encoder.mixers:
        mixer.long_horizons_()


# row -> (the encoder's ssm_init, a re-initialisation after construction)
INITS: dict[str, tuple[str, Optional[Callable[[MambaTrajEncoder], None]]]] = {
    "paper": ("paper", None),
    "long memory": ("paper", long_horizons_),
    "long memory, high-pass": ("long_memory", None),
}


def mamba(init: str, norm: str = "layer") -> MambaTrajEncoder:
    ssm_init, reinit = INITS[init]
    encoder = build_encoder("mamba", ssm_init=ssm_init, norm=norm)
    if reinit is not None:
        reinit(encoder)
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=int, default=100)
    parser.add_argument("--budget", type=int, default=4000, help="episodes per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--norms", nargs="+", choices=["layer", "none"], default=["layer", "none"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; "
          f"delay {args.delay}, budget {args.budget:,} episodes\n")
    print(f"| initialisation | norm | noise features | cue signal: median (min-max) "
          f"| episodes to 95% right, seeds {', '.join(map(str, args.seeds))} | s |\n|---|---|---:|---:|---|---:|")
    for norm in args.norms:
        for init in INITS:
            for n_noise in (2, 0):
                start = time.time()
                signals = [cue_signal_of(seeded_env(args.delay, seed, n_noise), mamba(init, norm))
                           for seed in args.seeds]
                seen = [train_to_recall(seeded_env(args.delay, seed, n_noise), mamba(init, norm), args.budget)
                        for seed in args.seeds]
                print(f"| {init} | {norm} | {n_noise} | {np.median(signals):.1e} ({min(signals):.1e}-{max(signals):.1e}) "
                      f"| {', '.join('not reached' if s is None else f'{s:,}' for s in seen)} "
                      f"| {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
