"""One table of the recorded comparisons with RLlib's LSTM on five kinds of POPGym Easy task.

Reads the runs that ``vs_rllib_lstm.py --json`` saved in docs/comparisons/ (three seeds each) and
prints, per task and contender, how many seeds reached the task's target, their median (min-max)
env steps to it, and POPGym's MMER (best mean episode return of a training iteration).
Usage: python benchmarks/popgym_breadth.py
"""
from __future__ import annotations

import json
from pathlib import Path

from vs_rllib_lstm import TASKS, by_contender, mmer, to_target  # same folder

COMPARISONS = Path(__file__).resolve().parents[1] / "docs" / "comparisons"
KINDS = {
    "popgym_repeat_previous_easy": "recall",
    "popgym_count_recall_easy": "counting",
    "popgym_autoencode_easy": "autoencoding",
    "popgym_position_only_cartpole_easy": "control with hidden state",
    "popgym_minesweeper_easy": "game",
}
HEADER = ("| task | kind | target | contender | seeds reaching the target "
          "| env steps to target: median (min-max) | MMER: median (min-max) |\n"
          "|---|---|---:|---|---:|---:|---:|")


def table() -> str:
    rows = [HEADER]
    for task, kind in KINDS.items():
        saved = json.loads((COMPARISONS / f"{task}.json").read_text())
        for contender, mine in by_contender(saved["runs"]).items():
            reached, steps = to_target(mine, saved["budget"])
            rows.append(f"| `{task}` | {kind} | {TASKS[task].target_return:g} | {contender} | {reached} "
                        f"| {steps} | {mmer(mine)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
