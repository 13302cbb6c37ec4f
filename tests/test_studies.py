"""Each study's command smoke-runs on the tiny model (the real runs are not part of CI)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from reft_lab.data import read_retention
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
                                              "rslora_r64_alpha32", "full"] and sweep.seed == "0,1,2"
    # two of the six presets keep the smoke run short
    report, jobs = _run_study("intruder_dimensions", tmp_path, "trainer.max_steps=2", "method_preset=rslora_r64_alpha32,full")
    assert sorted((j["method"], j["config"]["method"].get("rank"), j["config"]["method"].get("rslora")) for j in jobs) == \
        [("full", None, None), ("lora", 64, True)]
    assert len(list((tmp_path / "sweep").glob("*/intruders.json"))) == 2
    assert "## Intruder dimensions" in report and (tmp_path / "out" / "intruders.png").stat().st_size > 1000


def test_param_efficiency_frontier_study_runs_reports_and_states_the_ratio(tmp_path):
    from reft_lab.config import compose

    sweep = compose(["experiment=param_efficiency_frontier"], with_hydra=True).hydra.sweeper.params
    assert len(sweep.method_preset.split(",")) == 15 and sweep.task == "json_answer,arithmetic" and sweep.seed == "0,1,2"
    # the reference and one LoReFT under a tenth of its parameters, on one task, keep the smoke run short
    report, jobs = _run_study("param_efficiency_frontier", tmp_path, "task=json_answer",
                              "method_preset=loreft_r1_4layers,lora_r8_alpha16")
    assert sorted(j["method"] for j in jobs) == ["lora", "loreft"]
    # the tiny model's LoRA r8 has 7,168 parameters; LoReFT r1 on its 4 layers 1,032, over a tenth of them
    rows = [line for line in (tmp_path / "out" / "ratio.md").read_text().splitlines() if line.startswith("| json_answer")]
    assert rows[0] == "| json_answer | 7,168 | lora: 0.000 ± 0.000 | no LoReFT group ≤ 717 | | |"
    assert len(rows) == 2  # the table against the best weight update, here the same LoRA
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 1000


def _group(method, params, gains, **method_cfg):
    return {"method": method, "task": "json_answer", "trainable_params": params, "label": f"{method} {params}",
            "config": {"method": method_cfg}, "values": {"task_gain": gains}}


def test_frontier_ratio_picks_lora_r8_and_the_best_loreft_under_a_tenth():
    spec = importlib.util.spec_from_file_location("ratio", ROOT / "experiments" / "param_efficiency_frontier" / "ratio.py")
    ratio = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ratio)
    groups = [_group("lora", 460_800, [0.6, 0.6, 0.6], rank=8, target_modules=None),
              _group("lora", 2_442_240, [0.9, 0.9, 0.9], rank=8, target_modules=["q_proj"]),  # not the reference
              _group("loreft", 9_224, [0.2, 0.3, 0.4]), _group("loreft", 36_896, [0.3, 0.45, 0.6]),
              _group("loreft", 69_180, [0.9, 0.9, 0.9])]  # over a tenth: not a candidate
    [row] = ratio.ratio_rows(groups)
    assert row.startswith("| json_answer | 460,800 | lora 460800: 0.600 ± 0.000 | loreft 36896 (36,896) | 0.450 ± 0.373 | **0.75** ± 0.62 |")
    # against the best weight update (LoRA on more modules, 2,442,240): LoReFT at 69,180 is now a candidate
    [row] = ratio.ratio_rows(groups, ratio.best_weight_update)
    assert row.startswith("| json_answer | 2,442,240 | lora 2442240: 0.900 ± 0.000 | loreft 69180 (69,180) | 0.900 ± 0.000 | **1.00**")


def test_where_loreft_leaks_study_runs_its_four_sweeps_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERS", "early:1,middle:1,late:1")  # the tiny model's 4 layers hold one per third
    monkeypatch.setenv("LAUNCH", "hydra/launcher=basic")  # in-process: ten tiny jobs in seconds
    report, jobs = _run_study("where_loreft_leaks", tmp_path, "trainer.max_steps=2")
    configs = sorted((j["method"], str(j["config"]["method"].get("positions")), str(j["config"]["method"].get("layers")),
                      j["config"]["method"].get("rank")) for j in jobs if j["method"] == "loreft")
    assert len(jobs) == 10 and len(set(configs)) == 9  # 4 positions, 3 more layer spans, 2 more ranks; and LoRA
    assert ("loreft", "f3+l3", "late:1", 4) in configs and ("loreft", "f3+l3", "all", 8) in configs
    verdict = (tmp_path / "out" / "verdict.md").read_text()
    assert verdict.count("| loreft") == 9 and ("**Yes**" in verdict or "**No**" in verdict)


def _leak_group(method, gain, leak, label):
    return {"method": method, "label": label, "stats": {"task_gain": (gain, 0.01), "retention.leakage.after": (leak, 0.1),
                                                        "retention.kl_drift.after": (1.0, 0.1)}}


def test_leakage_verdict_needs_both_the_gain_and_the_leakage():
    spec = importlib.util.spec_from_file_location("verdict", ROOT / "experiments" / "where_loreft_leaks" / "verdict.py")
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)
    groups = [_leak_group("lora", 0.5, 0.4, "lora"), _leak_group("loreft", 0.8, 1.0, "best, leaks"),
              _leak_group("loreft", 0.75, 0.3, "close, clean"), _leak_group("loreft", 0.5, 0.0, "far, clean")]
    text = verdict.verdict(groups)
    assert "| close, clean | 0.750 ± 0.010 | 0.300 ± 0.100 | 1.000 ± 0.100 | yes | yes |" in text
    assert text.rstrip().endswith("**Yes**: close, clean")
    assert verdict.verdict(groups[:2] + groups[3:]).rstrip().endswith("leakage no worse than LoRA's.")


def test_known_split_records_the_base_models_answers(tmp_path):
    from reft_lab.cli import main

    out = tmp_path / "split.json"
    assert main(["analyze", "known-split", "--out", str(out), "--head", "200", "model=tiny"]) == 0
    split = json.loads(out.read_text())
    assert len(split["questions"]) == 231 and split["head"] == 200 and split["model"] == "tiny:llama"
    assert split["known"] == sum(q["known"] for q in split["questions"]) == 0  # a random model knows nothing
    assert all(q["base_output"] is not None and q["answers"] for q in split["questions"])
    assert main(["analyze", "known-split", "--out", str(out), "--head", "231", "model=tiny"]) == 2


def test_new_knowledge_study_trains_on_unknown_and_known_facts(tmp_path, monkeypatch):
    # the tiny model knows no fact, so the smoke run takes a split as a real model would make it:
    # after the first 200 questions, every third one known
    questions = [{"index": i, "question": q["question"], "answers": q["answers"], "base_output": "", "known": i % 3 == 0}
                 for i, q in enumerate(read_retention("knowledge_probe"))]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"model": "tiny:llama", "head": 200, "questions": questions}))
    monkeypatch.setenv("SPLIT", str(split))
    monkeypatch.setenv("HEAD", "4")
    report, jobs = _run_study("new_knowledge", tmp_path, "method=lora", "trainer.eval_at=[1]")
    assert sorted(j["task"] for j in jobs) == ["probe_known", "probe_unknown"]
    # 31 questions after the head: 10 known, 21 unknown; both tasks train on 5 and test on the other 5 known facts
    assert [set(j["task_scores"]["after"]) for j in jobs] == [{"answer_correct"}] * 2
    assert [len(j["curve"]) for j in jobs] == [2, 2] and "calibration" in report


def test_probe_fact_runs_refuse_a_split_of_another_base_and_a_probe_reaching_trained_facts(tmp_path, capsys):
    from reft_lab.accounting import fingerprint
    from reft_lab.cli import main
    from reft_lab.models import ModelConfig, load_model

    questions = [{"index": i, "question": q["question"], "answers": q["answers"], "base_output": "", "known": i % 3 == 0}
                 for i, q in enumerate(read_retention("knowledge_probe"))]
    split = tmp_path / "split.json"
    run = [*TINY, "method=lora", "task=probe_unknown", f"task.path={split}", "task.test_size=2"]

    def train(name: str, *extra: str) -> tuple[int, str]:
        code = main(["train", f"hydra.run.dir={tmp_path / name}", *run, *extra])
        return code, capsys.readouterr().err

    split.write_text(json.dumps({"model": "tiny:llama", "base_fingerprint": "0" * 64, "head": 200, "questions": questions}))
    code, err = train("other_base")
    assert code == 2 and "task.path=" in err and "fingerprint 000000000000" in err and "known-split" in err, err
    assert not (tmp_path / "other_base" / "adapter").exists()

    tiny_fingerprint = fingerprint(load_model(ModelConfig(name_or_path="tiny:llama")).model)
    split.write_text(json.dumps({"model": "tiny:llama", "base_fingerprint": tiny_fingerprint, "head": 200, "questions": questions}))
    code, err = train("probe_too_long", "retention.knowledge_probe=210")
    assert code == 2 and "retention.knowledge_probe=210 is not allowed: an integer in [0, 200] here" in err, err
    code, err = train("ok")
    assert code == 0, err
    assert read_metrics(tmp_path / "ok" / "metrics.json")["status"] == "ok"


def test_frontier_redraw_groups_the_committed_rows_by_preset(tmp_path):
    spec = importlib.util.spec_from_file_location("redraw", ROOT / "experiments" / "param_efficiency_frontier" / "redraw.py")
    redraw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(redraw)
    out = tmp_path / "frontier.png"
    assert redraw.main([str(ROOT / "experiments" / "param_efficiency_frontier" / "results" / "report.csv"), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    import csv

    with (ROOT / "experiments" / "param_efficiency_frontier" / "results" / "report.csv").open() as f:
        groups = redraw.groups_from_rows(list(csv.DictReader(f)))
    assert len(groups) == 30  # 15 presets × 2 tasks, 3 seeds each
    [r4] = [g for g in groups if g["task"] == "json_answer" and g["label"] == "loreft_r4_4layers"]
    assert r4["trainable_params"] == 36_896 and round(r4["stats"]["task_gain"][0], 3) == 0.635  # the README's table
