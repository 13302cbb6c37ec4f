"""Training, multiruns, experiments, golden losses, loggers and the report (tiny models, CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch

from reft_lab.cli import main
from reft_lab.config import compose
from reft_lab.data.batching import PromptEncoder, encode_examples
from reft_lab.methods import attach
from reft_lab.metrics import read_metrics, validate
from reft_lab.models import load_model
from reft_lab.settings import RunSettings
from reft_lab.tasks import load_task
from reft_lab.training import seed_everything, train

SMALL = ["model=tiny", "trainer=smoke", "retention.knowledge_probe=4", "retention.kl_prompts=2",
         "retention.leakage_prompts=2", "retention.kl_tokens=4", "task.test_size=4"]


def _metrics(root: Path) -> list[dict]:
    return [read_metrics(p) for p in sorted(root.rglob("metrics.json"))]


@pytest.mark.floor
def test_two_job_multirun_and_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "method=loreft,lora", f"hydra.sweep.dir={sweep}", "logger=csv", *SMALL]) == 0
    jobs = sorted(_metrics(sweep), key=lambda m: m["method"])
    assert [m["method"] for m in jobs] == ["lora", "loreft"]
    from reft_lab.config import job_dirname

    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(  # named by the jobs' overrides
        job_dirname(f"logger=csv,method={m},model=tiny,retention.kl_prompts=2,retention.kl_tokens=4,retention.knowledge_probe=4,"
                    f"retention.leakage_prompts=2,task.test_size=4,trainer=smoke") for m in ("loreft", "lora"))
    assert job_dirname("method=lora,seed=1") == "method=lora,seed=1" and job_dirname("task.path=/a/b.jsonl") == "task.path=_a_b.jsonl"
    for m in jobs:
        assert validate(m) == [], validate(m)
        assert m["status"] == "ok" and m["steps"] == 3 and m["final_loss"] > 0
        job = Path(m["output_dir"])
        assert (job / "adapter" / "adapter_model.safetensors").exists() and (job / "train_log.csv").exists()
        assert len((job / "train_log.csv").read_text().splitlines()) == 4  # header + 3 steps
        # throughput is the steady state after the first step, whose warm-up is reported apart
        assert 0 < m["first_step_s"] < m["train_wall_s"] and m["tokens_per_s"] > 0
        steady_s = m["train_wall_s"] - m["first_step_s"]
        logged = [float(row.split(",")[-1]) for row in (job / "train_log.csv").read_text().splitlines()[1:]]
        assert m["tokens_per_s"] == pytest.approx(logged[-1], rel=1e-6) and steady_s > 0
    assert jobs[0]["base_fingerprint_before"] == jobs[0]["base_fingerprint_after"]
    assert main(["report", str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert "loreft" in md and "lora" in md
    assert (sweep / "pareto.png").stat().st_size > 1000
    assert (sweep / "report.csv").read_text().count("\n") == 3


@pytest.mark.floor
def test_jobs_on_a_bf16_base_train_evaluate_and_keep_the_base(tmp_path):
    """A CUDA job's default base (model.dtype=auto there), on the CPU: each method trains, is
    evaluated and saved; the record says bfloat16; a frozen base keeps its fingerprint, and full
    fine-tuning trains an fp32 copy (the adapter's tensors) of the same base."""
    sweep = tmp_path / "bf16"
    assert main(["train", "-m", "method=loreft,lora,full", "model.dtype=bfloat16", f"hydra.sweep.dir={sweep}",
                 "logger=none", *SMALL]) == 0
    jobs = {m["method"]: m for m in _metrics(sweep)}
    assert sorted(jobs) == ["full", "lora", "loreft"]
    for method, m in jobs.items():
        assert validate(m) == [] and m["status"] == "ok" and m["steps"] == 3, (method, m.get("error"))
        assert m["config"]["model"]["dtype"] == "bfloat16" and m["final_loss"] > 0
        measured = [v["after"] for v in m["retention"].values() if v["after"] is not None]  # None: nothing known on a random model
        assert measured and all(math.isfinite(value) for value in measured), (method, m["retention"])
    assert len({m["base_fingerprint_before"] for m in jobs.values()}) == 1  # one base for every method
    for method in ("loreft", "lora"):
        assert jobs[method]["base_fingerprint_after"] == jobs[method]["base_fingerprint_before"]
    saved = json.loads((Path(jobs["full"]["output_dir"]) / "adapter" / "reft_lab_adapter.json").read_text())
    assert saved["base"]["dtype"] == "bfloat16" and saved["dtype"] == "float32"


@pytest.mark.floor
def test_evaluation_during_training_records_a_curve_and_leaves_the_result_alone(tmp_path):
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    args = [*SMALL, "method=lora", "trainer.max_steps=4", "logger=none"]
    assert main(["train", f"hydra.run.dir={plain}", *args]) == 0
    assert main(["train", f"hydra.run.dir={curved}", *args, "trainer.eval_at=[1,3]"]) == 0
    m, p = read_metrics(curved / "metrics.json"), read_metrics(plain / "metrics.json")
    assert validate(m) == [] and [point["step"] for point in m["curve"]] == [1, 3, 4]
    assert [point["step"] for point in p["curve"]] == [4]  # every run has its final point
    last = m["curve"][-1]
    assert last["task_after"] == m["task_after"] and last["task_scores"] == m["task_scores"]["after"]
    assert last["retention"] == {name: value["after"] for name, value in m["retention"].items()}
    # evaluating between steps changes nothing the run learns
    assert m["final_loss"] == p["final_loss"] and m["retention"] == p["retention"]
    assert (curved / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (plain / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_run_killed_during_an_evaluation_evaluates_that_step_on_resume(tmp_path, monkeypatch):
    import reft_lab.recipe as recipe

    args = [*SMALL, "method=lora", "trainer.max_steps=4", "trainer.eval_at=[2]", "trainer.checkpoint_every=2", "logger=none"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", f"hydra.run.dir={whole}", *args]) == 0
    real = recipe.curve_point

    def dies(*a, **k):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr(recipe, "curve_point", dies)
    assert main(["train", f"hydra.run.dir={killed}", *args]) != 0  # after the step-2 checkpoint, in its evaluation
    assert (killed / "checkpoints" / "step_00000002").is_dir() and not (killed / "curve.json").exists()
    monkeypatch.setattr(recipe, "curve_point", real)
    assert main(["train", f"hydra.run.dir={killed}", *args]) == 0  # resumes at step 2, evaluates it first
    m, w = read_metrics(killed / "metrics.json"), read_metrics(whole / "metrics.json")
    assert [p["step"] for p in m["curve"]] == [2, 4] and m["curve"] == w["curve"]


def test_a_resumed_run_keeps_the_curve_points_of_its_own_configuration(tmp_path):
    from reft_lab.errors import ReftLabError
    from reft_lab.recipe import save_curve_point, saved_curve

    point = {"step": 2, "task_after": 0.5, "task_scores": {}, "retention": {}}
    save_curve_point(tmp_path, "run-a", point)
    save_curve_point(tmp_path, "run-a", {**point, "step": 1})
    assert saved_curve(tmp_path, "run-a", [2, 1]) == [{**point, "step": 1}, point]
    with pytest.raises(ReftLabError, match=r"lacks the evaluation at step\(s\) \[1, 2\]"):
        saved_curve(tmp_path, "run-b", [1, 2])  # another configuration's points are not this run's


def test_every_experiment_smoke_runs(tmp_path):
    sweep = tmp_path / "experiments"
    experiments = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "experiment").glob("*.yaml"))
    assert "quickstart" in experiments
    experiments.remove("new_knowledge")  # its task needs the base model's split file: tests/test_studies.py runs it
    assert main(["train", "-m", f"experiment={','.join(experiments)}", f"hydra.sweep.dir={sweep}", "logger=none", *SMALL,
                 "trainer.max_steps=2", "trainer.eval_at=[1]"]) == 0
    jobs = _metrics(sweep)
    assert len(jobs) == len(experiments) and all(m["status"] == "ok" for m in jobs)


# 3 steps of tiny:llama, fp32, seed 0, LoReFT defaults on json_answer (trainer=smoke), recorded with
# torch 2.13 (torch 2.11 matched them to 1e-5 on the H100 machine's CPU, 2026-11-23). Another torch's
# CPU kernels round differently: on the floor (2.6) LoRA's second loss moved by 6e-5 of itself
# (AdamW's first step divides gradients near its eps), so other versions are held to 1e-4.
GOLDEN_LOSSES = {"loreft": [5.631548, 5.612919, 5.615304], "lora": [5.642498, 5.622988, 5.623750]}
GOLDEN_TOLERANCE = 1e-5 if torch.__version__.split(".")[:2] in (["2", "13"], ["2", "11"]) else 1e-4


@pytest.mark.floor
@pytest.mark.parametrize("method", sorted(GOLDEN_LOSSES))
def test_golden_losses(method):
    settings = RunSettings.from_cfg(compose([*SMALL, f"method={method}"]))
    seed_everything(settings.seed)
    loaded = load_model(settings.model)
    task = load_task(settings.task)
    encoder = PromptEncoder(loaded.tokenizer, True)
    tuned = attach(loaded.model, settings.method)

    class Record:
        losses = []

        def log(self, step, values):
            self.losses.append(values["loss"])

    record = Record()
    train(tuned, encode_examples(encoder, task.train), settings.trainer, lr=settings.lr, seed=settings.seed,
          pad_id=encoder.pad_id, logger=record)
    assert record.losses == pytest.approx(GOLDEN_LOSSES[method], rel=GOLDEN_TOLERANCE, abs=1e-6)


def test_wandb_offline_writes_one_run_per_job(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "wb"
    assert main(["train", "-m", "method=loreft,none", f"hydra.sweep.dir={sweep}", "logger=wandb", *SMALL]) == 0
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job}: {runs}"


@pytest.mark.floor
def test_untouched_model_retains_everything(tmp_path):
    run = tmp_path / "none"
    assert main(["train", f"hydra.run.dir={run}", "method=none", "logger=none", *SMALL]) == 0
    m = read_metrics(run / "metrics.json")
    r = m["retention"]
    assert r["kl_drift"]["after"] == pytest.approx(0.0, abs=1e-7)
    assert r["leakage"]["after"] == r["leakage"]["before"]
    assert r["knowledge_accuracy"]["after"] == r["knowledge_accuracy"]["before"]
    assert m["task_gain"] == 0 and m["trainable_params"] == 0 and m["steps"] == 0


@pytest.mark.slow
def test_untouched_smollm2_retention_is_one(tmp_path):
    run = tmp_path / "none"
    overrides = ["method=none", "logger=none", "retention.knowledge_probe=24", "retention.kl_prompts=4",
                 "retention.leakage_prompts=4", "retention.kl_tokens=4", "task.test_size=4"]
    assert main(["train", f"hydra.run.dir={run}", *overrides]) == 0
    r = read_metrics(run / "metrics.json")["retention"]
    assert r["knowledge_accuracy"]["before"] > 0.2
    assert r["knowledge_retention"]["after"] == 1.0
    assert r["kl_drift"]["after"] == pytest.approx(0.0, abs=1e-6)
    assert r["leakage"]["after"] == r["leakage"]["before"]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', "data.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "data.jsonl:2: missing or empty string field 'response'"),
        ("\n\n", "the file has no examples"),
    ],
)
def test_bad_jsonl_fails_with_file_and_line(tmp_path, capsys, content, needle):
    path = _write(tmp_path / "data.jsonl", content)
    run = tmp_path / "run"
    assert main(["train", f"hydra.run.dir={run}", "task=jsonl", f"task.path={path}", "logger=none", *SMALL[:2]]) == 2
    assert needle in capsys.readouterr().err
    assert read_metrics(run / "metrics.json")["status"] == "failed"


def test_overlapping_test_split_is_refused(tmp_path, capsys):
    rows = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(6))
    train_path, test_path = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "test.jsonl", "".join(rows.splitlines(True)[:2]))
    run = tmp_path / "run"
    assert main(["train", f"hydra.run.dir={run}", "task=jsonl", f"task.path={train_path}", f"task.test_path={test_path}",
                 "logger=none", *SMALL[:2]]) == 2
    assert "also appear in the training split" in capsys.readouterr().err
    assert read_metrics(run / "metrics.json")["status"] == "failed"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("task=nope", "task/nope"),
        ("optimized_metric=accuracy", "optimized_metric"),
        ("optimized_metric=retention.nothing.after", "optimized_metric"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.lr=-1", "trainer.lr"),
        ("retention.knowledge_probe=100000", "retention.knowledge_probe"),
    ],
)
def test_bad_training_config_exits_nonzero_without_ok_metrics(tmp_path, capsys, override, needle):
    run = tmp_path / "run"
    assert main(["train", f"hydra.run.dir={run}", "logger=none", *SMALL, override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (run / "metrics.json").exists()


def test_optimized_metric_not_produced(tmp_path, capsys):
    """knowledge_retention is null on a tiny random model (it answers no probe question)."""
    run = tmp_path / "run"
    assert main(["train", f"hydra.run.dir={run}", "logger=none", *SMALL,
                 "optimized_metric=retention.knowledge_retention.after"]) == 2
    assert "optimized_metric" in capsys.readouterr().err
    assert read_metrics(run / "metrics.json")["status"] == "failed"


def test_failed_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    code = main(["train", "-m", "method=loreft,lora", "method.rank=2,100", f"hydra.sweep.dir={sweep}", "logger=none", *SMALL])
    assert code == 1
    statuses = sorted((m["method"], m["status"]) for m in _metrics(sweep))
    # rank 100 > hidden size 64 fails for loreft only; lora accepts any rank
    assert statuses == [("lora", "ok"), ("lora", "ok"), ("loreft", "failed"), ("loreft", "ok")]


@pytest.mark.floor
def test_seeded_runs_are_deterministic(tmp_path):
    numbers = []
    for name in ("a", "b"):
        assert main(["train", f"hydra.run.dir={tmp_path / name}", "logger=none", *SMALL]) == 0
        m = read_metrics(tmp_path / name / "metrics.json")
        numbers.append((m["final_loss"], m["task_after"], m["retention"]["kl_drift"]["after"]))
    assert numbers[0] == numbers[1]
