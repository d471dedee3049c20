"""The connector pieces ``with_traj_encoder`` adds to a config, composed with the user's own.

* ``AddPrevActionReward`` (env-to-module) when model_config asks for previous action/reward;
* the compact-state pieces (compact_state.py) on env runners and learners, for any number of
  learners (the store survives RLlib's sharding of episode chunks across them).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Optional

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from rllib_trajenc.rllib import compact_state
from rllib_trajenc.rllib.prev_action_reward import AddPrevActionReward

if TYPE_CHECKING:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    from rllib_trajenc.rllib.config import TrajEncoderModelConfig


class _UserPiecesThen:
    """A picklable connector builder: the user's own builder's pieces (if any), then ours.

    RLlib runs pieces from ``config.env_runners(env_to_module_connector=...)`` and
    ``config.learners(learner_connector=...)`` before its defaults, which then find their
    columns filled and step aside; PPO still prepends its bootstrap step and appends GAE.
    """

    def __init__(self, user_builder: Optional[Callable], ours: Callable[[], list[ConnectorV2]]):
        while isinstance(user_builder, _UserPiecesThen):  # installing twice replaces, not nests
            user_builder = user_builder.user_builder
        self.user_builder, self.ours = user_builder, ours

    def __call__(self, *args: Any) -> list[ConnectorV2]:
        user = self.user_builder(*args) if self.user_builder is not None else []
        return ([user] if isinstance(user, ConnectorV2) else list(user)) + self.ours(*args)


def _env_to_module_pieces(prev_action: bool, prev_reward: bool, env: Any, *_: Any) -> list[ConnectorV2]:
    # Checked again when env runners build their pipelines: .multi_agent() may come after
    # with_traj_encoder, which checks too.
    if isinstance(getattr(env, "unwrapped", env), MultiAgentEnv):
        raise ValueError("with_traj_encoder supports single-agent configs only, but the env runner "
                         f"steps the multi-agent env {env}")
    pieces: list[ConnectorV2] = []
    if prev_action or prev_reward:
        pieces.append(AddPrevActionReward(prev_action=prev_action, prev_reward=prev_reward))
    return pieces + compact_state.env_to_module_pieces()


def _learner_pieces(*_: Any) -> list[ConnectorV2]:
    return compact_state.learner_pieces()


def install_connectors(config: AlgorithmConfig, model: TrajEncoderModelConfig) -> AlgorithmConfig:
    config = config.env_runners(env_to_module_connector=_UserPiecesThen(
        config._env_to_module_connector,
        functools.partial(_env_to_module_pieces, model.prev_action, model.prev_reward)))
    return config.learners(learner_connector=_UserPiecesThen(
        config._learner_connector, _learner_pieces))
