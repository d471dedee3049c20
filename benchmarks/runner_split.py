"""Where an env runner's vector step goes: the module's forward, the two connector pipelines, the rest.

One SingleAgentEnvRunner per contender of sampling_cpu.py (CartPole, 16 envs, the module env
runners build), timed with perf_counter around ``forward_exploration`` and the env-to-module and
module-to-env pipelines while it samples; "rest" is the env steps and RLlib's episode bookkeeping.
Beside them, the same module step timed alone, back to back (caches hot), and after 32 MB of other
reads (caches cold, as between two steps of a runner), in fresh rounds alternating the contenders.
Usage: python benchmarks/runner_split.py [--contenders rllib_mlp ff gru mamba transformer]
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from encoders_cpu import N_ENVS, timed  # same folder
from profile_rollout import module_step
from sampling_cpu import COMPILED, ENCODERS, MLP, config_for

PARTS = ("forward", "env-to-module", "module-to-env")


class Timed:
    """Wraps a callable, adding its seconds to ``totals[part]``."""

    def __init__(self, fn: Callable, totals: dict[str, float], part: str):
        self.fn, self.totals, self.part = fn, totals, part

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.part] += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self.fn, name)


def runner_split(contender: str, steps: int) -> dict[str, float]:
    """ms per vector step: the whole step and each part of it."""
    runner = SingleAgentEnvRunner(config=config_for(contender))
    runner.sample(num_timesteps=steps // 2, explore=True)  # warm-up (and compiles, if asked)
    totals = dict.fromkeys(PARTS, 0.0)
    runner.module.forward_exploration = Timed(runner.module.forward_exploration, totals, "forward")
    runner._env_to_module = Timed(runner._env_to_module, totals, "env-to-module")
    runner._module_to_env = Timed(runner._module_to_env, totals, "module-to-env")
    start = time.perf_counter()
    runner.sample(num_timesteps=steps, explore=True)
    per_step = 1e3 * N_ENVS / steps
    split = {part: seconds * per_step for part, seconds in totals.items()}
    split["vector step"] = (time.perf_counter() - start) * per_step
    return split


def module_alone(contender: str) -> tuple[float, float]:
    """ms of one module step with hot caches and after streaming 32 MB through them."""
    step = module_step(contender)
    for _ in range(300):  # into the episodes: the Transformer's ring is full
        step()
    other = torch.ones(8 * 2**20)

    def after_other_reads() -> None:
        other.sum()
        step()

    hot = 1e3 * timed(step, 100)
    return hot, 1e3 * (timed(after_other_reads, 100) - timed(other.sum, 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", nargs="+", default=[MLP, *ENCODERS, COMPILED])
    parser.add_argument("--steps", type=int, default=4096, help="env steps sampled per contender")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best is printed")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{N_ENVS} envs, spec-default sizes")
    best: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        for contender in args.contenders:
            split = runner_split(contender, args.steps)
            if contender != MLP:
                split["alone, hot"], split["alone, cold"] = module_alone(contender)
            if contender not in best or split["vector step"] < best[contender]["vector step"]:
                best[contender] = split
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    print(f"\nms per vector step of {N_ENVS} envs, the round with the fastest vector step:\n")
    columns = ["vector step", *PARTS, "rest", "alone, hot", "alone, cold"]
    print("| contender | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for contender, split in best.items():
        split["rest"] = split["vector step"] - sum(split[part] for part in PARTS)
        print(f"| {contender} | " + " | ".join(f"{split[c]:.2f}" if c in split else "-" for c in columns) + " |")


if __name__ == "__main__":
    main()
