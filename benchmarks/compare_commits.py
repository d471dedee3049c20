"""Env-runner step cost of this checkout against an earlier commit, measured side by side.

A change meant to speed up the rollout step is only shown by timing it beside the code it
replaces, on the same machine at the same time: on a shared VM, runs minutes apart differ by more
than such a change. This script checks ``BASE`` out into a temporary git worktree, then alternates
fresh processes of the two trees for ``--rounds`` rounds. Each process measures, per encoder at the
spec's default sizes (CartPole, 16 envs, the module env runners build, seeded as RLlib seeds it):
* ops per step: aten ops of one module step (``forward_exploration``), counted by torch.profiler;
  exact, so it shows a change even where timing noise hides it;
* module step: ms per ``forward_exploration`` of the 16 envs, in place (best of 5 medians);
* vector step: ms per vector step of a whole SingleAgentEnvRunner sampling 2,048 env steps.
Printed: per encoder, the best round of each tree (noise only adds time) and head / base.
Usage: python benchmarks/compare_commits.py BASE [--encoders ff gru "mamba (compile_rollout)"] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENCODER_NAMES = ("ff", "gru", "mamba", "transformer")
COMPILED = "mamba (compile_rollout)"  # sampling_cpu.py's contender: Mamba with model_config["compile_rollout"]


def measure(tree: Path, encoders: list[str]) -> dict[str, dict[str, float]]:
    """Runs in a child process whose imports come from ``tree``."""
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]
    import torch
    from torch.profiler import ProfilerActivity, profile
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    import rllib_trajenc
    from encoders_cpu import N_ENVS, timed
    from profile_rollout import module_step
    from sampling_cpu import config_for

    if not Path(rllib_trajenc.__file__).resolve().is_relative_to(tree):
        raise RuntimeError(f"imported {rllib_trajenc.__file__}, not the tree {tree}")
    results = {}
    for name in encoders:
        runner = SingleAgentEnvRunner(config=config_for(name))  # seeds: deterministic algorithms on
        runner.sample(num_timesteps=512, explore=True)
        start = time.perf_counter()
        runner.sample(num_timesteps=2048, explore=True)
        vector_ms = 1e3 * (time.perf_counter() - start) / (2048 / N_ENVS)
        step = module_step(name)
        for _ in range(300):  # well into the episodes: the Transformer's ring is full
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        results[name] = {"ops": sum(e.count for e in prof.key_averages()),
                         "module_ms": min(1e3 * timed(step, 100) for _ in range(5)),
                         "vector_ms": vector_ms}
    return results


def run_tree(tree: Path, encoders: list[str]) -> dict[str, dict[str, float]]:
    out = subprocess.run([sys.executable, __file__, "--measure", str(tree), "--encoders", *encoders],
                         capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", help="the commit to compare against, e.g. HEAD~3")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODER_NAMES), choices=[*ENCODER_NAMES, COMPILED])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child processes' mode
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure.resolve(), args.encoders)))
        return
    if args.base is None:
        parser.error("give the commit to compare against")
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    head_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True, check=True).stdout.strip():
        head_sha += "+changes"  # the working tree is what runs
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; base {base_sha}, head {head_sha} "
          f"(the working tree); {args.rounds} rounds, processes alternating", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base], cwd=ROOT, check=True)
        try:
            rounds: dict[str, list[dict]] = {"base": [], "head": []}
            for r in range(args.rounds):
                for label, tree in (("base", base_tree), ("head", ROOT)):
                    rounds[label].append(run_tree(tree, args.encoders))
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=True)
    best = {label: {name: {key: min(rnd[name][key] for rnd in got) for key in got[0][name]}
                    for name in args.encoders} for label, got in rounds.items()}
    print(f"\n| encoder | ops per step: {base_sha} -> {head_sha} | module step (ms): base -> head "
          "| head / base | vector step (ms): base -> head | head / base |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.encoders:
        b, h = best["base"][name], best["head"][name]
        print(f"| {name} | {b['ops']:.0f} -> {h['ops']:.0f} | {b['module_ms']:.3f} -> {h['module_ms']:.3f} "
              f"| {h['module_ms'] / b['module_ms']:.2f} | {b['vector_ms']:.2f} -> {h['vector_ms']:.2f} "
              f"| {h['vector_ms'] / b['vector_ms']:.2f} |")


if __name__ == "__main__":
    main()
