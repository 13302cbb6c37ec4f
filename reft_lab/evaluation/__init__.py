"""Before/after evaluation: the task metric and the retention suite, greedy and batched."""

from reft_lab.evaluation.suite import BaseResults, EvalConfig, evaluate_base, evaluate_tuned

__all__ = ["BaseResults", "EvalConfig", "evaluate_base", "evaluate_tuned"]
