"""The GPU check (`make gpu-check`) asks only for what exists: a typo there would cost a GPU
session's few minutes, so its bench providers, scales and training jobs are checked here; and its
goals table reads the figures its rows hold."""

import re
import shlex
from pathlib import Path

import torch

from reft_lab import bench
from reft_lab.config import compose
from reft_lab.settings import RunSettings

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "experiments" / "gpu"
SCRIPT = (SCRIPT_DIR / "run.sh").read_text()


def test_bench_calls_name_existing_scales_and_providers():
    calls = re.findall(r"for scale in ([^;]+); do\s+bench_at \S+ \"[^\"]+\" \d+ \d+ \d+ ([^;\n]+)", SCRIPT)
    assert len(calls) >= 4, "the script's bench loops were not found"
    for scales, providers in calls:
        assert set(scales.split()) <= set(bench.SCALES), scales
        assert set(providers.split()) <= set(bench.PROVIDERS), providers


def test_training_jobs_are_valid_runs_on_cuda(monkeypatch, tmp_path):
    """Every job's overrides compose and pass the preflight of a CUDA run on a SmolLM2-shaped model
    (its config alone, as the script's random model; CUDA faked: the preflight only asks whether the
    device exists)."""
    from transformers import LlamaConfig

    LlamaConfig(**bench.SMOL).save_pretrained(tmp_path)
    jobs = re.search(r'for v in (.*?); do', SCRIPT, re.S)
    fixed = re.search(r"cli train (.*?) \$v ", SCRIPT, re.S)
    assert jobs and fixed, "the script's training loop was not found"
    common = [o if not o.startswith("model.name_or_path=") else f"model.name_or_path={tmp_path}"
              for o in shlex.split(fixed.group(1).replace("\\\n", " "))]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    variants = shlex.split(jobs.group(1).replace("\\\n", " "))
    assert len(variants) >= 6
    for variant in variants:
        overrides = [*common, "model.device=cuda", *variant.split()]
        RunSettings.from_cfg(compose([o for o in overrides if not o.startswith("hydra.")])).preflight()


def test_sections_and_test_files_exist():
    """Each section the script lists has its function, and the test files it names exist."""
    listed = re.search(r'^ALL="([^"]+)"', SCRIPT, re.M)
    assert listed, "the script's list of sections was not found"
    assert {f"section_{s}" for s in listed.group(1).split()} == set(re.findall(r"^(section_[\w-]+)\(\)", SCRIPT, re.M))
    named = set(re.findall(r"tests/test_\w+\.py", SCRIPT))
    root = SCRIPT_DIR.parents[1]
    assert len(named) >= 5 and all((root / f).exists() for f in named), sorted(named)


def _goals_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_goals", SCRIPT_DIR / "goals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goals_table_reads_the_archived_h100_check(capsys):
    """The goals table from the committed H100 folder: each figure is the one its rows give."""
    goals = _goals_module()
    folder = SCRIPT_DIR / "h100-2026-11-23"
    rows = {what: (measured, met) for what, measured, _, met in goals.goals(folder, folder / "kernels_matmul_backward.csv")}
    assert rows["LoReFT step vs the floor, 7B (bf16 base)"] == ("0.99 (reft_lab_loreft 245.0 ms / floor 247.5 ms)", "no")
    assert rows["LoReFT step vs pyreft, 1B-like"][0].startswith("0.58 (reft_lab_loreft_eager 102.3 ms")
    assert rows["config A step (launch-bound)"] == ("115.7 ms (reft_lab_loreft_eager)", "no")
    assert rows["memory vs pyreft, every scale"][0] == "smol_A 0.56, smol_b32 0.37, llama1b_b16 0.34, llama7b_b8 0.73"
    assert rows["`reft-lab train` LoReFT tokens/s vs LoRA, same job"][0].startswith("1.07–2.04 over 3 LoReFT jobs")
    kernel = next(v for k, v in rows.items() if k.startswith("fused fwd+bwd"))
    assert kernel == ("5% of copy bandwidth; 1.26× eager, 4.6× pyreft (worst of 6)", "no")
    assert goals.main([str(folder / "missing")]) == 2 and "holds no step benchmark" in capsys.readouterr().err


def test_script_runs_within_a_budget_and_packs(tmp_path):
    """The script's control flow on a machine without a GPU (nvidia-smi faked): with a budget too
    small for anything, every command is skipped with a line, the goals table is still written, and
    PACK=1 leaves the archive beside goals.md and run.log. Bad sections and budgets exit 2."""
    import os
    import subprocess
    import sys
    import tarfile

    bin_dir, work, out = tmp_path / "bin", tmp_path / "work", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU, 1 MiB, 0'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    work.mkdir()
    (work / "experiments").symlink_to(SCRIPT_DIR.parent)  # the script's own paths, without the checkout's wheels
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": sys.executable}

    def run(*args, **extra):
        return subprocess.run(["bash", str(SCRIPT_DIR / "run.sh"), str(out), *args], cwd=work, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)

    done = run("bench", "recompute", BUDGET_S="30", PACK="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    skipped = [line for line in done.stdout.splitlines() if ": skipped: " in line]
    assert len(skipped) == 5 and all("BUDGET_S=30" in line for line in skipped), done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["goals.md", "gpu-check.tar.gz", "run.log"]
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        assert "./run.log" in archive.getnames()
    assert run("benchh").returncode == 2 and run("bench", BUDGET_S="9m").returncode == 2
