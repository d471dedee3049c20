"""Bytes of recurrent state that sampled RLlib episodes carry per env step, as markdown tables.

Our modules keep their state in a per-chunk store (rllib/compact_state.py: a snapshot every
max_seq_len steps, plus the states at the chunk's ends); RLlib's built-in LSTM writes its
STATE_OUT into the episode at every step. Both are measured on what a local env runner's
``sample()`` returns on StatelessCartPole (4 envs, PPO's defaults otherwise), after one warm-up
call so that the measured chunks continue episodes, as they do in training.
Usage: python benchmarks/state_bytes.py
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import numpy as np
import ray
import torch
import tree
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole

from rllib_trajenc.rllib import with_traj_encoder
from rllib_trajenc.rllib.compact_state import stored_state_bytes

TSTEP_DIM = 64
N_ENVS = 4
ENCODERS = ("ff", "gru", "mamba", "transformer")  # at the spec's default sizes
LSTM_CELL = 256
MEASURED_STEPS = 3 * 256 * N_ENVS  # env steps measured per row, after the warm-up call
LIMIT = 8 * 1024  # bytes per env step we aim to stay under


@dataclass(frozen=True)
class Measured:
    full_state: int  # bytes of one env's state
    per_step: float  # stored state bytes per env step
    mean_chunk: float  # env steps per shipped episode chunk
    mean_episode: float  # length of the episodes that ended while measuring


def ppo_config(fragment: int) -> PPOConfig:
    return (
        PPOConfig()
        .environment(StatelessCartPole)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=N_ENVS, rollout_fragment_length=fragment)
        .debugging(seed=0)
    )


def ours(encoder: str, max_seq_len: int, fragment: int) -> AlgorithmConfig:
    return with_traj_encoder(ppo_config(fragment), encoder, max_seq_len=max_seq_len, tstep_dim=TSTEP_DIM)


def rllib_lstm(max_seq_len: int, fragment: int) -> AlgorithmConfig:
    return ppo_config(fragment).rl_module(model_config=DefaultModelConfig(
        use_lstm=True, lstm_cell_size=LSTM_CELL, max_seq_len=max_seq_len))


def measure(config: AlgorithmConfig, fragment: int) -> Measured:
    runner = SingleAgentEnvRunner(config=config)
    try:
        full = sum(np.asarray(x).nbytes for x in tree.flatten(runner.module.get_initial_state()))
        runner.sample()  # warm-up: every chunk of the first call starts a fresh episode
        calls = max(1, MEASURED_STEPS // (fragment * N_ENVS))
        episodes = [e for _ in range(calls) for e in runner.sample()]
    finally:
        runner.stop()
    steps = sum(len(e) for e in episodes)
    ended = [e.t_started + len(e) for e in episodes if e.is_done]
    return Measured(full, sum(stored_state_bytes(e) for e in episodes) / steps, steps / len(episodes),
                    float(np.mean(ended)) if ended else float("nan"))


def flag(per_step: float) -> str:
    return " (> 8 KiB)" if per_step > LIMIT else ""


def print_storage_table(max_seq_len: int, fragment: int = 256) -> None:
    print(f"\n### max_seq_len={max_seq_len}, rollout_fragment_length={fragment} per env\n")
    print("| model | how state is stored | full state (bytes) | stored bytes / env step "
          "| steps / chunk | mean episode len |")
    print("|---|---|---:|---:|---:|---:|")
    rows = [(name, "compact store", ours(name, max_seq_len, fragment)) for name in ENCODERS]
    rows.append((f"RLlib LSTM (cell {LSTM_CELL})", "STATE_OUT every step", rllib_lstm(max_seq_len, fragment)))
    for name, storage, config in rows:
        m = measure(config, fragment)
        print(f"| {name} | {storage} | {m.full_state:,} | {m.per_step:,.0f}{flag(m.per_step)} "
              f"| {m.mean_chunk:.1f} | {m.mean_episode:.1f} |", flush=True)


def print_fragment_table(encoder: str = "transformer", max_seq_len: int = 256) -> None:
    print(f"\n### {encoder}, max_seq_len={max_seq_len}: stored bytes vs fragment length\n")
    print("Every shipped chunk that continues an episode carries the full state it starts from, "
          "so short fragments cost about full state / fragment per step (a cut chunk ships "
          "its last state too only when a bootstrap row starts there).\n")
    print("| fragment (steps per env) | stored bytes / env step | full state / fragment |")
    print("|---:|---:|---:|")
    for fragment in (64, 256, 1024):
        m = measure(ours(encoder, max_seq_len, fragment), fragment)
        print(f"| {fragment} | {m.per_step:,.0f}{flag(m.per_step)} | {m.full_state / fragment:,.0f} |", flush=True)


def main() -> None:
    # One intra-op thread: these are batch-4 single-step forwards, and on a busy machine extra
    # threads mostly wait for each other (10x slower sampling; the bytes are the same).
    torch.set_num_threads(1)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}, ray {ray.__version__}")
    print(f"StatelessCartPole, {N_ENVS} envs, untrained policies (sampling, no training), "
          f"tstep_dim={TSTEP_DIM}, encoders at their default sizes, float32 state.")
    for max_seq_len in (256, 64):
        print_storage_table(max_seq_len)
    print_fragment_table()
    print("\nNotes: untrained policies end StatelessCartPole episodes after ~20 steps, and a "
          "finished chunk keeps no state (the fresh-episode state is never stored), so the compact "
          "numbers above are mostly the states at fragment boundaries. Episodes longer than "
          "max_seq_len add one snapshot (full state / max_seq_len per step) on top. RLlib's LSTM "
          "pays its full state at every step regardless (its lookback step is not counted).")


if __name__ == "__main__":
    main()
