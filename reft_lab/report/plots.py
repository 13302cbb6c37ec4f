"""The report's figures: task gain against retention (Pareto), task scores, a sweep over one method
key, each metric over training steps (the runs' curves), intruder dimensions, and task gain against
trainable parameters (the frontier). Each writes one PNG atomically."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from reft_lab.atomic import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _method_colours(plt, groups: list[dict]) -> dict:
    """One colour per method, the same in every figure that colours by method."""
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(sorted({g["method"] for g in groups}))}


def _method_legend(ax, colours: dict, **kwargs) -> None:
    for method, colour in colours.items():
        ax.scatter([], [], color=colour, label=method)
    ax.legend(fontsize=8, **kwargs)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)


def group_score_keys(groups: list[dict]) -> list[str]:
    return sorted({k for g in groups for k in g["stats"] if k.startswith("task_scores.after.")})


def score_plot(path: Path, groups: list[dict]) -> bool:
    """Each group's task scores after training, bars with 95% CIs; False (nothing drawn) without scores."""
    keys = group_score_keys(groups)
    if not keys:
        return False
    plt = _pyplot()
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
    _save(fig, path)
    return True


def pareto_plot(path: Path, groups: list[dict]) -> int:
    """Task gain against knowledge retention, one point per group; returns how many were plotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    colours = _method_colours(plt, groups)
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
    ax.set_xlim(-0.02, 1.05)
    ax.margins(y=0.2)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("knowledge retention (share of base-correct probe answers kept)")
    ax.set_ylabel("task gain (after − before)")
    ax.set_title("Task gain vs retention (marker size ∝ log trainable params)")
    ax.grid(alpha=0.3)
    if plotted:
        _method_legend(ax, colours, loc="best")
    fig.tight_layout()
    _save(fig, path)
    return len(plotted)


SWEEP_KEYS = ("rank", "layers", "positions", "alpha", "lr", "tied")


def sweep_plots(out: Path, groups: list[dict]) -> list[Path]:
    """Task gain and knowledge retention against the one method key a sweep varied (rank, layers, …)."""
    plt = _pyplot()
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
        _save(fig, path)
        written.append(path)
    return written


def curve_plot(path: Path, groups: list[dict], keys: list[tuple[str, str]]) -> bool:
    """Each curve metric against training step, a line per group with its 95% CI band; False
    (nothing drawn) when no group was evaluated at more than one step."""
    curved = [g for g in groups if len(g["curve"]) > 1]
    if not curved:
        return False
    plt = _pyplot()
    shown = [(k, name) for k, name in keys if any(k in stats for g in curved for stats in g["curve"].values())]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=120, squeeze=False)
    tasks = {g["task"] for g in curved}
    for ax, (key, name) in zip(axes.flat, shown):
        for i, g in enumerate(curved):
            points = [(step, *stats[key]) for step, stats in g["curve"].items() if key in stats]
            if not points:
                continue
            steps, means, cis = zip(*points)
            label = g["label"] + (f" · {g['task']}" if len(tasks) > 1 else "")
            line, = ax.plot(steps, means, marker="o", markersize=3, label=label, color=plt.get_cmap("tab10")(i % 10))
            ax.fill_between(steps, [m - (c or 0) for m, c in zip(means, cis)], [m + (c or 0) for m, c in zip(means, cis)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Over training steps (mean ± 95% CI over seeds)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def intruder_plot(path: Path, groups: list[dict]) -> bool:
    """Left: intruders per matrix against choice retention, a point per group. Middle: the
    least-aligned top singular vector's best |cosine| with the pre-trained ones (how near the job
    came to an intruder) against the same retention. Right: each retention measure before and
    after the intruders' singular values were scaled. False (nothing drawn) when no job was
    analysed (``reft-lab analyze intruders``)."""
    analysed = [g for g in groups if g["stats"].get("intruders.intruders_per_matrix", (None, None))[0] is not None]
    if not analysed:
        return False
    plt = _pyplot()
    legend_rows = math.ceil(len(analysed) / 3)  # the groups' legend goes under the panels, three a row
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4 + 0.22 * legend_rows), dpi=120)
    measures = [("knowledge_retention", "knowledge retention"), ("knowledge_choice_retention", "choice retention")]
    for i, g in enumerate(analysed):
        colour = plt.get_cmap("tab10")(i % 10)
        y, ye = g["stats"]["retention.knowledge_choice_retention.after"]
        if y is not None:
            for ax, key in ((left, "intruders.intruders_per_matrix"), (middle, "intruders.least_aligned_cosine")):
                x, xe = g["stats"].get(key, (None, None))
                if x is not None:
                    ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt="o", color=colour, capsize=3, label=g["label"])
        for j, (name, _) in enumerate(measures):
            before = g["stats"].get(f"retention.{name}.after", (None, None))
            after = g["stats"].get(f"intruders.scale.after.retention.{name}", (None, None))
            if before[0] is None or after[0] is None:
                continue
            pos = j * (len(analysed) + 1) + i
            right.bar([pos - 0.2], [before[0]], 0.4, yerr=[before[1] or 0], color=colour, alpha=0.5, capsize=2)
            right.bar([pos + 0.2], [after[0]], 0.4, yerr=[after[1] or 0], color=colour, capsize=2, hatch="//")
    left.set_xlabel("intruder dimensions per matrix")
    left.set_title("Intruders against retention", fontsize=10)
    middle.set_xlabel("least-aligned top vector's best |cos| with W₀'s (intruder: below ε)")
    middle.set_title("How near each update came to an intruder", fontsize=10)
    for ax in (left, middle):
        ax.set_ylabel("choice retention")
        ax.grid(alpha=0.3)
    right.set_xticks([j * (len(analysed) + 1) + (len(analysed) - 1) / 2 for j in range(len(measures))], [n for _, n in measures])
    right.set_title("Retention as trained (plain), intruders scaled (hatched)", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * legend_rows / fig.get_figheight() + 0.01, 1, 1))
    _save(fig, path)
    return True


def frontier_plot(path: Path, groups: list[dict]) -> bool:
    """Task gain against trainable parameters (log axis), a panel per task, a point per group with
    its 95% CI, numbered (the key below names each number and its size): the parameter-efficiency
    frontier. False (nothing drawn) unless some task has groups of different sizes."""
    by_task = defaultdict(list)
    for g in groups:
        if g["stats"]["task_gain"][0] is not None:
            by_task[g["task"]].append(g)
    tasks = sorted(t for t, same in by_task.items() if len({g["trainable_params"] for g in same}) > 1)
    if not tasks:
        return False
    drawn = sorted((g for t in tasks for g in by_task[t]), key=lambda g: (g["task"], g["trainable_params"], g["label"]))
    plt = _pyplot()
    fig, axes = _figure_with_key(plt, len(tasks), len(drawn))
    colours = _method_colours(plt, drawn)
    for ax, task in zip(axes, tasks):
        for number, g in enumerate(drawn, 1):
            if g["task"] == task:
                y, ye = g["stats"]["task_gain"]
                ax.errorbar([g["trainable_params"]], [y], yerr=ye, fmt="o", color=colours[g["method"]], capsize=3, alpha=0.8)
                ax.annotate(str(number), (g["trainable_params"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("task gain (after − before), mean ± 95% CI")
        ax.set_title(f"Parameter efficiency on {task}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _method_legend(ax, colours)
    _save_with_key(fig, path, [f"{g['task']}, {g['label']}: {g['trainable_params']:,} params" for g in drawn])
    return True


KEY_LINE = 0.13  # inches per line of a figure's numbered key (7 pt text)


def _figure_with_key(plt, panels: int, entries: int):
    """A row of ``panels`` axes with room below for a key of ``entries`` numbered lines, set in one
    column per panel."""
    lines = math.ceil(entries / panels)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.8 + KEY_LINE * lines), dpi=120, squeeze=False)
    return fig, list(axes.flat)


def _save_with_key(fig, path: Path, entries: list[str]) -> None:
    """Write the numbered key (``1: …``) under the axes of ``_figure_with_key``, then save."""
    panels = len(fig.axes)
    lines = math.ceil(len(entries) / panels)
    numbered = [f"{n}: {entry}" for n, entry in enumerate(entries, 1)]
    for column in range(panels):
        fig.text(0.01 + column / panels, 0.01, "\n".join(numbered[column * lines:(column + 1) * lines]), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, KEY_LINE * lines / fig.get_figheight() + 0.02, 1, 1))
    _save(fig, path)


DRIFT_KEYS = (("retention.kl_drift.after", "KL drift (mean per-token KL(base ‖ tuned))"),
              ("retention.leakage.after", "leakage (share of off-task prompts in the task's format)"))


def drift_plot(path: Path, groups: list[dict]) -> bool:
    """Task gain against KL drift and against leakage, a panel each, a point per group with its 95%
    CIs, numbered (the legend below names each number). False (nothing drawn) unless some group has
    both measures."""
    drawn = [g for g in groups if g["stats"]["task_gain"][0] is not None
             and all(g["stats"].get(key, (None, None))[0] is not None for key, _ in DRIFT_KEYS)]
    if not drawn:
        return False
    plt = _pyplot()
    fig, axes = _figure_with_key(plt, len(DRIFT_KEYS), len(drawn))
    colours = _method_colours(plt, drawn)
    for ax, (key, name) in zip(axes, DRIFT_KEYS):
        for number, g in enumerate(drawn, 1):
            (x, xe), (y, ye) = g["stats"][key], g["stats"]["task_gain"]
            ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt="o", color=colours[g["method"]], capsize=3, alpha=0.8)
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("task gain (after − before), mean ± 95% CI")
        ax.grid(alpha=0.3)
        _method_legend(ax, colours)
    axes[0].set_title("Task gain vs drift from the base", fontsize=10)
    axes[1].set_title("Task gain vs leakage", fontsize=10)
    _save_with_key(fig, path, [f"{g['task']}, {g['label']}" for g in drawn])
    return True
