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
LONG = [*SMALL, "method=lora", "trainer.max_steps=150", "trainer.checkpoint_every=5", "trainer.warmup_ratio=0.1"]


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


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, LONG), check=True, env=_env(), capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, LONG), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_after = random.Random().randrange(10, 120)
    _wait_for_checkpoint(proc, run, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "metrics.json").exists(), "the job finished before it was killed"

    resumed = subprocess.run(_train_cmd(run, LONG), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
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
