"""Observation -> one vector per timestep, the input the trajectory encoder expects.

Each leaf of the observation space gets a small encoder (flatten, one-hot, or CNN); the leaves
are concatenated and an MLP maps them to ``tstep_dim``. Any number of leading (batch, time)
dims is kept, so the same module serves env-runner [B, 1, ...] and learner [B, T, ...] batches.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from rllib_trajenc.nets.layers import activation as get_activation

SUPPORTED_OBS = ("Box (rank 0-2: flattened; rank 3: HWC image -> CNN), Discrete, MultiDiscrete, "
                 "and Dict/Tuple nests of these")

Path = tuple[Union[str, int], ...]


class MLP(nn.Module):
    """Linear layers with an activation between them (none after the last).

    ``input_gain`` g: the first layer computes g * (W x + b) with W and b initialised / g, the
    same function at initialisation. Adam's steps do not scale with the gradient, so that layer's
    effective weights move g times faster than the others': the input weights can single out the
    informative features (and leave per-step noise out of a recurrent state) early in training.
    """

    def __init__(self, in_dim: int, hiddens: Sequence[int], out_dim: int, activation: str,
                 input_gain: float = 1.0):
        super().__init__()
        sizes = [in_dim, *hiddens, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = get_activation(activation)
        self.input_gain = input_gain
        with torch.no_grad():
            self.layers[0].weight.div_(input_gain)
            self.layers[0].bias.div_(input_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)
        if self.input_gain != 1.0:  # x * 1.0 == x: an op saved on every env step
            x = x * self.input_gain
        for layer in itertools.islice(self.layers, 1, None):  # slicing a ModuleList builds a new one
            x = layer(self.act(x))
        return x


class _Leaf(nn.Module, ABC):
    """Encodes one observation leaf: [*lead, *space.shape] -> [*lead, out_dim]."""

    out_dim: int

    def __init__(self, space: gym.Space):
        super().__init__()
        self.event_shape = tuple(space.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:x.dim() - len(self.event_shape)]
        if len(lead) == 1:  # an env runner's batch: already [N, *space.shape]
            return self.encode(x)
        return self.encode(x.reshape(-1, *self.event_shape)).reshape(*lead, self.out_dim)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, *space.shape] -> [N, out_dim]."""


class _Flatten(_Leaf):
    def __init__(self, space: gym.spaces.Box):
        super().__init__(space)
        self.out_dim = int(np.prod(space.shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().reshape(x.shape[0], -1)


class _OneHot(_Leaf):
    """Discrete and MultiDiscrete: one one-hot block per sub-action, concatenated."""

    def __init__(self, space: Union[gym.spaces.Discrete, gym.spaces.MultiDiscrete]):
        super().__init__(space)
        sizes = np.asarray(space.nvec if isinstance(space, gym.spaces.MultiDiscrete) else [space.n]).ravel()
        starts = np.asarray(getattr(space, "start", 0)).ravel() * np.ones_like(sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.out_dim = int(sizes.sum())
        # Shifting each sub-value into its own block lets one one_hot call cover all of them.
        self.register_buffer("shift", torch.as_tensor(offsets - starts, dtype=torch.long), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        idx = x.reshape(x.shape[0], -1).long() + self.shift
        return F.one_hot(idx, self.out_dim).sum(-2).float()


class _ImageCNN(_Leaf):
    """Two stride-2 convolutions; small enough for gridworld-sized and Atari-sized images."""

    def __init__(self, space: gym.spaces.Box, activation: str):
        super().__init__(space)
        self.scale = 1 / 255 if space.dtype == np.uint8 else 1.0
        self.convs = nn.ModuleList([
            nn.Conv2d(space.shape[-1], 16, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
        ])
        self.act = get_activation(activation)
        h, w = space.shape[0], space.shape[1]
        for _ in self.convs:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.out_dim = 32 * h * w

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().permute(0, 3, 1, 2) * self.scale
        for conv in self.convs:
            x = self.act(conv(x))
        return x.flatten(1)


def _leaves(space: gym.Space, activation: str, path: Path = ()) -> list[tuple[Path, _Leaf]]:
    if isinstance(space, gym.spaces.Dict):
        return [leaf for key, sub in space.spaces.items() for leaf in _leaves(sub, activation, path + (key,))]
    if isinstance(space, gym.spaces.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in _leaves(sub, activation, path + (i,))]
    if isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        return [(path, _OneHot(space))]
    if isinstance(space, gym.spaces.Box) and len(space.shape) <= 2:
        return [(path, _Flatten(space))]
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 3:
        return [(path, _ImageCNN(space, activation))]
    where = f" at {list(path)}" if path else ""
    raise ValueError(f"TrajEncoderRLModule cannot encode the observation space {space}{where}; "
                     f"supported: {SUPPORTED_OBS}")


class TstepEncoder(nn.Module):
    """Observation (any supported space, nested like the space) -> [*lead, tstep_dim].

    With ``time_scale`` set, ``t / time_scale`` (t = the step's episode time index) joins the
    observation features before the MLP; ``input_gain`` is the MLP's.
    """

    def __init__(self, obs_space: gym.Space, tstep_dim: int, hiddens: Sequence[int], activation: str,
                 time_scale: Optional[float] = None, input_gain: float = 1.0):
        super().__init__()
        paths, leaves = zip(*_leaves(obs_space, activation))
        self.paths: list[Path] = list(paths)
        self.leaves = nn.ModuleList(leaves)
        self.time_scale = time_scale
        n_features = sum(leaf.out_dim for leaf in leaves) + (time_scale is not None)
        self.mlp = MLP(n_features, hiddens, tstep_dim, activation, input_gain)

    def lead_shape_and_device(self, obs: Any) -> tuple[torch.Size, torch.device]:
        """The (batch,) or (batch, time) dims in front of the observations, and their device."""
        x = self._leaf_input(obs, self.paths[0])
        return x.shape[:x.dim() - len(self.leaves[0].event_shape)], x.device

    def forward(self, obs: Any, time_idxs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``time_idxs``: [*lead, 1] episode time indices, needed when ``time_scale`` is set."""
        parts = [leaf(self._leaf_input(obs, path)) for path, leaf in zip(self.paths, self.leaves)]
        if self.time_scale is not None:
            parts.append(time_idxs.to(parts[0].dtype) / self.time_scale)
        return self.mlp(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    @staticmethod
    def _leaf_input(obs: Any, path: Path) -> torch.Tensor:
        for key in path:
            obs = obs[key]
        return obs
