"""``reft-lab analyze known-split --out FILE [overrides]``: which probe facts the base model knows.

The base model answers every question of the shipped knowledge probe greedily, exactly as the
retention probe asks it (same prompts, same token budget, same scoring: an accepted answer appears
as a whole word). Each question is *known* when it answers correctly, *unknown* otherwise. The file
records every question, the base's output and the verdict, the model and its fingerprint, and
``head``: the first ``head`` questions stay the retention probe (``retention.knowledge_probe ≤
head``), so the facts the ``probe_known`` / ``probe_unknown`` tasks train and test on (drawn from
the rest) never overlap what retention measures.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from reft_lab.atomic import atomic_write_json
from reft_lab.errors import ReftLabError

DEFAULT_HEAD = 100


def known_split(overrides: list[str], head: int) -> dict:
    from reft_lab.accounting import fingerprint
    from reft_lab.config import build_section, compose
    from reft_lab.data import read_retention
    from reft_lab.data.batching import PromptEncoder
    from reft_lab.evaluation.retention import probe_answers
    from reft_lab.evaluation.suite import EvalConfig
    from reft_lab.methods import TunedModel
    from reft_lab.methods.none import NoneConfig
    from reft_lab.models import ModelConfig, load_model

    cfg = compose(overrides)
    model_cfg = build_section(ModelConfig, cfg.model, "model")
    batch_size = build_section(EvalConfig, cfg.retention, "retention").batch_size
    probe = read_retention("knowledge_probe")
    if not 1 <= head < len(probe):
        raise ReftLabError(f"--head={head} is not allowed: an integer in [1, {len(probe) - 1}] (the probe has {len(probe)} questions)")
    loaded = load_model(model_cfg)
    encoder = PromptEncoder(loaded.tokenizer, model_cfg.chat_template)
    prompts = [encoder.prompt_ids(q["question"]) for q in probe]
    answers = probe_answers(TunedModel(loaded.model, NoneConfig()), encoder, prompts, probe, batch_size, "knowledge probe (base)")
    questions = [{"index": index, "question": q["question"], "answers": q["answers"], "base_output": output, "known": known}
                 for index, (q, (output, known)) in enumerate(zip(probe, answers))]
    tail = questions[head:]
    return {"model": loaded.name, "base_fingerprint": fingerprint(loaded.model), "head": head,
            "known": sum(q["known"] for q in questions), "unknown": sum(not q["known"] for q in questions),
            "known_after_head": sum(q["known"] for q in tail), "unknown_after_head": sum(not q["known"] for q in tail),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "questions": questions}


def known_split_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reft-lab analyze known-split",
                                     description="Split the knowledge probe by the base model's own answers into known and unknown facts.")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write (the probe_known / probe_unknown tasks read it: task.path)")
    parser.add_argument("--head", type=int, default=DEFAULT_HEAD,
                        help=f"the first HEAD questions stay the retention probe; the tasks use the rest (default {DEFAULT_HEAD})")
    parser.add_argument("overrides", nargs="*", help="config overrides for the model, e.g. model=tiny")
    opts = parser.parse_args(args)
    result = known_split(opts.overrides, opts.head)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(opts.out, result)
    print(f"{opts.out}: {result['model']} knows {result['known']} of {len(result['questions'])} probe questions; "
          f"after the first {opts.head} (the retention probe): {result['known_after_head']} known, "
          f"{result['unknown_after_head']} unknown")
    return 0
