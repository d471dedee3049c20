"""Our encoders against RLlib's built-in LSTM: same task, PPO settings, budget and seeds.

Every contender trains PPO in this process, one after the other, until the task's target
return or the env-step budget; the table gives env steps to the target, the final return and
sampling+training throughput (env steps/s) for each. Usage:

    python benchmarks/vs_rllib_lstm.py --task delayed_recall --budget 300000 --seeds 0 1
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples.*`

import ray  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.connectors.env_to_module import FlattenObservations  # noqa: E402
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig  # noqa: E402

from examples.tasks import PPO_DEFAULTS, SMALL_ENCODERS, TASKS, Task, register  # noqa: E402
from rllib_trajenc.rllib import with_traj_encoder  # noqa: E402

LSTM = "rllib_lstm"
CONTENDERS = [LSTM, "ff", "gru", "mamba", "transformer"]
LSTM_CELL = 64  # about the parameter count of SMALL_ENCODERS' memory models


def _flatten_observations(env, spaces, device) -> FlattenObservations:
    return FlattenObservations()


def build(task: Task, contender: str, seed: int, envs: int) -> PPOConfig:
    config = (
        PPOConfig()
        .environment(task.env, env_config=task.env_config)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=envs)
        .training(**{**PPO_DEFAULTS, **task.ppo})
        .debugging(seed=seed)
    )
    if contender == LSTM:
        # RLlib's default models take only Box observations: one-hot Discrete ones first.
        config = config.env_runners(env_to_module_connector=_flatten_observations)
        return config.rl_module(model_config=DefaultModelConfig(
            use_lstm=True, lstm_cell_size=LSTM_CELL, max_seq_len=task.max_seq_len,
            fcnet_hiddens=[64], vf_share_layers=True))
    return with_traj_encoder(config, contender, max_seq_len=task.max_seq_len,
                             encoder_config={**SMALL_ENCODERS[contender],
                                             **task.encoders.get(contender, {})})


def run(task: Task, contender: str, seed: int, budget: int, envs: int) -> dict:
    algo = build(task, contender, seed, envs).build_algo()
    params = sum(p.numel() for p in algo.get_module().parameters())
    start, steps, ret, to_target = time.time(), 0, float("nan"), None
    try:
        while steps < budget and to_target is None:
            result = algo.train()
            steps = int(result["num_env_steps_sampled_lifetime"])
            ret = result["env_runners"].get("episode_return_mean", ret)
            if ret >= task.target_return:
                to_target = steps
    finally:
        algo.stop()
    elapsed = time.time() - start
    return {"contender": contender, "seed": seed, "params": params, "to_target": to_target,
            "final_return": ret, "steps": steps, "steps_per_s": steps / elapsed}


def fmt(steps: Optional[int]) -> str:
    return "not reached" if steps is None else f"{steps:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="delayed_recall")
    parser.add_argument("--budget", type=int, help="env steps per run (default: the task's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--envs", type=int, default=8, help="vectorised envs (one env runner)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    args = parser.parse_args()
    task = TASKS[args.task]
    budget = args.budget or task.max_env_steps
    register(task)
    ray.init(address="local", include_dashboard=False)
    print(f"task {args.task} {task.env_config}, target return {task.target_return}, budget "
          f"{budget:,} env steps, seeds {args.seeds}; machine: {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print("| contender | seed | params | env steps to target | final return | env steps/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        for contender in args.contenders:
            r = run(task, contender, seed, budget, args.envs)
            print(f"| {r['contender']} | {r['seed']} | {r['params']:,} | {fmt(r['to_target'])} "
                  f"| {r['final_return']:.3f} | {r['steps_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
