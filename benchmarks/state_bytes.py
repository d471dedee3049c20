"""Bytes of recurrent state shipped per env step, as markdown tables.

Our modules keep their state in a per-chunk store (rllib/compact_state.py: a snapshot every
max_seq_len steps, the state a chunk continues from, a reference per step); RLlib's built-in
LSTM writes its STATE_OUT into the episode at every step. Both are measured on what a local env
runner's ``sample()`` returns (4 envs, PPO's defaults otherwise), after one warm-up call so that
the measured chunks continue episodes, as they do in training: the bytes that the state adds to
the pickled episodes (compact_state.shipped_state_bytes), whole for one learner, and sharded
exactly as LearnerGroup.update shards them for 2 and 4 learners (cut chunks ship their store
with each piece). StatelessCartPole's untrained episodes are short (~20 steps); Acrobot's last
500 steps, so there every chunk continues an episode and holds snapshots every max_seq_len steps.
A last table measures bytes per agent step on 2-agent StatelessCartPole, a policy per agent.
Usage: python benchmarks/state_bytes.py
"""
from __future__ import annotations

import os
import pickle
import platform
from dataclasses import dataclass

import numpy as np
import ray
import torch
import tree
from ray import cloudpickle
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.examples.envs.classes.multi_agent import MultiAgentStatelessCartPole
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole

from rllib_trajenc.rllib import with_traj_encoder
from rllib_trajenc.rllib.compact_state import shipped_state_bytes

TSTEP_DIM = 64
N_ENVS = 4
ENCODERS = ("ff", "gru", "mamba", "transformer")  # at the spec's default sizes
LSTM_CELL = 256
MEASURED_STEPS = 3 * 256 * N_ENVS  # env steps measured per row, after the warm-up call
LIMIT = 8 * 1024  # bytes per env step we aim to stay under
LEARNERS = (1, 2, 4)  # 0 (a learner in the driver) ships like 1
ENVS = {"StatelessCartPole": StatelessCartPole, "Acrobot-v1": "Acrobot-v1"}


@dataclass(frozen=True)
class Measured:
    full_state: int  # bytes of one env's state
    per_step: dict[int, float]  # shipped state bytes per env step, by number of learners
    mean_chunk: float  # env steps per shipped episode chunk
    mean_episode: float  # length of the episodes that ended while measuring


def ppo_config(env: str, fragment: int) -> PPOConfig:
    return (
        PPOConfig()
        .environment(ENVS[env])
        .env_runners(num_env_runners=0, num_envs_per_env_runner=N_ENVS, rollout_fragment_length=fragment)
        .training(minibatch_size=256)  # whole max_seq_len rows
        .debugging(seed=0)
    )


def ours(encoder: str, env: str, max_seq_len: int, fragment: int) -> AlgorithmConfig:
    return with_traj_encoder(ppo_config(env, fragment), encoder, max_seq_len=max_seq_len, tstep_dim=TSTEP_DIM)


def rllib_lstm(env: str, max_seq_len: int, fragment: int) -> AlgorithmConfig:
    return ppo_config(env, fragment).rl_module(model_config=DefaultModelConfig(
        use_lstm=True, lstm_cell_size=LSTM_CELL, max_seq_len=max_seq_len))


def shipped_per_step(episodes: list, num_learners: int, lookback: int) -> float:
    """State bytes per env step in what LearnerGroup.update sends to ``num_learners`` learners."""
    shards = [episodes] if num_learners == 1 else [
        part.episodes for part, _ in TrainingData(episodes=episodes).shard(
            num_shards=num_learners, len_lookback_buffer=lookback, minibatch_size=256)]
    return sum(shipped_state_bytes(shard) for shard in shards) / sum(len(e) for e in episodes)


def measure(config: AlgorithmConfig, fragment: int) -> Measured:
    runner = SingleAgentEnvRunner(config=config)
    try:
        full = sum(np.asarray(x).nbytes for x in tree.flatten(runner.module.get_initial_state()))
        runner.sample()  # warm-up: every chunk of the first call starts a fresh episode
        calls = max(1, MEASURED_STEPS // (fragment * N_ENVS))
        # As the driver receives them from a remote env runner.
        episodes = pickle.loads(pickle.dumps([e for _ in range(calls) for e in runner.sample()]))
    finally:
        runner.stop()
    steps = sum(len(e) for e in episodes)
    ended = [e.t_started + len(e) for e in episodes if e.is_done]
    per_step = {n: shipped_per_step(episodes, n, config.episode_lookback_horizon) for n in LEARNERS}
    return Measured(full, per_step, steps / len(episodes), float(np.mean(ended)) if ended else float("nan"))


def flag(per_step: float) -> str:
    return " (> 8 KiB)" if per_step > LIMIT else ""


def print_storage_table(max_seq_len: int, fragment: int = 256) -> None:
    print(f"\n### max_seq_len={max_seq_len}, rollout_fragment_length={fragment} per env\n")
    print("| env | model | how state is stored | full state (bytes) | "
          + " | ".join(f"bytes / env step, {n} learner{'s' * (n > 1)}" for n in LEARNERS)
          + " | steps / chunk | mean episode len |")
    print("|---|---|---|---:|" + "---:|" * len(LEARNERS) + "---:|---:|")
    for env in ENVS:
        rows = [(name, "compact store", ours(name, env, max_seq_len, fragment)) for name in ENCODERS]
        rows.append((f"RLlib LSTM (cell {LSTM_CELL})", "STATE_OUT every step", rllib_lstm(env, max_seq_len, fragment)))
        for name, storage, config in rows:
            m = measure(config, fragment)
            per_step = " | ".join(f"{m.per_step[n]:,.0f}{flag(m.per_step[n])}" for n in LEARNERS)
            print(f"| {env} | {name} | {storage} | {m.full_state:,} | {per_step} "
                  f"| {m.mean_chunk:.1f} | {m.mean_episode:.1f} |", flush=True)


def print_fragment_table(encoder: str = "transformer", env: str = "Acrobot-v1", max_seq_len: int = 256) -> None:
    print(f"\n### {encoder} on {env}, max_seq_len={max_seq_len}: bytes vs fragment length\n")
    print("Every shipped chunk that continues an episode carries the full state it starts from, "
          "so short fragments cost about full state / fragment per step, plus a snapshot every "
          "max_seq_len steps.\n")
    print("| fragment (steps per env) | bytes / env step, 1 learner | 4 learners | full state / fragment |")
    print("|---:|---:|---:|---:|")
    for fragment in (64, 256, 1024):
        m = measure(ours(encoder, env, max_seq_len, fragment), fragment)
        print(f"| {fragment} | {m.per_step[1]:,.0f}{flag(m.per_step[1])} | {m.per_step[4]:,.0f}{flag(m.per_step[4])} "
              f"| {m.full_state / fragment:,.0f} |", flush=True)


def _policy_per_agent(agent_id, *args, **kwargs) -> str:
    return f"p{agent_id}"


def multi_agent(config: AlgorithmConfig) -> AlgorithmConfig:
    """``config`` on 2-agent StatelessCartPole, one policy per agent."""
    return (config.environment(MultiAgentStatelessCartPole, env_config={"num_agents": 2})
            .multi_agent(policies={"p0", "p1"}, policy_mapping_fn=_policy_per_agent))


def print_multi_agent_table(max_seq_len: int = 256, fragment: int = 256) -> None:
    """Bytes per agent step on 2-agent StatelessCartPole, one policy each (1 learner: RLlib 2.60
    cannot shard every multi-agent chunk, README "Multi-agent")."""
    print(f"\n### 2-agent StatelessCartPole, a policy per agent, max_seq_len={max_seq_len}, "
          f"rollout_fragment_length={fragment} per env\n")
    print("| model | how state is stored | bytes / agent step, 1 learner | agent steps measured |")
    print("|---|---|---:|---:|")
    rows = [(name, "compact store", with_traj_encoder(multi_agent(ppo_config("StatelessCartPole", fragment)),
                                                      name, max_seq_len=max_seq_len, tstep_dim=TSTEP_DIM))
            for name in ENCODERS]
    rows.append((f"RLlib LSTM (cell {LSTM_CELL})", "STATE_OUT every step",
                 multi_agent(rllib_lstm("StatelessCartPole", max_seq_len, fragment))))
    for name, storage, config in rows:
        runner = MultiAgentEnvRunner(config=config)
        try:
            runner.sample()  # warm-up, as in the single-agent table
            calls = max(1, MEASURED_STEPS // (fragment * N_ENVS))
            # As the driver receives them from a remote env runner.
            episodes = cloudpickle.loads(cloudpickle.dumps([e for _ in range(calls) for e in runner.sample()]))
        finally:
            runner.stop()
        agent_steps = sum(len(a) for e in episodes for a in e.agent_episodes.values())
        per_step = shipped_state_bytes(episodes) / agent_steps
        print(f"| {name} | {storage} | {per_step:,.0f}{flag(per_step)} | {agent_steps:,} |", flush=True)


def main() -> None:
    # One intra-op thread: these are batch-4 single-step forwards, and on a busy machine extra
    # threads mostly wait for each other (10x slower sampling; the bytes are the same).
    torch.set_num_threads(1)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}, ray {ray.__version__}")
    print(f"{N_ENVS} envs, untrained policies (sampling, no training), tstep_dim={TSTEP_DIM}, "
          "encoders at their default sizes, float32 state.")
    print_storage_table(256)
    print_fragment_table()
    print_multi_agent_table()
    print("\nNotes: a finished chunk keeps no state of its start when it starts an episode (the "
          "fresh-episode state is never stored). The state after a chunk's last step is not shipped "
          "with it (its successor starts from it); a bootstrap row that starts there is replayed on "
          "the learner. RLlib's LSTM pays its full state at every step regardless.")


if __name__ == "__main__":
    main()
