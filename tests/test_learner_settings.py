"""The learner-side settings: ``amp``, ``fused_kernels``, the backends in the learner's metrics, and
RLlib's ``torch_compile_learner``."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import LEARNER_RESULTS
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from conftest import ENCODERS, build_module, ppo_config, sample_and_recompute, with_small_encoder
from rllib_trajenc.rllib.module import DIAGNOSTICS
from stand_ins import flash_attn, mamba_kernels

STATEFUL = [name for name in ENCODERS if name != "ff"]
# What the reference path reports on CPU, where no fused kernel is installed.
REFERENCE_BACKENDS = {
    "gru": {}, "ff": {},
    "mamba": {"scan_backend": "pytorch", "conv_backend": "pytorch"},
    "transformer": {"attention_backend": "sdpa"},
}


def learner_batch(encoder: str, **model_config) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """A train batch of rows that carry state (PPO on StatelessCartPole) and a module of the
    given settings with the sampling module's weights."""
    algo = with_small_encoder(ppo_config(), encoder).build_algo()
    try:
        _, batch, module = sample_and_recompute(algo)
    finally:
        algo.stop()
    other = build_module(encoder=encoder, **model_config)
    other.load_state_dict(module.state_dict())
    return batch, module, other


def assert_ppo_update_reports(encoder: str, backends: dict[str, str]) -> None:
    """One PPO iteration; its learner results name ``backends`` as traj_encoder/<kind>."""
    algo = with_small_encoder(ppo_config(), encoder).build_algo()
    try:
        stats = algo.train()[LEARNER_RESULTS][DEFAULT_MODULE_ID]
    finally:
        algo.stop()
    for kind, backend in backends.items():
        assert stats[f"traj_encoder/{kind}"] == backend


@pytest.mark.parametrize("encoder", STATEFUL)
def test_amp_runs_the_learners_encoder_in_bf16_and_the_rest_in_fp32(ray_session, encoder):
    batch, module, amp_module = learner_batch(encoder, amp="bf16")
    seen = {}
    amp_module.traj_encoder.register_forward_hook(lambda m, args, out: seen.update(dtype=out[0].dtype))
    out, ref = amp_module.forward_train(batch), module.forward_train(batch)
    assert seen["dtype"] == torch.bfloat16
    for key in (Columns.ACTION_DIST_INPUTS, Columns.EMBEDDINGS):
        assert out[key].dtype == torch.float32
        error = (out[key] - ref[key]).abs().max().item()
        assert 0 < error < 0.1, (key, error)  # bf16 rounding: different, but close
    assert amp_module.compute_values(batch, out[Columns.EMBEDDINGS]).dtype == torch.float32
    if encoder == "mamba":  # the scan keeps its state in fp32
        assert {out[Columns.STATE_OUT][k].dtype for k in ("conv", "ssm")} == {torch.float32}
    # Env runners act in fp32: the rollout pass is the fp32 module's, bit for bit.
    rollout = {Columns.OBS: batch[Columns.OBS][:, 0], Columns.STATE_IN: batch[Columns.STATE_IN]}
    assert torch.equal(amp_module.forward_inference(rollout)[Columns.ACTION_DIST_INPUTS],
                       module.forward_inference(rollout)[Columns.ACTION_DIST_INPUTS])


@pytest.mark.parametrize("fused", [True, False])
def test_fused_kernels_setting_reaches_the_encoder(fused):
    assert build_module(encoder="mamba", fused_kernels=fused).traj_encoder.fused_kernels is fused


def test_repr_names_the_backends_it_would_pick():
    text = repr(build_module(encoder="mamba", fused_kernels=False))
    assert "fused_kernels=False" in text and "scan_backend" in text


@pytest.mark.parametrize("encoder", ["mamba", "transformer"])
def test_learner_metrics_name_the_backends_of_the_last_update(ray_session, encoder):
    assert_ppo_update_reports(encoder, REFERENCE_BACKENDS[encoder])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_ppo_trains_with_torch_compile_learner(ray_session, encoder):
    """RLlib 2.60 compiles no module of a MultiRLModule itself (module.py's
    _compile_where_rllib_skipped does): after one iteration the learner's forward_train is
    compiled, and a second iteration trains through it."""
    config = with_small_encoder(ppo_config().framework(torch_compile_learner=True), encoder)
    algo = config.build_algo()
    try:
        algo.train()
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]
        assert hasattr(vars(module)["_forward_train"], "_torchdynamo_orig_callable")
        before = [p.detach().clone() for p in module.parameters()]
        stats = algo.train()[LEARNER_RESULTS][DEFAULT_MODULE_ID]
        assert torch.isfinite(torch.tensor(stats["total_loss"]))
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    finally:
        algo.stop()


FUSED_BACKENDS = {"mamba": {"scan_backend": "mamba_ssm", "conv_backend": "causal_conv1d"},
                  "transformer": {"attention_backend": "flash_attn_varlen"}}


@pytest.mark.parametrize("encoder", ["mamba", "transformer"])
def test_ppo_update_from_carried_state_runs_the_kernels_and_equals_reference(ray_session, monkeypatch, encoder):
    """With the kernels' CPU stand-ins (tests/stand_ins; fp32 admitted for flash-attn so that
    1e-5 can be asked), a learner pass over PPO's train batch, whose rows carry state, runs the
    fused path and gives the reference path's outputs and gradients; PPO's metrics say so."""
    mamba_kernels.install(monkeypatch)
    flash_attn.install(monkeypatch, allow_fp32=True)
    batch, module, reference = learner_batch(encoder, fused_kernels=False)
    assert (batch[Columns.STATE_IN]["t"] > 0).any()  # rows that continue an episode
    results = []
    for m in (module, reference):
        out = m.forward_train(batch)
        loss = (out[Columns.ACTION_DIST_INPUTS] * torch.linspace(-1, 1, 2)).sum()
        loss = loss + m.compute_values(batch, out[Columns.EMBEDDINGS]).square().sum()
        results.append([out[Columns.ACTION_DIST_INPUTS], *torch.autograd.grad(loss, list(m.parameters()))])
    assert module.traj_encoder.last_backends == FUSED_BACKENDS[encoder]
    assert reference.traj_encoder.last_backends == REFERENCE_BACKENDS[encoder]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_ppo_update_reports(encoder, FUSED_BACKENDS[encoder])


def test_backends_survive_the_merge_of_two_learners_metrics(monkeypatch):
    """RLlib merges an "item" metric from one learner only (two raise an AssertionError at
    aggregation, which crashed 2-learner Mamba and Transformer runs): rank 0 alone logs it."""
    module = build_module(encoder="mamba")
    module.traj_encoder.last_backends = {"scan_backend": "pytorch", "conv_backend": "pytorch"}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    reduced = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        learner = SimpleNamespace(metrics=MetricsLogger(), compute_loss_for_module=lambda **_: torch.zeros(()))
        module.compute_self_supervised_loss(learner=learner, module_id=DEFAULT_MODULE_ID, config=None,
                                            batch={}, fwd_out={DIAGNOSTICS: {}})
        reduced.append(learner.metrics.reduce())
    root = MetricsLogger(root=True)
    root.aggregate(reduced)
    assert root.peek((DEFAULT_MODULE_ID, "traj_encoder/scan_backend")) == "pytorch"
