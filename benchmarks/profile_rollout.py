"""Where an env runner's module step spends its time: torch.profiler per op, one table per encoder.

The module env runners build (``with_traj_encoder``, spec-default sizes, CartPole, 16 envs), its
``forward_exploration`` on one vector step in place, as the env runner calls it, profiled over
``--steps`` steps after a warm-up. Per op: self CPU time per vector step and calls per step; the
total beside the step's wall time shows what is Python around the ops.
Usage: python benchmarks/profile_rollout.py [--encoders gru mamba transformer] [--steps 200]
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from encoders_cpu import ENCODERS, N_ENVS  # same folder
from rllib_trajenc.rllib.module import ROLLOUT_ROW
from sampling_cpu import config_for

TOP = 12


def module_step(name: str) -> Callable[[], None]:
    """A closure taking one env-runner step of the module for N_ENVS envs (rows 0..N-1)."""
    return module_and_step(name)[1]


def module_and_step(name: str) -> tuple[RLModule, Callable[[], None]]:
    """The module env runners build for ``name``, and ``module_step``'s closure over it."""
    env = gym.make("CartPole-v1")
    module = config_for(name).get_rl_module_spec(env=env, inference_only=True).build()
    obs = torch.as_tensor(np.stack([env.observation_space.sample() for _ in range(N_ENVS)]))
    stateful = bool(module.get_initial_state())
    if stateful:  # the rows the compact-state piece names as STATE_IN, all in place
        module.rollout_state(N_ENVS)
    state = {ROLLOUT_ROW: torch.arange(N_ENVS)} if stateful else None

    def step() -> None:
        batch = {Columns.OBS: obs}
        if state is not None:
            batch[Columns.STATE_IN] = state
        with torch.no_grad():
            module.forward_exploration(batch)
    return module, step


def profile_table(name: str, steps: int) -> None:
    step = module_step(name)
    for _ in range(20):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    print(f"\n### {name}: {wall_ms:.3f} ms per vector step under the profiler, {total_ms:.3f} ms in ops")
    print("\n| op | self CPU (ms per step) | share | calls per step |\n|---|---:|---:|---:|")
    for e in events[:TOP]:
        ms = e.self_cpu_time_total / 1e3 / steps
        print(f"| {e.key} | {ms:.3f} | {100 * ms / total_ms:.0f}% | {e.count / steps:.0f} |")
    n_ops = sum(e.count for e in events) / steps
    print(f"| (all {len(events)} ops) | {total_ms:.3f} | 100% | {n_ops:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=[n for n in ENCODERS if n != "ff"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{N_ENVS} envs, spec-default sizes")
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first start is slow
        torch.ones(1).add_(1)
    for name in args.encoders:
        profile_table(name, args.steps)


if __name__ == "__main__":
    main()
