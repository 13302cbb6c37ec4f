"""The evaluation suite: the task metric and every retention metric (``retention.RETENTION``), on the
same prompts before and after training.

The base model's results depend only on the base, the prompts and these settings, so they are
cached under $REFT_LAB_CACHE/evals, keyed by the base fingerprint: a sweep evaluates the base once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from reft_lab.atomic import atomic_write_json
from reft_lab.data import read_retention
from reft_lab.data.batching import PromptEncoder, fit_prompt
from reft_lab.errors import config_error
from reft_lab.evaluation.generation import generate
from reft_lab.evaluation.retention import PROBES, RETENTION
from reft_lab.methods import TunedModel
from reft_lab.tasks import Task

EVAL_VERSION = 4  # bump when anything below changes what the cached base results mean


@dataclass(kw_only=True)
class EvalConfig:
    """``retention``: how many of each shipped prompt set to score, the same before and after."""

    knowledge_probe: int = 200  # factual questions (of 231 shipped); more = tighter estimate, slower eval
    kl_prompts: int = 32  # general prompts for KL(base ‖ tuned) over their continuations
    kl_tokens: int = 16  # continuation length scored per prompt
    leakage_prompts: int = 48  # off-task prompts checked for the task's output format
    batch_size: int = 32  # generation batch

    def __post_init__(self):
        limits = {"knowledge_probe": len(read_retention("knowledge_probe")),
                  "kl_prompts": len(read_retention("general_prompts")),
                  "leakage_prompts": len(read_retention("off_task_prompts")), "kl_tokens": 256, "batch_size": 4096}
        for key, limit in limits.items():
            value = getattr(self, key)
            low = 1 if key in ("kl_tokens", "batch_size") else 0
            if not low <= value <= limit:
                raise config_error(f"retention.{key}", value, f"an integer in [{low}, {limit}]")


@dataclass
class BaseResults:
    """What the untouched base produced: cached as JSON, all but ``references``."""

    task_outputs: list[str]
    task_scores: dict[str, float]
    observed: dict[str, Any]  # probe name → observations
    references: dict[str, Any] = field(default_factory=dict)  # probe name → what the tuned phase needs of the base


def check_probe_held_out(task: Task, cfg: EvalConfig) -> None:
    """Retention's knowledge probe must ask about facts the run does not train on: refuse a
    ``retention.knowledge_probe`` that reaches the first probe question among the training prompts."""
    trained = {e.prompt for e in task.train}
    probe = read_retention("knowledge_probe")[: cfg.knowledge_probe]
    first = next((i for i, q in enumerate(probe) if q["question"] in trained), None)
    if first is not None:
        raise config_error("retention.knowledge_probe", cfg.knowledge_probe,
                           f"an integer in [0, {first}] here: task {task.name} trains on probe question {first} "
                           f"({probe[first]['question']!r}), and retention is measured on facts the run does not train on")


class Suite:
    """Prompts encoded once per job."""

    def __init__(self, task: Task, encoder: PromptEncoder, cfg: EvalConfig, max_length: int | None = None,
                 overlong: str = "refuse"):
        self.task, self.encoder, self.cfg = task, encoder, cfg
        self.task_prompts = [fit_prompt(encoder.prompt_ids(e.prompt), task.max_new_tokens, max_length, overlong, e.source)
                             for e in task.test]
        self.probe = read_retention("knowledge_probe")[: cfg.knowledge_probe]
        self.probe_prompts = [encoder.prompt_ids(q["question"]) for q in self.probe]
        # knowledge choice: the accepted answer first, then its distractors, after each question
        self.choices = [[encoder.text_ids(a) for a in [q["answers"][0], *q["distractors"]]] for q in self.probe]
        self.choice_chars = [[len(a) for a in [q["answers"][0], *q["distractors"]]] for q in self.probe]
        self.kl_prompts = [encoder.prompt_ids(p["prompt"]) for p in read_retention("general_prompts")[: cfg.kl_prompts]]
        self.leak_prompts = [encoder.prompt_ids(p["prompt"]) for p in read_retention("off_task_prompts")[: cfg.leakage_prompts]]

    @staticmethod
    def phase(base) -> str:
        return "base" if base is None else "tuned"

    def texts(self, model: TunedModel, prompts, tokens: int, desc: str) -> list[str]:
        ids = generate(model, self.encoder, prompts, tokens, self.cfg.batch_size, desc)
        return [self.encoder.decode(x) for x in ids]

    def task_outputs(self, model: TunedModel, phase: str) -> tuple[list[str], dict[str, float]]:
        outputs = self.texts(model, self.task_prompts, self.task.max_new_tokens, f"task ({phase})")
        return outputs, self.task.score(outputs, self.task.test)

    def cache_key(self, fingerprint: str, device: torch.device) -> str:
        payload = {"fingerprint": fingerprint, "task": self.task.name, "tokens": self.task.max_new_tokens,
                   "prompts": [self.task_prompts, self.probe_prompts, self.choices, self.kl_prompts, self.leak_prompts],
                   "eval": asdict(self.cfg), "device": device.type, "version": EVAL_VERSION, "probes": sorted(PROBES)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def evaluate_base(base: TunedModel, suite: Suite, fingerprint: str | None) -> BaseResults:
    """The base's task outputs and probe observations (from the cache when this base, these prompts
    and settings were evaluated before), and each probe's in-memory reference."""
    from reft_lab.models.loading import cache_dir

    device = next(base.parameters()).device
    path = cache_dir() / "evals" / f"{suite.cache_key(fingerprint, device)}.json" if fingerprint else None
    results = None
    if path is not None and path.exists():
        try:
            results = BaseResults(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass  # unreadable cache entry: recompute and overwrite
    if results is None:
        outputs, scores = suite.task_outputs(base, "base")
        results = BaseResults(outputs, scores, {name: probe.run(suite, base, None) for name, probe in PROBES.items()})
        if path is not None:
            atomic_write_json(path, {k: v for k, v in asdict(results).items() if k != "references"})
    results.references = {name: probe.reference(suite, base, results.observed[name])
                          for name, probe in PROBES.items() if probe.reference is not None}
    return results


def evaluate_tuned(tuned: TunedModel, suite: Suite, base: BaseResults) -> dict:
    """Task outputs and scores of the tuned model, and every retention metric before and after."""
    outputs, scores = suite.task_outputs(tuned, "tuned")
    observed = {name: probe.run(suite, tuned, (base.observed[name], base.references.get(name)))
                for name, probe in PROBES.items()}
    retention = {m.name: m.score(suite, base.observed[m.probe], observed[m.probe]) for m in RETENTION}
    return {"task_outputs": outputs, "task_scores": scores, "retention": retention}
