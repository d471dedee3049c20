"""The README's results table, rendered from the committed records in docs/results/.

Each record is ``docs/results/<task>-<encoder>-seed<seed>/summary.json`` (with its
``learning_curve.png``), written by ``python examples/train.py --task T --encoder E --seed S``.
One row per task and encoder: how many seeds reached the target, and the median (min-max)
env steps and wall time to it over the seeds that did. tests/test_results.py checks that the
README's table is exactly this one. Usage: python benchmarks/results_table.py
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
HEADER = ("| task | encoder | target return | seeds reaching the target "
          "| env steps to target: median (min-max) | training time to target: median |\n"
          "|---|---|---:|---:|---:|---:|")


def load_records(results: Path = RESULTS) -> dict[tuple[str, str], list[dict]]:
    """Summaries grouped by (task, encoder), in order of seed."""
    records: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(results.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        records.setdefault((summary["task"], summary["encoder"]), []).append(summary)
    for runs in records.values():
        runs.sort(key=lambda s: s["seed"])
    return records


def row(task: str, encoder: str, runs: list[dict]) -> str:
    reached = [r for r in runs if r["reached_target"]]
    steps = [r["env_steps_to_target"] for r in reached]
    seeds = f"{len(reached)}/{len(runs)}"
    if not reached:
        budget = max(r["env_steps"] for r in runs)
        return f"| `{task}` | {encoder} | {runs[0]['target_return']:g} | {seeds} | not reached in {budget:,} | - |"
    spread = f"{min(steps):,}-{max(steps):,}" if len(steps) > 1 else "one seed"
    wall = statistics.median(r["time_s_to_target"] for r in reached)
    return (f"| `{task}` | {encoder} | {runs[0]['target_return']:g} | {seeds} "
            f"| {statistics.median(steps):,.0f} ({spread}) | {wall:,.0f} s |")


def table(results: Path = RESULTS) -> str:
    return "\n".join([HEADER, *(row(task, enc, runs) for (task, enc), runs in load_records(results).items())])


if __name__ == "__main__":
    print(table())
