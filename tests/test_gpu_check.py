"""The GPU check script (`make gpu-check`) asks only for what exists: a typo there would cost a
GPU session's few minutes, so its bench providers, scales and training jobs are checked here."""

import re
import shlex
from pathlib import Path

import torch

from reft_lab import bench
from reft_lab.config import compose
from reft_lab.settings import RunSettings

SCRIPT = (Path(__file__).resolve().parents[1] / "experiments" / "gpu" / "run.sh").read_text()


def test_bench_calls_name_existing_scales_and_providers():
    calls = re.findall(r"for scale in ([^;]+);.*?--providers ([^2|]+?) 2>", SCRIPT, re.S)
    assert len(calls) >= 2, "the script's bench loops were not found"
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
