"""The real kernels against the reference path on a CUDA GPU; skipped elsewhere.

Imports no Ray and no conftest, so it runs on a GPU machine that has only torch and the kernels:
``python3 -m pytest --noconftest -q -m cuda tests/test_cuda_kernels.py`` (BENCHMARKS.md gives the
whole command with the prebuilt mamba-ssm bundle). Kernels that are not installed are reported
as the PyTorch backend the encoder then ran, so the backend rows say what was proven.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from learner_gpu import SIZES, agreement  # noqa: E402
from rllib_trajenc.nets import attention, selective_scan  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
BACKENDS = {
    "gru": {},
    "mamba": {"scan_backend": "mamba_ssm" if selective_scan.SCAN_KERNEL else "pytorch",
              "conv_backend": "causal_conv1d" if selective_scan.CONV_KERNEL else "pytorch"},
    "transformer": {"attention_backend": "flash_attn_varlen" if attention.flash_attn_varlen_func else "sdpa"},
}


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """TF32 would make 'fp32' matmuls ~1e-3 off; the fp32 rows below compare at 1e-4."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("size", ["default", "large"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_fused_bf16_from_carried_state_agrees_with_fp32_reference(name, size):
    result = agreement(name, SIZES[size][name], CUDA, steps=256, batch=8)
    assert result.backends == BACKENDS[name]
    assert result.out_err < 1e-2, result
    assert result.ok, result


@pytest.mark.skipif(selective_scan.SCAN_KERNEL is None, reason="mamba-ssm is not installed")
@pytest.mark.parametrize("steps", [1, 7, 64, 256])
def test_mamba_kernel_in_fp32_from_carried_state_equals_reference(steps):
    result = agreement("mamba", SIZES["default"]["mamba"], CUDA, steps=steps, batch=8, fused_bf16=False)
    assert result.backends == BACKENDS["mamba"]
    assert result.out_err < 1e-4 and result.grad_err < 1e-4, result
