"""Shipped data is reproducible and disjoint; scorers and format detectors."""

import pytest

from reft_lab.data import generate, read_retention
from reft_lab.errors import ConfigError
from reft_lab.tasks import Example, TaskConfig, load_task
from reft_lab.tasks.builtin import (
    looks_like_bare_number,
    looks_like_json,
    score_arithmetic,
    score_json_answer,
)


def test_shipped_files_match_the_generator():
    assert generate.main(["--check"]) == 0


def test_splits_and_retention_sets_are_disjoint():
    files = generate.build()  # raises if any two files share a prompt
    assert len(files["retention/knowledge_probe.jsonl"]) >= 200
    probe = {r["question"] for r in read_retention("knowledge_probe")}
    for name in ("json_answer", "arithmetic"):
        task = load_task(TaskConfig(name=name))
        assert not probe & {e.prompt for e in task.train + task.test}
        assert not {e.prompt for e in task.train} & {e.prompt for e in task.test}


def test_json_answer_scorer():
    ex = Example("What is the capital of France?", '{"answer": "Paris"}', ["Paris"])
    assert score_json_answer('{"answer": "Paris"}', ex)["json_answer_correct"] == 1.0
    assert score_json_answer('{"answer": "paris."}', ex)["json_answer_correct"] == 1.0
    assert score_json_answer('{"answer": "Lyon"}', ex) == {"json_valid": 1.0, "answer_match": 0.0, "json_answer_correct": 0.0}
    assert score_json_answer("The capital is Paris.", ex)["json_valid"] == 0.0
    assert score_json_answer('{"answer": "Paris", "why": "x"}', ex)["json_valid"] == 0.0


def test_arithmetic_scorer_and_formats():
    ex = Example("What is 2 + 3?", "5", ["5"])
    assert score_arithmetic("5", ex) == {"exact_match": 1.0, "number_match": 1.0}
    assert score_arithmetic("The answer is 5.", ex) == {"exact_match": 0.0, "number_match": 1.0}
    assert score_arithmetic("2 + 3 = 5", ex)["number_match"] == 1.0  # the result, not an operand
    assert score_arithmetic("2 + 3 = 6", ex)["number_match"] == 0.0
    assert looks_like_json(' {"answer"') and not looks_like_json("Sure: {")
    assert looks_like_bare_number(" -12 ") and not looks_like_bare_number("12 apples")


def test_expected_calibration_error_by_hand():
    from reft_lab.evaluation.retention import expected_calibration_error

    # bin [0.9, 1): confidences 0.95 and 0.9, one right → |0.5 − 0.925| · 2/4; bin [0.3, 0.4): right at 0.3 →
    # 0.7 · 1/4; bin [0.6, 0.7): wrong at 0.6 → 0.6 · 1/4
    assert expected_calibration_error([True, False, True, False], [0.95, 0.9, 0.3, 0.6]) == \
        pytest.approx((abs(0.5 - 0.925) * 2 + 0.7 + 0.6) / 4)
    assert expected_calibration_error([True, True], [1.0, 1.0]) == 0.0  # confidence 1 sits in the top bin
    assert expected_calibration_error([], []) is None


def test_probe_fact_tasks_train_apart_and_test_on_the_same_held_out_known_facts(tmp_path):
    import json

    questions = [{"index": i, "question": f"Q{i}?", "answers": [f"a{i}", f"alias{i}"], "base_output": "", "known": i % 2 == 0}
                 for i in range(30)]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"head": 10, "questions": questions}))
    known = load_task(TaskConfig(name="probe_known", path=str(split)), seed=0)
    unknown = load_task(TaskConfig(name="probe_unknown", path=str(split)), seed=0)
    # after the head: 10 known (10, 12, …, 28), 10 unknown; both train on 5, the other 5 known facts test
    assert [e.prompt for e in known.train] == [f"Q{i}?" for i in range(10, 20, 2)]
    assert [e.prompt for e in unknown.train] == [f"Q{i}?" for i in range(11, 21, 2)]
    assert [e.prompt for e in known.test] == [e.prompt for e in unknown.test] == [f"Q{i}?" for i in range(20, 30, 2)]
    assert known.train[0].response == "a10" and known.score(["It is alias20."], known.test[:1]) == {"answer_correct": 1.0}
    assert len(load_task(TaskConfig(name="probe_known", path=str(split), train_size=9), seed=0).test) == 1
    with pytest.raises(ConfigError, match=r"task.train_size=10 is not allowed: null or an integer in \[1, 9\]"):
        load_task(TaskConfig(name="probe_unknown", path=str(split), train_size=10), seed=0)
    with pytest.raises(ConfigError, match="task.path"):
        TaskConfig(name="probe_known", path=str(tmp_path / "missing.json"))
    split.write_text(json.dumps({"head": 10, "questions": [{**q, "known": False} for q in questions]}))  # a model that knows nothing
    with pytest.raises(ConfigError, match=r"0 known and 20 unknown facts after the first 10; these tasks need at least 1 unknown and 2 known"):
        load_task(TaskConfig(name="probe_unknown", path=str(split)), seed=0)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a known-split file"):
        load_task(TaskConfig(name="probe_known", path=str(tmp_path / "bad.json")), seed=0)
