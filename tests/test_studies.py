"""Each study's command smoke-runs on the tiny model (the real runs are not part of CI)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "trainer=smoke", "logger=none", "retention.knowledge_probe=4", "retention.kl_prompts=2",
        "retention.leakage_prompts=2", "retention.kl_tokens=4", "task.test_size=4", "seed=0"]


def test_format_not_knowledge_study_runs_and_reports(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "SWEEP": str(tmp_path / "sweep"), "OUT": str(tmp_path / "out"),
           "REFT_LAB": str(Path(sys.executable).parent / "reft-lab")}
    run = subprocess.run(["bash", str(ROOT / "experiments/format_not_knowledge/run.sh"), *TINY, "method=loreft"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "out" / "report.md").read_text()
    for task in ("json_answer", "json_answer_shuffled", "json_answer_constant"):
        assert f"| {task} |" in report
    assert "json_valid" in report and (tmp_path / "out" / "scores.png").stat().st_size > 1000
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 3  # 3 answer kinds × loreft × seed 0
