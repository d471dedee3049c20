"""The previous action and reward as part of each observation (RL^2-style inputs).

Memory tasks where the agent must infer the task from what its own actions earned (meta-RL,
bandits, "remember what worked") need the previous action and reward in every timestep.
``AddPrevActionReward`` rewrites each new observation *in the episode* into
``{"obs": o_t, "prev_action": a_{t-1}, "prev_reward": r_{t-1}}``, so the env runner and the
learner read the very same inputs and no learner-side piece is needed. The module's
``TstepEncoder`` then encodes the Dict like any other (one-hot for discrete actions).

At an episode's first step there is no previous action: discrete spaces get one extra value
that means "none" (``n`` for ``Discrete(n)``, ``nvec`` for ``MultiDiscrete``), Box actions
and the reward get zeros.

In multi-agent envs each agent's observations are wrapped with its own previous action and
reward (the sum of the rewards since it last acted, as RLlib records it), from its own first step.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.rl_module.rl_module import RLModule

OBS = "obs"
PREV_ACTION = "prev_action"
PREV_REWARD = "prev_reward"

_REWARD_SPACE = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)


def _prev_action_space(action_space: gym.Space) -> gym.Space:
    """``action_space`` plus a "no action yet" value."""
    if isinstance(action_space, gym.spaces.Discrete):
        return gym.spaces.Discrete(int(action_space.n) + 1)
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return gym.spaces.MultiDiscrete(action_space.nvec + 1)
    if isinstance(action_space, gym.spaces.Box):
        return gym.spaces.Box(-np.inf, np.inf, action_space.shape, np.float32)
    raise ValueError(f"prev_action=True supports Discrete, MultiDiscrete and Box action spaces, "
                     f"got {action_space}")


def _no_action(space: gym.Space) -> np.ndarray:
    if isinstance(space, gym.spaces.Discrete):
        return np.asarray(space.n - 1, np.int64)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return (space.nvec - 1).astype(np.int64)
    return np.zeros(space.shape, np.float32)


def augmented_space(obs_space: gym.Space, action_space: gym.Space, prev_action: bool,
                    prev_reward: bool) -> gym.spaces.Dict:
    """The observation space the module sees when the piece below is installed."""
    spaces = {OBS: obs_space}
    if prev_action:
        spaces[PREV_ACTION] = _prev_action_space(action_space)
    if prev_reward:
        spaces[PREV_REWARD] = _REWARD_SPACE
    return gym.spaces.Dict(spaces)


class AddPrevActionReward(ConnectorV2):
    """Env-to-module: wraps each (agent's) episode's newest observation with the previous
    action/reward. ``multi_agent``: the spaces are Dicts by agent id, as a multi-agent env's are.

    Runs once per env step, before the observations are batched; RLlib calls the env-to-module
    pipeline once for every new observation (also the final one of an episode), so every
    stored observation is wrapped exactly once, and a chunk cut from an ongoing episode
    starts from already-wrapped data.
    """

    def __init__(self, input_observation_space: Optional[gym.Space] = None,
                 input_action_space: Optional[gym.Space] = None, *, prev_action: bool = True,
                 prev_reward: bool = True, multi_agent: bool = False, **kwargs):
        self.prev_action, self.prev_reward, self.multi_agent = prev_action, prev_reward, multi_agent
        super().__init__(input_observation_space, input_action_space, **kwargs)

    def recompute_output_observation_space(self, input_observation_space: gym.Space,
                                           input_action_space: gym.Space) -> gym.Space:
        if not self.multi_agent:
            return augmented_space(input_observation_space, input_action_space,
                                   self.prev_action, self.prev_reward)
        return gym.spaces.Dict({agent: augmented_space(space, input_action_space[agent], self.prev_action,
                                                       self.prev_reward)
                                for agent, space in input_observation_space.spaces.items()})

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=True):
            space = self.observation_space[episode.agent_id] if self.multi_agent else self.observation_space
            spaces = space.spaces
            first = episode.t == 0
            wrapped = {OBS: episode.get_observations(-1)}
            if self.prev_action:
                none = _no_action(spaces[PREV_ACTION])
                wrapped[PREV_ACTION] = none if first else np.asarray(episode.get_actions(-1), none.dtype)
            if self.prev_reward:
                wrapped[PREV_REWARD] = np.array([0.0 if first else episode.get_rewards(-1)], np.float32)
            episode.set_observations(at_indices=-1, new_data=wrapped)
            episode.observation_space = space
        return batch
