"""benchmarks/mamba_init.py's rows build the initialisations and norms they name."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mamba_init import INITS, mamba  # noqa: E402

DIFFERENCE = torch.tensor([0.0, 0.0, -1.0, 1.0])


def is_high_pass(encoder) -> bool:
    mixer = encoder.mixers[0]
    half = mixer.conv.out_channels // 2
    return bool(torch.equal(mixer.conv.weight[:half, 0], DIFFERENCE.expand(half, -1)))


def smallest_A(encoder) -> float:
    return torch.exp(encoder.mixers[0].A_log).min().item()


@pytest.mark.parametrize("norm, norm_type", [("layer", nn.LayerNorm), ("none", nn.Identity)])
def test_each_row_builds_its_initialisation_and_norm(norm, norm_type):
    torch.manual_seed(0)
    paper, long, high_pass = (mamba(init, norm) for init in INITS)
    assert all(isinstance(n, norm_type) for e in (paper, long, high_pass) for n in e.norms)
    assert smallest_A(paper) == pytest.approx(1.0) and not is_high_pass(paper)
    assert smallest_A(long) == pytest.approx(1e-3) and not is_high_pass(long)
    assert smallest_A(high_pass) == pytest.approx(1e-3) and is_high_pass(high_pass)
