"""The GPU issue's goals table, read from a GPU check's output folder.

    python experiments/gpu/goals.py OUTDIR [--kernels FILE]

OUTDIR is what `experiments/gpu/run.sh OUTDIR` wrote (or an archived copy such as
experiments/gpu/h100-2026-11-23): the step benchmark's `train_step.jsonl` (in OUTDIR/bench/ or
OUTDIR/), the kernel benchmark's CSV (`kernels.csv`, or --kernels) and the training jobs'
`train.jsonl`. Prints one markdown row per goal: what was measured, from which rows, the goal and
whether it is met; "pending" where the folder holds no measurement of it. Exits 2 when the folder
holds no benchmark at all.

Per scale, each provider's latest record is used: the compiled providers run in a later call than
the others (run.sh's `compiled` section), and on a GPU every provider is timed alone anyway.
ReFT's best step is the fastest of reft_lab's LoReFT providers that run every layer each step
(fused, eager edit, compiled blocks, CUDA graphs); the prefix cache's provider is left out, as it
skips the layers below the lowest edited one.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REFT_STEPS = ("reft_lab_loreft", "reft_lab_loreft_eager", "reft_lab_loreft_compiled", "reft_lab_loreft_graphs")
KERNEL_ELEMENTS = 16 * 2**20  # the kernel goals hold from 16M edited elements up


def latest_steps(folder: Path) -> dict[str, dict[str, dict]]:
    """{scale: {provider: its latest measurement}} from the step benchmark's JSON lines."""
    path = next((p for p in (folder / "bench" / "train_step.jsonl", folder / "train_step.jsonl") if p.exists()), None)
    steps: dict[str, dict[str, dict]] = {}
    for line in path.read_text().splitlines() if path else []:
        record = json.loads(line)
        scale = record["config"].get("scale")
        if scale:
            steps.setdefault(scale, {}).update(record["providers"])
    return steps


def best_reft(providers: dict[str, dict]) -> tuple[str, dict] | None:
    found = [(name, providers[name]) for name in REFT_STEPS if name in providers]
    return min(found, key=lambda item: item[1]["median_s"]) if found else None


def step_ratio(steps, scale: str, peer: str) -> tuple[float, str] | None:
    providers = steps.get(scale, {})
    best = best_reft(providers)
    if best is None or peer not in providers:
        return None
    name, value = best
    return value["median_s"] / providers[peer]["median_s"], f"{name} {value['median_s'] * 1e3:.1f} ms / {peer} {providers[peer]['median_s'] * 1e3:.1f} ms"


def kernel_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [row for row in csv.DictReader(path.open()) if row["mode"] == "full" and int(row["edited_elements"]) >= KERNEL_ELEMENTS]


def train_jobs(folder: Path) -> list[dict]:
    """Each training job's latest row (a folder written to again appends)."""
    path = folder / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return list({row["job"]: row for row in rows}.values())


def goals(folder: Path, kernels: Path | None) -> list[tuple[str, str, str, str]]:
    """(what, measured, goal, met) per goal of the GPU issue."""
    steps = latest_steps(folder)
    if not steps:
        raise SystemExit(f"goals.py: {folder} holds no step benchmark (bench/train_step.jsonl or train_step.jsonl)")
    rows = []

    def ratio_goal(what: str, scale: str, peer: str, goal: float) -> None:
        found = step_ratio(steps, scale, peer)
        rows.append((what, f"{found[0]:.2f} ({found[1]})" if found else "pending", f"≤ {goal}",
                     ("yes" if found[0] <= goal else "no") if found else "—"))

    ratio_goal("LoReFT step vs the floor, 1B-like (bf16 base)", "llama1b_b16", "floor", 0.65)
    ratio_goal("LoReFT step vs the floor, 7B (bf16 base)", "llama7b_b8", "floor", 0.65)
    ratio_goal("LoReFT step vs pyreft, 1B-like", "llama1b_b16", "pyreft_loreft", 0.35)
    ratio_goal("LoReFT step vs peft LoRA, 1B-like", "llama1b_b16", "peft_lora", 0.42)
    ratio_goal("LoReFT step vs pyreft, 7B", "llama7b_b8", "pyreft_loreft", 0.5)

    best7 = best_reft(steps.get("llama7b_b8", {}))
    mfu = best7[1].get("mfu") if best7 else None
    rows.append(("MFU of the LoReFT step (needed FLOPs), 7B", f"{mfu:.1%} ({best7[0]})" if mfu is not None else "pending",
                 "≥ 70%", ("yes" if mfu >= 0.70 else "no") if mfu is not None else "—"))

    best_a = best_reft(steps.get("smol_A", {}))
    rows.append(("config A step (launch-bound)", f"{best_a[1]['median_s'] * 1e3:.1f} ms ({best_a[0]})" if best_a else "pending",
                 "≤ 35 ms", ("yes" if best_a[1]["median_s"] <= 0.035 else "no") if best_a else "—"))

    memory = {scale: p["reft_lab_loreft"]["peak_train_bytes"] / p["pyreft_loreft"]["peak_train_bytes"]
              for scale, p in steps.items() if "reft_lab_loreft" in p and "pyreft_loreft" in p}
    rows.append(("memory vs pyreft, every scale", ", ".join(f"{s} {m:.2f}" for s, m in memory.items()) or "pending", "≤ 0.4",
                 ("yes" if max(memory.values()) <= 0.4 else "no") if memory else "—"))

    jobs = train_jobs(folder)
    lora = [j for j in jobs if j["status"] == "ok" and j["job"].split()[0] == "method=lora"]
    measured = []
    for base in lora:  # each LoRA job against the LoReFT jobs on the same base dtype
        dtype = [o for o in base["job"].split() if o.startswith("model.dtype=")]
        loreft = [j for j in jobs if j["status"] == "ok" and j["job"].startswith("method=loreft")
                  and [o for o in j["job"].split() if o.startswith("model.dtype=")] == dtype]
        if loreft:  # every LoReFT job counts: met only where the slowest is 1.2× LoRA
            ratios = sorted((j["tokens_per_s"] / base["tokens_per_s"], j["job"]) for j in loreft)
            where = f" on {dtype[0]}" if dtype else ""
            measured.append((ratios[0][0], f"{ratios[0][0]:.2f}–{ratios[-1][0]:.2f} over {len(ratios)} LoReFT jobs{where} "
                             f"(LoRA {base['tokens_per_s']:.0f} tokens/s; slowest: {ratios[0][1]})"))
    rows.append(("`reft-lab train` LoReFT tokens/s vs LoRA, same job", "; ".join(how for _, how in measured) or "pending",
                 "≥ 1.2", ("yes" if min(r for r, _ in measured) >= 1.2 else "no") if measured else "—"))

    path = kernels if kernels else folder / "kernels.csv"
    full = kernel_rows(path)
    by = {(r["shape"], r["dtype"], r["provider"]): r for r in full}
    cases = sorted({(shape, dtype) for shape, dtype, provider in by if provider == "triton"})
    if cases:
        bandwidth = min(float(by[c + ("triton",)]["gbs"]) / float(by[c + ("triton",)]["copy_gbs"]) for c in cases)
        speedups = {peer: min(float(by[c + (peer,)]["median_ms"]) / float(by[c + ("triton",)]["median_ms"])
                              for c in cases if c + (peer,) in by) for peer in ("eager", "pyreft")}
        measured_k = f"{bandwidth:.0%} of copy bandwidth; {speedups['eager']:.2f}× eager, {speedups['pyreft']:.1f}× pyreft (worst of {len(cases)})"
        met = bandwidth >= 0.5 and speedups["eager"] >= 2 and speedups["pyreft"] >= 3
    else:
        measured_k, met = "pending", None
    rows.append((f"fused fwd+bwd, ≥ 16M edited elements ({path.name})", measured_k, "≥ 50%; ≥ 2× eager, ≥ 3× pyreft",
                 ("yes" if met else "no") if met is not None else "—"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a GPU check's output folder")
    parser.add_argument("--kernels", type=Path, default=None, help="the kernel benchmark's CSV (default: FOLDER/kernels.csv)")
    opts = parser.parse_args(argv)
    try:
        rows = goals(opts.folder, opts.kernels)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    print(f"Goals, from {opts.folder}:\n")
    print("| what | measured | goal | met |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
