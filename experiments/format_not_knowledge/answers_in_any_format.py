"""Share of test answers that contain an accepted answer anywhere in the output, JSON or prose (the
knowledge probe's whole-word rule), per method and training-answer kind: mean ± 95% CI over seeds.

    .venv/bin/python experiments/format_not_knowledge/answers_in_any_format.py multirun/format_not_knowledge/<sweep>
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from reft_lab.evaluation.retention import contains_answer
from reft_lab.report.stats import mean_ci
from reft_lab.tasks import TaskConfig, load_task


def main(sweep: Path) -> None:
    accepted = {ex.prompt: ex.answers for ex in load_task(TaskConfig(name="json_answer")).test}
    shares = defaultdict(list)
    for metrics_path in sorted(sweep.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        rows = [json.loads(line) for line in (metrics_path.parent / "predictions.jsonl").read_text().splitlines()]
        for when, key in (("after", (metrics["method"], metrics["task"])), ("before", ("base (untrained)", "—"))):
            hits = [contains_answer(row[when], accepted[row["prompt"]]) for row in rows]
            if when == "after" or not shares[key]:  # the base's outputs are the same in every job
                shares[key].append(sum(hits) / len(hits))
    print("| method | trained on | n | correct answer anywhere in the output |")
    print("|---|---|---|---|")
    for (method, task), values in sorted(shares.items()):
        mean, ci = mean_ci(values)
        print(f"| {method} | {task} | {len(values)} | {mean:.3f}{'' if ci is None else f' ± {ci:.3f}'} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
