"""The frontier study's headline: LoReFT's best task gain at ≤ 1/10 of LoRA r8's trainable
parameters, as a fraction of LoRA r8's gain (q_proj and v_proj, peft's default targets), per task,
with its 95% interval over seeds (delta method). A second table takes as the reference the weight
update (LoRA, DoRA or full) with the task's best mean gain, since a short run can leave LoRA r8
under-trained and its small gain makes the headline ratio large and loose.

    python experiments/param_efficiency_frontier/ratio.py <sweep dir> <out dir>

Prints the table and writes it to <out dir>/ratio.md.
"""

from __future__ import annotations

import sys

from reft_lab.report import study_table_main
from reft_lab.report.stats import mean_ci, ratio_ci


def is_lora_r8_default(g: dict) -> bool:
    method = g["config"].get("method") or {}
    return (g["method"] == "lora" and method.get("rank") == 8 and method.get("target_modules") is None
            and not method.get("rslora"))


def lora_r8_reference(in_task: list[dict]) -> dict | None:
    return next((g for g in in_task if is_lora_r8_default(g)), None)


def best_weight_update(in_task: list[dict]) -> dict | None:
    updates = [g for g in in_task if g["method"] in ("lora", "dora", "full")]
    return max(updates, key=lambda g: mean_ci(g["values"]["task_gain"])[0], default=None)


def ratio_rows(groups: list[dict], pick_reference=lora_r8_reference) -> list[str]:
    rows = []
    for task in sorted({g["task"] for g in groups}):
        in_task = [g for g in groups if g["task"] == task]
        reference = pick_reference(in_task)
        if reference is None:
            rows.append(f"| {task} | no reference group | | | | |")
            continue
        budget = reference["trainable_params"] / 10
        small = [g for g in in_task if g["method"] == "loreft" and g["trainable_params"] <= budget]
        reference_gain = mean_ci(reference["values"]["task_gain"])
        reference_cell = f"{reference['label']}: {reference_gain[0]:.3f} ± {reference_gain[1] or 0:.3f}"
        if not small:
            rows.append(f"| {task} | {reference['trainable_params']:,} | {reference_cell} | no LoReFT group ≤ {budget:,.0f} | | |")
            continue
        best = max(small, key=lambda g: mean_ci(g["values"]["task_gain"])[0])
        gain = mean_ci(best["values"]["task_gain"])
        ratio = ratio_ci(best["values"]["task_gain"], reference["values"]["task_gain"])
        ratio_cell = "undefined (the reference's gain ≤ 0)" if ratio is None else (
            f"**{ratio[0]:.2f}** ± {ratio[1]:.2f}" if ratio[1] is not None else f"{ratio[0]:.2f}")
        rows.append(f"| {task} | {reference['trainable_params']:,} | {reference_cell} | {best['label']} "
                    f"({best['trainable_params']:,}) | {gain[0]:.3f} ± {gain[1] or 0:.3f} | {ratio_cell} |")
    return rows


def ratio_table(groups: list[dict]) -> str:
    header = ("| task | {0} params | {0} task gain | best LoReFT ≤ 1/10 of them (params) | its task gain "
              "| gain ratio LoReFT / {0} (95% CI) |\n|---|---|---|---|---|---|")
    return "\n".join(["LoReFT against LoRA r8 on q_proj, v_proj:", "", header.format("LoRA r8"), *ratio_rows(groups), "",
                      "LoReFT against the weight update (LoRA, DoRA, full) with the task's best mean gain:", "",
                      header.format("reference"), *ratio_rows(groups, best_weight_update)]) + "\n"


if __name__ == "__main__":
    sys.exit(study_table_main(sys.argv[1:], "python experiments/param_efficiency_frontier/ratio.py <sweep dir> <out dir>",
                              ratio_table, "ratio.md"))
