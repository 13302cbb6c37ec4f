"""Tasks: train/test prompt→response pairs, a task metric, and the task's output format.

A task is one ``register_task`` call (``reft_lab/tasks/builtin.py`` holds the shipped ones): how its
examples load, how an output is scored, which score is the task metric, and how to tell its format
(for leakage). Registering it also makes ``task=<name>`` a config option with ``TaskConfig``'s
defaults (see ``reft_lab.conf_store``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reft_lab.errors import ConfigError, config_error


@dataclass(kw_only=True)
class TaskConfig:
    name: str
    train_size: int | None = None  # null = the whole train split; fewer = faster epochs, less coverage
    test_size: int | None = None  # null = the whole test split; held-out examples scored before and after
    max_new_tokens: int = 32  # generation budget per test answer
    max_length: int | None = None  # tokens of prompt + response (test: prompt + max_new_tokens); null = the model's context
    overlong: str = "refuse"  # an example over max_length: refuse (naming its file and line) or truncate (drop prompt tokens from the left)
    path: str | None = None  # jsonl: the examples
    test_path: str | None = None  # jsonl: null = hold out test_fraction of path
    test_fraction: float = 0.2  # jsonl without test_path: seeded share held out
    prompt_field: str = "prompt"  # jsonl / hf: field names
    response_field: str = "response"
    dataset: str | None = None  # hf: dataset name
    dataset_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"

    def __post_init__(self):
        if self.name not in TASKS:
            raise config_error("task", self.name, f"one of {', '.join(TASKS)}")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise config_error(f"task.{key}", value, "null (all) or an integer ≥ 1")
        if self.max_new_tokens < 1:
            raise config_error("task.max_new_tokens", self.max_new_tokens, "an integer ≥ 1")
        if self.max_length is not None and self.max_length <= self.max_new_tokens:
            raise config_error("task.max_length", self.max_length, f"null (the model's context) or an integer > task.max_new_tokens={self.max_new_tokens}")
        if self.overlong not in OVERLONG:
            raise config_error("task.overlong", self.overlong, " or ".join(OVERLONG))
        if not 0 < self.test_fraction < 1:
            raise config_error("task.test_fraction", self.test_fraction, "a number in (0, 1)")
        check = TASKS[self.name].check
        if check is not None:
            check(self)


OVERLONG = ("refuse", "truncate")


@dataclass
class Example:
    prompt: str
    response: str
    answers: list[str] = field(default_factory=list)  # accepted answers; default: the response
    source: str = ""  # where it came from ("path:line"), for error messages


Scorer = Callable[[str, Example], dict[str, float]]


@dataclass(frozen=True)
class TaskKind:
    """What ``register_task`` records: ``load(cfg, seed) → (train, test)``; ``score(output,
    example) → {score name: value}``, one of which is ``metric``; ``has_format(output)`` says whether
    an output takes the task's format (None: the task has no distinct format, no leakage measured);
    ``check(cfg)`` raises a ConfigError for settings the task cannot use; ``base_fingerprint(cfg)``:
    the fingerprint of the base model the task's data was derived from (a run on another base is
    refused), None when the data does not depend on a model; ``defaults``: the task's own
    TaskConfig defaults (``???`` for a key the user must give)."""

    load: Callable[[TaskConfig, int], tuple[list[Example], list[Example]]]
    score: Scorer
    metric: str
    has_format: Callable[[str], bool] | None = None
    check: Callable[[TaskConfig], None] | None = None
    base_fingerprint: Callable[[TaskConfig], str | None] | None = None
    defaults: dict = field(default_factory=dict)


TASKS: dict[str, TaskKind] = {}


def register_task(name: str, kind: TaskKind) -> TaskKind:
    if name in TASKS:
        raise RuntimeError(f"task {name!r} registered twice")
    TASKS[name] = kind
    return kind


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    metric: str  # the key of score() that is the task metric
    scorer: Scorer
    has_format: Callable[[str], bool] | None = None  # leakage detector; None: task has no distinct format
    max_new_tokens: int = 32
    base_fingerprint: str | None = None  # the base model the data was derived from (TaskKind.base_fingerprint)

    def score(self, outputs: list[str], examples: list[Example]) -> dict[str, float]:
        rows = [self.scorer(o, ex) for o, ex in zip(outputs, examples)]
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def read_jsonl(path: Path, prompt_field: str, response_field: str, key: str) -> list[Example]:
    """Examples of a JSONL file; every problem names the file and line."""
    if not path.exists():
        raise config_error(key, str(path), "an existing JSONL file")
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}={str(path)!r}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object with {prompt_field!r} and {response_field!r}")
        for name in (prompt_field, response_field):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise ConfigError(f"{path}:{number}: missing or empty string field {name!r}")
        answers = row.get("answers")
        answers = [str(a) for a in answers] if isinstance(answers, list) and answers else [row[response_field]]
        examples.append(Example(row[prompt_field], row[response_field], answers, f"{path}:{number}"))
    if not examples:
        raise ConfigError(f"{key}={str(path)!r}: the file has no examples")
    return examples


def _take(examples: list[Example], size: int | None, key: str, split: str) -> list[Example]:
    if size is not None and size > len(examples):
        raise config_error(key, size, f"null (all) or an integer in [1, {len(examples)}] (the {split} split has {len(examples)} examples)")
    return examples[:size] if size else examples


def load_task(cfg: TaskConfig, seed: int = 0) -> Task:
    kind = TASKS[cfg.name]
    train, test = kind.load(cfg, seed)
    overlap = {e.prompt for e in train} & {e.prompt for e in test}
    if overlap:
        raise ConfigError(
            f"task={cfg.name}: {len(overlap)} test prompts also appear in the training split "
            f"(e.g. {sorted(overlap)[0]!r}); the test split must be held out"
        )
    if not train or not test:
        raise ConfigError(f"task={cfg.name}: empty {'train' if not train else 'test'} split")
    train = _take(train, cfg.train_size, "task.train_size", "train")
    test = _take(test, cfg.test_size, "task.test_size", "test")
    return Task(name=cfg.name, train=train, test=test, metric=kind.metric, scorer=kind.score, has_format=kind.has_format,
                max_new_tokens=cfg.max_new_tokens, base_fingerprint=kind.base_fingerprint(cfg) if kind.base_fingerprint else None)


from reft_lab.tasks import builtin  # noqa: E402,F401  (registers the shipped tasks)

__all__ = ["OVERLONG", "TASKS", "Example", "Task", "TaskConfig", "TaskKind", "load_task", "read_jsonl", "register_task"]
