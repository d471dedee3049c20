"""Which part of our RLlib module slows PPO's recall? PPO on DelayedRecall without RLlib.

RLlib's PPO loss (clipped surrogate on every step, GAE advantages standardised over the batch,
value loss and entropy bonus on every step) with the settings of examples/tasks.py's
delayed_recall_400: gamma 0.5, lambda 0.9, 32 fresh episodes per iteration, 6 epochs over
minibatches of 10 episodes, Adam lr 1e-3, gradients clipped at 1. The network is our module's
layout, timestep encoder -> trajectory encoder (recall_supervised.py's) -> actor and critic heads;
the timestep encoder and the heads are each one linear layer or an MLP with one hidden layer of 64
(the module's default ``tstep_hiddens``/``head_hiddens``). The table gives the episodes sampled until one
iteration's mean return reaches 0.9, the task's target; no env runner, no stored state. Usage:

    python benchmarks/recall_ppo.py [--delay 400] [--budget 2500] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Optional

import torch
from torch import nn
from torch.distributions import Categorical

from recall_supervised import CONTENDERS, TSTEP_DIM, build_encoder, episodes, seeded_env
from rllib_trajenc.rllib.tstep_encoder import MLP

EPISODES_PER_ITER, MINIBATCH_EPISODES, EPOCHS = 32, 10, 6
GAMMA, LAMBDA, CLIP, LR, VF_COEFF, ENTROPY_COEFF = 0.5, 0.9, 0.2, 1e-3, 0.5, 0.003
TARGET = 0.9
# layout -> (timestep encoder hiddens, head hiddens)
LAYOUTS: dict[str, tuple[list[int], list[int]]] = {
    "linear timestep encoder and heads": ([], []),
    "MLP timestep encoder": ([64], []),
    "MLP heads": ([], [64]),
    "MLP timestep encoder and heads (module default)": ([64], [64]),
}


def gae(rewards: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Advantages [B, T] of episodes that end at their last step."""
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = rewards + GAMMA * next_values - values
    advantages, running = torch.zeros_like(deltas), torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + GAMMA * LAMBDA * running
        advantages[:, t] = running
    return advantages


def episodes_to_learn(contender: str, layout: str, delay: int, budget: int, seed: int) -> Optional[int]:
    """Episodes sampled until an iteration's mean return reaches TARGET; None if not within budget."""
    env = seeded_env(delay, seed)
    encoder = build_encoder(contender)
    tstep_hiddens, head_hiddens = LAYOUTS[layout]
    tstep = MLP(env.observation_space.shape[0], tstep_hiddens, TSTEP_DIM, "leaky_relu")
    actor = MLP(encoder.emb_dim, head_hiddens, env.n_cues, "leaky_relu")
    critic = MLP(encoder.emb_dim, head_hiddens, 1, "leaky_relu")
    params = [p for net in (tstep, encoder, actor, critic) for p in net.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR)
    time_idxs = torch.arange(delay + 2).expand(EPISODES_PER_ITER, -1).unsqueeze(-1)

    def forward(obs: torch.Tensor, idx: torch.Tensor) -> tuple[Categorical, torch.Tensor]:
        out, _ = encoder(tstep(obs[idx]), time_idxs[idx])
        return Categorical(logits=actor(out)), critic(out)[..., 0]

    everyone = torch.arange(EPISODES_PER_ITER)
    for sampled in range(EPISODES_PER_ITER, budget + 1, EPISODES_PER_ITER):
        obs, cues = episodes(env, EPISODES_PER_ITER)
        with torch.no_grad():
            dist, values = forward(obs, everyone)
            actions = dist.sample()
            old_logp = dist.log_prob(actions)
            rewards = torch.zeros_like(values)
            rewards[:, -1] = (actions[:, -1] == cues).float() * 2 - 1  # only the query is scored
            if rewards[:, -1].mean() >= TARGET:
                return sampled
            advantages = gae(rewards, values)
            value_targets = advantages + values
            advantages = (advantages - advantages.mean()) / max(1e-4, advantages.std().item())
        for _ in range(EPOCHS):
            for idx in torch.randperm(EPISODES_PER_ITER).split(MINIBATCH_EPISODES):
                dist, values = forward(obs, idx)
                ratio = (dist.log_prob(actions[idx]) - old_logp[idx]).exp()
                surrogate = torch.min(ratio * advantages[idx], ratio.clamp(1 - CLIP, 1 + CLIP) * advantages[idx])
                loss = (-surrogate.mean() + VF_COEFF * (values - value_targets[idx]).pow(2).mean()
                        - ENTROPY_COEFF * dist.entropy().mean())
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=int, default=400)
    parser.add_argument("--budget", type=int, default=2500, help="episodes per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--contender", choices=list(CONTENDERS), default="transformer (rope)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.contender}, delay {args.delay}, "
          f"budget {args.budget:,} episodes\n")
    print("| layout | seed | episodes to target | s |\n|---|---:|---:|---:|")
    for layout in args.layouts:
        for seed in args.seeds:
            start = time.time()
            seen = episodes_to_learn(args.contender, layout, args.delay, args.budget, seed)
            print(f"| {layout} | {seed} | {'not reached' if seen is None else f'{seen:,}'} "
                  f"| {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
