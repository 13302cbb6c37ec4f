"""The metrics.json schema: the one definition of what every job reports.

``validate`` checks a metrics dict against it; the trainer writes through ``write_metrics`` (atomic)
and the report reads with ``read_metrics``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from reft_lab.atomic import atomic_write_json
from reft_lab.errors import ReftLabError
from reft_lab.evaluation.retention import RETENTION

METRICS_FILE = "metrics.json"
SCHEMA_VERSION = 3
NUM = (int, float)
STATUSES = ("ok", "failed", "diverged")  # diverged: trained, but its weights or loss blew up (README)

# key: (accepted types, required non-null when status == "ok", meaning)
SCHEMA: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "schema_version": ((int,), True, "version of this schema"),
    "status": ((str,), True, '"ok", "failed" or "diverged"'),
    "error": ((str, type(None)), False, "one-line error of a failed job"),
    "method": ((str,), True, "method name (loreft, lora, ...)"),
    "model": ((str,), True, "model.name_or_path"),
    "task": ((str,), True, "task name"),
    "seed": ((int,), True, "seed"),
    "trainable_params": ((int,), True, "parameters that train"),
    "base_params": ((int,), True, "parameters of the base model"),
    "trainable_pct": (NUM, True, "100 · trainable / base"),
    "adapter_bytes": ((int,), True, "size of adapter/adapter_model.safetensors"),
    "task_metric": ((str,), True, "name of the task metric"),
    "task_before": (NUM, True, "task metric of the untouched base on the test split"),
    "task_after": (NUM, True, "task metric after training"),
    "task_gain": (NUM, True, "task_after − task_before"),
    "task_scores": ((dict,), True, "every task score, before and after"),
    "retention": ((dict,), True, "each retention metric (reft_lab.evaluation.retention) with before and after"),
    "train_wall_s": (NUM, True, "training wall time (s)"),
    "tokens_per_s": (NUM + (type(None),), False, "training throughput (attended tokens), steady state: after the first step"),
    "first_step_s": (NUM + (type(None),), False, "the first training step (s), Triton JIT and compile warm-up included"),
    "peak_mem_bytes": ((int,), True, "peak CUDA memory, or the process's peak RSS on CPU"),
    "final_loss": (NUM + (type(None),), False, "mean loss of the last logged step"),
    "steps": ((int,), True, "optimizer steps taken"),
    "torch_threads": ((int,), True, "torch intra-op threads the job used"),
    "world_size": ((int,), True, "processes that trained the job (torchrun DDP), 1 otherwise"),
    "base_fingerprint_before": ((str, type(None)), True, "SHA-256 of base parameters/buffers before"),
    "base_fingerprint_after": ((str, type(None)), True, "... and after training"),
    "versions": ((dict,), True, "package versions"),
    "config": ((dict,), True, "the composed config"),
    "output_dir": ((str,), True, "the job's directory"),
    "finished_at": ((str, type(None)), True, "when the job finished (UTC, ISO 8601); null for a failed job"),
    "curve": ((list,), True, "the evaluation at each step of trainer.eval_at and at the end: step, task_after, "
                             "task_scores and each retention metric's after value"),
}
KEY_SINCE = {"curve": 3}  # schema version that introduced a key: older files lack it


def validate(metrics: dict) -> list[str]:
    """Problems with ``metrics`` (empty list = valid)."""
    problems = []
    ok = metrics.get("status") == "ok"
    version = metrics.get("schema_version") if isinstance(metrics.get("schema_version"), int) else SCHEMA_VERSION
    for key, (types, required, _) in SCHEMA.items():
        if KEY_SINCE.get(key, 1) > version:
            continue
        if key not in metrics:
            problems.append(f"missing key {key!r}")
            continue
        value = metrics[key]
        if value is None:
            if ok and required and key not in ("base_fingerprint_before", "base_fingerprint_after"):
                problems.append(f"{key} is null in an ok run")
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            problems.append(f"{key}={value!r} is not {'/'.join(t.__name__ for t in types)}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key} is not finite")
    if ok:
        retention = metrics.get("retention") or {}
        for metric in RETENTION:
            if metric.since <= version and set(retention.get(metric.name, {})) != {"before", "after"}:
                problems.append(f"retention.{metric.name} needs before and after")
    elif metrics.get("status") not in STATUSES:
        problems.append(f"status={metrics.get('status')!r} is not one of {', '.join(STATUSES)}")
    return problems


def lookup(metrics: dict, dotted: str):
    """``task_after`` or ``retention.kl_drift.after``."""
    value = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def write_metrics(directory: Path, metrics: dict) -> Path:
    """Write ``metrics`` (every schema key, no other; schema_version is set here) atomically."""
    keys, given = set(SCHEMA) - {"schema_version"}, set(metrics) - {"schema_version"}
    if given != keys:
        raise ReftLabError(f"metrics.json keys do not match the schema: missing {sorted(keys - given)}, "
                           f"unknown {sorted(given - keys)}")
    path = Path(directory) / METRICS_FILE
    atomic_write_json(path, {**metrics, "schema_version": SCHEMA_VERSION})
    return path


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
