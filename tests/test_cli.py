"""`reft-lab params`: exact counts from configs alone (the LoReFT paper's numbers), clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reft_lab.cli import main

PAPER = Path(__file__).resolve().parent.parent / "experiments" / "param_counts"


def _params(capsys, *overrides):
    assert main(["params", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


# LoReFT paper (arXiv 2404.03592) Tables 1-3: "Params (%)" of LoReFT on LLaMA-7B/13B and Llama-2 7B
@pytest.mark.parametrize(
    "model,overrides,trainable,pct",
    [
        # commonsense / arithmetic: rank 8, every layer, f7+l7 tied → 0.031% (7B), 0.025% (13B)
        ("llama-7b", ["method.rank=8", "method.layers=all", "method.positions=f7+l7", "method.tied=true"], 2_097_408, 0.031),
        ("llama-13b", ["method.rank=8", "method.layers=all", "method.positions=f7+l7", "method.tied=true"], 3_277_120, 0.025),
        # instruction following: rank 4, layers 3;9;18;24, f5+l5 untied → 0.004%
        ("llama-7b", ["method.rank=4", "method.layers=[3,9,18,24]", "method.positions=f5+l5", "method.tied=false"], 262_176, 0.004),
    ],
)
def test_paper_parameter_counts_from_config_only(capsys, model, overrides, trainable, pct):
    report = _params(capsys, f"model.name_or_path={PAPER / model}", "method=loreft", *overrides)
    assert report["device"] == "meta"
    assert report["trainable_params"] == trainable
    assert round(report["trainable_pct"], 3) == pct
    assert report["base_params"] == {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320}[model]
    assert report["adapter_bytes"] > 4 * trainable


def test_lora_count_on_meta(capsys):
    report = _params(capsys, f"model.name_or_path={PAPER / 'llama-7b'}", "method=lora", "method.rank=8")
    # q_proj and v_proj (4096×4096) in 32 layers: 2·8·(4096+4096) each
    assert report["trainable_params"] == 32 * 2 * 8 * (4096 + 4096)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["params", "method=nope"], "method/nope"),
        (["params", "model=tiny", "method.rank=0"], "method.rank=0"),
        (["params", "model=tiny", "method.layers=[0,99]"], "method.layers"),
        (["params", "model=tiny", "method.positions=f3l3"], "method.positions"),
        (["params", "model=tiny", "method=lora", "method.target_modules=[wq]"], "method.target_modules"),
        (["params", "model.name_or_path=/definitely/missing"], "model.name_or_path"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "reft_lab.cli", "params", "model=tiny", "method.rank=-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "method.rank=-3" in proc.stderr
