"""Is it the encoder or the RL? Each memory model alone learns DelayedRecall's recall, supervised.

An encoder (sizes of examples/tasks.py's SMALL_ENCODERS) between a linear input layer and a linear
head is trained by cross-entropy to name the cue at the query step of fresh DelayedRecall episodes
(Adam, lr 1e-3, 4 episodes per step, gradients clipped at 1): no PPO, no value function, no stored
state, the gradient reaching the cue from every episode. The table gives the episodes seen until
the accuracy over the last 100 reaches 95%, within a budget: what the encoder can learn, apart
from what PPO adds. Usage:

    python benchmarks/recall_supervised.py [--delays 100 400] [--budget 4000] [--seeds 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples.*`

from examples.tasks import LONG_RECALL_MAMBA, SMALL_ENCODERS  # noqa: E402
import rllib_trajenc as rt  # noqa: E402
from rllib_trajenc.envs import DelayedRecall  # noqa: E402

BATCH = 4
LR = 1e-3
MAX_SEQ_LEN = 512
TSTEP_DIM = 64
# name -> (encoder class, its SMALL_ENCODERS entry, overrides)
CONTENDERS: dict[str, tuple[type[rt.TrajEncoder], str, dict[str, Any]]] = {
    "gru": (rt.GRUTrajEncoder, "gru", {}),
    "mamba": (rt.MambaTrajEncoder, "mamba", {}),
    "mamba (long recall)": (rt.MambaTrajEncoder, "mamba", LONG_RECALL_MAMBA),
    "transformer (fixed)": (rt.TformerTrajEncoder, "transformer", {"pos_emb": "fixed"}),
    "transformer (rope)": (rt.TformerTrajEncoder, "transformer", {"pos_emb": "rope"}),
}


def seeded_env(delay: int, seed: int, n_noise: int = 2) -> DelayedRecall:
    """A DelayedRecall env seeded with ``seed``; torch is seeded too, for the networks built next."""
    torch.manual_seed(seed)
    env = DelayedRecall({"delay": delay, "n_noise": n_noise})
    env.reset(seed=seed)
    return env


def build_encoder(contender: str, **kwargs: Any) -> rt.TrajEncoder:
    """The contender's encoder at its SMALL_ENCODERS sizes with its overrides, then ``kwargs``."""
    cls, sizes, overrides = CONTENDERS[contender]
    return cls(TSTEP_DIM, MAX_SEQ_LEN, **{**SMALL_ENCODERS[sizes], **overrides, **kwargs})


def episodes(env: DelayedRecall, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Observations [n, delay + 2, obs_dim] of n episodes up to their query step, and their cues [n]."""
    seqs = []
    for _ in range(n):
        obs, _ = env.reset()
        seqs.append([obs] + [env.step(0)[0] for _ in range(env.delay + 1)])
    obs = torch.from_numpy(np.array(seqs))
    return obs, obs[:, 0, :env.n_cues].argmax(-1)


def episodes_to_learn(contender: str, delay: int, budget: int, seed: int) -> Optional[int]:
    """Episodes seen until 95% of the last 100 are answered right; None if not within ``budget``."""
    env = seeded_env(delay, seed)
    return train_to_recall(env, build_encoder(contender), budget)


def train_to_recall(env: DelayedRecall, encoder: rt.TrajEncoder, budget: int) -> Optional[int]:
    """The supervised loop of episodes_to_learn on a built env and encoder."""
    delay = env.delay
    inp = nn.Linear(env.observation_space.shape[0], TSTEP_DIM)
    head = nn.Linear(encoder.emb_dim, env.n_cues)
    params = [*inp.parameters(), *encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR)
    time_idxs = torch.arange(delay + 2).expand(BATCH, -1).unsqueeze(-1)
    hits: deque[bool] = deque(maxlen=100)
    for seen in range(BATCH, budget + 1, BATCH):
        obs, cues = episodes(env, BATCH)
        out, _ = encoder(inp(obs), time_idxs)
        logits = head(out[:, -1])
        hits.extend((logits.argmax(-1) == cues).tolist())
        if len(hits) == hits.maxlen and sum(hits) >= 95:
            return seen
        optimizer.zero_grad()
        F.cross_entropy(logits, cues).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--budget", type=int, default=4000, help="episodes per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; budget {args.budget:,} episodes\n")
    print("| encoder | delay | seed | episodes to 95% right | s |\n|---|---:|---:|---:|---:|")
    for delay in args.delays:
        for contender in args.contenders:
            for seed in args.seeds:
                start = time.time()
                seen = episodes_to_learn(contender, delay, args.budget, seed)
                print(f"| {contender} | {delay} | {seed} | {'not reached' if seen is None else f'{seen:,}'} "
                      f"| {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
