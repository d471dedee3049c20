"""Train PPO with a trajectory encoder on a memory task, locally or on a Ray cluster.

    python examples/train.py --task stateless_cartpole --encoder gru
    python examples/train.py --task delayed_recall --encoder transformer --seed 1
    python examples/train.py --task stateless_cartpole --encoder mamba --smoke   # 1 iteration

Each run uses the task's tuned settings (examples/tasks.py), stops at the task's target
return or step budget, prints Tune's progress table as it goes, keeps checkpoints, and
writes into ``--out/<task>-<encoder>-seed<seed>/``: ``summary.json`` (steps and wall time
to the target, final return, machine) and ``learning_curve.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples.*`

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402

from examples.scaling import add_scaling_args, apply_scaling  # noqa: E402
from examples.tasks import PPO_DEFAULTS, TASKS, Task, register  # noqa: E402
from rllib_trajenc.rllib import encoder_names, with_traj_encoder  # noqa: E402

RETURN = "env_runners/episode_return_mean"
STEPS = "num_env_steps_sampled_lifetime"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="stateless_cartpole")
    parser.add_argument("--encoder", choices=encoder_names(), default="gru")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-return", type=float, help="default: the task's target")
    parser.add_argument("--stop-timesteps", type=int, help="default: the task's step budget")
    parser.add_argument("--smoke", action="store_true", help="one small iteration (CI)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "local"),
                        help="Ray cluster to join (default: $RAY_ADDRESS, else a new local instance)")
    add_scaling_args(parser)
    return parser.parse_args(argv)


def build_config(task: Task, args: argparse.Namespace) -> PPOConfig:
    ppo, env_runners = {**PPO_DEFAULTS, **task.ppo}, dict(task.env_runners)
    if args.smoke:
        # Minibatches hold whole max_seq_len rows, so none may be smaller than one row; four
        # rows per iteration let every task finish an episode (RepeatPreviousMedium: 103 steps).
        ppo.update(train_batch_size_per_learner=4 * task.max_seq_len, minibatch_size=task.max_seq_len,
                   num_epochs=1)
        # RLlib wants the batch near a multiple of the fragments; a task's own may not fit it.
        env_runners["rollout_fragment_length"] = "auto"
    config = (
        PPOConfig()
        .environment(task.env, env_config=task.env_config)
        .env_runners(**env_runners)
        .training(**ppo)
        .debugging(seed=args.seed)
    )
    if task.multi_agent:  # before with_traj_encoder, which then gives each policy its module
        config = config.multi_agent(**task.multi_agent)
    # Scaling first: with_traj_encoder picks the state storage that suits num_learners.
    return with_traj_encoder(apply_scaling(config, args), args.encoder,
                             **task.traj_encoder_kwargs(args.encoder))


class PrintProgress(tune.Callback):
    """One line per training iteration: Tune's own table omits the return and prints rarely."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        ret = result.get("env_runners", {}).get("episode_return_mean")
        print(f"iter {result['training_iteration']:4d} | {int(result[STEPS]):>9,} env steps | "
              f"return {'-' if ret is None else f'{ret:.3f}'} | {result['time_total_s']:6.0f} s", flush=True)


def summarize(rows: list[dict[str, Any]], target: float, wall_s: float,
              args: argparse.Namespace) -> dict[str, Any]:
    reached = next((r for r in rows if r.get(RETURN, float("-inf")) >= target), None)
    return {
        "task": args.task, "encoder": args.encoder, "seed": args.seed, "target_return": target,
        "reached_target": reached is not None,
        "env_steps_to_target": None if reached is None else int(reached[STEPS]),
        "time_s_to_target": None if reached is None else round(reached["time_total_s"], 1),
        "final_return": rows[-1].get(RETURN) if rows else None,
        "env_steps": int(rows[-1][STEPS]) if rows else 0,
        "wall_time_s": round(wall_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
    }


def plot(rows: list[dict[str, Any]], target: float, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r[STEPS], r[RETURN]) for r in rows if RETURN in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points), label="mean episode return")
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:g}")
    ax.set(xlabel="env steps", ylabel="return", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    task = TASKS[args.task]
    register(task)
    target = task.target_return if args.stop_return is None else args.stop_return
    budget = task.max_env_steps if args.stop_timesteps is None else args.stop_timesteps
    out = (args.out / f"{args.task}-{args.encoder}-seed{args.seed}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.encoder not in task.tuned:
        print(f"note: {args.task} has no recorded run reaching its target with {args.encoder} "
              f"(recorded: {', '.join(task.tuned) or 'none yet'}); its settings are the task's defaults")
    config = build_config(task, args)
    stop = {"training_iteration": 1} if args.smoke else {RETURN: target, STEPS: budget}
    ray.init(address=args.address, ignore_reinit_error=True, include_dashboard=False)
    start = time.time()
    result = tune.Tuner(
        "PPO",
        param_space=config,
        run_config=tune.RunConfig(
            name="tune", storage_path=str(out), stop=stop, verbose=1, callbacks=[PrintProgress()],
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=20, checkpoint_at_end=True,
                                                    num_to_keep=2),
        ),
    ).fit().get_best_result(metric=STEPS, mode="max")
    if result.error:
        raise result.error
    rows = result.metrics_dataframe.to_dict("records")
    summary = summarize(rows, target, time.time() - start, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, target, f"{args.task} / {args.encoder} / seed {args.seed}", out / "learning_curve.png")
    print(json.dumps(summary, indent=2))
    print(f"results, checkpoints and learning_curve.png are in {out}")
    return summary


if __name__ == "__main__":
    main()
