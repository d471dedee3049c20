"""model_config["compile_rollout"]: Mamba's env-runner step through torch.compile computes what the
eager step computes, follows weight syncs, keeps PPO's learner == rollout, and bad settings fail
at config time."""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor import cpp_builder
from torch._inductor.exc import InvalidCxxCompiler

import rllib_trajenc as rt
from rllib_trajenc.rllib import with_traj_encoder
from rllib_trajenc.rllib.config import TrajEncoderModelConfig
from conftest import (
    ENCODER_CONFIGS, MAX_SEQ_LEN, SMALL_NETS, TSTEP_DIM, episode_inputs, logp_error, model_config, ppo_config,
    sample_and_recompute,
)

TOL = 1e-5


def has_cpp_compiler() -> bool:
    try:
        cpp_builder.get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return True


needs_compiler = pytest.mark.skipif(not has_cpp_compiler(), reason="inductor's CPU backend needs a C++ compiler")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@needs_compiler
@torch.no_grad()
def test_compiled_step_equals_eager_step_and_whole_sequence_across_a_weight_sync(fresh_dynamo):
    eager = rt.MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=16, d_state=4, n_layers=2).eval()
    compiled = copy.deepcopy(eager)
    compiled.compile_rollout = True
    seq, _ = episode_inputs(3, 2 * MAX_SEQ_LEN + 3)
    whole, _ = eager(seq)
    states = [enc.init_hidden_state(3, torch.device("cpu")) for enc in (eager, compiled)]
    outs = {"eager": [], "compiled": []}
    for t in range(seq.shape[1]):
        for enc, state, key in zip((eager, compiled), states, outs):
            out, returned = enc(seq[:, t:t + 1], hidden_state=state, in_place=True)
            assert returned is state  # updated in place, as env runners need
            outs[key].append(out)
    assert compiled_graphs() >= 1  # the compiled path ran
    assert (torch.cat(outs["compiled"], 1) - torch.cat(outs["eager"], 1)).abs().max() <= TOL
    assert (torch.cat(outs["compiled"], 1) - whole).abs().max() <= TOL
    for key in states[0]:
        assert (states[1][key] - states[0][key]).abs().max() <= TOL

    # A weight sync (load_state_dict, as RLlib's set_state does): the compiled step follows it.
    synced = {k: v + 0.05 * torch.randn_like(v) for k, v in eager.state_dict().items()}
    eager.load_state_dict(synced)
    compiled.load_state_dict(synced)
    x, _ = episode_inputs(3, 1)
    out_eager, _ = eager(x, hidden_state=states[0], in_place=True)
    out_compiled, _ = compiled(x, hidden_state=states[1], in_place=True)
    assert (out_compiled - out_eager).abs().max() <= TOL
    assert compiled_graphs() == 1  # new weights are inputs of the same graph, not a recompile


@needs_compiler
def test_ppo_with_compiled_rollout_recomputes_rollout_logp_after_updates(ray_session, fresh_dynamo):
    algo = with_traj_encoder(ppo_config(), "mamba", max_seq_len=MAX_SEQ_LEN, encoder_config=ENCODER_CONFIGS["mamba"],
                             compile_rollout=True, **SMALL_NETS).build_algo()
    try:
        assert algo.env_runner.module.traj_encoder.compile_rollout
        _, batch, module = sample_and_recompute(algo)
        assert compiled_graphs() >= 1
        assert logp_error(module, batch) <= 1e-4
        algo.train()
        _, batch, module = sample_and_recompute(algo)  # after the update and the weight sync
        assert logp_error(module, batch) <= 1e-4
    finally:
        algo.stop()


@pytest.mark.parametrize("change, message", [
    (dict(traj_encoder="gru"), "compile_rollout=True is supported for the encoders ['mamba'] only"),
    (dict(compile_rollout=1), "compile_rollout=1 must be True or False"),
])
def test_bad_compile_rollout_settings_fail_at_config_time(change, message):
    config = {**model_config("mamba", compile_rollout=True), **change}
    config["traj_encoder_config"] = model_config(config["traj_encoder"])["traj_encoder_config"]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrajEncoderModelConfig.from_model_config(config)


def test_compile_rollout_without_a_cpp_compiler_fails_at_config_time(monkeypatch):
    def no_compiler() -> str:
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match="compile_rollout=True needs a C\\+\\+ compiler"):
        TrajEncoderModelConfig.from_model_config(model_config("mamba", compile_rollout=True))
    TrajEncoderModelConfig.from_model_config(model_config("mamba"))  # off: no compiler needed


@needs_compiler
def test_a_remote_env_runner_compiles_its_step_and_ppo_trains(ray_session):
    """Where the setting matters: env runners are Ray actors, each compiling in its own process."""
    algo = with_traj_encoder(ppo_config().env_runners(num_env_runners=1), "mamba", max_seq_len=MAX_SEQ_LEN,
                             encoder_config=ENCODER_CONFIGS["mamba"], compile_rollout=True, **SMALL_NETS).build_algo()
    try:
        result = algo.train()
        remote = algo.env_runner_group.foreach_env_runner(
            lambda runner: (runner.module.traj_encoder.compile_rollout,
                            importlib.import_module("torch._dynamo.utils").counters["stats"]["unique_graphs"]),
            local_env_runner=False)
        assert len(remote) == 1 and remote[0][0] and remote[0][1] >= 1  # its own process compiled
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 64
        assert math.isfinite(result["learners"]["default_policy"]["total_loss"])
    finally:
        algo.stop()
