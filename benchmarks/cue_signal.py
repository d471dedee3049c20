"""Why recall is slow to learn: how much of the cue reaches the query step in an untrained encoder.

Two DelayedRecall episodes that differ only in their cue (same noise) go through one freshly
initialised encoder (the contenders and sizes of recall_supervised.py, behind a linear input layer);
the table gives the norm of the difference of the two outputs at the query step, as a fraction of
that difference at step 0, where the cue is seen. Learning the recall starts from this signal: a
gradient on the query's answer reaches the cue in proportion to it. Usage:

    python benchmarks/cue_signal.py [--delays 10 100 400] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
from torch import nn

from recall_supervised import CONTENDERS, TSTEP_DIM, build_encoder, seeded_env
from rllib_trajenc.envs import DelayedRecall
from rllib_trajenc.nets import TrajEncoder


def cue_signal(contender: str, delay: int, seed: int) -> float:
    """|out_query(cue 0) - out_query(cue 1)| / |out_0(cue 0) - out_0(cue 1)| at initialisation."""
    env = seeded_env(delay, seed)
    return cue_signal_of(env, build_encoder(contender))


def cue_signal_of(env: DelayedRecall, encoder: TrajEncoder) -> float:
    """cue_signal for a built env and encoder."""
    obs = np.array([env.reset()[0]] + [env.step(0)[0] for _ in range(env.delay + 1)])
    pair = torch.from_numpy(np.stack([obs, obs]))
    pair[:, 0, :env.n_cues] = torch.eye(env.n_cues)[:2]  # cue 0 in one episode, cue 1 in the other
    inp = nn.Linear(env.observation_space.shape[0], TSTEP_DIM)
    with torch.no_grad():
        out, _ = encoder.eval()(inp(pair), torch.arange(env.delay + 2).expand(2, -1).unsqueeze(-1))
    diff = (out[0] - out[1]).norm(dim=-1)
    return (diff[-1] / diff[0]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=int, nargs="+", default=[10, 100, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| encoder | " + " | ".join(f"delay {d}" for d in args.delays) + " |")
    print("|---|" + "---:|" * len(args.delays))
    for contender in CONTENDERS:
        cells = []
        for delay in args.delays:
            signals = [cue_signal(contender, delay, seed) for seed in args.seeds]
            cells.append(f"{np.median(signals):.1e} ({min(signals):.1e}-{max(signals):.1e})")
        print(f"| {contender} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
