"""Redraw the study's frontier figure from its per-job rows, without the job directories.

    .venv/bin/python experiments/param_efficiency_frontier/redraw.py [results/report.csv] [--out results/frontier.png]

`reft-lab report` wrote `report.csv` (one row per job, its directory included); this groups the
rows by task and method preset (read from the job directory's name, e.g. `method_preset=lora_r8_alpha16`)
and draws them with the report's own `frontier_plot`, labelled by preset.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

from reft_lab.report.plots import frontier_plot
from reft_lab.report.stats import mean_ci

HERE = Path(__file__).parent


def groups_from_rows(rows: list[dict]) -> list[dict]:
    gains = defaultdict(list)
    for row in rows:
        if row["status"] != "ok":
            continue
        preset = re.search(r"method_preset=([^,/]+)", row["output_dir"])
        if preset is None:
            raise SystemExit(f"row of {row['output_dir']!r}: no method_preset in the job directory's name")
        gains[(row["task"], preset.group(1), row["method"], int(row["trainable_params"]))].append(float(row["task_gain"]))
    return [{"task": task, "label": preset, "method": method, "trainable_params": params, "stats": {"task_gain": mean_ci(values)}}
            for (task, preset, method, params), values in gains.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=HERE / "results" / "report.csv")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "frontier.png")
    opts = parser.parse_args(argv)
    with opts.csv.open(newline="") as f:
        groups = groups_from_rows(list(csv.DictReader(f)))
    if not frontier_plot(opts.out, groups):
        raise SystemExit(f"{opts.csv}: no task has groups of different sizes to draw")
    print(f"{opts.out}: {len(groups)} groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
