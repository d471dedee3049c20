"""How fast one CPU env runner samples with each encoder, side by side with RLlib's LSTM.

Three markdown tables:
1. PPO sampling on CartPole-v1, one local env runner with 16 envs, encoders at the spec's
   default sizes through with_traj_encoder (max_seq_len 256), RLlib's LSTM with cell 256 and
   fcnet [256]: env steps/s, median of interleaved rounds so that load on the machine hits
   every contender alike, the ratio to the LSTM, and the time spent in this package's
   connector piece (AddStatesFromEpisodeStore) per vector step. RLlib's own MLP [256] (no
   memory, next to no arithmetic) shows what RLlib's env runner itself costs per step.
2. The encoder alone on the rollout path (16 envs, one step, in place, no autograd): latency at
   episode step 10 and 2,000 (bounded memory: the two should match), the step's multiply-adds
   and the state bytes it reads, and the bound they set at this machine's measured matmul
   rate and memory read rate (a step must read its whole state: attention reads every cached
   key and value).
3. Each encoder's vector step against its floor, each contender's fastest round (load on a shared
   machine only slows a round): RLlib's env runner around the MLP (row 1),
   plus the whole module's multiply-adds at the matmul rate (the encoder's step, counted, plus
   the timestep encoder and actor head, one multiply-add per weight), plus reading the state.
Every table is printed at the spec's default sizes and at a size users pick for CPU env runners
(d_model 128, 2 layers), and for Mamba at the default sizes with model_config["compile_rollout"]
(where a C++ compiler is found), all measured in one run.
Usage: python benchmarks/sampling_cpu.py [--rounds 5] [--steps 2048]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import gymnasium as gym
import torch
from torch.utils.flop_counter import FlopCounterMode
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from encoders_cpu import (  # same folder: sizes, timing and the rollout step
    ENCODERS, MAX_SEQ_LEN, N_ENVS, TSTEP_DIM, rollout_step, timed,
)
from rllib_trajenc.rllib import with_traj_encoder
from rllib_trajenc.rllib.compact_state import AddStatesFromEpisodeStore
from rllib_trajenc.rllib.config import TrajEncoderModelConfig

LSTM, MLP = "rllib_lstm", "rllib_mlp"
LABELS = {LSTM: "RLlib LSTM-256", MLP: "RLlib MLP [256] (no memory)"}
# The spec's default sizes, and a size users pick for CPU env runners.
SIZES: dict[str, dict[str, dict]] = {
    "default": {name: {} for name in ENCODERS},
    "small": {"ff": dict(d_model=128, n_layers=2), "gru": dict(d_hidden=128, n_layers=2, d_output=128),
              "mamba": dict(d_model=128, n_layers=2), "transformer": dict(d_model=128, n_layers=2)},
}
SMALL_SUFFIX = " (d_model 128, 2 layers)"
# Mamba at the spec's default sizes with model_config["compile_rollout"]: its step through inductor.
COMPILED = "mamba (compile_rollout)"


def encoder_contenders() -> list[str]:
    """"gru", ..., then "gru (d_model 128, 2 layers)", ..., then COMPILED where a C++ compiler
    lets inductor build it: one sampling contender per size."""
    contenders = [name + ("" if size == "default" else SMALL_SUFFIX) for size in SIZES for name in ENCODERS]
    try:
        TrajEncoderModelConfig.from_model_config({"traj_encoder": "mamba", "max_seq_len": MAX_SEQ_LEN,
                                                  "compile_rollout": True})
    except ValueError as error:
        print(f"left out: {COMPILED} ({error})")
        return contenders
    return contenders + [COMPILED]


def contender_settings(contender: str) -> tuple[str, dict, dict]:
    """(encoder name, its encoder_config, further model_config keys) of a contender."""
    if contender == COMPILED:
        return "mamba", {}, {"compile_rollout": True}
    name, small = contender.removesuffix(SMALL_SUFFIX), contender.endswith(SMALL_SUFFIX)
    return name, SIZES["small" if small else "default"][name], {}


def config_for(contender: str) -> AlgorithmConfig:
    config = (PPOConfig().environment("CartPole-v1")
              .env_runners(num_env_runners=0, num_envs_per_env_runner=N_ENVS)
              .training(minibatch_size=MAX_SEQ_LEN)
              .debugging(seed=0))
    if contender == LSTM:
        return config.rl_module(model_config=DefaultModelConfig(
            use_lstm=True, lstm_cell_size=256, fcnet_hiddens=[256], max_seq_len=MAX_SEQ_LEN))
    if contender == MLP:  # RLlib's env runner around next to no arithmetic
        return config.rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[256]))
    name, size, model_config = contender_settings(contender)
    return with_traj_encoder(config, name, max_seq_len=MAX_SEQ_LEN, encoder_config=size, **model_config)


def module_for(contender: str) -> RLModule:
    """The module env runners build for ``contender``."""
    return config_for(contender).get_rl_module_spec(env=gym.make("CartPole-v1"), inference_only=True).build()


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class PieceTimer:
    """Seconds and calls of our env-to-module piece, per contender (patched in at class level)."""

    def __init__(self) -> None:
        self.current = ""
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        original = AddStatesFromEpisodeStore.__call__

        def timed_call(piece, **kwargs):
            start = time.perf_counter()
            try:
                return original(piece, **kwargs)
            finally:
                self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.perf_counter() - start
                self.calls[self.current] = self.calls.get(self.current, 0) + 1

        AddStatesFromEpisodeStore.__call__ = timed_call

    def ms_per_call(self, name: str) -> str:
        return f"{1e3 * self.seconds[name] / self.calls[name]:.3f}" if self.calls.get(name) else "-"


def sampling_table(rounds: int, steps: int) -> dict[str, list[float]]:
    """Prints the sampling table; returns each contender's env steps/s in every round."""
    contenders = [LSTM, MLP, *encoder_contenders()]
    runners = {name: SingleAgentEnvRunner(config=config_for(name)) for name in contenders}
    for runner in runners.values():  # warm-up: first calls allocate and fill caches
        runner.sample(num_timesteps=steps // 4, explore=True)
    timer = PieceTimer()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, runner in runners.items():
            timer.current = name
            start = time.perf_counter()
            sampled = sum(len(e) for e in runner.sample(num_timesteps=steps, explore=True))
            rates[name].append(sampled / (time.perf_counter() - start))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in contenders),
              flush=True)
    lstm = median(rates[LSTM])
    print(f"\n| contender | env steps/s (median of {rounds}) | min-max | vs RLlib's LSTM "
          "| our connector piece (ms per vector step) |")
    print("|---|---:|---:|---:|---:|")
    for name in contenders:
        label = LABELS.get(name, name)
        print(f"| {label} | {median(rates[name]):,.0f} | {min(rates[name]):,.0f}-{max(rates[name]):,.0f} "
              f"| {median(rates[name]) / lstm:.2f} | {timer.ms_per_call(name)} |")
    return rates


def matmul_macs_per_s() -> float:
    """Multiply-adds/s of a rollout-shaped matmul ([16, 256] x [256, 1024]) on this machine, at
    its fastest (like the floor table's rounds)."""
    x, w = torch.randn(N_ENVS, 256), torch.randn(256, 1024)
    ms = 1e3 * timed(lambda: [x @ w for _ in range(100)], 25, fastest=True)
    return 100 * N_ENVS * 256 * 1024 / (ms / 1e3)


def read_bytes_per_s() -> float:
    """Memory read rate: summing a 64 MiB tensor, far beyond the caches, at its fastest."""
    big = torch.ones(16 * 2**20)
    return big.numel() * 4 / timed(big.sum, 25, fastest=True)


def head_macs(contender: str) -> int:
    """Multiply-adds per env step of the module outside the encoder (timestep encoder and actor
    head: one per weight of their linear layers), from the module env runners build."""
    module = module_for(contender)
    return sum(p.numel() for part in (module.tstep_encoder, module.pi) for p in part.parameters() if p.dim() == 2)


def encoder_table(repeats: int) -> dict[str, tuple[float, float]]:
    """Prints the encoder-alone table; returns each contender's (module arithmetic, state read)
    bound in ms per vector step."""
    rate, bandwidth = matmul_macs_per_s(), read_bytes_per_s()
    print(f"\nmatmul rate here, at its fastest: {rate / 1e9:.1f} G multiply-adds/s ([16, 256] x [256, 1024]); "
          f"memory read rate: {bandwidth / 1e9:.1f} GB/s")
    print("\n| encoder | step latency @ t=10 (ms) | @ t=2,000 (ms) | multiply-adds per env step "
          "| state bytes per env | bound (ms, 16 envs): matmuls / state read |")
    print("|---|---:|---:|---:|---:|---:|")
    bounds = {}
    for contender in encoder_contenders():
        name, size, model_config = contender_settings(contender)
        enc = ENCODERS[name](TSTEP_DIM, MAX_SEQ_LEN, **size).eval()
        latency, macs = [], 0
        for episode_step in (10, 2000):
            step = rollout_step(enc, episode_step)
            enc.compile_rollout = model_config.get("compile_rollout", False)
            latency.append(1e3 * timed(step, repeats))
            enc.compile_rollout = False  # the same arithmetic, counted where the counter sees the ops
            with FlopCounterMode(display=False) as counter:
                step()
            macs = max(macs, counter.get_total_flops() // 2 // N_ENVS)
        state = enc.init_hidden_state(N_ENVS, torch.device("cpu"))
        state_bytes = sum(v.numel() * v.element_size() for v in state.values()) // N_ENVS if state else 0
        print(f"| {contender} | {latency[0]:.2f} | {latency[1]:.2f} | {macs / 1e6:.2f} M | {state_bytes:,} "
              f"| {macs * N_ENVS / rate * 1e3:.2f} / {state_bytes * N_ENVS / bandwidth * 1e3:.2f} |", flush=True)
        bounds[contender] = ((macs + head_macs(contender)) * N_ENVS / rate * 1e3, state_bytes * N_ENVS / bandwidth * 1e3)
    return bounds


def floor_table(rates: dict[str, float], bounds: dict[str, tuple[float, float]], basis: str = "") -> None:
    """Each encoder's vector step against its floor: RLlib's env runner (the MLP's vector step)
    + the module's arithmetic + the state read; ``rates`` (env steps/s) as ``basis`` says."""
    runner_ms = 1e3 * N_ENVS / rates[MLP]
    print(f"\nRLlib's env runner (MLP [256] row): {runner_ms:.2f} ms per vector step of {N_ENVS} envs{basis}")
    print("\n| encoder | vector step (ms) | floor (ms): runner + arithmetic + state read | step / floor "
          "| env steps/s | vs RLlib's LSTM |")
    print("|---|---:|---:|---:|---:|---:|")
    for contender, (arithmetic, read) in bounds.items():
        step_ms, floor = 1e3 * N_ENVS / rates[contender], runner_ms + arithmetic + read
        print(f"| {contender} | {step_ms:.2f} | {floor:.2f} = {runner_ms:.2f} + {arithmetic:.2f} + {read:.2f} "
              f"| {step_ms / floor:.2f}x | {rates[contender]:,.0f} | {rates[contender] / rates[LSTM]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved sampling rounds")
    parser.add_argument("--steps", type=int, default=2048, help="env steps per contender per round")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per encoder latency")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; {N_ENVS} envs, "
          f"max_seq_len {MAX_SEQ_LEN}, spec-default encoder sizes, tstep_dim {TSTEP_DIM}")
    rounds = sampling_table(args.rounds, args.steps)
    # Each contender's fastest round: load from elsewhere on a shared VM only slows a round down,
    # and a round's spread (the sampling table's min-max) is far wider than the effects measured.
    fastest = {name: max(rates) for name, rates in rounds.items()}
    floor_table(fastest, encoder_table(args.repeats), f"; every row from its fastest of {args.rounds} rounds")


if __name__ == "__main__":
    main()
