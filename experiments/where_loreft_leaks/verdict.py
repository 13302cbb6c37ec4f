"""The leakage study's question: is there a LoReFT configuration with at least 90% of the best
LoReFT task gain and leakage no worse than LoRA's? Means over seeds (95% CI beside each); a
configuration qualifies on the means.

    python experiments/where_loreft_leaks/verdict.py <sweep dir> <out dir>

Prints the table and the answer and writes them to <out dir>/verdict.md.
"""

from __future__ import annotations

import sys

from reft_lab.report import study_table_main

GAIN, LEAK, KL = "task_gain", "retention.leakage.after", "retention.kl_drift.after"


def _cell(stats: dict, key: str) -> str:
    mean, ci = stats.get(key, (None, None))
    return "—" if mean is None else f"{mean:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")


def verdict(groups: list[dict]) -> str:
    loreft = [g for g in groups if g["method"] == "loreft" and g["stats"][GAIN][0] is not None]
    lora = next((g for g in groups if g["method"] == "lora"), None)
    if not loreft or lora is None or lora["stats"][LEAK][0] is None:
        return "No answer: the sweep needs LoReFT groups and a LoRA group with leakage measured.\n"
    best = max(g["stats"][GAIN][0] for g in loreft)
    lora_leak = lora["stats"][LEAK][0]
    lines = [f"Best LoReFT task gain: {best:.3f}; 90% of it: {0.9 * best:.3f}. LoRA: task gain {_cell(lora['stats'], GAIN)}, "
             f"leakage {_cell(lora['stats'], LEAK)}, KL drift {_cell(lora['stats'], KL)}.", "",
             "| configuration | task gain | leakage | KL drift | ≥ 90% of best gain | leakage ≤ LoRA's |", "|---|---|---|---|---|---|"]
    qualifying = []
    for g in sorted(loreft, key=lambda g: -g["stats"][GAIN][0]):
        gain_ok = g["stats"][GAIN][0] >= 0.9 * best
        leak = g["stats"][LEAK][0]
        leak_ok = leak is not None and leak <= lora_leak
        if gain_ok and leak_ok:
            qualifying.append(g["label"])
        lines.append(f"| {g['label']} | {_cell(g['stats'], GAIN)} | {_cell(g['stats'], LEAK)} | {_cell(g['stats'], KL)} "
                     f"| {'yes' if gain_ok else 'no'} | {'yes' if leak_ok else 'no'} |")
    lines += ["", ("**Yes**: " + "; ".join(qualifying)) if qualifying else
              "**No**: no LoReFT configuration here reaches 90% of the best task gain with leakage no worse than LoRA's."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(study_table_main(sys.argv[1:], "python experiments/where_loreft_leaks/verdict.py <sweep dir> <out dir>", verdict, "verdict.md"))
