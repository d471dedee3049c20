"""benchmarks/mamba_init.py's initialisations do what its table's rows say they do."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mamba_init import mamba  # noqa: E402
from recall_supervised import TSTEP_DIM  # noqa: E402


def test_long_memory_spreads_forgetting_across_the_state_and_steps_up_to_one():
    torch.manual_seed(0)
    for mixer in mamba("long memory").mixers:
        A = torch.exp(mixer.A_log)
        torch.testing.assert_close(A[:, 0], torch.full_like(A[:, 0], 1e-3))
        torch.testing.assert_close(A[:, -1], torch.ones_like(A[:, -1]))
        dt = F.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-2 - 1e-6 and dt.max() <= 1.0 + 1e-6


def test_high_pass_channels_write_nothing_for_a_constant_input():
    """After the first step of a constant input, layer 0's high-pass half only decays; the other
    half keeps writing it."""
    torch.manual_seed(0)
    encoder = mamba("long memory, high-pass").eval()
    mixer, half = encoder.mixers[0], encoder.d_inner // 2
    decay = torch.exp(F.softplus(mixer.dt_proj.bias)[:, None] * -torch.exp(mixer.A_log))
    state = encoder.init_hidden_state(1, torch.device("cpu"))
    step = torch.randn(1, 1, TSTEP_DIM)
    with torch.no_grad():
        encoder(step, hidden_state=state, in_place=True)
        assert state["ssm"][0, 0, :half].abs().min() > 0  # the first step is written
        for _ in range(5):
            before = state["ssm"][0, 0].clone()
            encoder(step, hidden_state=state, in_place=True)
            after = state["ssm"][0, 0]
            torch.testing.assert_close(after[:half], before[:half] * decay[:half])
            assert not torch.allclose(after[half:], before[half:] * decay[half:])
