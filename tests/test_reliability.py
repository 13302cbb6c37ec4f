"""Crash safety, resume, the numerical guard, and a table of bad inputs (tiny models, CPU)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reft_lab.checkpoint import latest_checkpoint
from reft_lab.cli import main
from reft_lab.metrics import read_metrics

SMALL = ["model=tiny", "trainer=smoke", "retention.knowledge_probe=4", "retention.kl_prompts=2",
         "retention.leakage_prompts=2", "retention.kl_tokens=4", "task.test_size=4", "logger=none"]
# LoRA has dropout: the resumed run must restore the RNG too, not only the weights
LONG = [*SMALL, "method=lora", "trainer.max_steps=60", "trainer.checkpoint_every=5", "trainer.warmup_ratio=0.1"]


def _train_cmd(run: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "reft_lab.cli", "train", f"hydra.run.dir={run}", *extra]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _wait_for_checkpoint(proc, run: Path, min_step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")] if (run / "checkpoints").exists() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {min_step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def _comparable(metrics: dict) -> dict:
    drop = {"train_wall_s", "tokens_per_s", "first_step_s", "peak_mem_bytes", "output_dir", "finished_at", "config"}
    return {k: v for k, v in metrics.items() if k not in drop}


def _log_rows(run: Path) -> list[list[str]]:
    """train_log.csv without its throughput column (timing differs between runs)."""
    return [row.split(",")[:4] for row in (run / "train_log.csv").read_text().splitlines()]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, [*LONG, "logger=csv"]), check=True, env=_env(), capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, [*LONG, "logger=csv"]), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    kill_after = random.Random().randrange(10, 50)
    _wait_for_checkpoint(proc, run, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "metrics.json").exists(), "the job finished before it was killed"

    resumed = subprocess.run(_train_cmd(run, [*LONG, "logger=csv"]), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    # the step log keeps every step once: those before the checkpoint, then the re-run ones
    assert len(_log_rows(run)) == 61 and _log_rows(run) == _log_rows(reference)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    assert _comparable(read_metrics(run / "metrics.json")) == _comparable(read_metrics(reference / "metrics.json"))


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    run = tmp_path / "term"
    args = [*SMALL, "method=loreft", "trainer.max_steps=2000", "trainer.checkpoint_every=10"]
    proc = subprocess.Popen(_train_cmd(run, args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, run, 20)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "interrupted by SIGTERM" in err
    metrics = read_metrics(run / "metrics.json")
    assert metrics["status"] == "failed" and "interrupted by SIGTERM" in metrics["error"]
    newest = latest_checkpoint(run)
    assert newest is not None and int(newest.name.split("_")[1]) >= 20

    # a truncated checkpoint is skipped in favour of the previous complete one
    victim = newest / "trainable.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    fallback = latest_checkpoint(run)
    assert fallback is not None and fallback != newest


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import reft_lab.training.loss as loss_module

    real = loss_module.response_loss
    calls = {"n": 0}

    def poisoned(tuned, batch):
        calls["n"] += 1
        loss = real(tuned, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loss_module, "response_loss", poisoned)
    run = tmp_path / "nan"
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "trainer.max_steps=8", "trainer.checkpoint_every=2"]) == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and "last good checkpoint is step 4" in err
    calls["n"] = 0  # again, with checkpoints on signals only: none was written, and the message says so
    assert main(["train", f"hydra.run.dir={tmp_path / 'nan_uncheckpointed'}", *SMALL, "trainer.max_steps=8",
                 "trainer.checkpoint_every=0"]) == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and "no checkpoint was written" in err and "last good" not in err
    metrics = read_metrics(run / "metrics.json")
    assert metrics["status"] == "failed" and "step 5" in metrics["error"]
    assert latest_checkpoint(run).name == "step_00000004"
    assert not (run / "adapter").exists()


def test_completed_job_is_skipped_unless_forced(tmp_path, capsys):
    run = tmp_path / "done"
    assert main(["train", f"hydra.run.dir={run}", *SMALL]) == 0
    first = (run / "metrics.json").read_text()
    assert main(["train", f"hydra.run.dir={run}", *SMALL]) == 0
    assert "skipped" in capsys.readouterr().out
    assert (run / "metrics.json").read_text() == first
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "skip_completed=false"]) == 0
    assert json.loads((run / "metrics.json").read_text())["finished_at"] >= json.loads(first)["finished_at"]


def test_checkpoint_from_another_config_is_refused(tmp_path, capsys):
    run = tmp_path / "changed"
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2"]) == 0
    (run / "metrics.json").unlink()
    code = main(["train", f"hydra.run.dir={run}", *SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2", "method.rank=2"])
    assert code == 2 and "different configuration" in capsys.readouterr().err


# --- bad inputs -------------------------------------------------------------------------------


def _files(tmp: Path) -> dict[str, str]:
    good = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8))
    (tmp / "malformed.jsonl").write_text(good + '{"prompt": "x", "response": \n')
    (tmp / "missing.jsonl").write_text(good + '{"prompt": "x"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    (tmp / "array.jsonl").write_text('["prompt", "response"]\n')
    broken_model = tmp / "broken_model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{not json")
    return {k: str(tmp / v) for k, v in [("malformed", "malformed.jsonl"), ("missing", "missing.jsonl"), ("empty", "empty.jsonl"),
                                         ("latin1", "latin1.jsonl"), ("array", "array.jsonl"), ("broken_model", "broken_model")]}


BAD_TRAIN = [
    (["method=unknown"], "method/unknown"),
    (["method.rank=0"], "method.rank=0"),
    (["method.rank=abc"], "method.rank='abc'"),
    (["method.rank=100"], "method.rank=100"),
    (["method.layers=[0,99]"], "method.layers"),
    (["method.layers=some"], "method.layers"),
    (["method.positions=f3l3"], "method.positions"),
    (["method.dropout=2.0"], "method.dropout"),
    (["method.tied=maybe"], "method.tied"),
    (["method=lora", "method.target_modules=[nope]"], "method.target_modules"),
    (["method=lora", "method.alpha=0"], "method.alpha"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.lr=-1"], "trainer.lr"),
    (["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio"),
    (["trainer.batch_size=two"], "trainer.batch_size"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every"),
    (["trainer.eval_at=[3]"], "trainer.eval_at"),
    (["-m", "--cfg", "job"], "--cfg shows one job's config: drop -m"),
    (["method.rslora=maybe"], "method.rslora"),
    (["seed=abc"], "seed"),
    (["optimized_metric=nope"], "optimized_metric"),
    (["logger=nope"], "logger/nope"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["task=nope"], "task/nope"),
    (["+unknown_key=1"], "unknown_key"),
    (["model.dtype=float8"], "model.dtype"),
    (["model.name_or_path=/missing/model/dir"], "model.name_or_path"),
    (["retention.kl_tokens=0"], "retention.kl_tokens"),
    (["task=jsonl", "task.path={malformed}"], "malformed.jsonl:9: not valid JSON"),
    (["task=jsonl", "task.path={missing}"], "missing.jsonl:9: missing or empty string field 'response'"),
    (["task=jsonl", "task.path={empty}"], "the file has no examples"),
    (["task=jsonl", "task.path={latin1}"], "not UTF-8"),
    (["task=jsonl", "task.path={array}"], "array.jsonl:1: expected a JSON object"),
    (["task=jsonl", "task.path=/no/such/file.jsonl"], "task.path"),
    (["model.name_or_path={broken_model}"], "config.json"),
]


@pytest.mark.parametrize("args,needle", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_training_input(tmp_path, capsys, args, needle):
    files = _files(tmp_path)
    args = [a.format(**files) for a in args]
    run = tmp_path / "run"
    code = main(["train", f"hydra.run.dir={run}", *SMALL, *args])
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (run / "metrics.json").exists() or read_metrics(run / "metrics.json")["status"] == "failed"


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    run = tmp_path_factory.mktemp("adapter_job")
    assert main(["train", f"hydra.run.dir={run}", *SMALL]) == 0
    return run / "adapter"


def test_bad_adapter_directories(tmp_path, capsys, saved_adapter):
    import shutil

    cases = []
    cases.append(([str(tmp_path / "absent")], "does not exist"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(saved_adapter, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    cases.append(([str(corrupt)], "cannot be read"))
    cases.append(([str(saved_adapter), "--model", "tiny:gpt2"], "was trained on base"))
    not_adapter = tmp_path / "plain"
    not_adapter.mkdir()
    cases.append(([str(not_adapter)], "reft_lab_adapter.json is missing"))
    for adapter_args, needle in cases:
        code = main(["generate", "--adapter", *adapter_args, "hello"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, (adapter_args, err)


def test_bad_cli_arguments(tmp_path, capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_problem_reported_at_once(capsys):
    assert main(["train", *SMALL, "method.rank=0", "trainer.max_steps=0", "model.dtype=float8"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and {l.split("error: ")[1].split("=")[0] for l in lines} == {"model.dtype", "method.rank", "trainer.max_steps"}


# --- round two: stale results, bounded inputs, runs that learned nothing, records ---------------


def test_a_finished_job_with_other_settings_is_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "job"
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "method.rank=2"]) == 0
    metrics, record = (run / "metrics.json").read_text(), (run / ".hydra" / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "method.rank=4"]) == 2
    err = capsys.readouterr().err
    assert "finished job with other settings (method.rank: 2 then, 4 now)" in err and len(err.strip().splitlines()) <= 2
    assert (run / "metrics.json").read_text() == metrics and (run / ".hydra" / "config.yaml").read_text() == record
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "method.rank=2", "trainer.log_every=2"]) == 0  # same numbers
    assert "skipped" in capsys.readouterr().out and (run / ".hydra" / "config.yaml").read_text() == record


def test_a_sweep_with_new_values_runs_them_and_skips_only_the_same_ones(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    base = ["train", "-m", "method=lora", f"hydra.sweep.dir={sweep}", *SMALL]
    assert main([*base, "method.rank=1,4"]) == 0
    capsys.readouterr()
    assert main([*base, "method.rank=2,4"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 1  # rank 4 only; rank 2 is new and runs
    ranks = sorted(read_metrics(p)["config"]["method"]["rank"] for p in sweep.rglob("metrics.json"))
    assert ranks == [1, 2, 4]


def test_an_overlong_example_is_refused_with_its_line_or_truncated(tmp_path, capsys):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(12)]
    rows[7]["prompt"] = "x" * 2000  # the tiny model's context is 512 (byte tokens)
    data, test = tmp_path / "long.jsonl", tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps({"prompt": f"other {i}", "response": f"r {i}"}) + "\n" for i in range(4)))
    args = ["train", *SMALL, "task=jsonl", f"task.path={data}", f"task.test_path={test}"]
    assert main([*args, f"hydra.run.dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:8: prompt" in err and "task.max_length=512" in err and "Traceback" not in err
    assert main([*args, f"hydra.run.dir={tmp_path / 'cut'}", "task.overlong=truncate"]) == 0
    assert main([*args, f"hydra.run.dir={tmp_path / 'over'}", "task.max_length=600"]) == 2
    assert "task.max_length=600 is not allowed: null or an integer ≤ 512" in capsys.readouterr().err


def test_a_step_that_cannot_fit_in_memory_fails_before_training(tmp_path, capsys, monkeypatch):
    import reft_lab.training.budget as budget

    monkeypatch.setattr(budget, "free_bytes", lambda device: 2**20)
    run = tmp_path / "big"
    assert main(["train", f"hydra.run.dir={run}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "one training step would need about" in err and "GiB are free: lower trainer.batch_size" in err
    assert read_metrics(run / "metrics.json")["status"] == "failed" and not (run / "checkpoints").exists()


def test_a_run_whose_loss_rises_is_diverged_not_ok(tmp_path, monkeypatch, capsys):
    import reft_lab.training.loss as loss_module

    real, calls = loss_module.response_loss, {"n": 0}

    def rising(tuned, batch):
        calls["n"] += 1
        return real(tuned, batch) * calls["n"]  # ends 10× where it started

    monkeypatch.setattr(loss_module, "response_loss", rising)
    run = tmp_path / "up"
    assert main(["train", f"hydra.run.dir={run}", *SMALL, "trainer.max_steps=10"]) == 1
    metrics = read_metrics(run / "metrics.json")
    assert metrics["status"] == "diverged" and "the loss rose from" in metrics["error"] and metrics["steps"] == 10
    assert not (run / "adapter").exists()
    assert main(["report", str(run)]) == 1
    assert "diverged" in (run / "report.md").read_text()


def test_divergence_rule():
    import torch

    from reft_lab.training.loop import divergence

    flat = [5.6, 5.5, 5.7, 5.6, 5.5, 5.6, 5.7, 5.5, 5.6, 5.6]
    assert divergence(flat, [torch.ones(2)]) is None
    assert divergence([2.0, 1.5, 1.2, 1.0, 0.9], [torch.ones(2)]) is None
    assert divergence([2.5] * 5 + [10.8] * 5, [torch.ones(2)]).startswith("the loss rose from 2.5")
    assert divergence([2.0, 9.0, 2.0], [torch.ones(2)]) is None  # one spike, then back
    assert divergence([2.0, 9.0, 2.0, 2.1, 1.9, 2.0, 8.5, 2.0, 1.9, 2.0], [torch.ones(2)]) is None  # spikes inside the windows
    # LoRA on SmolLM2 at trainer.lr=1e30 without clipping: ln(vocab) from step 2 on (train_log.csv of that run)
    assert divergence([4.543] + [10.803] * 9, [torch.ones(2)]).startswith("the loss rose from 4.543")
    assert "NaN or infinite" in divergence(flat, [torch.tensor([1.0, float("nan")])])


BAD_ROUND_TWO = [
    (["seed=-1"], "seed=-1 is not allowed"),
    (["threads=-1"], "threads=-1 is not allowed"),
    (["method.lr=0"], "method.lr=0 is not allowed"),
    (["method=lora", "method.lr=0"], "method.lr=0 is not allowed"),
    (["task.overlong=cut"], "task.overlong"),
    (["hydra.run.dir=/proc/reft_lab_run"], "hydra.run.dir=/proc/reft_lab_run: cannot write there"),
]


@pytest.mark.parametrize("args,needle", BAD_ROUND_TWO, ids=[" ".join(a) for a, _ in BAD_ROUND_TWO])
def test_bad_input_round_two(tmp_path, capsys, args, needle):
    assert main(["train", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", f"hydra.run.dir={blocker / 'run'}", *SMALL]) == 2
    assert main(["train", "-m", f"hydra.sweep.dir={blocker / 'sweep'}", "method=loreft,lora", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("cannot write there" in line and "is not a directory" in line for line in err)


def test_generate_and_report_refuse_bad_arguments_in_one_line(tmp_path, capsys, saved_adapter):
    adapter = str(saved_adapter)
    cases = [
        (["generate", "--adapter", adapter, "--max-new-tokens", "0", "hi"], "--max-new-tokens=0 is not allowed"),
        (["generate", "--adapter", adapter, "--batch-size", "0", "hi"], "--batch-size=0 is not allowed"),
        (["generate", "--adapter", adapter, ""], "prompt 1 is empty"),
        (["generate", "--adapter", adapter, "--max-new-tokens", "500", "x" * 100], "exceeds the model's context of 512"),
        (["report", str(saved_adapter.parent), "--out", "/proc/reft_lab_report"], "--out=/proc/reft_lab_report: cannot write"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)


def test_report_lists_a_malformed_metrics_file_instead_of_crashing(tmp_path, capsys, saved_adapter):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(saved_adapter.parent, root / "good")
    (root / "bad").mkdir()
    (root / "bad" / "metrics.json").write_text(json.dumps({"status": "ok", "method": "loreft"}))
    assert main(["report", str(root)]) == 1
    out = capsys.readouterr().out
    assert "invalid" in out and "missing or malformed key 'task'" in out
    assert "pareto.png has no points" in out  # a tiny model knows no probe answer: nothing to retain
    assert "loreft" in (root / "report.md").read_text()


def test_help_texts(capsys):
    assert main(["params", "--help"]) == 0
    assert "usage: reft-lab params" in capsys.readouterr().out
    assert main(["train", "--cfg", "job", "model=tiny", "trainer=smoke"]) == 0  # every default, from the dataclasses
    out = capsys.readouterr().out
    assert "name_or_path: tiny:llama" in out and "prefix_cache_gb: 2.0" in out and "max_steps: 3" in out
    assert main(["train", "--help"]) == 0
    assert "reft-lab train is powered by Hydra" in capsys.readouterr().out
    said = {"generate": ["tokens generated per answer", "prompts generated at once", "the prompts, each one argument"],
            "bench": ["the training steps to time", "untimed steps per provider", "timed steps per provider",
                      "peak training memory", "record and the CSV table"],
            "analyze intruders": ["top singular vectors of each tuned matrix", "is an intruder",
                                  "re-run the job's evaluation", "leaf names of the linear layers"]}
    for command, phrases in said.items():
        with pytest.raises(SystemExit):
            main([*command.split(), "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(phrase in out for phrase in phrases), (command, out)


def test_analyze_lists_its_analyses_and_refuses_others(capsys):
    assert main(["analyze"]) == 0
    out = capsys.readouterr().out
    assert "intruders <job dir>" in out and "known-split --out FILE" in out
    assert main(["analyze", "spectra"]) == 2
    assert capsys.readouterr().err.strip() == "reft-lab analyze: error: unknown analysis 'spectra'; allowed: intruders, known-split"


def test_beam_search_and_several_sequences_are_edited(tiny):
    """generate repeats each prompt once per beam / returned sequence: every copy gets the edit, so
    the beams are the edited model's top tokens, not the base's."""
    import torch

    from reft_lab.methods import attach

    loaded = tiny()
    tuned = attach(loaded.model, {"name": "direft", "layers": [1, 2, 3], "rank": 4})
    with torch.no_grad():
        for p in tuned.interventions.parameters():
            p.mul_(30)  # an edit large enough to change the next token
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 9, 8, 7, 6]])
    mask = torch.ones_like(ids)
    k = 3
    beams = tuned.generate(ids, attention_mask=mask, max_new_tokens=1, num_beams=k, num_return_sequences=k,
                           do_sample=False, pad_token_id=0)[:, -1].reshape(2, k)
    edited_top = tuned(ids, attention_mask=mask).logits[:, -1].topk(k).indices
    base_top = loaded.model(input_ids=ids, attention_mask=mask).logits[:, -1].topk(k).indices  # hooks skip: no positions set
    assert all(set(b.tolist()) == set(e.tolist()) for b, e in zip(beams, edited_top))
    assert any(set(b.tolist()) != set(e.tolist()) for b, e in zip(beams, base_top))


def test_atomic_writes_get_the_permissions_of_a_new_file(tmp_path):
    import os

    from reft_lab.atomic import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
