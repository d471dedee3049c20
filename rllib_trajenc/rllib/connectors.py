"""The connector pieces ``with_traj_encoder`` adds to a config, composed with the user's own.

* ``AddPrevActionReward`` (env-to-module) when model_config asks for previous action/reward;
* the compact-state pieces (compact_state.py) on env runners and learners, for any number of
  learners (the store survives RLlib's sharding of episode chunks across them); multi-agent
  env runners also refer each step to its store as it is taken (``ReferStepsToStore``).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Optional

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.env.multi_agent_env import MultiAgentEnv
from ray.rllib.env.vector.vector_multi_agent_env import VectorMultiAgentEnv

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


def _env_to_module_pieces(prev_action: bool, prev_reward: bool, multi_agent: bool, env: Any,
                          *_: Any) -> list[ConnectorV2]:
    # Checked when env runners build their pipelines: .multi_agent() may come after
    # with_traj_encoder, whose module spec and pieces were then made for one agent.
    if not multi_agent and isinstance(getattr(env, "unwrapped", env), (MultiAgentEnv, VectorMultiAgentEnv)):
        raise ValueError(f"the env runner steps the multi-agent env {env}, but with_traj_encoder was "
                         "given a single-agent config: call config.multi_agent(...) before with_traj_encoder")
    pieces: list[ConnectorV2] = []
    if prev_action or prev_reward:
        pieces.append(AddPrevActionReward(prev_action=prev_action, prev_reward=prev_reward,
                                          multi_agent=multi_agent))
    return pieces + compact_state.env_to_module_pieces()


def _module_to_env_pieces(*_: Any) -> list[ConnectorV2]:
    return [compact_state.ReferStepsToStore()]


def _learner_pieces(*_: Any) -> list[ConnectorV2]:
    return compact_state.learner_pieces()


def install_connectors(config: AlgorithmConfig, model: TrajEncoderModelConfig) -> AlgorithmConfig:
    """``model``: any policy's (with_traj_encoder checks that all policies agree on prev_action
    and prev_reward, which shape every agent's observations)."""
    config = config.env_runners(env_to_module_connector=_UserPiecesThen(
        config._env_to_module_connector,
        functools.partial(_env_to_module_pieces, model.prev_action, model.prev_reward,
                          config.is_multi_agent)))
    if config.is_multi_agent:
        config = config.env_runners(module_to_env_connector=_UserPiecesThen(
            config._module_to_env_connector, _module_to_env_pieces))
    return config.learners(learner_connector=_UserPiecesThen(
        config._learner_connector, _learner_pieces))
