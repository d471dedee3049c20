"""Multi-agent PPO: a TrajEncoderRLModule per policy (shared by the agents mapped to it), and the
learner still recomputes every policy's rollout, per agent, when agents act on different steps,
end early or join late, across RLlib's cuts and its sharding over learners."""
from __future__ import annotations

import copy
import functools
import pickle
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray import cloudpickle
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from rllib_trajenc.rllib import TrajEncoderRLModule, with_traj_encoder
from rllib_trajenc.rllib.compact_state import (
    STORE_COLUMN, StateStore, _bare, agent_stores, copy_to_numpy, shipped_state_bytes,
)
from rllib_trajenc.rllib.module import TIME_KEY
from rllib_trajenc.rllib.prev_action_reward import OBS, PREV_ACTION, PREV_REWARD
from examples.recall_each_other import RecallEachOther
from conftest import ENCODER_CONFIGS, MAX_SEQ_LEN, SMALL_NETS, logp_error, ppo_config

JOINS, ENDS = 3, 6  # env steps at which agent "c" joins and agent "b" terminates


class TurnTaking(MultiAgentEnv):
    """Agent "a" acts at every env step, "b" at every other one (its actions wait for its next
    observation) until it terminates at step ENDS, "c" joins at step JOINS; episodes last 9-15
    steps, so RLlib's cuts fall anywhere in them. Observations are noise, rewards the actions."""

    def __init__(self, config: Any = None):
        super().__init__()
        self.possible_agents = ["a", "b", "c"]
        self.observation_spaces = {agent: gym.spaces.Box(-1.0, 1.0, (2,), np.float32) for agent in self.possible_agents}
        self.action_spaces = {agent: gym.spaces.Discrete(2) for agent in self.possible_agents}
        self.rng = np.random.default_rng(0)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t, self.length, self.agents = 0, int(self.rng.integers(9, 16)), ["a", "b"]
        return self._observe(self.agents), {}

    def step(self, actions):
        self.t += 1
        if self.t == JOINS:
            self.agents.append("c")
        rewards = {agent: float(actions.get(agent, 0)) for agent in self.agents}
        seeing = [agent for agent in self.agents if agent != "b" or self.t % 2 == 0]
        terminateds = {"__all__": False, **({"b": True} if self.t == ENDS else {})}
        if self.t == ENDS:
            self.agents.remove("b")
        return self._observe(seeing), rewards, terminateds, {"__all__": self.t >= self.length}, {}

    def _observe(self, agents: list[str]) -> dict[str, np.ndarray]:
        return {agent: self.rng.uniform(-1, 1, 2).astype(np.float32) for agent in agents}


def small(encoder: str) -> dict[str, Any]:
    """A policy's entry for with_traj_encoder: ``encoder`` at the tests' small sizes."""
    return {"encoder": encoder, "encoder_config": ENCODER_CONFIGS[encoder]}


def policy_of(mapping: dict[str, str], agent: str, *_: Any, **__: Any) -> str:
    return mapping[agent]


def turn_taking(policies: set[str], mapping: dict[str, str]) -> AlgorithmConfig:
    # A picklable mapping: multi-agent episodes keep it, and they are pickled on their way to learners.
    return (ppo_config().environment(TurnTaking)
            .multi_agent(policies=policies, policy_mapping_fn=functools.partial(policy_of, mapping)))


# "a" and "c" share the policy "pair"; "b", which acts every other step and ends early, is "solo".
PAIR_AND_SOLO = ({"pair", "solo"}, {"a": "pair", "b": "solo", "c": "pair"})


def two_policies(pair: str, solo: str, **model_config: Any) -> AlgorithmConfig:
    return with_traj_encoder(turn_taking(*PAIR_AND_SOLO), {"pair": small(pair), "solo": small(solo)},
                             max_seq_len=MAX_SEQ_LEN, **SMALL_NETS, **model_config)


def sample(algo: Algorithm, calls: int = 6) -> list:
    """Several sample() calls (so chunks continue episodes), as the driver receives them."""
    return pickle.loads(pickle.dumps(
        [e for _ in range(calls) for e in algo.env_runner.sample(num_timesteps=31, explore=True)]))


def shards(episodes: list, num_learners: int, lookback: int) -> list[list]:
    """What each learner trains on (copies: the learner connector changes its episodes): the local
    learner's episodes, or exactly the split LearnerGroup.update makes for remote learners, each
    shard shipped as Ray ships it."""
    if num_learners == 0:
        return [copy.deepcopy(episodes)]
    parts = TrainingData(episodes=episodes).shard(num_shards=num_learners, len_lookback_buffer=lookback,
                                                 minibatch_size=32)
    return [pickle.loads(pickle.dumps(part.episodes)) for part, _ in parts]


def logp_errors(algo: Algorithm, episodes: list) -> dict[str, float]:
    """Max |learner log-prob - rollout log-prob| per policy, with a learner module of its own
    (a train-mode forward may change it: sigma-reparam's power step)."""
    learner = algo.learner_group._learner
    module = copy.deepcopy(learner.module)
    batch = learner._learner_connector(rl_module=module, batch={}, episodes=episodes, shared_data={},
                                       metrics=learner.metrics)
    with torch.no_grad():
        return {policy: logp_error(module[policy], batch[policy]) for policy in batch}


def offsets(episodes: list) -> list[int]:
    """Where each agent's piece starts in the agent chunk it was cut from."""
    return [agent.t_started - agent.get_extra_model_outputs(STORE_COLUMN, 0).t_started
            for episode in episodes for agent in episode.agent_episodes.values()
            if STORE_COLUMN in agent.extra_model_outputs and len(agent)]


def sliceable(episode) -> bool:
    """RLlib 2.60 slices a multi-agent chunk only if all its agents have equal lookbacks, which a cut
    breaks where an agent's action waited across it (RLlib's own LSTM setup fails the same way)."""
    return len({agent.observations.lookback for agent in episode.agent_episodes.values()}) == 1


def trainable(part: list) -> bool:
    """RLlib 2.60's own learner pipeline (its LSTM's too) fails on a piece in which an agent that
    ended before the piece has no step (PPO's AddOneTsToEpisodesAndTruncate)."""
    return bool(part) and all(len(agent) or not agent.is_done for e in part for agent in e.agent_episodes.values())


def cut_mid_row(episodes: list, lookback: int) -> list[list]:
    """A chunk cut as two learners' shards, so that some agent's piece starts mid-row, among the
    chunks whose pieces RLlib itself can train on."""
    for chunk in sorted(filter(sliceable, episodes), key=len, reverse=True):
        parts = shards([chunk], 2, lookback)
        if all(map(trainable, parts)) and any(o % MAX_SEQ_LEN for part in parts for o in offsets(part)):
            return parts
    raise AssertionError("no chunk of the sample can be cut mid-row")


def assert_exact_for_every_learner_count(algo: Algorithm, episodes: list, label: str) -> None:
    lookback = algo.config.episode_lookback_horizon
    for num_learners in (0, 1, 2):
        parts = shards(episodes, num_learners, lookback)
        if num_learners == 2:  # the hard case for sure: agents' pieces that start mid-row
            parts += cut_mid_row(episodes, lookback)
        for part in parts:
            errors = logp_errors(algo, part)
            print(f"{label}, {num_learners} learners: max |logp diff| {errors}")
            assert errors and max(errors.values()) <= 1e-4, errors


def assert_agents_come_and_go(episodes: list) -> None:
    """The sample has what the test is about: "b" terminated mid-episode, "c" joined late."""
    assert any(e.agent_episodes["b"].is_terminated and e.env_t > ENDS for e in episodes if "b" in e.agent_episodes)
    assert any(e.env_t_started == 0 and e.env_t > JOINS and "c" in e.agent_episodes for e in episodes)


@pytest.mark.parametrize("pair, solo", [("gru", "transformer"), ("ff", "mamba")])
def test_two_policies_with_their_own_encoders_recompute_the_rollout_and_train(ray_session, pair, solo):
    algo = two_policies(pair, solo).build_algo()
    try:
        modules = algo.env_runner.module
        assert [modules[p].model_config["traj_encoder"] for p in ("pair", "solo")] == [pair, solo]
        episodes = sample(algo)
        assert_agents_come_and_go(episodes)
        assert_exact_for_every_learner_count(algo, episodes, f"pair={pair}, solo={solo}")
        # One env-runner row per (env, agent) that acts under the policy, reused as agents end.
        n_envs = algo.config.num_envs_per_env_runner
        for policy, agents in (("pair", 2), ("solo", 1)):
            if modules[policy].is_stateful():
                assert modules[policy]._rollout.n_rows <= agents * n_envs
        results = algo.train()["learners"]
        assert {"pair", "solo"} <= set(results)
    finally:
        algo.stop()


def test_one_encoder_shared_by_every_agent(ray_session):
    """Parameter sharing: three agents, acting on different steps, on one policy's module rows."""
    config = turn_taking({"shared"}, {"a": "shared", "b": "shared", "c": "shared"})
    algo = with_traj_encoder(config, "transformer", max_seq_len=MAX_SEQ_LEN,
                             encoder_config=ENCODER_CONFIGS["transformer"], **SMALL_NETS).build_algo()
    try:
        assert isinstance(algo.config.rl_module_spec, MultiRLModuleSpec)
        episodes = sample(algo)
        assert_exact_for_every_learner_count(algo, episodes, "shared transformer")
        assert algo.env_runner.module["shared"]._rollout.n_rows <= 3 * algo.config.num_envs_per_env_runner
        assert "shared" in algo.train()["learners"]
    finally:
        algo.stop()


def test_a_waiting_agents_start_state_across_a_cut_is_replayed(ray_session, monkeypatch):
    """Teeth: "b"'s action waits for its next observation, so at a cut its running state is already
    past the successor chunk's first step; copying that state instead of replaying is wrong."""
    algo = two_policies("gru", "gru").build_algo()
    try:
        assert max(logp_errors(algo, sample(algo)).values()) <= 1e-4
        monkeypatch.setattr(StateStore, "state_after_chunk", lambda store: copy_to_numpy(store.running))
        assert logp_errors(algo, sample(algo))["solo"] > 1e-4
    finally:
        algo.stop()


def test_previous_action_reward_and_time_are_each_agents_own(ray_session):
    algo = two_policies("gru", "mamba", prev_action=True, prev_reward=True, time_scale=16.0).build_algo()
    try:
        runner = algo.env_runner
        episodes = [e for _ in range(3) for e in runner.sample(num_timesteps=31, explore=True)]
        for agent in (a for e in episodes for a in e.agent_episodes.values() if len(a)):
            obs, steps = agent.get_observations(slice(0, len(agent) + 1)), slice(0, len(agent))
            if agent.t_started == 0:
                assert obs[PREV_ACTION][0] == 2 and obs[PREV_REWARD][0][0] == 0.0  # Discrete(2): 2 = none
            assert np.array_equal(obs[PREV_ACTION][1:], agent.get_actions(steps))
            # "b" gets the rewards of the steps its action waited through, summed (as RLlib does).
            assert np.allclose(obs[PREV_REWARD][1:, 0], agent.get_rewards(steps))
            assert obs[OBS].shape == (len(agent) + 1, 2)
        # Each agent's row counts its own steps: the time index of its next step.
        prepared = [episode.agent_episodes[agent_id] for episode in runner._ongoing_episodes
                    for agent_id in agent_stores(episode).stepped]
        assert {agent.agent_id for agent in prepared} >= {"a", "c"}
        for agent in prepared:
            rows = runner.module[agent.module_id]._rollout
            assert int(rows.tensors[TIME_KEY][rows._row_of[agent.id_]]) == agent.t
        assert_exact_for_every_learner_count(algo, pickle.loads(pickle.dumps(episodes)), "prev action/reward, time")
    finally:
        algo.stop()


def test_trains_on_a_remote_learner(ray_session):
    """The pieces and both policies' modules travel to a learner actor (the env and the mapping of
    this file go by value: the actor cannot import test modules). Two remote learners are left to
    the simulated shards above: on this env RLlib 2.60's DDP learners hung or lost a gloo peer in
    some runs, RLlib's own LSTM module too."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        algo = two_policies("mamba", "transformer").learners(num_learners=1).build_algo()
        try:
            assert {"pair", "solo"} <= set(algo.train()["learners"])
        finally:
            algo.stop()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def act(module: TrajEncoderRLModule, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic actions and logits of 3 episodes over ``steps`` seeded random observations."""
    torch.manual_seed(1)
    state = {k: torch.as_tensor(v).expand(3, *v.shape) for k, v in module.get_initial_state().items()}
    for _ in range(steps):
        with torch.no_grad():
            out = module.forward_inference({Columns.OBS: torch.randn(3, 1, 2), Columns.STATE_IN: state})
        state = out[Columns.STATE_OUT]
    logits = out[Columns.ACTION_DIST_INPUTS]
    return logits, module.get_inference_action_dist_cls().from_logits(logits).to_deterministic().sample()


def test_checkpoint_round_trip_restores_every_policys_encoder(ray_session, tmp_path):
    algo = two_policies("mamba", "transformer").build_algo()
    try:
        algo.train()
        algo.save_to_path(tmp_path)
        restored = Algorithm.from_checkpoint(tmp_path)
        try:
            for policy in ("pair", "solo"):
                (logits, actions), expected = act(restored.get_module(policy)), act(algo.get_module(policy))
                assert torch.equal(logits, expected[0]) and torch.equal(actions, expected[1])
            errors = logp_errors(restored, sample(restored, calls=3))
            assert set(errors) == {"pair", "solo"} and max(errors.values()) <= 1e-4
        finally:
            restored.stop()
    finally:
        algo.stop()


@pytest.mark.parametrize("encoders, message", [
    ({"pair": small("gru"), "solo": {**small("mamba"), "tstep_dims": 8}},
     r"policy 'solo': unknown model_config keys \['tstep_dims'\]; valid keys are \['traj_encoder'"),
    ({"pair": {"encoder": "gru", "encoder_config": {"d_hidden": 0}}, "solo": small("gru")},
     r"policy 'pair': d_hidden=0 must be a positive int"),
    ({"pair": small("gru"), "solo": {"encoder": "lstm"}},
     r"policy 'solo': traj_encoder='lstm' is not supported; choose one of \['ff', 'gru', 'mamba', 'transformer'\]"),
    ({"pair": small("gru"), "solo": {"encoder_config": {}}},
     r"policy 'solo': encoder entry \{'encoder_config': \{\}\} needs an 'encoder' \(one of \['ff', 'gru'"),
    ({"pair": small("gru")},
     r"encoder gives encoders for policies \['pair'\], but the config has policies \['pair', 'solo'\]"),
    ({"pair": small("gru"), "solo": {**small("gru"), "max_seq_len": 64}},
     r"policy 'solo': minibatch_size=32 is smaller than max_seq_len=64"),
    ({"pair": {**small("gru"), "prev_action": True}, "solo": small("gru")},
     r"prev_action must be the same for every policy, got \{'pair': True, 'solo': False\}"),
])
def test_bad_per_policy_settings_name_the_policy_the_value_and_what_is_allowed(encoders, message):
    with pytest.raises(ValueError, match=message):
        with_traj_encoder(turn_taking(*PAIR_AND_SOLO), encoders, max_seq_len=MAX_SEQ_LEN)


def test_encoders_by_policy_need_a_multi_agent_config():
    with pytest.raises(ValueError, match=r"gives encoders by policy, but the config is single-agent: call "
                                         r"config.multi_agent\(policies=...\) first"):
        with_traj_encoder(ppo_config(), {"pair": "gru"}, max_seq_len=MAX_SEQ_LEN)


def test_readme_multi_agent_snippet_builds_one_encoder_per_policy(ray_session):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Multi-agent\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own snippet, run as a user would
    algo = scope["algo"]
    try:
        assert type(algo.get_module("p0").traj_encoder).__name__ == "GRUTrajEncoder"
        assert type(algo.get_module("p1").traj_encoder).__name__ == "TformerTrajEncoder"
        assert algo.get_module("p1").traj_encoder.d_model == 64
    finally:
        algo.stop()


def test_shipped_state_bytes_count_every_agents_store(ray_session):
    """benchmarks/state_bytes.py's multi-agent row: our stores are what the bytes measure, and
    they are gone from the bare copies it subtracts."""
    algo = two_policies("gru", "mamba").build_algo()
    try:
        episodes = sample(algo)
    finally:
        algo.stop()
    assert shipped_state_bytes(episodes) > 0
    bare = [_bare(e) for e in episodes]
    assert shipped_state_bytes(bare) == 0
    assert not any(STORE_COLUMN in a.extra_model_outputs for e in bare for a in e.agent_episodes.values())
    assert all(len(b.agent_episodes[agent]) == len(a) for e, b in zip(episodes, bare)
               for agent, a in e.agent_episodes.items())


def test_sampling_goes_on_when_every_envs_episode_ends_on_the_same_step(ray_session):
    """RecallEachOther's episodes all last delay + 3 steps, so every env's ends on one step and no
    agent acts in that env-to-module pass; STATE_IN must still be there, or RLlib's time-rank
    piece leaves a flag that breaks every later module-to-env pass of the sample() call."""
    config = (ppo_config().environment(RecallEachOther, env_config={"delay": 2})
              .multi_agent(policies={"pa", "pb"}, policy_mapping_fn=functools.partial(policy_of, {"a": "pa", "b": "pb"})))
    algo = with_traj_encoder(config, "gru", encoder_config=ENCODER_CONFIGS["gru"], max_seq_len=MAX_SEQ_LEN,
                             **SMALL_NETS).build_algo()
    try:
        episodes = sample(algo, calls=2)
    finally:
        algo.stop()
    assert sum(e.is_done for e in episodes) >= 2
