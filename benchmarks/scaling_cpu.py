"""How PPO + a small GRU encoder on StatelessCartPole scales on this machine's CPUs.

Two markdown tables:

* sampling: env steps/s for 1, 2 and 4 remote env runners sampling in parallel, episodes
  delivered to the driver (what PPO's sampling phase does each iteration);
* learning: time of one ``LearnerGroup.update`` (PPO's learner phase: connector + GAE +
  epochs of minibatch SGD) for 0 (in the driver), 1 and 2 (DDP over gloo) CPU learners, each
  with the same per-learner batch, so 2 learners process twice the data.

Env runners and learners are Ray actors with 1 logical CPU each; on a machine with fewer
cores than actors they time-share, which is what the numbers then show.
Usage: python benchmarks/scaling_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples.*`
from examples.scaling import add_scaling_args, apply_scaling  # noqa: E402
from examples.tasks import SMALL_ENCODERS, TASKS  # noqa: E402
from rllib_trajenc.rllib import with_traj_encoder  # noqa: E402

RUNNER_COUNTS = (1, 2, 4)
LEARNER_COUNTS = (0, 1, 2)
ENVS_PER_RUNNER = 4
BATCH_PER_LEARNER = 1024
MINIBATCH = 256
EPOCHS = 2


def build_ppo(flags: list[str]) -> Algorithm:
    """The README's stateless_cartpole job (GRU at its default size), scaled by ``flags``."""
    config = (
        PPOConfig()
        .environment(StatelessCartPole)
        .training(train_batch_size_per_learner=BATCH_PER_LEARNER, minibatch_size=MINIBATCH, num_epochs=EPOCHS)
        .debugging(seed=0)
    )
    args = add_scaling_args(argparse.ArgumentParser()).parse_args(
        ["--envs-per-runner", str(ENVS_PER_RUNNER), *flags])
    return with_traj_encoder(apply_scaling(config, args), "gru",
                             max_seq_len=TASKS["stateless_cartpole"].max_seq_len,
                             encoder_config=SMALL_ENCODERS["gru"]).build_algo()


def median_time(fn: Callable[[], float], repeats: int) -> float:
    """Median of what ``fn`` reports (seconds) over ``repeats`` calls, after one warm-up call."""
    fn()
    return sorted(fn() for _ in range(repeats))[repeats // 2]


def sampling_table(steps_per_round: int, repeats: int) -> None:
    """One algorithm with the most runners; each row samples with the first n of them."""
    print(f"Sampling: {steps_per_round} env steps a round split over the runners, median of {repeats} rounds\n")
    print("| env runners | envs each | env steps/s | per runner |")
    print("|---:|---:|---:|---:|")
    algo = build_ppo(["--num-env-runners", str(max(RUNNER_COUNTS)), "--num-learners", "0"])
    ids = algo.env_runner_group.healthy_worker_ids()
    try:
        for n in RUNNER_COUNTS:
            share = steps_per_round // n

            def one_round() -> float:
                start = time.perf_counter()
                algo.env_runner_group.foreach_env_runner(
                    lambda runner: runner.sample(num_timesteps=share, explore=True),
                    remote_worker_ids=ids[:n], local_env_runner=False)
                return time.perf_counter() - start

            rate = share * n / median_time(one_round, repeats)
            print(f"| {n} | {ENVS_PER_RUNNER} | {rate:,.0f} | {rate / n:,.0f} |", flush=True)
    finally:
        algo.stop()


def learner_table(repeats: int) -> None:
    print(f"\nLearning: {BATCH_PER_LEARNER} env steps per learner, minibatch {MINIBATCH}, {EPOCHS} epochs, "
          f"median of {repeats} updates\n")
    print("| learners | env steps per update | update time (s) | trained env steps/s |")
    print("|---:|---:|---:|---:|")
    for n in LEARNER_COUNTS:
        total = BATCH_PER_LEARNER * max(1, n)
        algo = build_ppo(["--num-env-runners", "0", "--num-learners", str(n)])
        try:
            def one_update() -> float:
                # Fresh episodes each time: a local learner's connector extends them in place.
                episodes = algo.env_runner.sample(num_timesteps=total, explore=True)
                start = time.perf_counter()
                algo.learner_group.update(episodes=episodes, num_epochs=EPOCHS, minibatch_size=MINIBATCH,
                                          shuffle_batch_per_epoch=True)
                return time.perf_counter() - start

            seconds = median_time(one_update, repeats)
            row = f"{seconds:.2f} | {total / seconds:,.0f}"
        except Exception as error:  # one broken setting should not hide the other rows
            row = f"failed: {str(error).splitlines()[-1][:100]} | -"
        finally:
            algo.stop()
        print(f"| {n} | {total} | {row} |", flush=True)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {model}, {cores} cores usable (load avg {load}), torch {torch.__version__}, "
            f"ray {ray.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (smoke run)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    # Ray gives each 1-CPU actor one torch thread (OMP_NUM_THREADS=1); the driver's learner gets
    # the same, so the rows compare like with like (with torch's default of one thread per core,
    # it slowed down many times over when other processes took the cores).
    torch.set_num_threads(1)
    print(machine(), "\n")
    # Logical CPUs: enough for the largest setting (4 runners or 2 learners, plus the driver).
    ray.init(num_cpus=max(RUNNER_COUNTS) + 1, include_dashboard=False, log_to_driver=False)
    try:
        sampling_table(steps_per_round=800 if args.quick else 4000, repeats=repeats)
        learner_table(repeats)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
