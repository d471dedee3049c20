"""CPU speed of every encoder at the spec's default sizes, printed as a markdown table.

Per-step inference latency (16 parallel envs, one env step, updating the state in place as env
runners do) is measured from the state the encoder has at episode step 10 and at step 2000: for
models with bounded memory the two must be about equal. Training throughput is forward+backward
timesteps/s over sequences of T=64 and T=256 (batch 16), both from an episode start
(``hidden_state=None``, AMAGO's training path) and from a carried state (the path RLlib learners
take: every learner row starts from its STATE_IN). Usage: python benchmarks/encoders_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch

import rllib_trajenc as rt

TSTEP_DIM = 64
MAX_SEQ_LEN = 256
N_ENVS = 16
ENCODERS = {
    "ff": rt.FFTrajEncoder,
    "gru": rt.GRUTrajEncoder,
    "mamba": rt.MambaTrajEncoder,
    "transformer": rt.TformerTrajEncoder,
}


def timed(fn: Callable[[], object], repeats: int, fastest: bool = False) -> float:
    """Median (or with ``fastest``, least) seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if fastest else sorted(times)[len(times) // 2]


@torch.no_grad()
def state_at(enc: rt.TrajEncoder, episode_step: int) -> dict:
    """The state of N_ENVS episodes that are ``episode_step`` steps old, reached in whole chunks."""
    state = enc.init_hidden_state(N_ENVS, torch.device("cpu"))
    for start in range(0, episode_step, MAX_SEQ_LEN):
        steps = min(MAX_SEQ_LEN, episode_step - start)
        t = (start + torch.arange(steps)).view(1, -1, 1).expand(N_ENVS, -1, -1)
        _, state = enc(torch.randn(N_ENVS, steps, TSTEP_DIM), t, hidden_state=state)
    return state


def rollout_step(enc: rt.TrajEncoder, episode_step: int) -> Callable[[], object]:
    """One env step of N_ENVS episodes ``episode_step`` steps old, as env runners take it
    (in place, no autograd)."""
    state = state_at(enc, episode_step)
    obs = torch.randn(N_ENVS, 1, TSTEP_DIM)
    t_now = torch.full((N_ENVS, 1, 1), episode_step)

    @torch.no_grad()
    def step() -> object:
        return enc(obs, t_now, hidden_state=state, in_place=True)

    return step


def step_latency_ms(enc: rt.TrajEncoder, episode_step: int, repeats: int) -> float:
    return 1e3 * timed(rollout_step(enc, episode_step), repeats)


def train_steps_per_s(enc: rt.TrajEncoder, seq_len: int, repeats: int, carried: bool) -> float:
    """fwd+bwd timesteps/s from an episode start, or (``carried``) from the state after one
    earlier sequence, as an RLlib learner row starts from STATE_IN."""
    seq = torch.randn(N_ENVS, seq_len, TSTEP_DIM)
    t = torch.arange(seq_len).view(1, -1, 1).expand(N_ENVS, -1, -1)
    state = None
    if carried:
        with torch.no_grad():
            _, state = enc(seq, t, hidden_state=enc.init_hidden_state(N_ENVS, torch.device("cpu")))
        t = t + seq_len

    def fwd_bwd() -> None:
        enc.zero_grad(set_to_none=True)
        out, _ = enc(seq, t, hidden_state=state)
        out.square().mean().backward()

    return N_ENVS * seq_len / timed(fwd_bwd, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 15
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
          f"torch {torch.__version__}; {N_ENVS} envs, tstep_dim={TSTEP_DIM}, max_seq_len={MAX_SEQ_LEN}, "
          "spec-default encoder sizes\n")
    print("| encoder | params | step latency @ t=10 (ms) | step latency @ t=2000 (ms) "
          "| fwd+bwd T=64 (steps/s), episode start / carried state "
          "| fwd+bwd T=256 (steps/s), episode start / carried state |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cls in ENCODERS.items():
        enc = cls(TSTEP_DIM, MAX_SEQ_LEN)
        n_params = sum(p.numel() for p in enc.parameters())
        enc.eval()
        early, late = (step_latency_ms(enc, s, repeats) for s in (10, 2000))
        enc.train()
        train = [[train_steps_per_s(enc, T, max(1, repeats // 3), carried) for carried in (False, True)]
                 for T in (64, 256)]
        print(f"| {name} | {n_params / 1e6:.2f}M | {early:.2f} | {late:.2f} "
              f"| {train[0][0]:,.0f} / {train[0][1]:,.0f} | {train[1][0]:,.0f} / {train[1][1]:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
