"""Smoke test: every example task runs one training iteration end to end and writes its outputs."""
from __future__ import annotations

import json
from typing import Iterator

import pytest
import ray

from examples import train
from examples.tasks import TASKS

# Each task with one encoder, so that every encoder runs through the example script too.
RUNS = [(task, ["gru", "transformer", "mamba", "ff"][i % 4]) for i, task in enumerate(sorted(TASKS))]


@pytest.fixture(scope="module", autouse=True)
def shutdown_ray_afterwards() -> Iterator[None]:
    """train.main starts Ray and leaves it running, as a script may."""
    yield
    ray.shutdown()


@pytest.mark.parametrize("task,encoder", RUNS)
def test_example_runs_one_iteration(tmp_path, task, encoder):
    summary = train.main(["--task", task, "--encoder", encoder, "--smoke", "--out", str(tmp_path),
                          "--num-env-runners", "0", "--envs-per-runner", "2"])
    out = tmp_path / f"{task}-{encoder}-seed0"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["env_steps"] > 0 and summary["final_return"] is not None
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert list(out.glob("tune/*/checkpoint_*")), "no checkpoint written"


def test_bad_flags_fail_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--encoder", "lstm"])
    assert "invalid choice: 'lstm'" in capsys.readouterr().err
