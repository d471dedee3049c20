"""The README's recorded results are the committed records, and every record is committed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_table import HEADER, RESULTS, load_records, table  # noqa: E402


def readme_table() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(HEADER.splitlines()[0])
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def test_readme_table_is_rendered_from_the_records():
    records = load_records()
    assert records, "no records in docs/results"
    assert readme_table() == table()


def test_every_record_is_committed():
    tracked = set(subprocess.run(["git", "ls-files", str(RESULTS.relative_to(ROOT))], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split())
    for folder in sorted(p.parent for p in RESULTS.glob("*/summary.json")):
        for name in ("summary.json", "learning_curve.png"):
            assert str((folder / name).relative_to(ROOT)) in tracked, folder / name


def test_each_row_has_three_seeds():
    assert all(sorted(r["seed"] for r in runs) == [0, 1, 2] for runs in load_records().values())


def test_tuned_encoders_are_the_recorded_ones():
    from examples.tasks import TASKS

    recorded = {task: sorted(enc for t, enc in load_records() if t == task) for task in TASKS}
    assert {task: sorted(TASKS[task].tuned) for task in TASKS} == recorded
