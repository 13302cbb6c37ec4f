"""``reft-lab report <dir>...``: gather metrics.json files into report.md, report.csv, pareto.png,
scores.png (every task score per group), frontier.png (task gain against trainable parameters, when
the groups differ in size), curves.png (runs evaluated during training), intruders.png (jobs
analysed by ``reft-lab analyze intruders``) and, for a sweep over one method key, sweep plots.

Jobs whose configs differ only by seed form one group (mean ± 95% CI over seeds). Failed jobs
(status "failed") and missing ones (a job directory without metrics.json) are listed as such.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

from reft_lab.atomic import atomic_write_text, check_writable
from reft_lab.errors import ReftLabError
from reft_lab.evaluation.retention import RETENTION
from reft_lab.metrics import METRICS_FILE, STATUSES, lookup, read_metrics
from reft_lab.report.plots import (
    curve_plot,
    drift_plot,
    frontier_plot,
    group_score_keys,
    intruder_plot,
    pareto_plot,
    score_plot,
    sweep_plots,
)
from reft_lab.report.stats import differs, mean_ci

RUN_COLUMNS = ["method", "task", "model", "seed", "status", "trainable_params", "trainable_pct", "adapter_bytes",
               "task_metric", "task_before", "task_after", "task_gain"]


def columns() -> list[tuple[str, str]]:
    """report.csv: (column, dotted metrics key), the retention columns from the metric table."""
    return [*[(key, key) for key in RUN_COLUMNS],
            *[(column, f"retention.{m.name}.{when}") for m in RETENTION for when, column in m.columns.items()],
            *[(key, key) for key in ("train_wall_s", "tokens_per_s", "final_loss", "error", "output_dir")]]


def summary() -> list[tuple[str, str]]:
    """The report table's metric columns: (dotted metrics key, header)."""
    return [("task_before", "task before"), ("task_after", "task after"), ("task_gain", "task gain"),
            *[(f"retention.{m.name}.after", m.label) for m in RETENTION if m.label]]


def gather(dirs: list[Path]) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for root in dirs:
        if not root.exists():
            raise ReftLabError(f"report: directory {root} does not exist")
        for path in sorted(root.rglob(METRICS_FILE)):
            try:
                row = read_metrics(path)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                rows.append({"status": "failed", "error": f"unreadable {path}: {err}", "output_dir": str(path.parent)})
                continue
            problem = _unusable(row)
            if problem:  # listed, not summarised: a half-written or foreign file must not skew a group
                rows.append({"status": "failed", "error": f"invalid {path}: {problem}", "output_dir": str(path.parent)})
            else:
                rows.append({**row, **_analyses(path.parent)})
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if not (job / METRICS_FILE).exists():
                missing.append(str(job))
    return rows, missing


def _analyses(job: Path) -> dict:
    """What ``reft-lab analyze`` wrote beside the job's metrics (intruders.json), under its name."""
    from reft_lab.analysis.intruders import RESULT_FILE

    try:
        return {"intruders": json.loads((job / RESULT_FILE).read_text(encoding="utf-8"))}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def intruder_keys() -> list[tuple[str, str]]:
    """The intruder analysis's columns: count per matrix, the least-aligned top vector's best |cosine|
    with the pre-trained ones, then task and each curve metric with the intruders' singular values
    scaled (``--scale``)."""
    scaled = [(f"intruders.scale.after.{key.removesuffix('.after')}" if key.startswith("retention.")
               else "intruders.scale.after.task_after", f"{name}, scaled") for key, name in curve_keys()]
    return [("intruders.intruders_per_matrix", "intruders per matrix"),
            ("intruders.least_aligned_cosine", "least-aligned |cos|"), *scaled]


GROUP_KEYS = {"method": str, "task": str, "model": str, "trainable_params": int, "trainable_pct": (int, float),
              "adapter_bytes": int, "config": dict}


def _unusable(row) -> str | None:
    """Why the report cannot use this metrics.json (None when it can). Older schema versions lack
    some keys and stay usable; an ok row needs what grouping and the table read."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if row.get("status") not in STATUSES:
        return f"status={row.get('status')!r} is not one of {', '.join(STATUSES)}"
    if row["status"] != "ok":
        return None
    for key, types in GROUP_KEYS.items():
        if not isinstance(row.get(key), types) or isinstance(row.get(key), bool):
            return f"missing or malformed key {key!r}"
    for key, _ in summary():
        value = lookup(row, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key}={value!r} is not a number"
    return None


def _group_key(row: dict) -> str:
    config = dict(row.get("config") or {})
    config.pop("seed", None)
    return json.dumps(config, sort_keys=True, default=str)


def group(rows: list[dict]) -> list[dict]:
    """Groups of ok jobs that differ only by seed, labelled by method plus what tells them apart."""
    buckets: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "ok":
            buckets[_group_key(row)].append(row)
    groups = []
    for members in buckets.values():
        first = members[0]
        stats, values = {}, {}
        analysed = [k for k, _ in intruder_keys()] if any("intruders" in m for m in members) else []
        for key in [k for k, _ in summary()] + score_keys(members) + analysed:
            values[key] = [v for v in (lookup(m, key) for m in members) if isinstance(v, (int, float))]
            stats[key] = mean_ci(values[key]) if values[key] else (None, None)
        groups.append({"method": first["method"], "task": first["task"], "model": first["model"], "n": len(members),
                       "trainable_params": first["trainable_params"], "trainable_pct": first["trainable_pct"],
                       "adapter_bytes": first["adapter_bytes"], "config": first.get("config") or {}, "stats": stats,
                       "values": values, "curve": curve_stats(members)})
    _label(groups)
    _compare_to_best(groups)
    return sorted(groups, key=lambda g: (g["task"], g["model"], g["label"]))


def score_keys(rows: list[dict]) -> list[str]:
    """Every task score after training that ``rows`` report (json_valid, answer_match, ...), as dotted keys."""
    names = {name for r in rows for name in ((r.get("task_scores") or {}).get("after") or {})}
    return [f"task_scores.after.{name}" for name in sorted(names)]


def curve_keys() -> list[tuple[str, str]]:
    """What a curve point holds of the summary columns: task after and each labelled retention metric."""
    return [(key, name) for key, name in summary() if key not in ("task_before", "task_gain")]


def curve_stats(members: list[dict]) -> dict[int, dict[str, tuple]]:
    """step → curve key → (mean, CI) over the members that evaluated that step."""
    by_step: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in members:
        for point in m.get("curve") or []:
            flat = {"task_after": point.get("task_after"),
                    **{f"retention.{name}.after": v for name, v in (point.get("retention") or {}).items()}}
            for key, _ in curve_keys():
                value = flat.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    by_step[point["step"]][key].append(value)
    return {step: {key: mean_ci(v) for key, v in values.items()} for step, values in sorted(by_step.items())}


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(cells) + " |" for cells in rows)]
    return "\n".join(lines) + "\n"


def _stat_cells(stats: dict, keys: list[str]) -> list[str]:
    return [_fmt(*stats.get(k, (None, None))) for k in keys]


def _curve_table(groups: list[dict]) -> str:
    curved = [g for g in groups if len(g["curve"]) > 1]
    if not curved:
        return ""
    keys = curve_keys()
    rows = [[g["label"], g["task"], str(g["n"]), str(step), *_stat_cells(stats, [k for k, _ in keys])]
            for g in curved for step, stats in g["curve"].items()]
    return ("\n## Over training steps\n\nThe whole evaluation at each step of `trainer.eval_at` and at the end "
            "(mean ± 95% CI over seeds; curves.png).\n\n" + _table(["group", "task", "n", "step", *(n for _, n in keys)], rows))


def _intruder_table(groups: list[dict]) -> str:
    analysed = [g for g in groups if "intruders.intruders_per_matrix" in g["stats"]]
    if not analysed:
        return ""
    keys = curve_keys() + intruder_keys()  # as trained, then the intruder columns
    rows = [[g["label"], g["task"], str(g["n"]), *_stat_cells(g["stats"], [k for k, _ in keys])] for g in analysed]
    return ("\n## Intruder dimensions\n\n`reft-lab analyze intruders`: top singular vectors of each updated matrix that "
            "align with no pre-trained one (intruders.json beside each job), and the job's metrics with the intruders' "
            "singular values scaled (mean ± 95% CI over seeds; intruders.png).\n\n"
            + _table(["group", "task", "n", *(n for _, n in keys)], rows))


def _score_table(groups: list[dict]) -> str:
    keys = group_score_keys(groups)
    if not keys:
        return ""
    rows = [[g["label"], g["task"], str(g["n"]), *_stat_cells(g["stats"], keys)] for g in groups]
    return ("\n## Task scores after training\n\nEvery score the task reports (mean ± 95% CI over seeds).\n\n"
            + _table(["group", "task", "n", *(k.rsplit(".", 1)[1] for k in keys)], rows))


def _compare_to_best(groups: list[dict]) -> None:
    """Mark each group against the best task gain of its task and model: best, lower (Welch 95%),
    n.s. (the difference is not significant), or — (fewer than 2 seeds on either side)."""
    by_setting = defaultdict(list)
    for g in groups:
        by_setting[(g["task"], g["model"])].append(g)
    for same in by_setting.values():
        ranked = [g for g in same if g["stats"]["task_gain"][0] is not None]
        if not ranked:
            continue
        best = max(ranked, key=lambda g: g["stats"]["task_gain"][0])
        for g in same:
            if g is best:
                g["vs_best"] = "best"
                continue
            verdict = differs(best["values"]["task_gain"], g["values"]["task_gain"])
            g["vs_best"] = "—" if verdict is None else ("lower" if verdict else "n.s.")


def _label(groups: list[dict]) -> None:
    by_method = defaultdict(list)
    for g in groups:
        by_method[(g["method"], g["task"], g["model"])].append(g)
    for same in by_method.values():
        for g in same:
            g["label"] = g["method"]
            if len(same) > 1:
                keys = sorted({k for o in same for k in (o["config"].get("method") or {})})
                differing = [k for k in keys if len({json.dumps((o["config"].get("method") or {}).get(k)) for o in same}) > 1]
                g["label"] += " (" + ", ".join(f"{k}={_short((g['config'].get('method') or {}).get(k))}" for k in differing) + ")"


def _short(value) -> str:
    """A config value for a label: long lists (LoRA's seven target modules) by their first entry and
    length; null (the method's own default, e.g. peft's target modules) as "default"."""
    if value is None:
        return "default"
    if isinstance(value, list) and len(value) > 3:
        return f"[{value[0]}, … {len(value)}]"
    return str(value)


def _fmt(value, ci=None, digits=3) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text + (f" ± {ci:.{digits}f}" if ci is not None else "")


def markdown(groups: list[dict], rows: list[dict], missing: list[str]) -> str:
    head = ["method", "task", "n", "trainable params", "% of base", "adapter KiB"] + [name for _, name in summary()] + ["gain vs best"]
    cells = [[g["label"], g["task"], str(g["n"]), f"{g['trainable_params']:,}", f"{g['trainable_pct']:.4f}",
              f"{g['adapter_bytes'] / 1024:.1f}", *_stat_cells(g["stats"], [k for k, _ in summary()]), g.get("vs_best", "—")]
             for g in groups]
    text = "# reft_lab report\n\n" + _table(head, cells)
    meanings = "; ".join(f"{m.label} = {m.meaning}" for m in RETENTION if m.label)
    text += ("\nMeans over seeds ± 95% t-interval half-width (shown when n ≥ 2). Task gain = task after − task "
             f"before on the held-out test split; {meanings}. Gain vs best: the group with the highest mean "
             "task gain of its task and model is `best`; another group is `lower` when Welch's 95% interval for the "
             "difference excludes 0, `n.s.` when it does not (not a real difference at this n), `—` with fewer than "
             "2 seeds on either side.\n")
    text += _score_table(groups) + _curve_table(groups) + _intruder_table(groups)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed or missing:
        text += "\n## Failed or missing jobs\n\n"
        text += "".join(f"- {r.get('status')}: {r.get('output_dir')}: {r.get('error')}\n" for r in failed)
        text += "".join(f"- missing (no metrics.json): {m}\n" for m in missing)
    return text


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    table = columns()
    writer.writerow([c for c, _ in table])
    for row in rows:
        writer.writerow(["" if (v := lookup(row, key)) is None else v for _, key in table])
    atomic_write_text(path, buffer.getvalue())


def print_table(groups: list[dict], rows: list[dict], missing: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reft_lab report")
    for name in ["method", "task", "n", "trainable", "% base"] + [n for _, n in summary()] + ["vs best"]:
        table.add_column(name, justify="left" if name in ("method", "task") else "right")
    for g in groups:
        table.add_row(g["label"], g["task"], str(g["n"]), f"{g['trainable_params']:,}", f"{g['trainable_pct']:.4f}",
                      *[_fmt(*g["stats"][key]) for key, _ in summary()], g.get("vs_best", "—"))
    console = Console(width=160)
    console.print(table)
    for r in rows:
        if r.get("status") != "ok":
            console.print(f"[red]{r.get('status')}[/red] {r.get('output_dir')}: {r.get('error')}")
    for m in missing:
        console.print(f"[yellow]missing[/yellow] {m}: no metrics.json")


def report_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reft-lab report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories to search for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report files (default: the first dir)")
    opts = parser.parse_args(args)
    rows, missing = gather(opts.dirs)
    if not rows and not missing:
        raise ReftLabError(f"report: no {METRICS_FILE} under {', '.join(map(str, opts.dirs))}")
    out = opts.out or opts.dirs[0]
    check_writable(out)
    groups = group(rows)
    atomic_write_text(out / "report.md", markdown(groups, rows, missing))
    write_csv(out / "report.csv", rows)
    plotted = pareto_plot(out / "pareto.png", groups)
    extra = [*sweep_plots(out, groups), *([out / "scores.png"] if score_plot(out / "scores.png", groups) else []),
             *([out / "curves.png"] if curve_plot(out / "curves.png", groups, curve_keys()) else []),
             *([out / "intruders.png"] if intruder_plot(out / "intruders.png", groups) else []),
             *([out / "frontier.png"] if frontier_plot(out / "frontier.png", groups) else []),
             *([out / "drift.png"] if drift_plot(out / "drift.png", groups) else [])]
    print_table(groups, rows, missing)
    if groups and not plotted:
        print("pareto.png has no points: no group has a knowledge-retention value (the base answered no probe "
              "question correctly, e.g. a tiny random model)")
    print(f"wrote {', '.join(str(p) for p in [out / 'report.md', out / 'report.csv', out / 'pareto.png', *extra])}")
    failed = sum(r.get("status") != "ok" for r in rows) + len(missing)
    return 1 if failed else 0


def study_table_main(args: list[str], usage: str, render, name: str) -> int:
    """A study's own summary: ``render(groups)`` of the jobs under a sweep directory, printed and
    written to ``<out dir>/<name>``. ``args``: the sweep directory and the out directory."""
    if len(args) != 2:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    sweep, out = map(Path, args)
    rows, _ = gather([sweep])
    text = render(group(rows))
    print(text)
    check_writable(out)
    atomic_write_text(out / name, text)
    return 0
