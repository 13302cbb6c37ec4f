"""``reft-lab bench``: one training step of reft_lab vs pyreft vs peft on the same work.

Reference config A: SmolLM2-135M-Instruct, fp32, batch 8, prompt 48 + response 16 tokens (loss on
the response only), LoReFT rank 4 at layers 6, 12, 18, 24, positions f3+l3 untied; LoRA rank 8,
alpha 16 on q_proj and v_proj; AdamW. Step time: the providers run interleaved round by round in
one process (the machine's drift hits all alike), median/p20/p80 over the rounds after warm-up.
Peak memory: each provider in a fresh subprocess, after one warm-up step, the peak of live memory
during its steps minus the memory before them (CPU: RSS with glibc returning every large block on
free, see ``measure_memory``; CUDA: max_memory_allocated). On CUDA each provider instead runs alone
(``time_alone``: a 7B model fits once), memory measured in the same pass. ``--scale`` swaps config
A for a random-initialised model and workload of another size (``SCALES``; bf16 base on CUDA) and
adds MFU against the GPU's dense bf16 peak. Writes a JSON record and CSV rows under
experiments/bench/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from reft_lab.data.batching import EncodedExample, collate_train
from reft_lab.errors import ReftLabError

LAYERS, RANK, FIRST, LAST = [6, 12, 18, 24], 4, 3, 3  # config A; --layers changes LAYERS (small test models)
BATCH, PROMPT, RESPONSE = 8, 48, 16
PROVIDERS = ["reft_lab_loreft", "reft_lab_loreft_cached", "reft_lab_loreft_recompute", "reft_lab_loreft_ckpt",
             "reft_lab_loreft_compiled", "reft_lab_loreft_graphs",
             "reft_lab_loreft_eager", "pyreft_loreft", "peft_lora", "reft_lab_lora", "floor"]
CUDA_ONLY = ("reft_lab_loreft_graphs",)  # trainer.cuda_graphs
# floor: the plain transformers model's forward plus the activation-gradient backward from the lowest
# intervened layer, LM head on the response only, no intervention: what any LoReFT step computes

# --scale: random-initialised Llama-family models built from a config on the device (no download).
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, tie_word_embeddings=False)
# name: (model config, batch, prompt, response, layers, bf16 base weights on CUDA)
SCALES = {
    "smol_A": (SMOL, 8, 48, 16, [6, 12, 18, 24], False),  # config A's shapes, fp32
    # config A at 1/8 of SmolLM2's width (vocabulary 512): every op's fixed cost (host dispatch,
    # autograd, the kernel's own overhead) dominates the step, as launches bound config A on a GPU;
    # measurable on a CPU
    "smol_host": (dict(SMOL, hidden_size=72, intermediate_size=192, vocab_size=512), 8, 48, 16, [6, 12, 18, 24], False),
    "smol_b32": (SMOL, 32, 448, 64, [6, 12, 18, 24], True),
    "llama1b_b16": (ONE_B, 16, 448, 64, [3, 6, 9, 12], True),
    "llama7b_b8": (SEVEN_B, 8, 448, 64, [6, 12, 18, 24], True),
}
BF16_BASE = {"on": False}  # the current scale's choice (or --bf16-base): frozen base in bf16 (trainable state stays fp32), autocast steps
# dense bf16 tensor-core peak (FLOP/s) by GPU name, from NVIDIA's data sheets, for MFU
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]
# reft_lab_loreft_eager forces method.impl=eager: on CUDA the fused kernel vs the eager edit; on a CPU
# both are the eager path, so it is left out of the default list there
DEFAULT_PROVIDERS = [p for p in PROVIDERS if torch.cuda.is_available() or p not in ("reft_lab_loreft_eager", *CUDA_ONLY)]


def _model(name: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("scale:"):
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SCALES[name.removeprefix("scale:")][0], max_position_embeddings=2048))
        return model.to(torch.bfloat16 if BF16_BASE["on"] else torch.float32).eval()
    from reft_lab.models import ModelConfig, load_model

    return load_model(ModelConfig(name_or_path=name, device=device, dtype="float32")).model  # config A is fp32 on any device


def set_scale(name: str, bf16_base: bool = False) -> str:
    """Size the workload for ``--scale name``; returns the model name that builds it. The base is
    bf16 where the scale says so on CUDA, or anywhere with ``bf16_base``."""
    _, BATCH_, PROMPT_, RESPONSE_, layers, bf16 = SCALES[name]
    global BATCH, PROMPT, RESPONSE
    BATCH, PROMPT, RESPONSE = BATCH_, PROMPT_, RESPONSE_
    LAYERS[:] = layers
    BF16_BASE["on"] = (bf16 and torch.cuda.is_available()) or bf16_base
    return f"scale:{name}"


def _autocast():
    """bf16 autocast on the benchmark's device where the base is bf16: every provider alike."""
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=BF16_BASE["on"])


def needed_flops(config, provider: str) -> float:
    """The matmul FLOPs a provider's step needs, attention included (causal masking not discounted):
    the forward of every layer, the LM head on the response only, and the backward the method needs.
    ReFT (and the floor): activation gradients from the loss down to the lowest edited layer (a
    frozen base has no weight gradients). LoRA: activation gradients through every layer (its
    adapters' own FLOPs are negligible). Each backward of activations costs as much as its forward."""
    d, inter, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    tokens, T = BATCH * (PROMPT + RESPONSE), PROMPT + RESPONSE
    layer = 2 * tokens * (2 * d * d + 2 * d * kv + 3 * d * inter) + 4 * BATCH * T * T * d
    head = 2 * BATCH * RESPONSE * d * config.vocab_size
    lowest = 0 if "lora" in provider else min(LAYERS)
    return (n_layers * layer + head) + ((n_layers - lowest) * layer + head)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def _batch(device, vocab_size: int):
    g = torch.Generator().manual_seed(0)
    examples = [EncodedExample(torch.randint(3, vocab_size, (PROMPT,), generator=g).tolist(),
                               torch.randint(3, vocab_size, (RESPONSE,), generator=g).tolist()) for _ in range(BATCH)]
    return collate_train(examples, pad_id=2).to(device)


def _optimizer_step(loss_fn, optimizer):
    """One training step as every provider takes it: loss, backward, optimizer step, zeroed grads.
    With a bf16 base, the loss runs under bf16 autocast for every provider alike."""

    def step():
        with _autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_step(provider: str, model_name: str):
    """A closure running one optimizer step of ``provider`` on config A's batch."""
    from reft_lab.methods import attach
    from reft_lab.training import TrainerConfig, build_optimizer, response_loss
    from reft_lab.training.speedups import hot_path

    model = _model(model_name)
    device = next(model.parameters()).device
    batch = _batch(device, model.config.vocab_size)
    if provider == "floor":
        return _floor_step(model, batch)
    if provider.startswith("reft_lab"):
        if "loreft" in provider:
            cfg = {"name": "loreft", "rank": RANK, "layers": LAYERS, "positions": f"f{FIRST}+l{LAST}", "tied": False,
                   "impl": "eager" if provider.endswith("eager") else "auto"}
        else:
            cfg = {"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
        tuned = attach(model, cfg)
        if provider.endswith("ckpt"):
            tuned.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the training loop's own forward swaps at its defaults (compile only where the provider says)
        graphs = provider.endswith("graphs")
        swaps = hot_path(tuned, TrainerConfig(compile=provider.endswith(("compiled", "graphs")), cuda_graphs=graphs,
                                              recompute_mlp=provider.endswith("recompute")))
        swaps.__enter__()
        tuned.train()
        optimizer = build_optimizer(tuned, 1e-3, 0.0)
        cache = None
        if provider.endswith("cached"):
            from reft_lab.training.prefix_cache import PrefixCache

            cache = PrefixCache(2**31)
            # identity only guards against reuse across models; fingerprinting here would allocate and
            # free the whole model's bytes, which the memory measurement would then see as free pages
            cache.bind(tuned.model, min(LAYERS), "bench")

        def loss():
            if graphs:  # as the training loop marks each step
                torch.compiler.cudagraph_mark_step_begin()
            with cache.around_batch(batch) if cache else nullcontext():
                return response_loss(tuned, batch)

        step = _optimizer_step(loss, optimizer)
        step.swaps = swaps  # step holds them: a collected ExitStack would restore the plain forwards
        return step
    labels = batch.input_ids.clone()
    labels[:, :PROMPT] = -100
    if provider == "pyreft_loreft":
        import pyreft

        reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
                 "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=RANK,
                                                           dtype=torch.float32)}
                for layer in LAYERS for _ in range(2)]
        reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
        reft.model.train()
        locations = [[list(range(FIRST))] * BATCH if i % 2 == 0 else [list(range(PROMPT - LAST, PROMPT))] * BATCH
                     for i in range(len(reps))]
        params = [p for p in reft.parameters() if p.requires_grad]

        def loss():  # what pyreft's ReftTrainerForCausalLM.compute_loss does
            return reft({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
                        unit_locations={"sources->base": (None, locations)}, labels=labels, use_cache=False)[1].loss

        return _optimizer_step(loss, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0))
    if provider == "peft_lora":
        import peft

        lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        lora.train()
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        return _optimizer_step(lambda: lora(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                                            use_cache=False).loss, optimizer)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _floor_step(model, batch):
    """The floor provider: the frozen model's forward, LM head on the response positions, and the
    backward of activation gradients from the loss to the input of the lowest intervened layer
    (made a leaf that requires grad). No intervention, no weight gradient, no optimizer."""
    from reft_lab.methods import TunedModel
    from reft_lab.methods.none import NoneConfig
    from reft_lab.models.layers import decoder_layers
    from reft_lab.training import (
        response_loss,  # narrows the LM head to the supervised positions
    )

    model.requires_grad_(False)

    def leaf_input(module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}

    decoder_layers(model)[min(LAYERS)].register_forward_pre_hook(leaf_input, with_kwargs=True)

    plain = TunedModel(model, NoneConfig())  # response_loss's calling convention on the bare model

    def step():
        with _autocast():
            loss = response_loss(plain, batch)
        loss.backward()
        return loss.item()

    return step


def _profiled_step(provider: str, model_name: str, warmup: int):
    """torch.profiler's record of one step of ``provider``, after ``warmup`` steps."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(provider, model_name)
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    return prof


def profile_step(provider: str, model_name: str, warmup: int) -> str:
    """Where one step's time goes: torch.profiler's table by self time, after ``warmup`` steps."""
    prof = _profiled_step(provider, model_name, warmup)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                                     row_limit=20)


# aten ops that only make a new view of a tensor: no kernel runs for them
VIEW_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::slice", "aten::select",
            "aten::transpose", "aten::t", "aten::numpy_T", "aten::permute", "aten::unsqueeze", "aten::squeeze",
            "aten::as_strided", "aten::alias", "aten::detach", "aten::unbind", "aten::split", "aten::chunk",
            "aten::narrow", "aten::view_as", "aten::expand_as", "aten::unflatten", "aten::flatten"}


def dispatched_ops(prof) -> int:
    """The aten ops a profiled region dispatched: each outermost aten op (one not called by another
    aten op; backward's sit under autograd's engine, an optimizer's under its step), less those
    that only make views. On CUDA each is about one kernel launch."""
    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for event in prof.events() if event.name.startswith("aten::") and event.name not in VIEW_OPS and outermost(event))


def count_ops(provider: str, model_name: str, warmup: int) -> int:
    """``dispatched_ops`` of one step (forward, backward, optimizer): the launch count that bounds a
    small model's step. Counted on any device (the CPU runs the eager edit where CUDA would run
    the fused kernel)."""
    return dispatched_ops(_profiled_step(provider, model_name, warmup))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_steps(providers: list[str], model_name: str, warmup: int, steps: int) -> dict[str, list[float]]:
    closures = {p: make_step(p, model_name) for p in providers}
    times: dict[str, list[float]] = {p: [] for p in providers}
    for round_ in range(warmup + steps):
        for provider, step in closures.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[provider].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{warmup + steps}: " + ", ".join(f"{p} {times[p][-1]:.2f}s" for p in providers if times[p]),
              flush=True)
    return times


def time_alone(providers: list[str], model_name: str, warmup: int, steps: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """CUDA, one provider at a time (a 7B model fits once): build, ``warmup`` steps, ``steps``
    synchronised steps; peak allocated memory during them above what the built provider holds."""
    import gc

    times, memory = {}, {}
    for provider in providers:
        gc.collect()
        torch.cuda.empty_cache()
        step = make_step(provider, model_name)
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times[provider] = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times[provider].append(time.perf_counter() - start)
        memory[provider] = int(torch.cuda.max_memory_allocated() - before)
        print(f"{provider}: median {1e3 * statistics.median(times[provider]):.1f} ms, peak +{memory[provider] / 2**20:.0f} MiB", flush=True)
        del step
    return times, memory


def gc_tensors():
    """Every live CPU tensor with storage (the model's parameters and buffers among them)."""
    import gc

    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.numel() > 0:
                tensors.append(obj)
        except ReferenceError:  # a dead weak proxy (torch.compile leaves some behind)
            pass
    return tensors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MEMORY_METHOD = "live_after_warmup"  # rows before it: "rss_hwm" (heap high-water mark, no warm-up step)


def measure_memory(provider: str, model_name: str, steps: int) -> int:
    """Peak extra memory of training steps, in this (fresh) process, after one warm-up step
    (optimizer state, lazy initialisation and compilation are not training-step memory).

    CPU: the process must start with ``LIVE_MEMORY_ENV``: glibc then serves every allocation of
    ≥ 64 KiB from its own mapping and returns it on free, so peak RSS follows live tensor bytes (as
    CUDA's max_memory_allocated does) instead of the heap's high-water mark, which depends on the
    allocator's history. Weights load memory-mapped: they are read once first, so their pages are
    resident before the baseline and not counted as training.
    """
    step = make_step(provider, model_name)
    step()
    with torch.no_grad():
        for obj in gc_tensors():
            obj.sum()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        return int(torch.cuda.max_memory_allocated() - before)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != LIVE_MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"]:
        raise RuntimeError(f"measure CPU memory in a process started with {LIVE_MEMORY_ENV} (reft-lab bench does this)")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    before = _rss_bytes()
    for _ in range(steps):
        step()
    return _peak_rss_bytes() - before


def _comparisons(providers) -> list[tuple[str, str]]:
    ours_loreft = [p for p in PROVIDERS if p.startswith("reft_lab_loreft") and p in providers]
    pairs = [(ours, peer) for ours in ours_loreft for peer in ("pyreft_loreft", "peft_lora", "floor") if peer in providers]
    return pairs + ([("reft_lab_lora", "peft_lora")] if {"reft_lab_lora", "peft_lora"} <= set(providers) else [])


def ratios(times: dict[str, list[float]], memory: dict[str, int]) -> tuple[dict, dict]:
    """(ratios of medians, step and memory; medians of per-round step ratios). The rounds interleave
    the providers, so a round's ratio compares steps taken seconds apart: the paired median is the
    less drift-prone estimate on a shared machine."""
    med = {p: statistics.median(t) for p, t in times.items()}
    of_medians, paired = {}, {}
    for ours, peer in _comparisons(times):
        of_medians[f"{ours}/{peer}_step"] = med[ours] / med[peer]
        paired[f"{ours}/{peer}_step"] = statistics.median(a / b for a, b in zip(times[ours], times[peer]))
        if peer == "pyreft_loreft":
            of_medians[f"{ours}/{peer}_memory"] = memory[ours] / memory[peer]
    return of_medians, paired


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append result rows to a CSV file (the benchmarks' own, here and in experiments/), with the
    header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from reft_lab.recipe import versions as run_versions

    out = run_versions()
    try:
        out["pyreft"] = version("pyreft")
    except PackageNotFoundError:
        pass
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu} ({len(os.sched_getaffinity(0))} cores)"


def memory_in_subprocesses(opts) -> dict[str, int]:
    """Each provider's peak training memory, each in its own fresh process. As many run side by side
    as there are cores (a process's peak is its own, whatever runs beside it): fewer start-ups to wait for."""
    where = (["--scale", opts.scale] if opts.scale else ["--model", opts.model]) + ["--layers", *map(str, LAYERS)]
    where += ["--bf16-base"] if opts.bf16_base else []

    def measure(provider: str) -> int:
        proc = subprocess.run([sys.executable, "-m", "reft_lab.cli", "bench", *where, "--memory-only", provider,
                               "--memory-steps", str(opts.memory_steps)],
                              capture_output=True, text=True, env={**os.environ, **LIVE_MEMORY_ENV})
        if proc.returncode:
            raise ReftLabError(f"bench: measuring {provider}'s memory failed (exit {proc.returncode}): "
                               f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_train_bytes"]

    workers = max(1, min(len(opts.providers), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(opts.providers, pool.map(measure, opts.providers)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reft-lab bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="the model of config A (ignored with --scale)")
    parser.add_argument("--scale", choices=list(SCALES), default=None,
                        help="a random-initialised model and workload of this size, built on the device: smol_A (config A's "
                             "shapes), smol_host (config A at 1/8 width: per-op costs dominate), smol_b32, llama1b_b16, "
                             "llama7b_b8 (bf16 base weights on CUDA); adds an MFU column")
    parser.add_argument("--bf16-base", action="store_true",
                        help="with --scale: the frozen base in bf16 on any device (the GPU scales' default; on a CPU slow, for memory)")
    parser.add_argument("--providers", nargs="+", default=DEFAULT_PROVIDERS, choices=PROVIDERS,
                        help="the training steps to time: reft_lab's and pyreft's LoReFT, peft's LoRA, the frozen-base floor")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider first (JIT, caches)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per provider, interleaved; medians are reported")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps run to measure each provider's peak training memory")
    parser.add_argument("--out", type=Path, default=Path("experiments/bench"),
                        help="folder the JSON-lines record and the CSV table are appended to")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="intervened layers (default: config A's 6 12 18 24, or the scale's)")
    parser.add_argument("--profile", default=None, choices=PROVIDERS, help="print torch.profiler's op table of one step of this provider")
    parser.add_argument("--ops", action="store_true",
                        help="print how many aten ops one step of each provider dispatches (about one kernel launch each on CUDA)")
    parser.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)  # internal: one provider's memory
    opts = parser.parse_args(argv)
    for key in ("warmup", "steps", "memory_steps"):
        if getattr(opts, key) < (0 if key == "warmup" else 1):
            raise ReftLabError(f"--{key.replace('_', '-')}={getattr(opts, key)} is not allowed: an integer ≥ {0 if key == 'warmup' else 1}")
    cuda_only = [p for p in opts.providers + [opts.profile] if p in CUDA_ONLY]
    if cuda_only and not torch.cuda.is_available():
        raise ReftLabError(f"--providers {cuda_only[0]} is not allowed here: it needs CUDA (CUDA graphs), which this machine "
                           f"lacks; choose from {', '.join(p for p in PROVIDERS if p not in CUDA_ONLY)}")
    if opts.bf16_base and not opts.scale:
        raise ReftLabError("--bf16-base is not allowed without --scale: config A's embedded model loads in fp32; "
                           f"choose a scale from {', '.join(SCALES)}")
    scale_model = set_scale(opts.scale or "smol_A", opts.bf16_base)  # config A's shapes unless --scale, whatever ran before
    if opts.scale:
        opts.model = scale_model
    if opts.layers is not None:  # after the scale, which sets its own
        LAYERS[:] = opts.layers
    if opts.profile:
        print(profile_step(opts.profile, opts.model, opts.warmup))
        return 0
    if opts.ops:
        counts = {p: count_ops(p, opts.model, opts.warmup) for p in opts.providers}
        print(json.dumps({"machine": machine(), "model": opts.model, "aten_ops_per_step": counts}, indent=2))
        return 0
    if opts.memory_only:
        print(json.dumps({"provider": opts.memory_only, "peak_train_bytes": measure_memory(opts.memory_only, opts.model, opts.memory_steps)}))
        return 0
    if torch.cuda.is_available():
        times, memory = time_alone(opts.providers, opts.model, opts.warmup, opts.steps)
    else:
        times = time_steps(opts.providers, opts.model, opts.warmup, opts.steps)
        memory = memory_in_subprocesses(opts)
    method = "cuda_alone_max_allocated" if torch.cuda.is_available() else MEMORY_METHOD
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
              "config": {"model": opts.model, "scale": opts.scale, "batch": BATCH, "prompt": PROMPT, "response": RESPONSE,
                         "layers": LAYERS, "rank": RANK, "positions": f"f{FIRST}+l{LAST}", "warmup": opts.warmup,
                         "steps": opts.steps, "bf16_base": BF16_BASE["on"], "memory_method": method},
              "providers": {p: {"median_s": statistics.median(times[p]), "p20_s": _quantile(times[p], 0.2),
                                "p80_s": _quantile(times[p], 0.8), "peak_train_bytes": memory[p]} for p in opts.providers}}
    peak = peak_flops()
    if opts.scale and peak:
        from transformers import LlamaConfig

        config = LlamaConfig(**SCALES[opts.scale][0])
        for p, v in record["providers"].items():
            v["mfu"] = needed_flops(config, p) / v["median_s"] / peak
    record["ratios"], record["paired_step_ratios"] = ratios(times, memory)
    record["times_s"] = times  # every measured round, for re-analysis
    opts.out.mkdir(parents=True, exist_ok=True)
    with open(opts.out / "train_step.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    append_csv(opts.out / "train_step.csv", [
        {"date": record["date"], "machine": record["machine"], "provider": p, "median_s": f"{v['median_s']:.4f}",
         "p20_s": f"{v['p20_s']:.4f}", "p80_s": f"{v['p80_s']:.4f}", "peak_train_bytes": v["peak_train_bytes"],
         **{k: record["versions"][k] for k in ("torch", "transformers", "peft")}, "memory_method": method,
         "scale": (opts.scale or "") + ("+bf16" if opts.bf16_base else ""), "mfu": f"{v['mfu']:.3f}" if "mfu" in v else ""} for p, v in record["providers"].items()])
    print(json.dumps({key: record[key] for key in ("machine", "providers", "ratios", "paired_step_ratios")}, indent=2))
    return 0
