"""TrajEncoderRLModule in RLlib: the learner recomputes the rollout, PPO trains, bad input fails early.

IMPALA and APPO: test_algorithms.py.
"""
from __future__ import annotations

from typing import Iterator

import gymnasium as gym
import numpy as np
import pytest
import torch
import tree
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_trajenc.nets.ff import FFTrajEncoder
from rllib_trajenc.rllib import config as config_module
from rllib_trajenc.rllib import TrajEncoderRLModule, register_traj_encoder, with_traj_encoder
from conftest import (
    CARTPOLE_OBS, ENCODERS, MAX_SEQ_LEN, build_module, logp_error, model_config, ppo_config,
    sample_and_recompute, with_small_encoder,
)


@pytest.fixture(scope="module", params=ENCODERS)
def ppo(request, ray_session) -> Iterator[Algorithm]:
    algo = with_small_encoder(ppo_config(), request.param).build_algo()
    yield algo
    algo.stop()


def test_learner_recomputes_rollout_logp(ppo):
    """THE key property: PPO's importance ratio starts at exactly 1."""
    episodes, batch, module = sample_and_recompute(ppo)
    # The sample must contain what can go wrong: chunks that continue an episode (state from
    # the lookback buffer), chunks split into several learner rows (state carried across rows),
    # and chunks shorter than max_seq_len (zero padding).
    assert any(e.t_started > 0 for e in episodes)
    assert any(len(e) > MAX_SEQ_LEN for e in episodes)
    assert any(len(e) < MAX_SEQ_LEN for e in episodes)
    assert any(e.is_done for e in episodes)
    # with_traj_encoder keeps the state out of the per-step data (see compact_state.py).
    assert all(Columns.STATE_OUT not in e.extra_model_outputs for e in episodes)

    err = logp_error(module, batch)
    print(f"{module.model_config['traj_encoder']}: max |logp diff| = {err:.2e}")
    assert err <= 1e-4

    if module.is_stateful():
        assert batch[Columns.OBS].shape[1] == MAX_SEQ_LEN
        # The check has teeth: restart every learner row from a zero state and the rows that
        # continue an episode stop matching the rollout.
        wrong = {**batch, Columns.STATE_IN: {k: torch.zeros_like(v) for k, v in batch[Columns.STATE_IN].items()}}
        assert logp_error(module, wrong) > 1e-3


def test_ppo_trains(ppo):
    encoder = ppo.learner_group._learner.module[DEFAULT_MODULE_ID].traj_encoder
    before = [p.detach().clone() for p in encoder.parameters()]
    for _ in range(2):
        result = ppo.train()
    stats = result["learners"][DEFAULT_MODULE_ID]
    assert np.isfinite(stats["total_loss"]) and np.isfinite(stats["vf_loss"])
    # Gradients reach the trajectory encoder (that they reach earlier steps: test_algorithms.py).
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    # After updates and the weight sync, the learner still recomputes what the env runner did.
    _, batch, module = sample_and_recompute(ppo)
    assert logp_error(module, batch) <= 1e-4


@pytest.mark.parametrize("encoder", ENCODERS)
def test_initial_state_is_encoder_state_plus_time_index(encoder):
    module = build_module(encoder=encoder)
    state = module.get_initial_state()
    enc_state = module.traj_encoder.init_hidden_state(1, torch.device("cpu"))
    if enc_state is None:
        assert state == {} and not module.is_stateful()
        return
    assert module.is_stateful()
    assert set(state) == set(enc_state) | {"t"}
    assert state["t"].shape == () and state["t"].dtype == np.int64 and state["t"] == 0
    for key, value in enc_state.items():
        np.testing.assert_array_equal(state[key], value[0].numpy())


@pytest.mark.parametrize("encoder", ENCODERS)
def test_stepping_equals_one_chunk(encoder):
    """Env-runner calls ([B, 1] + STATE_IN) match one learner-style call on the whole chunk."""
    module = build_module(encoder=encoder)
    B, T = 3, MAX_SEQ_LEN + 3  # longer than the transformer's window
    obs = torch.randn(B, T, 2)
    if not module.is_stateful():  # RLlib gives stateless modules no time dim
        steps = module.forward_inference({Columns.OBS: obs.reshape(B * T, 2)})
        whole = module.forward_train({Columns.OBS: obs.reshape(B * T, 2)})
        torch.testing.assert_close(steps[Columns.ACTION_DIST_INPUTS], whole[Columns.ACTION_DIST_INPUTS])
        return
    init = {k: torch.as_tensor(v).expand(B, *v.shape) for k, v in module.get_initial_state().items()}
    state, outs = init, []
    for i in range(T):
        out = module.forward_inference({Columns.OBS: obs[:, i:i + 1], Columns.STATE_IN: state})
        outs.append(out[Columns.ACTION_DIST_INPUTS])
        state = out[Columns.STATE_OUT]
    assert torch.equal(state["t"], torch.full((B,), T))
    with torch.no_grad():
        whole = module.forward_train({Columns.OBS: obs, Columns.STATE_IN: init})
    torch.testing.assert_close(torch.cat(outs, 1), whole[Columns.ACTION_DIST_INPUTS], atol=1e-5, rtol=0)
    values = module.compute_values({Columns.OBS: obs, Columns.STATE_IN: init})
    assert values.shape == (B, T)


def test_target_network_starts_as_a_copy_of_the_policy():
    module = build_module(encoder="transformer")
    module.make_target_networks()
    batch = {Columns.OBS: torch.randn(2, 4, 2),
             Columns.STATE_IN: {k: torch.as_tensor(v).expand(2, *v.shape) for k, v in module.get_initial_state().items()}}
    target = module.forward_target(batch)[TARGET_NETWORK_ACTION_DIST_INPUTS]
    torch.testing.assert_close(target, module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS])
    assert len(module.get_target_network_pairs()) == 3
    assert all(not p.requires_grad for _, net in module.get_target_network_pairs() for p in net.parameters())


def test_inference_only_module_stays_in_eval_mode():
    """Env runners' modules skip RLlib's eval()/train() walk at every step and run under inference
    mode, computing the same."""
    config = model_config("transformer", traj_encoder_config={**model_config("transformer")["traj_encoder_config"],
                                                              "dropout_ff": 0.5})
    spec = RLModuleSpec(module_class=TrajEncoderRLModule, observation_space=CARTPOLE_OBS,
                        action_space=gym.spaces.Discrete(2), model_config=config)
    full, runner_module = spec.build(), RLModuleSpec(**{**vars(spec), "inference_only": True}).build()
    runner_module.set_state(full.get_state(inference_only=True))
    batch = {Columns.OBS: torch.randn(2, 4, 2),
             Columns.STATE_IN: {k: torch.as_tensor(v).expand(2, *v.shape) for k, v in full.get_initial_state().items()}}
    full.train(), runner_module.train()
    expected = full.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS]
    assert full.training  # RLlib's contract for learner-side modules: the mode is restored
    torch.testing.assert_close(runner_module.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS], expected)
    torch.testing.assert_close(runner_module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS], expected)
    assert not any(m.training for m in runner_module.modules())
    # and under inference mode, unlike the learner's module
    assert runner_module.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS].is_inference()
    assert not expected.is_inference()
    # The mode matters here: in train mode the dropout changes the output.
    assert not torch.allclose(full._forward(batch)[Columns.ACTION_DIST_INPUTS], expected)


def _linear_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for layer in module.modules() if isinstance(layer, (torch.nn.Linear, torch.nn.RNNBase))
            for p in layer.parameters(recurse=False) if p.dim() == 2]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_env_runner_module_stores_linear_weights_transposed(encoder):
    """An inference-only module's first step on CPU lays its linear weights out transposed (what
    the CPU GEMM takes faster), computing what the learner's module computes, also after a
    weight sync, which keeps the layout; the learner's module keeps the standard layout."""
    spec = RLModuleSpec(module_class=TrajEncoderRLModule, observation_space=CARTPOLE_OBS,
                        action_space=gym.spaces.Discrete(2), model_config=model_config(encoder))
    full, runner_module = spec.build(), RLModuleSpec(**{**vars(spec), "inference_only": True}).build()
    runner_module.set_state(full.get_state(inference_only=True))
    init = {k: torch.as_tensor(v).expand(3, *v.shape) for k, v in full.get_initial_state().items()}
    batch = {Columns.OBS: torch.randn(3, 1, 2), **({Columns.STATE_IN: init} if init else {})}
    for sync in range(2):
        expected = full.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(runner_module.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS], expected,
                                   atol=1e-6, rtol=0)
        weights = _linear_weights(runner_module)
        assert len(weights) >= 4 and all(w.t().is_contiguous() and not w.is_contiguous() for w in weights if min(w.shape) > 1)
        assert all(w.is_contiguous() for w in _linear_weights(full))
        with torch.no_grad():  # an optimizer step on the learner, then the weight sync
            for p in full.parameters():
                p.add_(0.01 * torch.randn_like(p))
        runner_module.set_state(full.get_state(inference_only=True))


@pytest.mark.parametrize("obs_space", [
    gym.spaces.Discrete(5, start=2),
    gym.spaces.MultiDiscrete([3, 4]),
    gym.spaces.Box(0, 255, (10, 9, 3), np.uint8),
    gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (2, 2)),
                     "parts": gym.spaces.Tuple([gym.spaces.Discrete(3), gym.spaces.Box(0, 1, (6, 6, 1))])}),
], ids=["discrete", "multidiscrete", "image", "nested"])
@pytest.mark.parametrize("action_space", [
    gym.spaces.Discrete(3), gym.spaces.MultiDiscrete([2, 5]), gym.spaces.Box(-1, 1, (2,), np.float32),
], ids=["discrete", "multidiscrete", "box"])
def test_supported_spaces(obs_space, action_space):
    module = build_module(obs_space, action_space)
    obs_space.seed(0)
    samples = [obs_space.sample() for _ in range(6)]
    obs = torch.utils.data.default_collate(samples)  # nests like the space, batch first
    obs = tree.map_structure(lambda x: x.reshape(2, 3, *x.shape[1:]), obs)  # [B=2, T=3, ...]
    state = {k: torch.as_tensor(v).expand(2, *v.shape) for k, v in module.get_initial_state().items()}
    out = module.forward_exploration({Columns.OBS: obs, Columns.STATE_IN: state})
    dist = module.get_exploration_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    actions = dist.sample()
    assert actions.shape == (2, 3, *action_space.shape)
    assert dist.logp(actions).shape == (2, 3) and torch.isfinite(dist.logp(actions)).all()


def test_plain_rlmodule_spec_ignores_keys_rllib_injects():
    module = build_module(vf_share_layers=False)  # PPO merges this into every model_config
    assert isinstance(module, TrajEncoderRLModule)


def test_registered_encoder_is_usable_by_name(monkeypatch):
    class TinyFF(FFTrajEncoder):
        pass

    # The registry is global: later tests' error messages list the registered names.
    monkeypatch.setattr(config_module, "_ENCODERS", dict(config_module._ENCODERS))
    register_traj_encoder("tiny_ff_for_test", TinyFF)
    module = build_module(traj_encoder="tiny_ff_for_test", traj_encoder_config={"d_model": 8, "d_ff": 8})
    assert type(module.traj_encoder) is TinyFF
    with pytest.raises(ValueError, match="already registered for TinyFF"):
        register_traj_encoder("tiny_ff_for_test", FFTrajEncoder)
    with pytest.raises(ValueError, match="not a subclass of rllib_trajenc.TrajEncoder"):
        register_traj_encoder("not_an_encoder", torch.nn.GRU)


BAD_MODEL_CONFIGS = [
    (dict(tstep_hidens=[8]), r"unknown model_config keys \['tstep_hidens'\]; valid keys are \['traj_encoder'"),
    (dict(traj_encoder="lstm"), r"traj_encoder='lstm' is not supported; choose one of \['ff', 'gru'"),
    (dict(max_seq_len=0), r"max_seq_len=0 must be a positive int"),
    (dict(max_seq_len=2.5), r"max_seq_len=2.5 must be a positive int"),
    (dict(traj_encoder_config={"d_hiden": 8}),
     r"unknown GRUTrajEncoder args \['d_hiden'\]; accepted: \['d_hidden', 'n_layers', 'd_output', 'norm'\]"),
    (dict(traj_encoder_config={"d_hidden": 0}), r"d_hidden=0 must be a positive int"),
    (dict(head_hiddens=[16, -1]), r"head_hiddens\[1\]=-1 must be a positive int"),
    (dict(activation="swish"), r"activation='swish' is not supported; choose one of"),
    (dict(tstep_input_gain=0), r"tstep_input_gain=0 must be a positive number"),
    (dict(tstep_input_gain="10"), r"tstep_input_gain='10' must be a positive number"),
    (dict(amp="fp16"), r"amp='fp16' is not supported; choose one of \[None, 'bf16'\]"),
    (dict(fused_kernels="no"), r"fused_kernels='no' must be True or False"),
]


@pytest.mark.parametrize("overrides, message", BAD_MODEL_CONFIGS)
def test_bad_model_config_fails_when_the_module_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_module(**overrides)


@pytest.mark.parametrize("overrides, message", BAD_MODEL_CONFIGS)
def test_bad_model_config_fails_in_with_traj_encoder(overrides, message):
    config = model_config(**overrides)
    encoder, encoder_config = config.pop("traj_encoder"), config.pop("traj_encoder_config")
    with pytest.raises(ValueError, match=message):
        with_traj_encoder(PPOConfig(), encoder, encoder_config=encoder_config, **config)


@pytest.mark.parametrize("args, message", [
    (dict(encoder=3), r"traj_encoder=3 is not supported; choose one of \['ff', 'gru'.* or pass a TrajEncoder subclass"),
    (dict(encoder_config="x"), r"encoder_config='x' must be a dict of the encoder's kwargs or None"),
    (dict(max_seq_len="8"), r"max_seq_len='8' must be a positive int"),
    (dict(config=PPOConfig), r"config=<class .*PPOConfig'> must be an AlgorithmConfig instance such as PPOConfig\(\)"),
    (dict(config=None), r"config=None must be an AlgorithmConfig instance"),
], ids=["encoder-int", "encoder_config-str", "max_seq_len-str", "config-class", "config-none"])
def test_with_traj_encoder_rejects_wrong_types(args, message):
    args = {"config": PPOConfig(), "encoder": "gru", "max_seq_len": MAX_SEQ_LEN, **args}
    with pytest.raises(ValueError, match=message):
        with_traj_encoder(args.pop("config"), args.pop("encoder"), **args)


def test_missing_max_seq_len_is_named():
    config = model_config()
    del config["max_seq_len"]
    with pytest.raises(ValueError, match=r"model_config needs 'max_seq_len'"):
        RLModuleSpec(module_class=TrajEncoderRLModule, observation_space=CARTPOLE_OBS,
                     action_space=gym.spaces.Discrete(2), model_config=config).build()


@pytest.mark.parametrize("obs_space", [gym.spaces.Box(0, 1, (2, 3, 4, 5)), gym.spaces.Text(8),
                                       gym.spaces.Dict({"ok": gym.spaces.Discrete(2), "bad": gym.spaces.Text(3)})],
                         ids=["box-rank-4", "text", "nested-text"])
def test_unsupported_observation_space(obs_space):
    with pytest.raises(ValueError, match=r"cannot encode the observation space .*supported: Box"):
        build_module(obs_space)


@pytest.mark.parametrize("action_space", [gym.spaces.Box(-1, 1, (2, 2)), gym.spaces.Box(0, 3, (2,), np.int64),
                                          gym.spaces.Tuple([gym.spaces.Discrete(2)]), gym.spaces.Discrete(3, start=1),
                                          gym.spaces.MultiDiscrete([2, 3], start=[0, 1])],
                         ids=["box-rank-2", "int-box", "tuple", "discrete-start-1", "multidiscrete-start-1"])
def test_unsupported_action_space(action_space):
    with pytest.raises(ValueError, match=r"cannot act in the action space .*supported: Discrete and MultiDiscrete"):
        build_module(action_space=action_space)


def test_minibatch_smaller_than_a_row_is_rejected():
    with pytest.raises(ValueError, match=r"minibatch_size=32 is smaller than max_seq_len=64; .* multiple of 64"):
        with_traj_encoder(PPOConfig().training(minibatch_size=32), "gru", max_seq_len=64)
    # A stateless module (FF) trains on single steps, so any minibatch size works.
    with_traj_encoder(PPOConfig().training(minibatch_size=32), "ff", max_seq_len=64)
