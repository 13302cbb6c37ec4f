"""One job, start to finish: evaluate the base → train → evaluate → save the adapter and metrics.json.

Every job writes into its own directory (Hydra's output directory, never the working directory):
``metrics.json`` (schema in ``reft_lab.metrics``), ``adapter/``, ``predictions.jsonl`` and the
logger's files. A failed job writes ``status: "failed"`` with its error (``failed_metrics``).
"""

from __future__ import annotations

import json
import platform
import resource
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from reft_lab import __version__, distributed
from reft_lab.accounting import fingerprint, param_report
from reft_lab.adapters import save_adapter
from reft_lab.atomic import atomic_write_json
from reft_lab.data.batching import PromptEncoder, encode_examples
from reft_lab.errors import ReftLabError, config_error
from reft_lab.evaluation.suite import Suite, check_probe_held_out, evaluate_base, evaluate_tuned
from reft_lab.loggers import NullLogger, make_logger
from reft_lab.methods import TunedModel, attach
from reft_lab.methods.none import NoneConfig
from reft_lab.metrics import SCHEMA, lookup, write_metrics
from reft_lab.models import load_model
from reft_lab.settings import RunSettings, config_fingerprint
from reft_lab.tasks import load_task
from reft_lab.training import Diverged, seed_everything, train
from reft_lab.training.budget import check_step_fits, max_length


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train_dtype(settings: RunSettings, model: torch.nn.Module) -> torch.dtype:
    """The dtype activations are held in: bf16 under CUDA autocast, else the base's once the method
    is attached (full fine-tuning trains a bf16 base as an fp32 copy by default)."""
    param = next(model.parameters())
    if param.device.type == "cuda" and settings.trainer.bf16:
        return torch.bfloat16
    return settings.method.base_dtype_attached(param.dtype)


def versions() -> dict:
    import peft
    import transformers

    return {"reft_lab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def run_job(settings: RunSettings, config: dict, out: Path, group: str = "") -> dict | None:
    """One job of validated, preflighted ``settings`` (``config``: the composed config, recorded);
    returns its metrics (already on disk), or None on a non-main torchrun process. Raises on
    failure (the caller records it)."""
    dist_info = distributed.setup()
    seed_everything(settings.seed)  # same seed on every process: identical initial interventions
    task = load_task(settings.task, settings.seed)  # data errors surface before the model loads
    check_probe_held_out(task, settings.retention)
    loaded = load_model(settings.model, device=dist_info.device())
    if loaded.on_meta:
        raise config_error("model.name_or_path", settings.model.name_or_path, "a model with weights: this one loads on the meta device (accounting only, see `reft-lab params`)")
    encoder = PromptEncoder(loaded.tokenizer, settings.model.chat_template)
    limit = max_length(loaded.model, settings.task.max_length)
    data = encode_examples(encoder, task.train, limit, settings.task.overlong)
    suite = Suite(task, encoder, settings.retention, limit, settings.task.overlong)
    check_step_fits(loaded.model, data, [e.source for e in task.train], settings.trainer.batch_size,
                    settings.trainer.gradient_checkpointing, train_dtype(settings, loaded.model))
    fingerprint_before = fingerprint(loaded.model)
    if task.base_fingerprint not in (None, fingerprint_before):
        raise config_error("task.path", settings.task.path,
                           f"data derived from this run's base ({loaded.name}, fingerprint {fingerprint_before[:12]}); "
                           f"this file's base has fingerprint {task.base_fingerprint[:12]} (another model or dtype): "
                           "for probe_known/probe_unknown, `reft-lab analyze known-split --out FILE` with this run's model overrides")
    if dist_info.main:
        base = TunedModel(loaded.model, NoneConfig())
        base_results = evaluate_base(base, suite, fingerprint_before)
    distributed.barrier(dist_info)

    tuned = attach(loaded.model, settings.method, loaded.name, base_fingerprint=fingerprint_before)
    name = out.name
    tags = [settings.method.name, task.name, f"seed{settings.seed}"]
    logger = make_logger(settings.logger, out, name, group, tags, config) if dist_info.main else NullLogger()
    run_id = config_fingerprint(settings)

    def evaluate_at(step: int) -> None:
        if dist_info.main and step not in _curve_points(out, run_id):  # saved: by the run this one resumed
            save_curve_point(out, run_id, curve_point(step, evaluate_tuned(tuned, suite, base_results), task.metric))

    try:
        stats = train(tuned, data, settings.trainer, lr=settings.lr, seed=settings.seed,
                      pad_id=encoder.pad_id, logger=logger, job_dir=out, run_id=run_id,
                      dist_info=dist_info, on_eval=evaluate_at if settings.trainer.eval_at else None)
        if not dist_info.main:
            return None
        if stats.diverged:
            raise Diverged(stats)  # no evaluation, no adapter: nothing of this run is a result
        after = evaluate_tuned(tuned, suite, base_results)
        save_adapter(tuned, out / "adapter")
        params = param_report(tuned)
        before_score, after_score = base_results.task_scores[task.metric], after["task_scores"][task.metric]
        metrics = {
            "status": "ok", "error": None, "method": settings.method.name, "model": loaded.name, "task": task.name,
            "seed": settings.seed, **params.to_dict(), "task_metric": task.metric,
            "task_before": before_score, "task_after": after_score, "task_gain": after_score - before_score,
            "task_scores": {"before": base_results.task_scores, "after": after["task_scores"]},
            "retention": after["retention"], "train_wall_s": stats.wall_s, "tokens_per_s": stats.tokens_per_s,
            "first_step_s": stats.first_step_s,
            "peak_mem_bytes": peak_memory_bytes(next(tuned.parameters()).device), "final_loss": stats.final_loss,
            "steps": stats.steps, "torch_threads": torch.get_num_threads(), "world_size": dist_info.world, "base_fingerprint_before": fingerprint_before,
            "base_fingerprint_after": fingerprint(tuned.base_model), "versions": versions(), "config": config,
            "output_dir": str(out), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "curve": [*saved_curve(out, run_id, settings.trainer.eval_at), curve_point(stats.steps, after, task.metric)],
        }
        _write_predictions(out, task, base_results.task_outputs, after["task_outputs"])
        if lookup(metrics, settings.optimized_metric) is None:
            raise config_error("optimized_metric", settings.optimized_metric, "a metric this run produces (it is null here)")
        write_metrics(out, metrics)
        logger.summary({k: v for k, v in metrics.items() if k not in ("config", "versions")})
        return metrics
    finally:
        logger.finish()


CURVE_FILE = "curve.json"  # the points evaluated so far: a resumed job keeps those before its checkpoint


def curve_point(step: int, evaluated: dict, metric: str) -> dict:
    return {"step": step, "task_after": evaluated["task_scores"][metric], "task_scores": evaluated["task_scores"],
            "retention": {name: value["after"] for name, value in evaluated["retention"].items()}}


def _curve_points(out: Path, run_id: str) -> dict[int, dict]:
    try:
        saved = json.loads((out / CURVE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {p["step"]: p for p in saved["points"]} if saved.get("run_id") == run_id else {}


def save_curve_point(out: Path, run_id: str, point: dict) -> None:
    points = {**_curve_points(out, run_id), point["step"]: point}
    atomic_write_json(out / CURVE_FILE, {"run_id": run_id, "points": [points[s] for s in sorted(points)]})


def saved_curve(out: Path, run_id: str, steps: list[int]) -> list[dict]:
    """The points of ``steps`` evaluated for this run (by this process or the one it resumed)."""
    points = _curve_points(out, run_id)
    missing = sorted(set(steps) - set(points))
    if missing:
        raise ReftLabError(f"{out / CURVE_FILE} lacks the evaluation at step(s) {missing} of trainer.eval_at")
    return [points[s] for s in sorted(set(steps))]


def _write_predictions(out: Path, task, before: list[str], after: list[str]) -> None:
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for ex, b, a in zip(task.test, before, after):
            f.write(json.dumps({"prompt": ex.prompt, "expected": ex.response, "before": b, "after": a}, ensure_ascii=False) + "\n")


def failed_metrics(cfg: DictConfig, out: Path, err: BaseException) -> dict:
    """The metrics.json of a job that did not finish ok: ``failed`` with its error, or ``diverged``
    with why and how far it trained."""
    def get(key):
        value = OmegaConf.select(cfg, key, default=None)
        return value if isinstance(value, (str, int)) else None

    message = f"{type(err).__name__}: {err}" if not isinstance(err, ReftLabError) else str(err)
    metrics = {key: None for key in SCHEMA if key != "schema_version"}
    metrics.update({"status": "diverged" if isinstance(err, Diverged) else "failed",
                    "error": message.splitlines()[0] if message else type(err).__name__,
                    "method": get("method.name"), "model": get("model.name_or_path"), "task": get("task.name"),
                    "seed": get("seed"), "output_dir": str(out), "versions": versions(),
                    "config": OmegaConf.to_container(cfg, resolve=False)})
    if isinstance(err, Diverged):
        metrics.update({"steps": err.stats.steps, "final_loss": err.stats.final_loss, "train_wall_s": err.stats.wall_s,
                        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    write_metrics(out, metrics)
    return metrics
