"""A long-horizon memory task: a cue seen once must be recalled `delay` steps later."""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np


class DelayedRecall(gym.Env):
    """Step 0 shows one of ``n_cues`` cues; ``delay`` blank steps follow; then a query step
    asks for the cue. Naming it earns +1, anything else -1, and the episode ends.

    Observation: ``[cue one-hot (n_cues), query flag, noise (n_noise)]``. The noise features
    are fresh each step, so the agent cannot read the answer from anything but its memory.
    Actions before the query have no effect and no reward, so credit for the answer must
    travel ``delay`` steps back to the cue. A memory-free policy scores 2/n_cues - 1 on
    average; a perfect memory scores 1.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        self.delay = int(config.pop("delay", 100))
        self.n_cues = int(config.pop("n_cues", 2))
        self.n_noise = int(config.pop("n_noise", 2))
        if config:
            raise ValueError(f"unknown DelayedRecall options {sorted(config)}; "
                             "allowed: delay, n_cues, n_noise")
        if self.delay < 0 or self.n_cues < 2 or self.n_noise < 0:
            raise ValueError(f"DelayedRecall needs delay >= 0, n_cues >= 2, n_noise >= 0; got "
                             f"delay={self.delay}, n_cues={self.n_cues}, n_noise={self.n_noise}")
        size = self.n_cues + 1 + self.n_noise
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (size,), np.float32)
        self.action_space = gym.spaces.Discrete(self.n_cues)
        self._cue = 0
        self._t = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, np.float32)
        if self._t == 0:
            obs[self._cue] = 1.0
        if self._t == self.delay + 1:
            obs[self.n_cues] = 1.0
        obs[self.n_cues + 1:] = self.np_random.uniform(-1, 1, self.n_noise)
        return obs

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._cue = int(self.np_random.integers(self.n_cues))
        self._t = 0
        return self._obs(), {}

    def step(self, action: int):
        answering = self._t == self.delay + 1
        reward = (1.0 if int(action) == self._cue else -1.0) if answering else 0.0
        self._t += 1
        return self._obs(), reward, answering, False, {}
