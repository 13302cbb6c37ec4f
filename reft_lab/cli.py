"""``reft-lab <command> [args]``: train, params, report. Errors print one line and exit 2."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from reft_lab.errors import ReftLabError

USAGE = """usage: reft-lab <command> [arguments]

commands:
  train  [overrides] [-m]   train and evaluate one job, or a multirun sweep (Hydra)
  params [overrides]        parameter accounting as JSON (works on meta-device configs)
  report <dir> [<dir>...]   gather metrics.json files into report.md, report.csv, pareto.png
  generate --adapter DIR [--adapter DIR2 ...] PROMPT...   greedy answers of saved adapters on their base model
  bench [--providers ...]   training-step time and memory: reft_lab vs pyreft vs peft (config A)
  analyze intruders <job dir>...  intruder dimensions of a job's updated weights (LoRA, DoRA, full)
  analyze known-split --out FILE  which knowledge-probe facts the base model knows (probe_known/probe_unknown tasks)

examples:
  reft-lab train -m experiment=quickstart
  reft-lab params method=loreft method.rank=8 model.name_or_path=path/to/config-only-dir
  reft-lab report multirun/quickstart
  reft-lab generate --adapter outputs/.../adapter "What is the capital of Peru?"
  reft-lab analyze intruders multirun/.../method=lora,seed=0 --scale 0.3
"""


PARAMS_HELP = """usage: reft-lab params [overrides]

Parameter accounting as JSON: trainable_params, base_params, trainable_pct (100 · trainable / base),
adapter_bytes (the exact size of the adapter file) and device. Takes the same overrides as
`reft-lab train`; a model directory holding only config.json is built on the meta device, so
configs alone give the counts (no weights load).

examples:
  reft-lab params method=loreft method.rank=8 method.tied=true model.name_or_path=experiments/param_counts/llama-7b
  reft-lab params method=lora method.rank=16 model=tiny
"""


def params_command(overrides: list[str]) -> int:
    if {"-h", "--help"} & set(overrides):
        print(PARAMS_HELP)
        return 0
    from reft_lab.accounting import param_report
    from reft_lab.config import build_section, compose
    from reft_lab.methods import attach, method_config
    from reft_lab.models import ModelConfig, load_model

    cfg = compose(overrides)
    model_cfg = build_section(ModelConfig, cfg.model, "model")
    method = method_config(cfg.method)  # validate before the (possibly slow) model load
    loaded = load_model(model_cfg)
    tuned = attach(loaded.model, method, loaded.name)
    report = {"model": loaded.name, "method": method.name, **param_report(tuned).to_dict(),
              "device": "meta" if loaded.on_meta else str(next(loaded.model.parameters()).device)}
    print(json.dumps(report, indent=2))
    return 0


def train_command(args: list[str]) -> int:
    from reft_lab.sweep import run

    return run(args)


def report_command(args: list[str]) -> int:
    from reft_lab.report import report_main

    return report_main(args)


def generate_command(args: list[str]) -> int:
    import argparse

    from reft_lab.adapters import load_adapter, load_adapter_bank, read_adapter_config
    from reft_lab.data.batching import PromptEncoder
    from reft_lab.evaluation.generation import generate
    from reft_lab.models import ModelConfig, load_model
    from reft_lab.models.layers import context_length
    from reft_lab.models.loading import DTYPES

    parser = argparse.ArgumentParser(prog="reft-lab generate", description="Greedy answers of saved adapters on their base model.")
    parser.add_argument("--adapter", required=True, action="append",
                        help="directory written by a training job (…/adapter); repeat it to answer every prompt with "
                             "each adapter, in shared batches (ReFT adapters of one layout)")
    parser.add_argument("--model", default=None, help="base model (default: the one recorded in the first adapter)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="the base's dtype (default: the one recorded in the first adapter, else float32); "
                             "an adapter loads only on the base it was trained on, dtype included")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer, at most (≥ 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated at once (≥ 1); more is faster, needs more memory")
    parser.add_argument("prompts", nargs="+", help="the prompts, each one argument (quote it); none may be empty")
    opts = parser.parse_args(args)
    for key in ("max_new_tokens", "batch_size"):
        if getattr(opts, key) < 1:
            raise ReftLabError(f"--{key.replace('_', '-')}={getattr(opts, key)} is not allowed: an integer ≥ 1")
    empty = [i for i, p in enumerate(opts.prompts, 1) if not p.strip()]
    if empty:
        raise ReftLabError(f"prompt {empty[0]} is empty: give each prompt as a non-empty argument")
    recorded = read_adapter_config(opts.adapter[0])
    base = recorded["base"]
    loaded = load_model(ModelConfig(name_or_path=opts.model or base["name_or_path"], dtype=opts.dtype or base.get("dtype", "float32")))
    encoder = PromptEncoder(loaded.tokenizer)
    prompts = [encoder.prompt_ids(p) for p in opts.prompts]
    context = context_length(loaded.model)
    for i, ids in enumerate(prompts, 1):
        if context and len(ids) + opts.max_new_tokens > context:
            raise ReftLabError(f"prompt {i} is {len(ids)} tokens: with --max-new-tokens {opts.max_new_tokens} that exceeds "
                               f"the model's context of {context} tokens; shorten it or lower --max-new-tokens")
    if len(opts.adapter) == 1:
        model = load_adapter(loaded.model, opts.adapter[0], base_name=loaded.name)
    else:  # one model serving every adapter: rows of one batch may use different adapters
        model = load_adapter_bank(loaded.model, opts.adapter, base_name=loaded.name)
    rows = [(k, text, ids) for k in range(len(opts.adapter)) for text, ids in zip(opts.prompts, prompts)]
    outputs = generate(model, encoder, [ids for _, _, ids in rows], opts.max_new_tokens, opts.batch_size, "generate",
                       adapter_ids=[k for k, _, _ in rows] if len(opts.adapter) > 1 else None)
    for (k, prompt, _), ids in zip(rows, outputs):
        print(json.dumps({"adapter": opts.adapter[k], "prompt": prompt, "output": encoder.decode(ids)}, ensure_ascii=False))
    return 0


def bench_command(args: list[str]) -> int:
    from reft_lab.bench import main as bench_main

    return bench_main(args)


ANALYSES = {"intruders": "reft_lab.analysis.intruders:intruders_main",
            "known-split": "reft_lab.analysis.known_split:known_split_main"}


def analyze_command(args: list[str]) -> int:
    import importlib

    if not args or args[0] in ("-h", "--help"):
        print("usage: reft-lab analyze <analysis> [arguments]\n\nanalyses:\n  intruders <job dir>...  "
              "intruder dimensions of a job's updated weight matrices (reft-lab analyze intruders --help)\n"
              "  known-split --out FILE [overrides]  the knowledge probe split by the base model's own answers "
              "(reft-lab analyze known-split --help)")
        return 0
    if args[0] not in ANALYSES:
        raise ReftLabError(f"unknown analysis {args[0]!r}; allowed: {', '.join(ANALYSES)}")
    module, function = ANALYSES[args[0]].split(":")
    return getattr(importlib.import_module(module), function)(args[1:])


COMMANDS = {"train": train_command, "params": params_command, "report": report_command, "generate": generate_command,
            "bench": bench_command, "analyze": analyze_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"reft-lab: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return COMMANDS[command](args)
    except ReftLabError as err:
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"reft-lab {command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
