"""A 2-agent memory task: each agent must repeat, much later, the first action the other took.

Written for this package's examples (it needs Ray's MultiAgentEnv, so it lives here rather than
in the Ray-free ``rllib_trajenc.envs``). No communication is needed, only memory of the other.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
from ray.rllib.env.multi_agent_env import MultiAgentEnv

AGENTS = ("a", "b")


class RecallEachOther(MultiAgentEnv):
    """Agents "a" and "b" each pick one of ``n_actions`` actions at step 0 (no reward); at step 1
    each sees the other's choice, once; ``delay`` steps of noise follow; at the query step each
    earns +1 for picking the other's step-0 action, -1 otherwise, and the episode ends.

    Observation per agent: ``[other's step-0 action one-hot (n_actions), query flag, noise
    (n_noise)]``. A memory-free policy averages 2/n_actions - 1 per agent; perfect memory 1, so
    the episode return (both agents' sum) ranges up to 2.
    """

    def __init__(self, config: Optional[dict] = None):
        super().__init__()
        config = dict(config or {})
        self.delay = int(config.pop("delay", 10))
        self.n_actions = int(config.pop("n_actions", 2))
        self.n_noise = int(config.pop("n_noise", 2))
        if config:
            raise ValueError(f"unknown RecallEachOther options {sorted(config)}; allowed: delay, n_actions, n_noise")
        if self.delay < 0 or self.n_actions < 2 or self.n_noise < 0:
            raise ValueError(f"RecallEachOther needs delay >= 0, n_actions >= 2, n_noise >= 0; got delay={self.delay}, "
                             f"n_actions={self.n_actions}, n_noise={self.n_noise}")
        self.agents = self.possible_agents = list(AGENTS)
        size = self.n_actions + 1 + self.n_noise
        self.observation_spaces = {a: gym.spaces.Box(-1.0, 1.0, (size,), np.float32) for a in AGENTS}
        self.action_spaces = {a: gym.spaces.Discrete(self.n_actions) for a in AGENTS}
        self._first: dict[str, int] = {}
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        out = {}
        for agent, other in zip(AGENTS, reversed(AGENTS)):
            obs = np.zeros(self.observation_spaces[agent].shape, np.float32)
            if self._t == 1:
                obs[self._first[other]] = 1.0
            if self._t == self.delay + 2:
                obs[self.n_actions] = 1.0
            obs[self.n_actions + 1:] = self.np_random.uniform(-1, 1, self.n_noise)
            out[agent] = obs
        return out

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._t, self._first = 0, {}
        return self._obs(), {}

    def step(self, actions: dict[str, Any]):
        rewards = {agent: 0.0 for agent in AGENTS}
        if self._t == 0:
            self._first = {agent: int(actions[agent]) for agent in AGENTS}
        done = self._t == self.delay + 2
        if done:
            rewards = {agent: 1.0 if int(actions[agent]) == self._first[other] else -1.0
                       for agent, other in zip(AGENTS, reversed(AGENTS))}
        self._t += 1
        return self._obs(), rewards, {"__all__": done}, {"__all__": False}, {}
