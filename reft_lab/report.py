"""``reft-lab report <dir>...``: gather metrics.json files into report.md, report.csv, pareto.png,
scores.png (every task score per group) and, for a sweep over one method key, sweep plots.

Jobs whose configs differ only by seed form one group (mean ± 95% CI over seeds). Failed jobs
(status "failed") and missing ones (a job directory without metrics.json) are listed as such.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from reft_lab.atomic import atomic_write, atomic_write_text, check_writable
from reft_lab.errors import ReftLabError
from reft_lab.evaluation.retention import RETENTION
from reft_lab.metrics import METRICS_FILE, STATUSES, lookup, read_metrics

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


# two-sided 95% t quantiles by degrees of freedom (normal beyond 30)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: float) -> float:
    """Two-sided 95% Student t quantile, rounding df down (conservative)."""
    below = [k for k in sorted(T95) if k <= max(1, math.floor(df))]
    return 1.96 if df > 30 else T95[below[-1]]


def _var(values: list[float], mean: float) -> float:
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t confidence interval (None for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, t95(n - 1) * math.sqrt(_var(values, mean) / n)


def differs(a: list[float], b: list[float]) -> bool | None:
    """Welch's 95% interval for mean(a) − mean(b) excludes 0; None when either has n < 2."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va, vb = _var(a, ma) / len(a), _var(b, mb) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma != mb
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0) + (vb ** 2 / (len(b) - 1) if vb else 0) or 1e-300)
    return abs(ma - mb) > t95(df) * se


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
                rows.append(row)
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if not (job / METRICS_FILE).exists():
                missing.append(str(job))
    return rows, missing


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
        for key in [k for k, _ in summary()] + score_keys(members):
            values[key] = [v for v in (lookup(m, key) for m in members) if isinstance(v, (int, float))]
            stats[key] = mean_ci(values[key]) if values[key] else (None, None)
        groups.append({"method": first["method"], "task": first["task"], "model": first["model"], "n": len(members),
                       "trainable_params": first["trainable_params"], "trainable_pct": first["trainable_pct"],
                       "adapter_bytes": first["adapter_bytes"], "config": first.get("config") or {}, "stats": stats,
                       "values": values})
    _label(groups)
    _compare_to_best(groups)
    return sorted(groups, key=lambda g: (g["task"], g["model"], g["label"]))


def score_keys(rows: list[dict]) -> list[str]:
    """Every task score after training that ``rows`` report (json_valid, answer_match, ...), as dotted keys."""
    names = {name for r in rows for name in ((r.get("task_scores") or {}).get("after") or {})}
    return [f"task_scores.after.{name}" for name in sorted(names)]


def _group_score_keys(groups: list[dict]) -> list[str]:
    return sorted({k for g in groups for k in g["stats"] if k.startswith("task_scores.after.")})


def _score_table(groups: list[dict]) -> str:
    keys = _group_score_keys(groups)
    if not keys:
        return ""
    head = ["group", "task", "n"] + [k.rsplit(".", 1)[1] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        lines.append("| " + " | ".join([g["label"], g["task"], str(g["n"])]
                                       + [_fmt(*g["stats"].get(k, (None, None))) for k in keys]) + " |")
    return "\n## Task scores after training\n\nEvery score the task reports (mean ± 95% CI over seeds).\n\n" + "\n".join(lines) + "\n"


def score_plot(path: Path, groups: list[dict]) -> bool:
    """Each group's task scores after training, bars with 95% CIs; False (nothing drawn) without scores."""
    keys = _group_score_keys(groups)
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(groups) + 2), 4.4), dpi=120)
    for j, key in enumerate(keys):
        means = [g["stats"].get(key, (None, None))[0] for g in groups]
        cis = [g["stats"].get(key, (None, None))[1] or 0 for g in groups]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(groups))]
        ax.bar([x for x, m in zip(xs, means) if m is not None], [m for m in means if m is not None], width,
               yerr=[c for c, m in zip(cis, means) if m is not None], capsize=3, label=key.rsplit(".", 1)[1])
    ax.set_xticks(range(len(groups)), [f"{g['label']}\n{g['task']}" for g in groups], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("score after training (mean ± 95% CI)")
    ax.set_title("Task scores after training")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


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
                g["label"] += " (" + ", ".join(f"{k}={(g['config'].get('method') or {}).get(k)}" for k in differing) + ")"


def _fmt(value, ci=None, digits=3) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text + (f" ± {ci:.{digits}f}" if ci is not None else "")


def markdown(groups: list[dict], rows: list[dict], missing: list[str]) -> str:
    head = ["method", "task", "n", "trainable params", "% of base", "adapter KiB"] + [name for _, name in summary()] + ["gain vs best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g["label"], g["task"], str(g["n"]), f"{g['trainable_params']:,}", f"{g['trainable_pct']:.4f}",
                 f"{g['adapter_bytes'] / 1024:.1f}"] + [_fmt(*g["stats"][key]) for key, _ in summary()] + [g.get("vs_best", "—")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "# reft_lab report\n\n" + "\n".join(lines) + "\n"
    meanings = "; ".join(f"{m.label} = {m.meaning}" for m in RETENTION if m.label)
    text += ("\nMeans over seeds ± 95% t-interval half-width (shown when n ≥ 2). Task gain = task after − task "
             f"before on the held-out test split; {meanings}. Gain vs best: the group with the highest mean "
             "task gain of its task and model is `best`; another group is `lower` when Welch's 95% interval for the "
             "difference excludes 0, `n.s.` when it does not (not a real difference at this n), `—` with fewer than "
             "2 seeds on either side.\n")
    text += _score_table(groups)
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


def pareto_plot(path: Path, groups: list[dict]) -> int:
    """Task gain against knowledge retention, one point per group; returns how many were plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    methods = sorted({g["method"] for g in groups})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for g in groups:
        x, xe = g["stats"]["retention.knowledge_retention.after"]
        y, ye = g["stats"]["task_gain"]
        if x is None or y is None:
            continue
        size = 30 + 25 * math.log10(max(10, g["trainable_params"]))
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="none", ecolor=colours[g["method"]], alpha=0.6, capsize=3)
        ax.scatter([x], [y], s=size, color=colours[g["method"]], edgecolor="black", linewidth=0.5, zorder=3)
        right = x > 0.6  # keep labels inside the axes
        ax.annotate(f"{g['label']} ({g['trainable_params']:,} params)", (x, y), textcoords="offset points",
                    xytext=(-6 if right else 6, 6), ha="right" if right else "left", fontsize=8)
    plotted = [g for g in groups if g["stats"]["retention.knowledge_retention.after"][0] is not None
               and g["stats"]["task_gain"][0] is not None]
    if not plotted:
        ax.text(0.5, 0.5, "no group has a knowledge-retention value:\nthe base answered no probe question correctly\n"
                "(e.g. a tiny random model), so there is nothing to retain", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="dimgrey")
    for m in methods:
        ax.scatter([], [], color=colours[m], label=m)
    ax.set_xlim(-0.02, 1.05)
    ax.margins(y=0.2)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("knowledge retention (share of base-correct probe answers kept)")
    ax.set_ylabel("task gain (after − before)")
    ax.set_title("Task gain vs retention (marker size ∝ log trainable params)")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return len(plotted)


SWEEP_KEYS = ("rank", "layers", "positions", "alpha", "lr", "tied")


def sweep_plots(out: Path, groups: list[dict]) -> list[Path]:
    """Task gain and knowledge retention against the one method key a sweep varied (rank, layers, …)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = defaultdict(list)
    for g in groups:
        by_method[(g["task"], g["model"], g["method"])].append(g)
    written = []
    for (task, _, method), same in sorted(by_method.items()):
        if len(same) < 2:
            continue
        settings = [g["config"].get("method") or {} for g in same]
        varying = [k for k in SWEEP_KEYS if len({json.dumps(s.get(k)) for s in settings}) > 1]
        if len(varying) != 1:
            continue
        key = varying[0]
        xs = [s.get(key) for s in settings]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        order = sorted(range(len(same)), key=lambda i: xs[i] if numeric else str(xs[i]))
        positions = [xs[i] for i in order] if numeric else list(range(len(order)))
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        for metric, name in (("task_gain", "task gain"), ("retention.knowledge_retention.after", "knowledge retention")):
            means = [same[i]["stats"][metric][0] for i in order]
            cis = [same[i]["stats"][metric][1] or 0 for i in order]
            if any(m is None for m in means):
                continue
            ax.errorbar(positions, means, yerr=cis, marker="o", capsize=3, label=name)
        if not numeric:
            ax.set_xticks(positions, [str(xs[i]) for i in order], rotation=20, fontsize=8)
        ax.set_xlabel(f"method.{key}")
        ax.set_title(f"{method} on {task}: sweep over {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"sweep_{task}_{method}_{key}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written.append(path)
    return written


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
    extra = sweep_plots(out, groups) + ([out / "scores.png"] if score_plot(out / "scores.png", groups) else [])
    print_table(groups, rows, missing)
    if groups and not plotted:
        print("pareto.png has no points: no group has a knowledge-retention value (the base answered no probe "
              "question correctly, e.g. a tiny random model)")
    print(f"wrote {', '.join(str(p) for p in [out / 'report.md', out / 'report.csv', out / 'pareto.png', *extra])}")
    failed = sum(r.get("status") != "ok" for r in rows) + len(missing)
    return 1 if failed else 0
