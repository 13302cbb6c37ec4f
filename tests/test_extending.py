"""What the README's "Extending reft_lab" promises: a ReFT variant, a task and a retention metric
each take one registration (and the function behind it) and nothing else: no YAML, no if-chain,
no change to the schema, the report or the trainer."""

import csv
import json

import pytest
import torch
from torch import nn

from reft_lab.cli import main
from reft_lab.metrics import read_metrics, validate

SMALL = ["model=tiny", "trainer=smoke", "logger=none", "retention.knowledge_probe=4", "retention.kl_prompts=2",
         "retention.leakage_prompts=2", "retention.kl_tokens=4"]


@pytest.fixture
def scaled_reft():
    """A new variant, as it would sit in reft_lab/interventions/scaledreft.py: Δ(h) = s ⊙ W₂ᵀ(W₁h + b)."""
    from reft_lab.interventions.base import INTERVENTIONS, Intervention, linear_init_, register_intervention

    @register_intervention("scaledreft")
    class ScaledReft(Intervention):
        def __init__(self, hidden_size, rank, dropout=0.0, dtype=None):
            super().__init__(hidden_size, rank, dropout, dtype)
            self.W1, self.W2, self.b = self.new_param(rank, hidden_size), self.new_param(rank, hidden_size), self.new_param(rank)
            self.scale = nn.Parameter(torch.ones(rank, dtype=self.dtype))
            linear_init_(self.W1, self.b)
            linear_init_(self.W2)

        def factors(self):
            return self.W1, self.W2 * self.scale[:, None], self.b

    yield ScaledReft
    INTERVENTIONS.pop("scaledreft")


@pytest.fixture
def reverse_task(tmp_path):
    """A new task, as registered in reft_lab/tasks/builtin.py: echo a word reversed."""
    from reft_lab.tasks import TASKS, Example, TaskKind, register_task

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
    examples = [Example(f"Reverse: {w}", w[::-1], [w[::-1]]) for w in words]
    register_task("reverse", TaskKind(load=lambda cfg, seed: (examples[:9], examples[9:]),
                                      score=lambda out, ex: {"reversed": float(out.strip() in ex.answers)},
                                      metric="reversed", defaults={"max_new_tokens": 8}))
    yield "reverse"
    TASKS.pop("reverse")


@pytest.fixture
def lost_metric():
    """A new retention metric on an existing probe: the share of probe questions answered wrongly."""
    from reft_lab.evaluation.retention import RETENTION, RetentionMetric
    from reft_lab.metrics import SCHEMA_VERSION

    def wrong(suite, before, after):
        return {"before": 1 - sum(before) / len(before), "after": 1 - sum(after) / len(after)}

    metric = RetentionMetric("knowledge_wrong", "knowledge_probe", wrong, "share of probe questions answered wrongly",
                             SCHEMA_VERSION, {"after": "knowledge_wrong"}, "knowledge wrong")
    RETENTION.append(metric)
    yield metric
    RETENTION.remove(metric)


def test_a_registered_variant_is_a_method_with_no_yaml(scaled_reft, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "method=scaledreft", "method.rank=2", "method.layers=[1,2]", "task.test_size=2",
                 f"hydra.run.dir={run}", *SMALL]) == 0
    metrics = read_metrics(run / "metrics.json")
    assert metrics["status"] == "ok" and metrics["method"] == "scaledreft"
    d = 64  # the tiny model's hidden size: 2 layers × 2 groups × (W1, W2, b, scale)
    assert metrics["trainable_params"] == 2 * 2 * (2 * 2 * d + 2 + 2)
    assert metrics["base_fingerprint_before"] == metrics["base_fingerprint_after"]


def test_a_registered_task_is_a_task_with_no_yaml(reverse_task, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "task=reverse", "method=lora", f"hydra.run.dir={run}", *SMALL]) == 0
    metrics = read_metrics(run / "metrics.json")
    assert metrics["task"] == "reverse" and metrics["task_metric"] == "reversed"
    assert set(metrics["task_scores"]["after"]) == {"reversed"} and metrics["config"]["task"]["max_new_tokens"] == 8
    assert metrics["retention"]["leakage"] == {"before": None, "after": None}  # no format: no leakage measured


def test_a_retention_metric_is_one_entry_and_one_function(lost_metric, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "method=loreft", "task.test_size=2", "optimized_metric=retention.knowledge_wrong.after",
                 f"hydra.run.dir={run}", *SMALL]) == 0
    metrics = read_metrics(run / "metrics.json")
    wrong, accuracy = metrics["retention"]["knowledge_wrong"], metrics["retention"]["knowledge_accuracy"]
    assert wrong == {when: pytest.approx(1 - accuracy[when]) for when in ("before", "after")}
    assert validate(metrics) == []
    broken = json.loads(json.dumps(metrics))
    del broken["retention"]["knowledge_wrong"]
    assert validate(broken) == ["retention.knowledge_wrong needs before and after"]  # the schema knows it
    assert main(["report", str(run)]) == 0
    header = next(csv.reader((run / "report.csv").open()))
    assert "knowledge_wrong" in header and "knowledge wrong" in (run / "report.md").read_text()
