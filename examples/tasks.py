"""Memory tasks and the PPO settings tuned for each of our encoders on them.

Each task names a registered env, a stop target and per-encoder configs. The settings
here are the ones the README's results table was recorded with.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import gymnasium as gym
import ray
from ray.tune.registry import register_env


@dataclass(frozen=True)
class Task:
    """An env plus what "solved" means and the hyperparameters that solve it."""

    env: str
    make_env: Callable[[dict], gym.Env]
    env_config: dict[str, Any]
    target_return: float
    max_env_steps: int
    max_seq_len: int
    ppo: dict[str, Any] = field(default_factory=dict)
    # AlgorithmConfig.env_runners() settings the task needs (every contender gets them).
    env_runners: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Other model_config keys (with_traj_encoder's keyword arguments) for all of our encoders,
    # and for one of them only (overriding those).
    module: dict[str, Any] = field(default_factory=dict)
    encoder_module: dict[str, dict[str, Any]] = field(default_factory=dict)
    # AlgorithmConfig.multi_agent() settings for a multi-agent env (empty: single-agent).
    multi_agent: dict[str, Any] = field(default_factory=dict)
    # Encoders whose recorded run (README table, docs/results/) reached target_return with
    # these settings; the others run with the same settings but carry no such promise.
    tuned: tuple[str, ...] = ()

    def traj_encoder_kwargs(self, encoder: str) -> dict[str, Any]:
        """with_traj_encoder's keyword arguments for one of our encoders on this task."""
        return {"max_seq_len": self.max_seq_len, **self.module, **self.encoder_module.get(encoder, {}),
                "encoder_config": {**SMALL_ENCODERS[encoder], **self.encoders.get(encoder, {})}}


def _stateless_cartpole(config: dict) -> gym.Env:
    from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole
    return StatelessCartPole(config)


def _multi_agent_stateless_cartpole(config: dict) -> Any:
    from ray.rllib.examples.envs.classes.multi_agent import MultiAgentStatelessCartPole
    return MultiAgentStatelessCartPole(config)


def _policy_per_agent(agent_id: Any, *args: Any, **kwargs: Any) -> str:
    return f"p{agent_id}"


def _recall_each_other(config: dict) -> Any:
    from examples.recall_each_other import RecallEachOther
    return RecallEachOther(config)


def _delayed_recall(config: dict) -> gym.Env:
    from rllib_trajenc.envs import DelayedRecall
    return DelayedRecall(config)


def _popgym(name: str, previous_action: bool = False) -> Callable[[dict], gym.Env]:
    """A POPGym env; ``previous_action`` adds the last action to each observation (POPGym's own
    wrapper, as its benchmark does) where observations are meaningless without it."""
    def make(config: dict) -> gym.Env:
        import popgym.envs as envs
        from popgym.wrappers import PreviousAction
        env = getattr(envs, name)(**config)
        return PreviousAction(env) if previous_action else env
    return make


# Encoder sizes shared by every task unless a task overrides them: small enough for CPU
# env runners, big enough to solve these tasks.
SMALL_ENCODERS: dict[str, dict[str, Any]] = {
    "ff": {"d_model": 64, "n_layers": 2},
    "gru": {"d_hidden": 64, "n_layers": 1, "d_output": 64},
    "mamba": {"d_model": 64, "d_state": 16, "n_layers": 2},
    "transformer": {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_layers": 2,
                    "dropout_ff": 0.0, "dropout_emb": 0.0},
}

PPO_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4, "gamma": 0.99, "lambda_": 0.95, "num_epochs": 6, "minibatch_size": 512,
    "train_batch_size_per_learner": 2048, "entropy_coeff": 0.0, "vf_loss_coeff": 0.5,
    "grad_clip": 1.0,
}

# RepeatPrevious: the reward for an action does not depend on later actions, so a short
# horizon (gamma 0.5) turns it into near-supervised learning of "the suit k cards ago".
# The same holds for every task whose step reward scores only that step's action.
REPEAT_PREVIOUS_PPO: dict[str, Any] = {
    "gamma": 0.5, "lambda_": 0.9, "lr": 1e-3, "entropy_coeff": 0.01, "minibatch_size": 256,
}

# DelayedRecall: the answer's reward comes at the query, after `delay` unrewarded steps.
DELAYED_RECALL_PPO: dict[str, Any] = {"gamma": 0.999, "lambda_": 0.99, "entropy_coeff": 0.003}


# Mamba for recall across hundreds of noisy steps: the long-memory SSM initialisation, and no norm
# before each block, which would rescale every blank step's noise to the cue's size
# (benchmarks/mamba_init.py).
LONG_RECALL_MAMBA: dict[str, Any] = {"norm": "none", "ssm_init": "long_memory"}
# At delay 400, also a timestep encoder that learns 10x faster, so the input weights single out
# the cue among the noise features early: without it Mamba stayed at chance within 1M env steps
# (BENCHMARKS.md). delayed_recall_100 was recorded without it.
LONG_RECALL_MAMBA_MODULE: dict[str, Any] = {"tstep_input_gain": 10.0}


def _long_recall(delay: int, max_seq_len: int, minibatch_size: int, tuned: tuple[str, ...] = (),
                 mamba_module: Optional[dict[str, Any]] = None) -> Task:
    """DelayedRecall with the cue ``delay`` steps back, in a window (``max_seq_len``) covering it.

    Fragments of exactly one episode per env make every episode one whole learner row: a row cut
    from an episode's middle starts from the state its env runner stored, through which no
    gradient reaches the cue (for the Transformer, the cue's cached keys and values). Only the
    query's action is scored, so the short horizon of REPEAT_PREVIOUS_PPO fits (with gamma 0.999
    every step's value target is the answer's +-1, unpredictable until the cue is remembered).
    32 episodes per iteration, because the target is judged on one iteration's mean return: 31
    right of 32 is out of a memory-free policy's reach, 8 of 8 is not (1 in 256 iterations);
    minibatches of about 10 episodes. Linear timestep encoder and heads (RLlib's LSTM's heads are
    linear too): at delay 400, with the default MLPs the Transformer learned on 2 of 3 seeds
    within 1M env steps, with linear ones on 3 of 3 in under half the env steps (BENCHMARKS.md;
    benchmarks/recall_ppo.py, without RLlib). Mamba runs LONG_RECALL_MAMBA here, with
    ``mamba_module`` (its other model_config keys) besides.
    """
    episode = delay + 2
    return Task(
        env="DelayedRecall", make_env=_delayed_recall, env_config={"delay": delay},
        target_return=0.9, max_env_steps=1_000_000, max_seq_len=max_seq_len,
        env_runners={"rollout_fragment_length": episode},
        ppo={"gamma": 0.5, "lambda_": 0.9, "lr": 1e-3, "entropy_coeff": 0.003,
             "train_batch_size_per_learner": 32 * episode, "minibatch_size": minibatch_size},
        encoders={"transformer": {"pos_emb": "rope"}, "mamba": LONG_RECALL_MAMBA},
        module={"tstep_hiddens": [], "head_hiddens": []},
        encoder_module={"mamba": mamba_module or {}}, tuned=tuned)


STATELESS_CARTPOLE_PPO: dict[str, Any] = {"lr": 5e-4, "vf_loss_coeff": 0.01, "train_batch_size_per_learner": 1024,
                                          "minibatch_size": 256}

TASKS: dict[str, Task] = {
    "stateless_cartpole": Task(
        env="StatelessCartPole", make_env=_stateless_cartpole, env_config={},
        target_return=150.0, max_env_steps=400_000, max_seq_len=32,
        ppo=STATELESS_CARTPOLE_PPO,
        tuned=("gru", "mamba", "transformer")),
    # Two agents, each on its own StatelessCartPole, each with its own policy and encoder; the
    # episode return is the two agents' sum, so the target is stateless_cartpole's for each.
    "multi_agent_stateless_cartpole": Task(
        env="MultiAgentStatelessCartPole", make_env=_multi_agent_stateless_cartpole,
        env_config={"num_agents": 2}, target_return=300.0, max_env_steps=800_000, max_seq_len=32,
        ppo=STATELESS_CARTPOLE_PPO,
        multi_agent={"policies": {"p0", "p1"}, "policy_mapping_fn": _policy_per_agent}, tuned=("gru",)),
    # Each agent repeats, 10 noisy steps later, the first action the other took (seen once):
    # only the query's action is scored, so REPEAT_PREVIOUS_PPO's short horizon fits.
    "multi_agent_recall_each_other": Task(
        env="RecallEachOther", make_env=_recall_each_other, env_config={"delay": 10},
        target_return=1.8, max_env_steps=400_000, max_seq_len=32, ppo=REPEAT_PREVIOUS_PPO,
        multi_agent={"policies": {"pa", "pb"}, "policy_mapping_fn": _policy_per_agent}, tuned=("gru",)),
    "delayed_recall": Task(
        env="DelayedRecall", make_env=_delayed_recall, env_config={"delay": 100},
        target_return=0.9, max_env_steps=600_000, max_seq_len=128,
        ppo=DELAYED_RECALL_PPO, tuned=("transformer",)),
    # delayed_recall's delay with the long-recall settings below.
    "delayed_recall_100": _long_recall(100, max_seq_len=128, minibatch_size=1024, tuned=("mamba",)),
    "delayed_recall_400": _long_recall(400, max_seq_len=512, minibatch_size=4096, tuned=("mamba", "transformer"),
                                       mamba_module=LONG_RECALL_MAMBA_MODULE),
    "delayed_recall_1000": _long_recall(1000, max_seq_len=1024, minibatch_size=10_240,
                                        mamba_module=LONG_RECALL_MAMBA_MODULE),
    "popgym_repeat_previous_easy": Task(
        env="RepeatPreviousEasy", make_env=_popgym("RepeatPreviousEasy"), env_config={},
        target_return=0.9, max_env_steps=600_000, max_seq_len=64,
        ppo=REPEAT_PREVIOUS_PPO, tuned=("gru", "mamba", "transformer")),
    "popgym_position_only_cartpole_easy": Task(
        env="PositionOnlyCartPoleEasy", make_env=_popgym("PositionOnlyCartPoleEasy"), env_config={},
        target_return=0.9, max_env_steps=600_000, max_seq_len=64,
        ppo={"lr": 5e-4, "minibatch_size": 256}, tuned=("gru", "mamba", "transformer")),
    # Three more kinds of POPGym Easy task, for the breadth comparison with RLlib's LSTM
    # (BENCHMARKS.md). Every step's reward scores that step's action alone, so the short
    # horizon of REPEAT_PREVIOUS_PPO fits them too. Targets were fixed before any run.
    "popgym_count_recall_easy": Task(  # counting: how often has this card's value been dealt?
        env="CountRecallEasy", make_env=_popgym("CountRecallEasy"), env_config={},
        target_return=0.0, max_env_steps=600_000, max_seq_len=64, ppo=REPEAT_PREVIOUS_PPO,
        tuned=("transformer",)),
    "popgym_autoencode_easy": Task(  # autoencoding: play the dealt cards back in reverse
        env="AutoencodeEasy", make_env=_popgym("AutoencodeEasy"), env_config={},
        target_return=0.0, max_env_steps=600_000, max_seq_len=128, ppo=REPEAT_PREVIOUS_PPO,
        tuned=("transformer",)),
    "popgym_minesweeper_easy": Task(  # a game: reveal the 14 safe cells of a 4x4 board
        # Each observation counts the mines next to the cell just clicked: which cell, the
        # previous action says.
        env="MineSweeperEasy", make_env=_popgym("MineSweeperEasy", previous_action=True),
        env_config={}, target_return=0.5, max_env_steps=600_000, max_seq_len=32,
        # A mine ends the game and forfeits the cells still to reveal: a longer horizon here.
        ppo={**REPEAT_PREVIOUS_PPO, "gamma": 0.9}),
    "popgym_repeat_previous_medium": Task(
        env="RepeatPreviousMedium", make_env=_popgym("RepeatPreviousMedium"), env_config={},
        # The suit 32 cards ago: a 64-step window covers it with room to spare.
        target_return=0.9, max_env_steps=1_500_000, max_seq_len=64,
        ppo=REPEAT_PREVIOUS_PPO, tuned=("transformer",)),
}


def register(task: Task) -> None:
    """Registers the task's env under ``task.env``. Its maker ships by value, because env runners
    on other processes or nodes may not find this module on their path."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register_env(task.env, task.make_env)
