"""Crash-safe training checkpoints: everything needed to continue bit-for-bit.

A checkpoint is a directory ``checkpoints/step_<N>/`` holding the trainable state (safetensors),
optimizer + scheduler + torch RNG states (``torch.save``, read back with ``weights_only=True``), a
JSON with the step, the data-order position, the python/numpy RNG states and the running stats, and
a ``manifest.json`` with the size and SHA-256 of each file. It is written into a temporary
directory, fsynced and renamed: a checkpoint directory is complete or absent. On resume, the newest
checkpoint whose manifest verifies is used; a corrupt or partial one is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reft_lab.errors import ConfigError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
FILES = ("trainable.safetensors", "optimizer.pt", "state.json")


@dataclass
class Progress:
    """Where training stands: restored exactly on resume."""

    step: int = 0
    epoch: int = 0  # data order: epoch index ...
    offset: int = 0  # ... and examples consumed in it
    tokens: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # every step's loss: the divergence rule reads its start and end


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _rng_state() -> dict:
    state = {"python": _jsonable(random.getstate())}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _restore_rng(state: dict, tensors: dict) -> None:
    random.setstate(_tupled(state["python"]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch_rng"])
    if torch.cuda.is_available() and tensors.get("cuda_rng"):
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])


def save_checkpoint(job_dir: Path, tuned, optimizer, scheduler, progress: Progress, fingerprint: str, keep: int) -> Path:
    root = Path(job_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{progress.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        state = {name: p.detach().to("cpu").contiguous() for name, p in tuned.trainable_state().items()}
        save_file(state, tmp / FILES[0])
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / FILES[1])
        (tmp / FILES[2]).write_text(json.dumps({"progress": asdict(progress), "rng": _rng_state(),
                                                 "config_fingerprint": fingerprint}), encoding="utf-8")
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        for name in (*FILES, "manifest.json"):
            _fsync(tmp / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verified(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return all((path / name).stat().st_size == manifest[name]["bytes"] and _sha256(path / name) == manifest[name]["sha256"]
                   for name in FILES)
    except (OSError, KeyError, ValueError, TypeError):
        return False


def latest_checkpoint(job_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    root = Path(job_dir) / CHECKPOINTS
    for path in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        if _verified(path):
            return path
        log.warning("skipping corrupt or partial checkpoint %s", path)
        print(f"reft-lab: warning: skipping corrupt or partial checkpoint {path}")
    return None


def load_checkpoint(path: Path, tuned, optimizer, scheduler, fingerprint: str) -> Progress:
    state = json.loads((path / FILES[2]).read_text(encoding="utf-8"))
    if state.get("config_fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {path} was written by a different configuration (method, task, model, trainer or seed "
            "changed): delete the job's checkpoints/ or set trainer.resume=false"
        )
    tuned.load_trainable_state(load_file(path / FILES[0]), source=str(path))
    tensors = torch.load(path / FILES[1], map_location="cpu", weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    _restore_rng(state["rng"], tensors)
    return Progress(**state["progress"])
