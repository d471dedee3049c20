"""benchmarks/learner_gpu.py runs on CPU at tiny sizes (``--device cpu --smoke``), so the GPU
command cannot rot between GPU runs; with the stand-ins its checks run the fused code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learner_gpu  # noqa: E402


@pytest.mark.parametrize("stand_ins", [False, True])
def test_smoke_run_checks_every_encoder_and_prints_every_row(stand_ins, capsys):
    assert learner_gpu.main(["--device", "cpu", "--smoke", *(["--stand-ins"] if stand_ins else [])]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "tiny" in line]
    # per encoder: 2 lengths x 2 starts x (fused, reference), GRU fused only
    assert len(rows) == 2 * 2 * (1 + 2 + 2)
    fused_backends = {"mamba_ssm", "causal_conv1d", "flash_attn_varlen", "flash_attn"} if stand_ins else {"sdpa"}
    seen = {b.strip() for line in rows if "| fused |" in line for b in line.split("|")[6].split(",")}
    assert fused_backends <= seen, seen
