"""The evaluation suite: task metric and retention, on the same prompts before and after.

Retention (prompt sets shipped in reft_lab/data/retention, disjoint from every task):
* knowledge probe — short factual questions; accuracy, and retention = share of the questions the
  base answers correctly that the tuned model still answers correctly (an accepted answer appears
  in the greedy output as a whole word, in any format);
* knowledge choice — the same questions scored by likelihood, free of output format: the answer
  counts as known when log p(answer | question), teacher-forced right after the prompt and divided
  by its length in characters, beats each of 3 distractors (other answers to the same kind of
  question); accuracy and retention as above. A tuned model that answers in a new format but still
  ranks the right answer first keeps its choice retention;
* KL drift — mean per-token KL(base ‖ tuned) over the base's greedy continuations of general
  prompts (teacher-forced, interventions applied as at inference);
* leakage — share of off-task prompts whose output takes the task's format (e.g. starts with '{').

The base model's results depend only on the base, the prompts and these settings, so they are
cached under $REFT_LAB_CACHE/evals, keyed by the base fingerprint: a sweep evaluates the base once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import torch

from reft_lab.data.batching import PromptEncoder
from reft_lab.data import read_retention
from reft_lab.tasks import Task
from reft_lab.evaluation.generation import continuation_logprobs, generate, option_scores
from reft_lab.atomic import atomic_write_json
from reft_lab.methods import TunedModel

EVAL_VERSION = 2  # bump when anything below changes what the cached base results mean
PROBE_TOKENS = 16  # enough for {"answer": "Leonardo da Vinci"}
LEAKAGE_TOKENS = 8  # the format shows in the first tokens


@dataclass(kw_only=True)
class EvalConfig:
    knowledge_probe: int = 200
    kl_prompts: int = 32
    kl_tokens: int = 16
    leakage_prompts: int = 48
    batch_size: int = 32

    def __post_init__(self):
        from reft_lab.errors import config_error

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
    """What the untouched base produced (cached as JSON)."""

    task_outputs: list[str]
    task_scores: dict[str, float]
    probe_correct: list[bool]
    choice_correct: list[bool]
    leakage_outputs: list[str]
    kl_continuations: list[list[int]]


def _contains_answer(output: str, answers: list[str]) -> bool:
    text = output.lower()
    return any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", text) for a in answers)


class Suite:
    """Prompts encoded once per job."""

    def __init__(self, task: Task, encoder: PromptEncoder, cfg: EvalConfig):
        self.task, self.encoder, self.cfg = task, encoder, cfg
        self.task_prompts = [encoder.prompt_ids(e.prompt) for e in task.test]
        self.probe = read_retention("knowledge_probe")[: cfg.knowledge_probe]
        self.probe_prompts = [encoder.prompt_ids(q["question"]) for q in self.probe]
        # knowledge choice: the accepted answer first, then its distractors, after each question
        self.choices = [[encoder.text_ids(a) for a in [q["answers"][0], *q["distractors"]]] for q in self.probe]
        self.choice_chars = [[len(a) for a in [q["answers"][0], *q["distractors"]]] for q in self.probe]
        self.kl_prompts = [encoder.prompt_ids(p["prompt"]) for p in read_retention("general_prompts")[: cfg.kl_prompts]]
        self.leak_prompts = [encoder.prompt_ids(p["prompt"]) for p in read_retention("off_task_prompts")[: cfg.leakage_prompts]]

    def texts(self, model: TunedModel, prompts, tokens: int, desc: str) -> list[str]:
        ids = generate(model, self.encoder, prompts, tokens, self.cfg.batch_size, desc)
        return [self.encoder.decode(x) for x in ids]

    def run_prompts(self, model: TunedModel, phase: str):
        outputs = self.texts(model, self.task_prompts, self.task.max_new_tokens, f"task ({phase})")
        probe = self.texts(model, self.probe_prompts, PROBE_TOKENS, f"knowledge probe ({phase})")
        correct = [_contains_answer(o, q["answers"]) for o, q in zip(probe, self.probe)]
        leaks = self.texts(model, self.leak_prompts, LEAKAGE_TOKENS, f"leakage ({phase})") if self.task.has_format else []
        return outputs, self.task.score(outputs, self.task.test), correct, self.choose(model, phase), leaks

    def choose(self, model: TunedModel, phase: str) -> list[bool]:
        """Knowledge choice: per question, does the accepted answer out-score every distractor?"""
        scores = option_scores(model, self.encoder, self.probe_prompts, self.choices, self.cfg.batch_size,
                               f"knowledge choice ({phase})")
        chosen = []
        for scored, chars in zip(scores, self.choice_chars):
            per_char = [score / n for score, n in zip(scored, chars)]
            chosen.append(max(range(len(per_char)), key=per_char.__getitem__) == 0)
        return chosen

    def leakage(self, outputs: list[str]) -> float | None:
        if not self.task.has_format or not outputs:
            return None
        return sum(self.task.has_format(o) for o in outputs) / len(outputs)

    def cache_key(self, fingerprint: str, device: torch.device) -> str:
        payload = {"fingerprint": fingerprint, "task": self.task.name, "tokens": self.task.max_new_tokens,
                   "prompts": [self.task_prompts, self.probe_prompts, self.choices, self.kl_prompts, self.leak_prompts],
                   "eval": asdict(self.cfg), "device": device.type, "version": EVAL_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def evaluate_base(base: TunedModel, suite: Suite, fingerprint: str | None) -> BaseResults:
    from reft_lab.models.loading import cache_dir

    device = next(base.parameters()).device
    path = cache_dir() / "evals" / f"{suite.cache_key(fingerprint, device)}.json" if fingerprint else None
    if path is not None and path.exists():
        try:
            return BaseResults(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass  # unreadable cache entry: recompute and overwrite
    outputs, scores, correct, chosen, leaks = suite.run_prompts(base, "base")
    continuations = generate(base, suite.encoder, suite.kl_prompts, suite.cfg.kl_tokens, suite.cfg.batch_size, "KL continuations (base)")
    results = BaseResults(outputs, scores, correct, chosen, leaks, continuations)
    if path is not None:
        atomic_write_json(path, asdict(results))
    return results


def base_logprobs(base: TunedModel, suite: Suite, results: BaseResults) -> list[torch.Tensor]:
    return continuation_logprobs(base, suite.encoder, suite.kl_prompts, results.kl_continuations, suite.cfg.batch_size)


def _accuracy_and_retention(before: list[bool], after: list[bool]) -> tuple[dict, dict]:
    """Accuracy before/after, and retention: the share of what the base got right still right."""
    known = [i for i, ok in enumerate(before) if ok]
    n = len(before)
    accuracy = {"before": sum(before) / n if n else None, "after": sum(after) / n if n else None}
    retention = {"before": 1.0 if known else None, "after": sum(after[i] for i in known) / len(known) if known else None}
    return accuracy, retention


def evaluate_tuned(tuned: TunedModel, suite: Suite, base: BaseResults, base_lp: list[torch.Tensor]) -> dict:
    outputs, scores, correct, chosen, leaks = suite.run_prompts(tuned, "tuned")
    tuned_lp = continuation_logprobs(tuned, suite.encoder, suite.kl_prompts, base.kl_continuations, suite.cfg.batch_size)
    kl_sum, n_tokens = 0.0, 0
    for p, q in zip(base_lp, tuned_lp):
        kl_sum += float((p.exp() * (p - q)).sum())
        n_tokens += p.shape[0]
    knowledge_accuracy, knowledge_retention = _accuracy_and_retention(base.probe_correct, correct)
    choice_accuracy, choice_retention = _accuracy_and_retention(base.choice_correct, chosen)
    return {
        "task_outputs": outputs,
        "task_scores": scores,
        "retention": {
            "knowledge_accuracy": knowledge_accuracy,
            "knowledge_retention": knowledge_retention,
            "knowledge_choice_accuracy": choice_accuracy,
            "knowledge_choice_retention": choice_retention,
            "kl_drift": {"before": 0.0, "after": kl_sum / n_tokens if n_tokens else None},
            "leakage": {"before": suite.leakage(base.leakage_outputs), "after": suite.leakage(leaks)},
        },
    }
