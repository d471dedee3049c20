"""The env-runner benchmarks at tiny scale, so that they cannot rot between their (long) runs:
sampling_cpu.py's floor arithmetic, profile_rollout.py's per-op table, rollout_step_cpu.py's rows,
compare_commits.py's measurement of one tree, runner_split.py's parts of a vector step,
weight_layout_cpu.py's two layouts."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_commits  # noqa: E402
import profile_rollout  # noqa: E402
import rollout_step_cpu  # noqa: E402
import runner_split  # noqa: E402
import sampling_cpu  # noqa: E402
import weight_layout_cpu  # noqa: E402


def test_floor_is_the_runners_step_plus_arithmetic_plus_state_read(capsys):
    rates = {sampling_cpu.LSTM: 4_000.0, sampling_cpu.MLP: 16_000.0, "gru": 8_000.0}  # env steps/s
    sampling_cpu.floor_table(rates, {"gru": (0.5, 0.25)})
    out = capsys.readouterr().out
    assert "RLlib's env runner (MLP [256] row): 1.00 ms per vector step" in out
    # 16 envs / 8,000 env steps/s = 2 ms against 1.00 + 0.50 + 0.25 = 1.75 ms
    assert "| gru | 2.00 | 1.75 = 1.00 + 0.50 + 0.25 | 1.14x | 8,000 | 2.00 |" in out


def test_contenders_build_their_size_and_settings():
    assert sampling_cpu.contender_settings("mamba" + sampling_cpu.SMALL_SUFFIX) == (
        "mamba", {"d_model": 128, "n_layers": 2}, {})
    assert sampling_cpu.contender_settings(sampling_cpu.COMPILED) == ("mamba", {}, {"compile_rollout": True})
    assert sampling_cpu.module_for(sampling_cpu.COMPILED).traj_encoder.compile_rollout
    assert sampling_cpu.head_macs("gru") > 0


def test_profile_table_names_the_ops_of_a_module_step(capsys):
    profile_rollout.profile_table("mamba", steps=2)
    out = capsys.readouterr().out
    assert "### mamba:" in out and "| aten::mm |" in out and "(all " in out


def test_rollout_step_rows_time_every_layout_and_kernel():
    assert set(rollout_step_cpu.row("transformer", rounds=2)) == {
        "batch first (SDPA)", "layer first, SDPA", "layer first, explicit"}
    assert rollout_step_cpu.attention.ring_attention is rollout_step_cpu.EXPLICIT  # restored


def test_compare_commits_measures_the_tree_it_is_given():
    root = Path(__file__).resolve().parents[1]
    got = compare_commits.measure(root, ["gru"])["gru"]
    assert set(got) == {"ops", "module_ms", "vector_ms"}
    assert got["ops"] > 50 and got["module_ms"] > 0 and got["vector_ms"] > got["module_ms"]


def test_runner_split_times_each_part_of_the_vector_step():
    split = runner_split.runner_split("gru", steps=64)
    assert set(split) == {*runner_split.PARTS, "vector step"}
    assert 0 < sum(split[part] for part in runner_split.PARTS) < split["vector step"]
    hot, cold = runner_split.module_alone("gru")
    assert hot > 0 and cold > 0


def test_weight_layout_compares_the_two_layouts(capsys):
    for layout in weight_layout_cpu.LAYOUTS:
        module, step = weight_layout_cpu.module_with_layout("gru", layout)
        weight = module.traj_encoder.rnn.weight_hh_l0
        assert weight.is_contiguous() == (layout == "as nn.Linear") and weight.t().is_contiguous() != weight.is_contiguous()
        step()
    weight_layout_cpu.linear_table(rounds=4)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 256 -> 1024 |")]
    assert len(rows) == 1 and rows[0].count("e-0") == 2  # both errors, float32-sized
