"""The retention metrics: the one table the evaluation, the metrics.json schema and the report read.

A metric is one ``RetentionMetric`` entry and one scoring function. It reads the observations of a
``Probe``: what is asked of a model in each phase, the same prompts before and after training.
A new metric on an existing probe is an entry and a function; one that asks something new adds a
``Probe`` too. The base's observations are cached (JSON) by the suite, so a probe's ``run`` must
return JSON for the base; ``reference`` keeps what the tuned phase needs of the base in memory.

The shipped prompt sets (``reft_lab/data/retention``) are disjoint from every task:
* knowledge probe: short factual questions, answered greedily; correct when an accepted answer
  appears in the output as a whole word, in any format;
* knowledge choice: the same questions scored by likelihood, free of output format: correct when
  log p(answer | question) per character beats each of 3 distractors;
* calibration: on the same choices, the probability of the chosen option (renormalised over the
  options) against whether it is right, as expected calibration error;
* KL drift: the base's greedy continuations of general prompts, teacher-forced through both models;
* leakage: off-task prompts, checked for the task's output format (e.g. starting with '{').

Importing this module is cheap (no torch): the report reads the table too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

PROBE_TOKENS = 16  # enough for {"answer": "Leonardo da Vinci"}
LEAKAGE_TOKENS = 8  # the format shows in the first tokens


@dataclass(frozen=True)
class Probe:
    """``run(suite, model, base)`` → observations of one model; ``base`` is None for the base model,
    else ``(base observations, base reference)``. ``reference(suite, base_model, observations)``:
    what the tuned phase needs of the base beyond its (cached) observations, kept in memory."""

    run: Callable[..., Any]
    reference: Callable[..., Any] | None = None


@dataclass(frozen=True)
class RetentionMetric:
    """``score(suite, base observations, tuned observations)`` → {"before": x, "after": y}.
    ``since``: the metrics.json schema version that introduced it (older files lack it);
    ``columns``: report.csv column of each of before/after; ``label``: its column in the report's
    summary table (None: CSV only)."""

    name: str
    probe: str
    score: Callable[[Any, Any, Any], dict]
    meaning: str
    since: int
    columns: dict[str, str]
    label: str | None = None


def contains_answer(output: str, answers: list[str]) -> bool:
    """An accepted answer appears in ``output`` as a whole word, in any case and format."""
    text = output.lower()
    return any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", text) for a in answers)


# --- probes ------------------------------------------------------------------------------------

def probe_answers(model, encoder, prompts, questions, batch_size: int, desc: str) -> list[tuple[str, bool]]:
    """The knowledge probe as asked: each question answered greedily in ``PROBE_TOKENS`` tokens; its
    output and whether it is correct (``contains_answer``). Also how ``analyze known-split`` asks it."""
    from reft_lab.evaluation.generation import generate

    outputs = [encoder.decode(ids) for ids in generate(model, encoder, prompts, PROBE_TOKENS, batch_size, desc)]
    return [(output, contains_answer(output, q["answers"])) for output, q in zip(outputs, questions)]


def _knowledge_probe(suite, model, base) -> list[bool]:
    answers = probe_answers(model, suite.encoder, suite.probe_prompts, suite.probe, suite.cfg.batch_size,
                            f"knowledge probe ({suite.phase(base)})")
    return [correct for _, correct in answers]


def _knowledge_choice(suite, model, base) -> dict:
    """Per question: does the accepted answer out-score every distractor, per character (``correct``),
    and the probability of the chosen option among the options, from their sequence log-likelihoods
    renormalised over the options (``confidence``: the model's confidence in its own answer)."""
    from reft_lab.evaluation.generation import option_scores

    scores = option_scores(model, suite.encoder, suite.probe_prompts, suite.choices, suite.cfg.batch_size,
                           f"knowledge choice ({suite.phase(base)})")
    correct, confidence = [], []
    for scored, chars in zip(scores, suite.choice_chars):
        per_char = [score / n for score, n in zip(scored, chars)]
        chosen = max(range(len(per_char)), key=per_char.__getitem__)
        top = max(scored)
        correct.append(chosen == 0)
        confidence.append(math.exp(scored[chosen] - top) / sum(math.exp(s - top) for s in scored))
    return {"correct": correct, "confidence": confidence}


def _kl(suite, model, base) -> Any:
    """The base: its greedy continuations. A tuned model: Σ KL(base ‖ tuned) over their tokens."""
    from reft_lab.evaluation.generation import continuation_logprobs, generate

    if base is None:
        return generate(model, suite.encoder, suite.kl_prompts, suite.cfg.kl_tokens, suite.cfg.batch_size,
                        "KL continuations (base)")
    continuations, base_logprobs = base
    tuned = continuation_logprobs(model, suite.encoder, suite.kl_prompts, continuations, suite.cfg.batch_size)
    kl_sum = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(base_logprobs, tuned))
    return {"kl_sum": kl_sum, "tokens": sum(p.shape[0] for p in base_logprobs)}


def _kl_reference(suite, base_model, continuations):
    from reft_lab.evaluation.generation import continuation_logprobs

    return continuation_logprobs(base_model, suite.encoder, suite.kl_prompts, continuations, suite.cfg.batch_size)


def _leakage_outputs(suite, model, base) -> list[str]:
    if not suite.task.has_format:
        return []
    return suite.texts(model, suite.leak_prompts, LEAKAGE_TOKENS, f"leakage ({suite.phase(base)})")


PROBES: dict[str, Probe] = {
    "knowledge_probe": Probe(_knowledge_probe),
    "knowledge_choice": Probe(_knowledge_choice),
    "kl": Probe(_kl, reference=_kl_reference),
    "leakage": Probe(_leakage_outputs),
}


# --- scores ------------------------------------------------------------------------------------

def accuracy(suite, before: list[bool], after: list[bool]) -> dict:
    n = len(before)
    return {"before": sum(before) / n if n else None, "after": sum(after) / n if n else None}


def kept(suite, before: list[bool], after: list[bool]) -> dict:
    """The share of what the base got right that the tuned model still gets right."""
    known = [i for i, ok in enumerate(before) if ok]
    return {"before": 1.0 if known else None, "after": sum(after[i] for i in known) / len(known) if known else None}


def choice_accuracy(suite, before: dict, after: dict) -> dict:
    return accuracy(suite, before["correct"], after["correct"])


def choice_kept(suite, before: dict, after: dict) -> dict:
    return kept(suite, before["correct"], after["correct"])


ECE_BINS = 10


def expected_calibration_error(correct: list[bool], confidence: list[float], bins: int = ECE_BINS) -> float | None:
    """Σ_bins (n_bin / n) · |accuracy − mean confidence| over equal-width confidence bins (Guo et al., 2017)."""
    if not correct:
        return None
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(confidence):
        members[min(bins - 1, int(c * bins))].append(i)
    return sum(abs(sum(correct[i] for i in m) - sum(confidence[i] for i in m)) for m in members) / len(correct)


def calibration(suite, before: dict, after: dict) -> dict:
    return {"before": expected_calibration_error(before["correct"], before["confidence"]),
            "after": expected_calibration_error(after["correct"], after["confidence"])}


def kl_drift(suite, before, after: dict) -> dict:
    return {"before": 0.0, "after": after["kl_sum"] / after["tokens"] if after["tokens"] else None}


def leakage(suite, before: list[str], after: list[str]) -> dict:
    def share(outputs):
        return sum(map(suite.task.has_format, outputs)) / len(outputs) if suite.task.has_format and outputs else None

    return {"before": share(before), "after": share(after)}


RETENTION: list[RetentionMetric] = [
    RetentionMetric("knowledge_accuracy", "knowledge_probe", accuracy, "share of probe questions answered correctly", 1,
                    {"before": "knowledge_acc_before", "after": "knowledge_acc_after"}),
    RetentionMetric("knowledge_retention", "knowledge_probe", kept,
                    "share of probe questions the base answers correctly that the tuned model still answers", 1,
                    {"after": "knowledge_retention"}, "knowledge retention"),
    RetentionMetric("knowledge_choice_accuracy", "knowledge_choice", choice_accuracy,
                    "share of probe questions whose answer out-scores its distractors", 2,
                    {"before": "knowledge_choice_acc_before", "after": "knowledge_choice_acc_after"}),
    RetentionMetric("knowledge_choice_retention", "knowledge_choice", choice_kept,
                    "share of the base's likelihood-correct questions still correct", 2,
                    {"after": "knowledge_choice_retention"}, "choice retention"),
    RetentionMetric("calibration_ece", "knowledge_choice", calibration,
                    "expected calibration error of the chosen option's probability among the options (10 bins; lower is better)", 3,
                    {"before": "ece_before", "after": "ece_after"}, "ECE"),
    RetentionMetric("kl_drift", "kl", kl_drift, "mean per-token KL(base ‖ tuned) over the base's continuations", 1,
                    {"after": "kl_drift"}, "KL drift"),
    RetentionMetric("leakage", "leakage", leakage, "share of off-task prompts answered in the task's format", 1,
                    {"before": "leakage_before", "after": "leakage_after"}, "leakage"),
]
RETENTION_METRICS = {m.name: m for m in RETENTION}


def retention_keys() -> list[str]:
    """Every dotted metrics.json key of a retention value."""
    return [f"retention.{m.name}.{when}" for m in RETENTION for when in ("before", "after")]
