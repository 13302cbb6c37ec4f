"""Each study's command smoke-runs on the tiny model (the real runs are not part of CI)."""

import os
import subprocess
import sys
from pathlib import Path

from reft_lab.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "trainer=smoke", "trainer.max_steps=3", "trainer.batch_size=4", "logger=none", "retention.knowledge_probe=4", "retention.kl_prompts=2",
        "retention.leakage_prompts=2", "retention.kl_tokens=4", "task.test_size=4", "seed=0"]


def _run_study(study: str, tmp_path: Path, *overrides: str) -> tuple[str, list[dict]]:
    """The study's run.sh on the tiny model: its report.md and its jobs' metrics."""
    env = {**os.environ, "WANDB_MODE": "disabled", "SWEEP": str(tmp_path / "sweep"), "OUT": str(tmp_path / "out"),
           "REFT_LAB": str(Path(sys.executable).parent / "reft-lab")}
    run = subprocess.run(["bash", str(ROOT / "experiments" / study / "run.sh"), *TINY, *overrides], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return (tmp_path / "out" / "report.md").read_text(), [read_metrics(p) for p in (tmp_path / "sweep").glob("*/metrics.json")]


def test_format_not_knowledge_study_runs_and_reports(tmp_path):
    report, jobs = _run_study("format_not_knowledge", tmp_path, "method=loreft")
    for task in ("json_answer", "json_answer_shuffled", "json_answer_constant"):
        assert f"| {task} |" in report
    assert "json_valid" in report and (tmp_path / "out" / "scores.png").stat().st_size > 1000
    assert len(jobs) == 3  # 3 answer kinds × loreft × seed 0


def test_forgetting_over_steps_study_runs_and_reports(tmp_path):
    report, jobs = _run_study("forgetting_over_steps", tmp_path, "method=lora", "trainer.eval_at=[1,2]")
    assert len(jobs) == 1 and [p["step"] for p in jobs[0]["curve"]] == [1, 2, 3]
    assert "## Over training steps" in report and (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_intruder_dimensions_study_runs_analyses_and_reports(tmp_path):
    from reft_lab.config import compose

    sweep = compose(["experiment=intruder_dimensions"], with_hydra=True).hydra.sweeper.params
    assert sweep.method_preset.split(",") == ["lora_r8_alpha8", "lora_r8_alpha16", "lora_r64_alpha64", "lora_r64_alpha128",
                                              "rslora_r64_alpha16", "full"] and sweep.seed == "0,1,2"
    # two of the six presets keep the smoke run short
    report, jobs = _run_study("intruder_dimensions", tmp_path, "trainer.max_steps=2", "method_preset=rslora_r64_alpha16,full")
    assert sorted((j["method"], j["config"]["method"].get("rank"), j["config"]["method"].get("rslora")) for j in jobs) == \
        [("full", None, None), ("lora", 64, True)]
    assert len(list((tmp_path / "sweep").glob("*/intruders.json"))) == 2
    assert "## Intruder dimensions" in report and (tmp_path / "out" / "intruders.png").stat().st_size > 1000
