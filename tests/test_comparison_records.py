"""BENCHMARKS.md's comparisons with RLlib's LSTM are the committed runs, rendered as recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = ROOT / "docs" / "comparisons"
sys.path.insert(0, str(ROOT / "benchmarks"))

RECORDS = sorted(COMPARISONS.glob("*.json"))


def test_records_exist_and_are_committed():
    assert RECORDS, "no recorded comparison in docs/comparisons"
    tracked = subprocess.run(["git", "ls-files", str(COMPARISONS.relative_to(ROOT))], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for record in RECORDS:
        for path in (record, record.with_suffix(".png")):
            assert str(path.relative_to(ROOT)) in tracked, path


@pytest.mark.parametrize("record", RECORDS, ids=[r.stem for r in RECORDS])
def test_benchmarks_md_shows_the_recorded_tables(record, capsys):
    from vs_rllib_lstm import report

    saved = json.loads(record.read_text())
    assert sorted({r["seed"] for r in saved["runs"]}) == [0, 1, 2]
    report(saved, plot_path=None)
    tables = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    missing = [line for line in tables if line not in benchmarks]
    assert not missing, f"rows of {record.name} not in BENCHMARKS.md: {missing}"


def test_benchmarks_md_shows_the_popgym_breadth_table():
    from popgym_breadth import table

    assert table() in (ROOT / "BENCHMARKS.md").read_text()
