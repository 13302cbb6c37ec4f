"""Generate the shipped task and retention files: ``python -m reft_lab.data.generate [--check]``.

Deterministic (fixed seed); ``--check`` verifies the shipped files equal a fresh generation.

* tasks/json_answer: factual questions → {"answer": "..."}; split by fact (both phrasings of a
  fact land in the same split), 80% train / 20% test.
* tasks/arithmetic: "What is a op b?" → the integer; 1000 train / 200 test, disjoint prompts.
* retention/knowledge_probe: factual questions on entities and topics no task uses, each with 3
  distractors (other answers to the same kind of question) for the likelihood probe.
* retention/general_prompts, retention/off_task_prompts: open prompts for KL drift and leakage.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from reft_lab.data import facts

ROOT = Path(__file__).resolve().parent
SEED = 20240405


def _aliases(answer: str) -> list[str]:
    return answer.split("|")


def _facts_json_answer(countries) -> list[list[tuple[str, str]]]:
    """Each fact is a list of (question, answer) phrasings."""
    out = []
    for country, capital, continent in countries:
        out.append([(f"What is the capital of {country}?", capital), (f"Which city is the capital of {country}?", capital)])
        out.append([(f"On which continent is {country}?", continent), (f"Which continent is {country} in?", continent)])
    for country, currency in facts.CURRENCIES:
        out.append([(f"What is the currency of {country}?", currency)])
    for element, symbol in facts.ELEMENTS:
        out.append([(f"What is the chemical symbol for {element}?", symbol)])
    for word, opposite in facts.OPPOSITES:
        out.append([(f"What is the opposite of '{word}'?", opposite), (f"Give the antonym of '{word}'.", opposite)])
    return out


def _knowledge_probe(countries) -> list[dict]:
    """Questions with accepted answers and, for the likelihood probe, 3 distractors: other answers
    of the same kind of question (other capitals, continents, languages, people, facts)."""
    questions = []  # (kind, question, answer)
    for country, capital, continent in countries:
        questions.append(("capital", f"What is the capital of {country}?", capital))
        questions.append(("continent", f"On which continent is {country}?", continent))
    questions += [("language", f"What language is mainly spoken in {country}?", language) for country, language in facts.LANGUAGES]
    questions += [("people", q, a) for q, a in facts.PEOPLE] + [("world", q, a) for q, a in facts.WORLD]
    pools: dict[str, set[str]] = {}
    for kind, _, answer in questions:
        pools.setdefault(kind, set()).add(_aliases(answer)[0])
    rng = random.Random(SEED + 1)  # its own stream: the other files do not change with it
    rows = []
    for kind, question, answer in questions:
        accepted = {a.lower() for a in _aliases(answer)}
        others = sorted(a for a in pools[kind] if a.lower() not in accepted)
        rows.append({"question": question, "answers": _aliases(answer), "distractors": rng.sample(others, 3)})
    return rows


def _arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    problems = set()
    for a in range(100):
        for b in range(100):
            problems.add((a, "+", b))
            if a >= b:
                problems.add((a, "-", b))
    for a in range(2, 13):
        for b in range(2, 21):
            problems.add((a, "*", b))
    ordered = sorted(problems)
    rng.shuffle(ordered)
    rows = []
    for a, op, b in ordered[:1200]:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        shown = "×" if op == "*" else op
        rows.append({"prompt": f"What is {a} {shown} {b}?", "response": str(value), "answers": [str(value)]})
    return rows[:1000], rows[1000:]


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    countries = list(facts.COUNTRIES)
    rng.shuffle(countries)
    probe_countries, task_countries = countries[: len(countries) // 2], countries[len(countries) // 2:]

    fact_groups = _facts_json_answer(task_countries)
    rng.shuffle(fact_groups)
    n_test = len(fact_groups) // 5
    split = {"test": fact_groups[:n_test], "train": fact_groups[n_test:]}
    files = {}
    for name, groups in split.items():
        rows = [
            {"prompt": q, "response": json.dumps({"answer": _aliases(a)[0]}), "answers": _aliases(a)}
            for group in groups
            for q, a in group
        ]
        files[f"tasks/json_answer/{name}.jsonl"] = rows
    train, test = _arithmetic(rng)
    files["tasks/arithmetic/train.jsonl"], files["tasks/arithmetic/test.jsonl"] = train, test
    probe = _knowledge_probe(probe_countries)
    rng.shuffle(probe)
    files["retention/knowledge_probe.jsonl"] = probe
    files["retention/general_prompts.jsonl"] = [{"prompt": p} for p in facts.GENERAL_PROMPTS]
    files["retention/off_task_prompts.jsonl"] = [{"prompt": p} for p in facts.OFF_TASK_PROMPTS]
    _check_disjoint(files)
    return files


def _check_disjoint(files: dict[str, list[dict]]) -> None:
    def prompts(key):
        return {r.get("prompt") or r.get("question") for r in files[key]}

    keys = list(files)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            shared = prompts(a) & prompts(b)
            if shared:
                raise AssertionError(f"{a} and {b} share prompts, e.g. {sorted(shared)[:2]}")


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the shipped files instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for rel, rows in build().items():
        path = ROOT / rel
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != render(rows):
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(rows), encoding="utf-8")
        print(f"{rel}: {len(rows)} rows")
    if stale:
        print(f"stale generated files: {', '.join(stale)}; run python -m reft_lab.data.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
