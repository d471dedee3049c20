"""Our encoders against RLlib's built-in LSTM: same task, PPO settings, budget and seeds.

Every contender trains PPO in this process, one after the other, until the task's target
return or the env-step budget; the table gives env steps to the target, the final return and
sampling+training throughput (env steps/s) for each run, then per contender how many seeds
reached the target, the median (min-max) env steps of those that did, and the median (min-max)
final return and best mean return of a training iteration (POPGym's MMER). ``--plot`` saves
every contender's learning curve, median over seeds with the min-max range shaded; ``--json``
saves every run, from which ``--from-json`` prints the same tables and plot without training.
Usage:

    python benchmarks/vs_rllib_lstm.py --task delayed_recall --budget 300000 --seeds 0 1 --plot dr.png
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples.*`

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.connectors.env_to_module import FlattenObservations  # noqa: E402
from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig  # noqa: E402

from examples.tasks import PPO_DEFAULTS, TASKS, Task, register  # noqa: E402
from rllib_trajenc.rllib import with_traj_encoder  # noqa: E402

LSTM = "rllib_lstm"
CONTENDERS = [LSTM, "ff", "gru", "mamba", "transformer"]
LSTM_CELL = 64  # about the parameter count of SMALL_ENCODERS' memory models


def _flatten_observations(env, spaces, device, multi_agent: bool) -> FlattenObservations:
    return FlattenObservations(multi_agent=multi_agent)


def build(task: Task, contender: str, seed: int, envs: int) -> PPOConfig:
    config = (
        PPOConfig()
        .environment(task.env, env_config=task.env_config)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=envs, **task.env_runners)
        .training(**{**PPO_DEFAULTS, **task.ppo})
        .debugging(seed=seed)
    )
    if task.multi_agent:  # every contender gets one module per policy
        config = config.multi_agent(**task.multi_agent)
    if contender == LSTM:
        # RLlib's default models take only Box observations: one-hot Discrete ones first.
        config = config.env_runners(env_to_module_connector=functools.partial(
            _flatten_observations, multi_agent=bool(task.multi_agent)))
        return config.rl_module(model_config=DefaultModelConfig(
            use_lstm=True, lstm_cell_size=LSTM_CELL, max_seq_len=task.max_seq_len,
            fcnet_hiddens=[64], vf_share_layers=True))
    return with_traj_encoder(config, contender, **task.traj_encoder_kwargs(contender))


def run(task: Task, contender: str, seed: int, budget: int, envs: int) -> dict:
    algo = build(task, contender, seed, envs).build_algo()
    params = sum(p.numel() for policy in task.multi_agent.get("policies", [DEFAULT_MODULE_ID])
                 for p in algo.get_module(policy).parameters())
    start, steps, ret, to_target, curve = time.time(), 0, float("nan"), None, []
    try:
        while steps < budget and to_target is None:
            result = algo.train()
            steps = int(result["num_env_steps_sampled_lifetime"])
            ret = result["env_runners"].get("episode_return_mean", ret)
            if not math.isnan(ret):  # no episode has finished yet
                curve.append((steps, ret))
            if ret >= task.target_return:
                to_target = steps
            # Progress on stderr, so that stdout stays the tables.
            print(f"  {contender} seed {seed}: {steps:,} env steps, return {ret:.3f}, "
                  f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        algo.stop()
    elapsed = time.time() - start
    return {"contender": contender, "seed": seed, "params": params, "to_target": to_target,
            "final_return": ret, "steps": steps, "steps_per_s": steps / elapsed, "curve": curve}


def fmt(steps: Optional[int]) -> str:
    return "not reached" if steps is None else f"{steps:,}"


def spread(values: list[float]) -> str:
    return f"{np.median(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def to_target(runs: list[dict], budget: int) -> tuple[str, str]:
    """Seeds reaching the target ("k/n") and their env steps to it: median (min-max)."""
    reached = sorted(r["to_target"] for r in runs if r["to_target"] is not None)
    steps = (f"{int(np.median(reached)):,} ({reached[0]:,}-{reached[-1]:,})" if reached
             else f"not reached in {budget:,}")
    return f"{len(reached)}/{len(runs)}", steps


def mmer(runs: list[dict]) -> str:
    """POPGym's MMER: each run's best mean episode return of a training iteration; median (range)."""
    return spread([max(ret for _, ret in r["curve"]) for r in runs])


def by_contender(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs of each contender, contenders in the order they first ran."""
    grouped: dict[str, list[dict]] = {}
    for r in runs:
        grouped.setdefault(r["contender"], []).append(r)
    return grouped


def print_summary(runs: list[dict], budget: int) -> None:
    print("\n| contender | seeds reaching the target | env steps to target: median (min-max) "
          "| final return: median (min-max) | max mean return (POPGym's MMER): median (min-max) |")
    print("|---|---:|---:|---:|---:|")
    for contender, mine in by_contender(runs).items():
        reached, steps = to_target(mine, budget)
        finals = spread([r["final_return"] for r in mine])
        print(f"| {contender} | {reached} | {steps} | {finals} | {mmer(mine)} |")


def plot(runs: list[dict], task_name: str, target: float, path: Path) -> None:
    """Each contender's median return over seeds against env steps, the min-max range shaded; a
    run that stopped at the target counts at its last return up to the longest run's end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(r["steps"] for r in runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for contender, contender_runs in by_contender(runs).items():
        mine = [r["curve"] for r in contender_runs if r["curve"]]
        if not mine:
            continue
        grid = np.linspace(min(curve[0][0] for curve in mine), end, 200)
        curves = [np.interp(grid, *zip(*curve), left=np.nan) for curve in mine]
        stacked = np.array(curves)
        line, = ax.plot(grid, np.nanmedian(stacked, 0), label=f"{contender} ({len(curves)} seeds)")
        ax.fill_between(grid, np.nanmin(stacked, 0), np.nanmax(stacked, 0), color=line.get_color(), alpha=0.2)
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:g}")
    ax.set(xlabel="env steps", ylabel="mean episode return", title=task_name)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_row(r: dict) -> str:
    return (f"| {r['contender']} | {r['seed']} | {r['params']:,} | {fmt(r['to_target'])} "
            f"| {r['final_return']:.3f} | {r['steps_per_s']:.0f} |")


RUNS_HEADER = ("| contender | seed | params | env steps to target | final return | env steps/s |\n"
               "|---|---:|---:|---:|---:|---:|")


def report(saved: dict, plot_path: Optional[Path]) -> None:
    """The tables (and plot) of a finished benchmark, from the runs it saved with --json."""
    task, runs = TASKS[saved["task"]], saved["runs"]
    print(f"task {saved['task']} {task.env_config}, target return {task.target_return}, budget "
          f"{saved['budget']:,} env steps\n\n{RUNS_HEADER}")
    print("\n".join(run_row(r) for r in runs))
    print_summary(runs, saved["budget"])
    if plot_path:
        plot(runs, saved["task"], task.target_return, plot_path)
        print(f"\nlearning curves: {plot_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="delayed_recall")
    parser.add_argument("--budget", type=int, help="env steps per run (default: the task's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--envs", type=int, default=8, help="vectorised envs (one env runner)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--plot", type=Path, help="save the learning curves here (PNG)")
    parser.add_argument("--json", type=Path, help="save every run (curve included) here")
    parser.add_argument("--from-json", type=Path,
                        help="train nothing: print the tables (and --plot) of runs saved with --json")
    args = parser.parse_args()
    if args.from_json:
        report(json.loads(args.from_json.read_text()), args.plot)
        return
    task = TASKS[args.task]
    budget = args.budget or task.max_env_steps
    register(task)
    ray.init(address="local", include_dashboard=False)
    print(f"task {args.task} {task.env_config}, target return {task.target_return}, budget "
          f"{budget:,} env steps, seeds {args.seeds}; machine: {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print(RUNS_HEADER)
    runs = []
    for seed in args.seeds:
        for contender in args.contenders:
            runs.append(run(task, contender, seed, budget, args.envs))
            print(run_row(runs[-1]), flush=True)
            if args.json:  # after every run: a long benchmark that stops early keeps its runs
                args.json.write_text(json.dumps({"task": args.task, "budget": budget, "runs": runs}))
    print_summary(runs, budget)
    if args.plot:
        plot(runs, args.task, task.target_return, args.plot)
        print(f"\nlearning curves: {args.plot}")


if __name__ == "__main__":
    main()
