"""Config defaults come from the dataclasses, once: this module puts them into Hydra's ConfigStore.

* ``method/<name>``: every registered method (ReFT variants, lora, dora, full, none) with its
  config class's defaults;
* ``task/<name>``: every registered task with ``TaskConfig``'s defaults and the task's own
  (``TaskKind.defaults``; ``???`` marks what the user must give, e.g. ``task.path`` for jsonl);
* ``trainer/default``, ``retention/default``, ``logger/<wandb|csv|none>``, ``model/base``.

The YAML files in ``reft_lab/conf`` hold only presets: the keys they change (``trainer/smoke``,
``model/tiny``, experiments, searches). A registered variant or task is a config option with no
file of its own.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from hydra.core.config_store import ConfigStore


def defaults_of(cls: type, **values: Any) -> dict:
    """The field defaults of dataclass ``cls`` as a plain dict (``???`` where a field has none), updated by ``values``."""
    out = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = "???"
    return {**out, **values}


def register() -> None:
    """Store every default node; cheap and idempotent (a later registration replaces an earlier one)."""
    from reft_lab.evaluation.suite import EvalConfig
    from reft_lab.loggers import LOGGERS, LoggerConfig
    from reft_lab.methods import methods
    from reft_lab.models import ModelConfig
    from reft_lab.tasks import TASKS, TaskConfig
    from reft_lab.training.config import TrainerConfig

    store = ConfigStore.instance()
    for name, method in methods().items():
        store.store(group="method", name=name, node=defaults_of(method.config, name=name))
    for name, kind in TASKS.items():
        store.store(group="task", name=name, node=defaults_of(TaskConfig, name=name, **kind.defaults))
    for name in LOGGERS:
        store.store(group="logger", name=name, node=defaults_of(LoggerConfig, name=name))
    store.store(group="trainer", name="default", node=defaults_of(TrainerConfig))
    store.store(group="retention", name="default", node=defaults_of(EvalConfig))
    store.store(group="model", name="base", node=defaults_of(ModelConfig))
