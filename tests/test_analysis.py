"""``reft-lab analyze intruders``: the definition on hand-made matrices, and on tiny trained jobs."""

import json

import pytest
import torch
from conftest import DEVICE

from reft_lab.analysis.intruders import intruders_of
from reft_lab.cli import main
from reft_lab.metrics import read_metrics

SMALL = ["model=tiny", "trainer=smoke", "retention.knowledge_probe=4", "retention.kl_prompts=2", "logger=none",
         "retention.leakage_prompts=2", "retention.kl_tokens=4", "task.test_size=4"]


def test_a_new_dominant_direction_is_an_intruder_and_a_rescaled_matrix_has_none():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32, dtype=torch.float64, device=DEVICE)  # its left singular vectors span 32 of the 64 output dims
    assert intruders_of(w0, 1.5 * w0, k=10, epsilon=0.5)[0] == []  # same singular vectors
    direction = torch.randn(64, dtype=torch.float64, device=DEVICE)
    q = torch.linalg.qr(w0)[0]
    direction -= q @ (q.T @ direction)  # outside W₀'s output space: orthogonal to every one of its singular vectors
    direction /= direction.norm()
    w = w0 + 100 * torch.outer(direction, torch.randn(32, dtype=torch.float64, device=DEVICE))  # far above W₀'s spectrum
    found, best, (u, _, _) = intruders_of(w0, w, k=10, epsilon=0.5)
    assert found == [0] and best[0] < 0.05 and abs(float(u[:, 0].to(direction) @ direction)) > 0.99
    assert all(b >= best[0] for b in best)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    for method in ("lora", "loreft"):
        assert main(["train", f"hydra.run.dir={root / method}", *SMALL, f"method={method}"]) == 0
    return root


@pytest.mark.floor  # peft's merge on the oldest peft
def test_scaling_by_one_reproduces_the_jobs_own_evaluation(jobs):
    """The merged weights W₀ + ΔW behave as the job's LoRA model did."""
    # ε = 1: every top vector short of perfect alignment is an intruder, so the evaluation re-runs
    assert main(["analyze", "intruders", str(jobs / "lora"), "--epsilon", "1", "--scale", "1"]) == 0
    result = json.loads((jobs / "lora" / "intruders.json").read_text())
    metrics = read_metrics(jobs / "lora" / "metrics.json")
    assert metrics["config"]["model"]["dtype"] == "float32"  # model.dtype=auto as decided where it ran: the reload's base
    assert result["matrices"] == 2 * 4  # q_proj and v_proj (peft's default) in each of 4 layers
    assert result["intruders"] > 0 and result["scale"]["evaluated"]
    after = result["scale"]["after"]
    assert after["task_after"] == metrics["task_after"]
    for name, value in metrics["retention"].items():  # None: no value on a tiny random model (nothing known)
        expected = value["after"] if value["after"] is None else pytest.approx(value["after"], rel=1e-3, abs=1e-6)
        assert after["retention"][name] == expected, name


def test_a_job_without_intruders_keeps_its_own_evaluation(jobs, capsys):
    assert main(["analyze", "intruders", str(jobs / "lora"), "--epsilon", "1e-9", "--scale", "0"]) == 0
    result = json.loads((jobs / "lora" / "intruders.json").read_text())
    assert result["intruders"] == 0 and not result["scale"]["evaluated"]
    assert result["scale"]["after"] == result["scale"]["before"]
    assert "nothing to scale (not re-evaluated)" in capsys.readouterr().out


def test_scaling_every_top_direction_away_changes_the_model(jobs):
    # ε = 1: each top vector short of perfect alignment counts, so scaling by 0 removes the top 2 directions
    assert main(["analyze", "intruders", str(jobs / "lora"), "--k", "2", "--epsilon", "1", "--scale", "0"]) == 0
    result = json.loads((jobs / "lora" / "intruders.json").read_text())
    assert result["intruders"] == 2 * result["matrices"]
    assert result["least_aligned_cosine"] == min(min(m["max_cosine"]) for m in result["per_matrix"]) < 1
    assert result["scale"]["after"]["retention"]["kl_drift"] > 10 * result["scale"]["before"]["retention"]["kl_drift"]
    # the report tabulates and draws it beside the job's metrics
    assert main(["report", str(jobs), "--out", str(jobs / "report")]) == 0
    table = (jobs / "report" / "report.md").read_text().split("## Intruder dimensions")[1].splitlines()
    header = next(line for line in table if line.startswith("| group |")).split(" | ")
    row = next(line for line in table if line.startswith("| lora |")).split(" | ")
    assert row[header.index("intruders per matrix")] == "2.000"  # 2 of the top 2; the ReFT job has no row
    assert float(row[header.index("least-aligned |cos|")]) == pytest.approx(result["least_aligned_cosine"], abs=5e-4)
    assert (jobs / "report" / "intruders.png").stat().st_size > 1000


def test_a_reft_job_has_no_weight_update_to_analyse(jobs, capsys):
    assert main(["analyze", "intruders", str(jobs / "loreft")]) == 2
    err = capsys.readouterr().err
    assert "method 'loreft' updates no weight (base fingerprint unchanged: True)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--k", "0"], "--k=0 is not allowed"),
    (["--epsilon", "1.5"], "--epsilon=1.5 is not allowed"),
    (["--scale", "-1"], "--scale=-1.0 is not allowed"),
    (["--modules", "nothing_here"], "no linear layer of the decoder"),
])
def test_bad_analysis_arguments(jobs, capsys, args, needle):
    assert main(["analyze", "intruders", str(jobs / "lora"), *args]) == 2
    assert needle in capsys.readouterr().err
