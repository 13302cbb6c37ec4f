"""``reft-lab analyze intruders <job dir>``: intruder dimensions of a job's updated weight matrices.

Intruder dimensions (Shuttleworth et al., 2024, arXiv 2410.21228): among the top ``k`` singular
vectors of a tuned matrix W = W₀ + ΔW, those whose largest cosine similarity with any singular
vector of the pre-trained W₀ is below ``ε``: new high-ranking directions that W₀ does not have.
Left singular vectors (the output space) are compared. ``--scale λ`` multiplies the intruders'
singular values by λ (W ← W + (λ − 1)·σᵢuᵢvᵢᵀ for each intruder i) and re-runs the job's whole
evaluation, so retention with and without them can be compared (a job with no intruder keeps its
weights, so its own evaluation stands, marked ``"evaluated": false``).

A weight update is needed: LoRA and DoRA (merged into the weights) and full fine-tuning. ReFT
methods leave every weight as it was (the job's base fingerprint proves it), so there is nothing
to decompose: the command says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from reft_lab.atomic import atomic_write_json
from reft_lab.errors import ReftLabError
from reft_lab.metrics import METRICS_FILE, read_metrics

RESULT_FILE = "intruders.json"
WEIGHT_METHODS = ("lora", "dora", "full")


@dataclass
class MatrixIntruders:
    name: str
    shape: list[int]
    intruders: list[int]  # ranks (0 = largest singular value) of the tuned matrix's intruders among its top k
    max_cosine: list[float]  # per top-k singular vector: its largest |cos| with any of W₀'s


def intruders_of(w0: torch.Tensor, w: torch.Tensor, k: int, epsilon: float) -> tuple[list[int], list[float], tuple]:
    """The top-``k`` left singular vectors of ``w`` whose largest |cosine| with every left singular
    vector of ``w0`` is below ``epsilon``; also each one's largest |cosine| and the SVD of ``w``.
    Computed where ``w`` lives: float64 on the CPU, float32 on a GPU (cosines to ~1e-6, and fast)."""
    dtype = torch.float64 if w.device.type == "cpu" else torch.float32
    u0 = torch.linalg.svd(w0.to(w.device, dtype), full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
    top = min(k, u.shape[1])
    best = (u[:, :top].T @ u0).abs().amax(dim=1)  # columns are unit vectors: the dot product is the cosine
    found = [i for i in range(top) if best[i] < epsilon]
    return found, best.tolist(), (u, s, vh)


def analysed_matrices(model: nn.Module, method: str, adapted: list[str], modules: list[str] | None) -> list[str]:
    """Names of the linear weights to analyse: ``modules`` (leaf names such as q_proj) when given,
    else the ones the method updated (LoRA/DoRA: its targets; full: every linear layer of the decoder)."""
    from reft_lab.models.layers import decoder_layers

    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    wanted = modules or (adapted if method in ("lora", "dora") else None)  # None: every linear layer
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and id(module) in inside and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise ReftLabError(f"--modules {modules}: no linear layer of the decoder has one of these names")
    return names


def _weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of these weights on the CPU, in their own dtype (W₀ for a whole 7B fits in host memory)."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().to("cpu", copy=True) for name in names}


def analyse(job: Path, k: int, epsilon: float, scale: float | None, modules: list[str] | None) -> dict:
    from reft_lab.adapters import load_adapter
    from reft_lab.data.batching import PromptEncoder
    from reft_lab.evaluation.suite import Suite, evaluate_base, evaluate_tuned
    from reft_lab.methods import TunedModel
    from reft_lab.methods.none import NoneConfig
    from reft_lab.models import load_model
    from reft_lab.recipe import curve_point
    from reft_lab.settings import RunSettings
    from reft_lab.tasks import load_task
    from reft_lab.training.budget import max_length

    metrics_path = job / METRICS_FILE
    if not metrics_path.exists():
        raise ReftLabError(f"{job}: no {METRICS_FILE}: give the directory of a finished training job")
    metrics = read_metrics(metrics_path)
    if metrics.get("status") != "ok":
        raise ReftLabError(f"{metrics_path}: status is {metrics.get('status')!r}: only an ok job has weights to analyse")
    method = metrics["method"]
    if method not in WEIGHT_METHODS:
        raise ReftLabError(f"{job}: method {method!r} updates no weight (base fingerprint unchanged: "
                           f"{metrics['base_fingerprint_before'] == metrics['base_fingerprint_after']}); "
                           f"intruder dimensions need a weight update: {', '.join(WEIGHT_METHODS)}")
    settings = RunSettings.from_cfg(OmegaConf.create(metrics["config"]))
    loaded = load_model(settings.model)
    model = loaded.model
    suite = base_results = None
    if scale is not None:  # the base's evaluation (cached) and its references, before the weights change
        task = load_task(settings.task, settings.seed)  # the job's test split and prompt sets
        encoder = PromptEncoder(loaded.tokenizer, settings.model.chat_template)
        suite = Suite(task, encoder, settings.retention, max_length(model, settings.task.max_length), settings.task.overlong)
        base_results = evaluate_base(TunedModel(model, NoneConfig()), suite, metrics["base_fingerprint_before"])
    if method == "full":  # the job's weights replace the pre-trained ones in place: keep W₀ first
        names = analysed_matrices(model, method, [], modules)
        w0 = _weights(model, names)
        load_adapter(model, job / "adapter", base_name=loaded.name)
    else:  # peft leaves W₀ in each adapted layer's base_layer until the update is merged into it
        peft_model = load_adapter(model, job / "adapter", base_name=loaded.name).model
        targets = peft_model.peft_config["default"].target_modules
        w0 = {name: module.base_layer.weight.detach().to("cpu", copy=True)
              for name, module in peft_model.get_base_model().named_modules() if isinstance(getattr(module, "base_layer", None), nn.Linear)}
        model = peft_model.merge_and_unload()  # the plain model, W₀ + ΔW in each adapted layer
        names = analysed_matrices(model, method, sorted([targets] if isinstance(targets, str) else targets), modules)
        unadapted = [n for n in names if n not in w0]
        if unadapted:
            raise ReftLabError(f"--modules: {unadapted[0]} was not updated by this {method} job (its targets: {sorted(targets)})")
    modules_by_name = dict(model.named_modules())
    rows, intruder_parts = [], {}  # per matrix: (σᵢ, uᵢ, vᵢ) of each intruder, all that scaling needs
    for name in names:
        weight = modules_by_name[name].weight.detach()
        found, best, (u, s, vh) = intruders_of(w0.pop(name), weight, k, epsilon)
        rows.append(MatrixIntruders(name, list(weight.shape), found, best))
        intruder_parts[name] = [(s[i], u[:, i].clone(), vh[i].clone()) for i in found]
    result = {"job": str(job), "method": method, "k": k, "epsilon": epsilon, "side": "left",
              "matrices": len(rows), "intruders": sum(len(r.intruders) for r in rows),
              "per_matrix": [r.__dict__ for r in rows], "scale": None,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    result["intruders_per_matrix"] = result["intruders"] / len(rows)
    # how close the job came to having one: the lowest best-|cosine| of any top-k vector (intruder below ε)
    result["least_aligned_cosine"] = min(min(r.max_cosine) for r in rows)
    if scale is not None:
        before = {"task_after": metrics["task_after"], "retention": {n: v["after"] for n, v in metrics["retention"].items()}}
        result["scale"] = {"factor": scale, "before": before, "evaluated": result["intruders"] > 0}
        if not result["intruders"]:  # nothing to scale: the weights are the job's own, so is its evaluation
            result["scale"]["after"] = before
            return result
        with torch.no_grad():
            for name, parts in intruder_parts.items():
                weight = modules_by_name[name].weight
                for sigma, u_i, v_i in parts:
                    weight += ((scale - 1) * sigma * torch.outer(u_i, v_i)).to(weight.device, weight.dtype)
        scaled = evaluate_tuned(TunedModel(model, NoneConfig()), suite, base_results)
        result["scale"]["after"] = curve_point(metrics["steps"], scaled, metrics["task_metric"])
    return result


def print_summary(result: dict) -> None:
    print(f"{result['job']}: {result['method']}, {result['intruders']} intruder dimension(s) in {result['matrices']} "
          f"matrices (top {result['k']} singular vectors, ε = {result['epsilon']}; least-aligned best |cos| "
          f"{result['least_aligned_cosine']:.4f})")
    if result["scale"]:
        before, after = result["scale"]["before"], result["scale"]["after"]
        if not result["scale"]["evaluated"]:
            print(f"  intruders' singular values × {result['scale']['factor']}: no intruder, nothing to scale (not re-evaluated)")
            return
        print(f"  intruders' singular values × {result['scale']['factor']}: task {before['task_after']:.3f} → {after['task_after']:.3f}")
        for name, value in after["retention"].items():
            was = before["retention"].get(name)
            if value is not None and was is not None:
                print(f"  {name}: {was:.4f} → {value:.4f}")


def intruders_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reft-lab analyze intruders", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("jobs", nargs="+", type=Path, help="directories of finished training jobs (metrics.json + adapter/)")
    parser.add_argument("--k", type=int, default=10, help="top singular vectors of each tuned matrix examined (≥ 1; default 10)")
    parser.add_argument("--epsilon", type=float, default=0.5,
                        help="a top singular vector whose largest |cosine| with every pre-trained one is below this is an intruder (0 < ε ≤ 1; default 0.5)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiply the intruders' singular values by this factor and re-run the job's evaluation (≥ 0; e.g. 0.3)")
    parser.add_argument("--modules", nargs="+", default=None,
                        help="leaf names of the linear layers to analyse (e.g. q_proj v_proj); default: those the method updated")
    opts = parser.parse_args(args)
    if opts.k < 1:
        raise ReftLabError(f"--k={opts.k} is not allowed: an integer ≥ 1")
    if not 0 < opts.epsilon <= 1:
        raise ReftLabError(f"--epsilon={opts.epsilon} is not allowed: a number in (0, 1]")
    if opts.scale is not None and opts.scale < 0:
        raise ReftLabError(f"--scale={opts.scale} is not allowed: a number ≥ 0")
    failed = 0
    for job in opts.jobs:  # one job's error is reported and the others still run
        try:
            result = analyse(job, opts.k, opts.epsilon, opts.scale, opts.modules)
        except ReftLabError as err:
            if len(opts.jobs) == 1:
                raise
            print(f"reft-lab analyze: error: {err}", file=sys.stderr)
            failed += 1
            continue
        atomic_write_json(job / RESULT_FILE, result)
        print_summary(result)
    return 2 if failed else 0
