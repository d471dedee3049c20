"""Optional RL^2-style inputs: previous action, previous reward and the episode time feature."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole
from ray.rllib.utils.metrics import LEARNER_RESULTS

from rllib_trajenc.rllib import with_traj_encoder
from rllib_trajenc.rllib.prev_action_reward import (
    OBS, PREV_ACTION, PREV_REWARD, AddPrevActionReward, augmented_space,
)
from conftest import (
    ENCODER_CONFIGS, MAX_SEQ_LEN, SMALL_NETS, build_module, logp_error, ppo_config, sample_and_recompute,
)

TIME_SCALE = 50.0


@pytest.fixture(scope="module", params=["gru", "transformer"])
def rl2_ppo(request, ray_session):
    config = with_traj_encoder(ppo_config(), request.param, max_seq_len=MAX_SEQ_LEN,
                               encoder_config=ENCODER_CONFIGS[request.param], prev_action=True,
                               prev_reward=True, time_scale=TIME_SCALE, **SMALL_NETS)
    algo = config.build_algo()
    yield algo
    algo.stop()


def test_observations_carry_previous_action_and_reward(rl2_ppo):
    episodes = [e for _ in range(5) for e in rl2_ppo.env_runner.sample(num_timesteps=30, explore=True)]
    module = rl2_ppo.env_runner.module
    env = StatelessCartPole()
    assert module.observation_space == augmented_space(env.observation_space, env.action_space, True, True)
    assert any(e.t_started > 0 for e in episodes)
    for episode in episodes:
        obs, actions, rewards = episode.get_observations(), episode.get_actions(), episode.get_rewards()
        for i in range(1, len(episode) + 1):
            assert obs[PREV_ACTION][i] == actions[i - 1]
            assert obs[PREV_REWARD][i, 0] == np.float32(rewards[i - 1])
        if episode.t_started == 0:
            assert obs[PREV_ACTION][0] == 2 and obs[PREV_REWARD][0, 0] == 0.0  # "no action yet"
        else:  # a continued chunk starts from the observation its predecessor wrapped
            assert obs[PREV_ACTION][0] in (0, 1) and obs[PREV_REWARD][0, 0] == 1.0


def test_learner_recomputes_rollout_logp_with_rl2_inputs(rl2_ppo):
    _, batch, module = sample_and_recompute(rl2_ppo)
    assert logp_error(module, batch) <= 1e-4
    # The time feature is an input: shifting the episode step changes the policy.
    state = batch[Columns.STATE_IN]
    shifted = {**batch, Columns.STATE_IN: {**state, "t": state["t"] + 1000}}
    assert logp_error(module, shifted) > 1e-3
    stats = rl2_ppo.train()[LEARNER_RESULTS][DEFAULT_MODULE_ID]  # and PPO trains on them
    assert np.isfinite(stats["total_loss"]) and np.isfinite(stats["vf_loss"])


@pytest.mark.parametrize("action_space, prev_space, none", [
    (gym.spaces.Discrete(3), gym.spaces.Discrete(4), 3),
    (gym.spaces.MultiDiscrete([2, 5]), gym.spaces.MultiDiscrete([3, 6]), [2, 5]),
    (gym.spaces.Box(-1.0, 1.0, (2,), np.float32), gym.spaces.Box(-np.inf, np.inf, (2,), np.float32), [0, 0]),
])
def test_prev_action_space_has_a_none_value(action_space, prev_space, none):
    obs_space = gym.spaces.Discrete(5)
    space = augmented_space(obs_space, action_space, prev_action=True, prev_reward=False)
    assert space == gym.spaces.Dict({OBS: obs_space, PREV_ACTION: prev_space})
    piece = AddPrevActionReward(obs_space, action_space, prev_action=True, prev_reward=False)
    episode = SingleAgentEpisode(observation_space=obs_space, action_space=action_space)
    episode.add_env_reset(observation=4)
    piece(rl_module=None, batch={}, episodes=[episode])
    first = episode.get_observations(0)
    assert first[OBS] == 4 and np.array_equal(first[PREV_ACTION], none)
    assert space.contains({OBS: 4, PREV_ACTION: np.asarray(none, space[PREV_ACTION].dtype)})


def test_unsupported_action_space_is_rejected():
    with pytest.raises(ValueError, match="prev_action=True supports Discrete, MultiDiscrete and Box"):
        augmented_space(gym.spaces.Discrete(2), gym.spaces.Tuple([gym.spaces.Discrete(2)]), True, False)


def test_plain_spec_with_prev_action_points_at_the_helper():
    with pytest.raises(ValueError, match=r"\['prev_action'\].*with_traj_encoder"):
        build_module(prev_action=True)


@pytest.mark.parametrize("key, value, message", [
    ("prev_action", "yes", "prev_action='yes' must be True or False"),
    ("prev_reward", 1, "prev_reward=1 must be True or False"),
    ("time_scale", 0, "time_scale=0 must be a positive number"),
    ("time_scale", "long", "time_scale='long' must be a positive number"),
])
def test_bad_rl2_settings_fail_at_config_time(key, value, message):
    with pytest.raises(ValueError, match=message):
        with_traj_encoder(ppo_config(), "gru", max_seq_len=MAX_SEQ_LEN, **{key: value})


def test_time_feature_needs_a_stateful_encoder():
    with pytest.raises(ValueError, match="time_scale=10.0 needs an encoder with memory; FFTrajEncoder keeps no state"):
        with_traj_encoder(ppo_config(), "ff", max_seq_len=MAX_SEQ_LEN, time_scale=10.0)


def test_prev_action_piece_stays_with_several_learners():
    """With several learners the env runners still add the RL^2 inputs."""
    config = with_traj_encoder(ppo_config().learners(num_learners=2), "gru", max_seq_len=MAX_SEQ_LEN,
                               prev_action=True)
    assert any(isinstance(p, AddPrevActionReward) for p in config._env_to_module_connector(None, None, None))


def test_time_feature_is_t_over_scale():
    encoder = build_module(time_scale=TIME_SCALE).tstep_encoder
    obs, t = torch.randn(2, 3, 2), torch.arange(6).view(2, 3, 1)
    torch.testing.assert_close(encoder(obs, t), encoder.mlp(torch.cat([obs, t / TIME_SCALE], -1)))
