"""Launchers, resumable search, resume-skip, failure isolation and report statistics (tiny models)."""

import json
import os
from pathlib import Path

import pytest
import torch

from reft_lab.cli import main
from reft_lab.config import compose
from reft_lab.metrics import SCHEMA, read_metrics, validate, write_metrics
from reft_lab.report import group
from reft_lab.report.stats import ratio_ci

SMALL = ["model=tiny", "trainer=smoke", "retention.knowledge_probe=4", "retention.kl_prompts=2",
         "retention.leakage_prompts=2", "retention.kl_tokens=4", "task.test_size=4", "logger=none"]


def _jobs(root: Path) -> list[dict]:
    return [read_metrics(p) for p in sorted(root.rglob("metrics.json"))]


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_joblib_runs_jobs_in_parallel_without_oversubscribing(tmp_path):
    sweep = tmp_path / "joblib"
    assert main(["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=loreft,lora",
                 f"hydra.sweep.dir={sweep}", *SMALL]) == 0
    jobs = _jobs(sweep)
    assert [j["status"] for j in jobs] == ["ok", "ok"]
    assert {j["torch_threads"] for j in jobs} == {max(1, _cores() // 2)}


def test_submitit_local_runs_jobs(tmp_path):
    sweep = tmp_path / "submitit"
    assert main(["train", "-m", "hydra/launcher=submitit_local", "method=loreft,none", f"hydra.sweep.dir={sweep}", *SMALL]) == 0
    jobs = _jobs(sweep)
    assert [(j["method"], j["status"], j["torch_threads"]) for j in jobs] == [("loreft", "ok", 1), ("none", "ok", 1)]


def test_slurm_config_reaches_the_launcher():
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu-long", "hydra.launcher.gpus_per_task=2",
                   "hydra.launcher.timeout_min=90"], with_hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    from hydra.utils import instantiate

    instance = instantiate(launcher)
    params = instance.params
    assert params["partition"] == "gpu-long" and params["gpus_per_task"] == 2 and params["timeout_min"] == 90
    assert params["cpus_per_task"] == 8 and params["mem_gb"] == 32 and params["array_parallelism"] == 64
    assert params["signal_delay_s"] == 120 and params["max_num_timeout"] == 3  # requeue on preemption


def test_optuna_search_resumes_from_sqlite(tmp_path, monkeypatch, capsys):
    """The study lives in hydra.sweep.dir, so a search resumed from another working directory
    continues the same study."""
    study_dir = tmp_path / "search"
    args = ["train", "hparams_search=loreft_optuna", f"hydra.sweep.dir={study_dir}", *SMALL]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main([*args, "hydra.sweeper.n_trials=2"]) == 0
    assert (study_dir / "optuna.db").exists() and not any((tmp_path / "a").iterdir())
    monkeypatch.chdir(tmp_path / "b")
    assert main([*args, "hydra.sweeper.n_trials=3"]) == 0
    assert "2 trials finished, 1 to go" in capsys.readouterr().out
    assert main([*args, "hydra.sweeper.n_trials=3"]) == 0
    assert "already has 3 finished trials" in capsys.readouterr().out

    import optuna

    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    (summary,) = optuna.study.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len(list(study_dir.glob("trial_*/metrics.json"))) == 3  # three distinct parameter sets


def test_failed_search_trial_counts_as_failure(tmp_path, monkeypatch, capsys):
    """A trial whose job fails returns NaN, which optuna records as FAIL, not as a result."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", "hparams_search=loreft_optuna", "hydra.sweeper.n_trials=1", *SMALL, "task=jsonl",
                 f"task.path={tmp_path / 'missing.jsonl'}"])
    assert code == 2  # validated before the search started: nothing ran
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(4)))
    # the test split equals the training split: refused inside the job, so the trial fails
    capsys.readouterr()
    code = main(["train", "hparams_search=loreft_optuna", "hydra.sweeper.n_trials=1", *SMALL, "task=jsonl",
                 f"task.path={few}", f"task.test_path={few}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "every trial of this search failed" in err and "Traceback" not in err and "Record does not exist" not in err
    import optuna

    study_dir = next((tmp_path / "multirun" / "search").iterdir())
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]


def test_rerunning_a_sweep_skips_ok_jobs_and_retries_failed_ones(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "method=loreft,lora", f"hydra.sweep.dir={sweep}", *SMALL]
    assert main(args) == 0
    before = {p: p.read_text() for p in sweep.rglob("metrics.json")}
    failed = next(iter(before))
    metrics = json.loads(failed.read_text())
    write_metrics(failed.parent, {**metrics, "status": "failed", "error": "simulated"})
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 1
    assert read_metrics(failed)["status"] == "ok"
    unchanged = [p for p in before if p != failed]
    assert all(p.read_text() == before[p] for p in unchanged)


def _synthetic(tmp: Path, method: str, seed: int, gain: float, retention: float) -> None:
    metrics = {key: 0 for key in SCHEMA}
    metrics.update({
        "status": "ok", "error": None, "method": method, "model": "m", "task": "t", "seed": seed,
        "trainable_params": 10, "base_params": 100, "trainable_pct": 10.0, "adapter_bytes": 100, "task_metric": "x",
        "task_before": 0.0, "task_after": gain, "task_gain": gain, "task_scores": {}, "tokens_per_s": 1.0,
        "final_loss": 1.0, "base_fingerprint_before": "a", "base_fingerprint_after": "a", "versions": {},
        "config": {"method": {"name": method}, "seed": seed}, "output_dir": str(tmp / f"{method}{seed}"),
        "finished_at": "2026-11-23T00:00:00+00:00", "curve": [],
        "retention": {"knowledge_accuracy": {"before": 1.0, "after": 1.0},
                      "knowledge_retention": {"before": 1.0, "after": retention},
                      "knowledge_choice_accuracy": {"before": 1.0, "after": 1.0},
                      "knowledge_choice_retention": {"before": 1.0, "after": retention},
                      "calibration_ece": {"before": 0.1, "after": 0.2},
                      "kl_drift": {"before": 0.0, "after": 0.1}, "leakage": {"before": 0.0, "after": 0.0}},
    })
    metrics.pop("schema_version")
    write_metrics(tmp / f"{method}{seed}", metrics)
    assert validate(read_metrics(tmp / f"{method}{seed}" / "metrics.json")) == []


def test_metrics_of_an_older_schema_stay_valid(tmp_path):
    """A schema-1 file (before the knowledge-choice metrics) is still read; a schema-2 one needs them;
    schema 3 added calibration and the curve."""
    _synthetic(tmp_path, "alpha", 0, 0.5, 0.9)
    metrics = read_metrics(tmp_path / "alpha0" / "metrics.json")
    del metrics["curve"], metrics["retention"]["calibration_ece"]
    assert validate(metrics) == ["missing key 'curve'", "retention.calibration_ece needs before and after"]
    assert validate({**metrics, "schema_version": 2}) == []
    for name in ("knowledge_choice_accuracy", "knowledge_choice_retention"):
        del metrics["retention"][name]
    assert "retention.knowledge_choice_accuracy needs before and after" in validate({**metrics, "schema_version": 2})
    assert validate({**metrics, "schema_version": 1}) == []


def test_report_statistics_on_synthetic_metrics(tmp_path):
    for seed, (a, b, c) in enumerate([(0.5, 0.55, 0.10), (0.6, 0.65, 0.12), (0.7, 0.60, 0.11)]):
        _synthetic(tmp_path, "alpha", seed, a, 0.9)
        _synthetic(tmp_path, "beta", seed, b, 0.8)
        _synthetic(tmp_path, "gamma", seed, c, 0.7)
    _synthetic(tmp_path, "delta", 0, 0.2, 0.5)
    assert main(["report", str(tmp_path)]) == 0
    groups = {g["method"]: g for g in group([read_metrics(p) for p in tmp_path.rglob("metrics.json")])}
    mean, ci = groups["alpha"]["stats"]["task_gain"]
    assert mean == pytest.approx(0.6) and ci == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-4)  # sd 0.1, n 3
    assert groups["beta"]["stats"]["task_gain"][0] == pytest.approx(0.6)
    assert groups["beta"]["n"] == 3 and groups["delta"]["n"] == 1
    verdicts = {m: g["vs_best"] for m, g in groups.items()}
    assert verdicts["gamma"] == "lower" and verdicts["delta"] == "—" and "best" in (verdicts["alpha"], verdicts["beta"])
    assert "n.s." in (verdicts["alpha"], verdicts["beta"])
    md = (tmp_path / "report.md").read_text()
    assert "0.600 ± 0.248" in md and "n.s." in md and "lower" in md
    assert (tmp_path / "drift.png").stat().st_size > 1000  # every group has KL drift and leakage


def test_group_labels_name_what_differs_and_shorten_long_lists():
    def row(target_modules, seed):
        return {"status": "ok", "method": "lora", "task": "t", "model": "m", "trainable_params": 1, "trainable_pct": 1.0,
                "adapter_bytes": 1, "task_gain": 0.1, "seed": seed,
                "config": {"method": {"name": "lora", "rank": 8, "target_modules": target_modules}}}

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    labels = sorted(g["label"] for g in group([row(None, 0), row(None, 1), row(linear, 0)]))
    assert labels == ["lora (target_modules=[q_proj, … 7])", "lora (target_modules=default)"]


def test_ratio_of_means_has_a_delta_method_interval():
    ratio, half = ratio_ci([0.4, 0.5, 0.6], [0.8, 0.8, 0.8])  # the denominator exact: var(R) = var(mean a) / 0.8²
    assert ratio == pytest.approx(0.625) and half == pytest.approx(4.303 * (0.1 / 3 ** 0.5) / 0.8, rel=1e-4)
    ratio, half = ratio_ci([0.5, 0.5, 0.5], [0.4, 0.5, 0.6])  # numerator exact: var(R) = R² var(mean b) / 0.5²
    assert ratio == pytest.approx(1.0) and half == pytest.approx(4.303 * (0.1 / 3 ** 0.5) / 0.5, rel=1e-4)
    assert ratio_ci([0.3], [0.0, 0.0]) is None  # no gain to compare with
    assert ratio_ci([0.3], [0.6, 0.6]) == (pytest.approx(0.5), None)


def test_report_draws_and_tabulates_curves_over_steps(tmp_path):
    from reft_lab.metrics import write_metrics

    for seed, late in enumerate([0.6, 0.8]):
        _synthetic(tmp_path, "alpha", seed, late, 0.9)
        metrics = read_metrics(tmp_path / f"alpha{seed}" / "metrics.json")
        metrics["curve"] = [{"step": step, "task_after": after, "task_scores": {},
                             "retention": {"knowledge_retention": 1.0 - step / 10, "kl_drift": None}}
                            for step, after in ((1, 0.2), (5, late))]
        write_metrics(tmp_path / f"alpha{seed}", metrics)
    assert main(["report", str(tmp_path)]) == 0
    curve = group([read_metrics(p) for p in tmp_path.rglob("metrics.json")])[0]["curve"]
    assert list(curve) == [1, 5] and curve[5]["task_after"][0] == pytest.approx(0.7)
    assert curve[1]["retention.knowledge_retention.after"] == (pytest.approx(0.9), 0.0)
    assert "retention.kl_drift.after" not in curve[1]  # a null value is no observation
    md = (tmp_path / "report.md").read_text()
    assert "## Over training steps" in md and "| alpha | t | 2 | 5 | 0.700 ± 1.271 |" in md
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_report_plots_a_rank_sweep(tmp_path):
    sweep = tmp_path / "ranks"
    assert main(["train", "-m", "method.rank=1,2,4", f"hydra.sweep.dir={sweep}", *SMALL]) == 0
    assert main(["report", str(sweep)]) == 0
    assert (sweep / "sweep_json_answer_loreft_rank.png").stat().st_size > 1000
    assert (sweep / "frontier.png").stat().st_size > 1000  # three sizes of one method on one task


def test_one_job_on_two_processes_saves_once(tmp_path):
    """torchrun DDP (gloo on the CPU here, NCCL on GPUs): rank 0 alone evaluates and saves."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "reft_lab.cli", "train",
           f"hydra.run.dir={run}", *SMALL, "logger=csv", "trainer.max_steps=4", "trainer.checkpoint_every=2",
           "trainer.eval_at=[2]"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if torch.cuda.device_count() < 2:  # one process per GPU: with fewer, both ranks train on the CPU (gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run / "metrics.json")
    assert metrics["status"] == "ok" and metrics["world_size"] == 2 and metrics["steps"] == 4
    assert [point["step"] for point in metrics["curve"]] == [2, 4]  # rank 0 evaluates while rank 1 waits
    assert len(list(run.rglob("adapter_model.safetensors"))) == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert len((run / "train_log.csv").read_text().splitlines()) == 5  # rank 0 logs, once per step
