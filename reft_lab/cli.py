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

examples:
  reft-lab train -m experiment=quickstart
  reft-lab params method=loreft method.rank=8 model.name_or_path=path/to/config-only-dir
  reft-lab report multirun/quickstart
"""


def params_command(overrides: list[str]) -> int:
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
    from reft_lab.train import run_hydra

    return run_hydra(args)


def report_command(args: list[str]) -> int:
    from reft_lab.report import report_main

    return report_main(args)


COMMANDS = {"train": train_command, "params": params_command, "report": report_command}


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
        print(f"reft-lab {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
