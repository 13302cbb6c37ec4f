"""``reft-lab train``: setup → evaluate the base → train → evaluate → save adapter and metrics.json.

One readable file. Every job writes into Hydra's output directory (never the working directory):
``metrics.json`` (schema in ``reft_lab.metrics``), ``adapter/``, ``predictions.jsonl`` and the
logger's files. A failed job writes ``status: "failed"`` with its error; in a multirun the other
jobs go on and the sweep exits non-zero at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from reft_lab import __version__, distributed
from reft_lab.accounting import fingerprint, param_report
from reft_lab.adapters import save_adapter
from reft_lab.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from reft_lab.config import build_section
from reft_lab.data.batching import (EncodedExample, PromptEncoder, TrainBatch, collate_train, encode_examples,
                                   position_ids, predicting_positions)
from reft_lab.tasks import TaskConfig, load_task
from reft_lab.errors import ConfigError, ReftLabError, config_error
from reft_lab.evaluation.suite import EvalConfig, Suite, base_logprobs, evaluate_base, evaluate_tuned
from reft_lab.loggers import LoggerConfig, NullLogger, make_logger
from reft_lab.methods import MethodConfig, ReftModel, TunedModel, attach, method_config
from reft_lab.methods.none import NoneConfig
from reft_lab.metrics import RETENTION_METRICS, SCHEMA, lookup, write_metrics
from reft_lab.models import ModelConfig, load_model
from reft_lab.models.head import logits_at
from reft_lab.models.layers import compiled_layers
from reft_lab.models.recompute import lean_gated_mlps
from reft_lab.models.loading import DTYPES, model_config_only
from reft_lab.prefix_cache import PrefixCache, stochastic_prefix


@dataclass(kw_only=True)
class TrainerConfig:
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    bf16: bool = True
    eval_batch_size: int = 32
    log_every: int = 1
    group_by_length: bool = False  # batches of similar length (less padding); changes the data order
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, slower
    compile: bool = False  # torch.compile each decoder block: fused pointwise ops, faster steps after a cold compile (README)
    recompute_mlp_act: bool = True  # gated MLPs recompute act(gate) in backward instead of saving it (eager path)
    prefix_cache: bool = True  # ReFT: reuse frozen activations below the lowest intervened layer (epochs ≥ 2)
    prefix_cache_gb: float = 2.0  # memory bound of the cache
    prefix_cache_dtype: str | None = None  # null = the model's dtype; bfloat16 halves the cache
    prefix_cache_spill: bool = False  # past the bound, spill entries to <job dir>/prefix_cache
    checkpoint_every: int = 25  # steps between checkpoints; 0 = only on SIGTERM/SIGINT
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = True  # continue from the job directory's newest complete checkpoint

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise config_error("trainer.checkpoint_every", self.checkpoint_every, "an integer ≥ 0 (0 = only on SIGTERM/SIGINT)")
        if self.prefix_cache_gb <= 0:
            raise config_error("trainer.prefix_cache_gb", self.prefix_cache_gb, "a number > 0")
        if self.prefix_cache_dtype is not None and self.prefix_cache_dtype not in DTYPES:
            raise config_error("trainer.prefix_cache_dtype", self.prefix_cache_dtype, f"null or one of {', '.join(DTYPES)}")
        if self.keep_checkpoints < 1:
            raise config_error("trainer.keep_checkpoints", self.keep_checkpoints, "an integer ≥ 1")
        for key in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise config_error(f"trainer.{key}", getattr(self, key), "an integer ≥ 1")
        if self.lr is not None and not self.lr > 0:
            raise config_error("trainer.lr", self.lr, "null (the method's default) or a number > 0")
        if self.weight_decay < 0:
            raise config_error("trainer.weight_decay", self.weight_decay, "a number ≥ 0")
        if not 0 <= self.warmup_ratio < 1:
            raise config_error("trainer.warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise config_error("trainer.max_grad_norm", self.max_grad_norm, "null or a number > 0")


@dataclass
class RunSettings:
    """The composed config, validated section by section before anything heavy happens."""

    model: ModelConfig
    method: MethodConfig
    task: TaskConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    retention: EvalConfig
    seed: int
    optimized_metric: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "RunSettings":
        known = {"model", "method", "task", "trainer", "logger", "retention", "seed", "optimized_metric", "skip_completed", "threads"}
        unknown = sorted(set(cfg.keys()) - known - {"experiment", "hparams_search"})
        if unknown:
            raise ConfigError(f"{unknown[0]} is not a known top-level key: allowed are {', '.join(sorted(known))}")
        seed = cfg.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise config_error("seed", seed, "an integer")
        metric = cfg.get("optimized_metric")
        numeric = [k for k, (types, _, _) in SCHEMA.items() if float in types or int in types]
        if not isinstance(metric, str) or not (metric in numeric or metric.startswith("retention.")):
            raise config_error("optimized_metric", metric, f"a numeric metrics.json key ({', '.join(numeric)}) or retention.<metric>.after")
        retention_keys = {f"retention.{m}.{when}" for m in RETENTION_METRICS for when in ("before", "after")}
        if metric.startswith("retention.") and metric not in retention_keys:
            raise config_error("optimized_metric", metric, f"retention.<{'|'.join(RETENTION_METRICS)}>.<before|after>")
        sections, problems = {}, []
        for name, build in (("model", lambda: build_section(ModelConfig, cfg.model, "model")),
                            ("method", lambda: method_config(cfg.method)),
                            ("task", lambda: build_section(TaskConfig, cfg.task, "task")),
                            ("trainer", lambda: build_section(TrainerConfig, cfg.trainer, "trainer")),
                            ("logger", lambda: build_section(LoggerConfig, cfg.logger, "logger")),
                            ("retention", lambda: build_section(EvalConfig, cfg.retention, "retention"))):
            try:
                sections[name] = build()
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(**sections, seed=seed, optimized_metric=metric)

    def preflight(self) -> None:
        """Attach the method to a meta-device copy built from the model's config alone: layer
        indices, rank and target modules are checked in seconds, before any weights load; so is
        what the method needs of the device the weights will load on (the fused kernel's)."""
        config = model_config_only(self.model)
        if config is not None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                attach(AutoModelForCausalLM.from_config(config), self.method)
        device = self.model.resolved_device()
        if device.type != "meta":
            self.method.check_device(device, self.model.torch_dtype, getattr(config, "hidden_size", 0))


def build_optimizer(tuned: TunedModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable state. Biases, norms and orthonormalised bases get no weight decay:
    decay on an orthogonally parametrised R is what collapses it (see interventions.base)."""
    no_decay = tuned.no_decay_parameter_names()
    params = tuned.trainable_state()
    groups = [
        {"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak rate over ``warmup_ratio·max_steps``, then linear decay to 0."""
    warmup = int(round(warmup_ratio * max_steps))

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


class BatchStream:
    """Endless batches. Epoch e is the permutation drawn from seed (seed, e), so the position
    (epoch, offset) is all a checkpoint needs to continue the same order."""

    def __init__(self, data: list[EncodedExample], batch_size: int, pad_id: int, seed: int, epoch: int = 0,
                 offset: int = 0, rank: int = 0, world: int = 1, group_by_length: bool = False):
        self.data, self.batch_size, self.pad_id, self.seed = data, batch_size, pad_id, seed
        self.group_by_length = group_by_length
        self.epoch, self.offset, self._order = epoch, offset, None
        self.rank, self.world = rank, world  # each process takes its slice of every global batch

    def order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.data), generator=generator).tolist()
            if self.group_by_length:  # sort within windows of 50 global batches: less padding, still shuffled
                window = 50 * self.batch_size * self.world
                length = lambda i: len(self.data[i].prompt) + len(self.data[i].response)  # noqa: E731
                order = [i for w in range(0, len(order), window) for i in sorted(order[w: w + window], key=length, reverse=True)]
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        if self.offset + self.world > len(self.data):  # every process needs at least one example
            self.epoch, self.offset = self.epoch + 1, 0
        chunk = self.order()[self.offset: self.offset + self.batch_size * self.world]
        self.offset += len(chunk)
        return collate_train([self.data[j] for j in chunk[self.rank:: self.world]], self.pad_id)


CE_CHUNK_ELEMENTS = 2**24  # logits upcast to fp32 per chunk of rows: bounded memory for large vocabularies


def response_loss(tuned: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Mean cross-entropy over response tokens. The LM head runs only on the positions whose next
    token is supervised (``logits_at``: one contiguous [N, d] matmul, no logits for prompt or
    padding), and the loss runs over row chunks so no full fp32 copy of a large-vocabulary logit
    tensor is made."""
    supervised = batch.labels != -100  # [B, R]: right-aligned, so each row's response is a suffix
    predicts = predicting_positions(batch.input_ids.shape[1], supervised.sum(1))
    with logits_at(tuned, predicts):
        logits = tuned(batch.input_ids, attention_mask=batch.attention_mask, prompt_lengths=batch.prompt_lengths,
                       position_ids=position_ids(batch.attention_mask), use_cache=False).logits  # [N, V]
    targets = batch.labels[supervised]
    rows = max(1, CE_CHUNK_ELEMENTS // logits.shape[-1])
    total = sum(F.cross_entropy(logits[i: i + rows].float(), targets[i: i + rows], reduction="sum")
                for i in range(0, len(targets), rows))
    return total / max(len(targets), 1)


@dataclass
class TrainStats:
    steps: int = 0
    final_loss: float | None = None
    wall_s: float = 0.0
    tokens_per_s: float | None = None  # steady state: after this process's first step
    first_step_s: float | None = None  # this process's first step, with its Triton JIT / compile warm-up


class TrialFailed(ReftLabError):
    """A search trial failed (recorded in its metrics.json); the sweeper marks the trial FAIL."""


class Interrupted(ReftLabError):
    """A stop signal during training: a checkpoint was written; re-running the job resumes."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint saved; "
                         "re-run the same job directory to resume")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)  # USR2: SLURM's pre-timeout/preemption signal


@contextmanager
def stop_signals():
    """Record stop signals instead of dying mid-step; the loop checkpoints, then hands the signal to
    whoever handled it before (submitit requeues the job on SIGUSR2) or stops the job."""
    received: list[int] = []
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield received, previous
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def config_fingerprint(settings: RunSettings) -> str:
    """What a checkpoint must match to be resumed: not logging or checkpoint cadence, and not the
    memory-for-compute switches that leave every number as it was (checkpointing, the act(gate)
    recompute, the cache's bound and spill)."""
    trainer = {k: v for k, v in asdict(settings.trainer).items()
               if k not in ("log_every", "checkpoint_every", "keep_checkpoints", "resume", "eval_batch_size",
                            "gradient_checkpointing", "recompute_mlp_act", "prefix_cache_gb", "prefix_cache_spill")}
    payload = {"model": asdict(settings.model), "method": asdict(settings.method), "task": asdict(settings.task),
               "trainer": trainer, "seed": settings.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def train(tuned: TunedModel, data: list[EncodedExample], settings: RunSettings, pad_id: int, logger,
          job_dir: Path | None = None, dist_info: distributed.Dist = distributed.Dist()) -> TrainStats:
    """The loop. With ``job_dir`` it checkpoints every ``trainer.checkpoint_every`` steps and on
    SIGTERM/SIGINT, and resumes from the newest complete checkpoint there. Under torchrun each
    process trains on its slice of every batch and rank 0 writes the checkpoints."""
    t = settings.trainer
    params = list(tuned.trainable_state().values())
    lr = t.lr if t.lr is not None else settings.method.lr
    if not params or lr == 0:
        return TrainStats()
    device = params[0].device
    optimizer = build_optimizer(tuned, lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.max_steps, t.warmup_ratio)
    fingerprint_cfg = config_fingerprint(settings)
    progress = Progress()
    latest = latest_checkpoint(job_dir) if job_dir is not None and t.resume else None
    if latest is not None:
        progress = load_checkpoint(latest, tuned, optimizer, scheduler, fingerprint_cfg)
        print(f"reft-lab: resuming from {latest} (step {progress.step})")
    stream = BatchStream(data, t.batch_size, pad_id, settings.seed, progress.epoch, progress.offset,
                         dist_info.rank, dist_info.world, t.group_by_length)
    model = distributed.wrap(tuned, dist_info)
    cache = _prefix_cache(tuned, t, job_dir)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and t.bf16 else nullcontext()

    def checkpoint() -> None:
        if job_dir is not None and dist_info.main:
            progress.epoch, progress.offset = stream.epoch, stream.offset
            save_checkpoint(job_dir, tuned, optimizer, scheduler, progress, fingerprint_cfg, t.keep_checkpoints)

    if t.gradient_checkpointing:
        # non-reentrant: correct with a frozen base (no input requires grad) and with the edit hooks
        tuned.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned.train()
    start = time.perf_counter() - progress.elapsed_s
    warm: tuple[float, int] | None = None  # (clock, tokens) after this process's first step (loss.item() synchronises)
    first_step_s = tokens_per_s = None
    bar = tqdm(range(progress.step, t.max_steps), initial=progress.step, total=t.max_steps,
               desc=f"train {settings.method.name}", unit="step", dynamic_ncols=True, disable=not dist_info.main)
    with stop_signals() as (received, previous), hot_path(tuned, t):
        for step in bar:
            step_loss, step_tokens = 0.0, 0
            for _ in range(t.grad_accum):
                batch = next(stream).to(device)
                with autocast, cache.around_batch(batch) if cache else nullcontext():
                    loss = response_loss(model, batch) / t.grad_accum
                loss.backward()
                step_loss += loss.item()
                step_tokens += batch.n_tokens
            if dist_info.world > 1:  # log the mean loss and all processes' tokens
                step_loss, step_tokens = distributed.mean_and_sum(step_loss, step_tokens, device)
            progress.tokens += step_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
                what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {float(grad_norm)}"
                kept = f"the last good checkpoint is step {progress.step}" if progress.step and job_dir else "no checkpoint was written"
                raise ReftLabError(f"{what} at step {step + 1}: training stopped ({kept}); lower trainer.lr or check the data")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step, progress.last_loss = step + 1, step_loss
            now = time.perf_counter()
            if warm is None:
                first_step_s = now - start - progress.elapsed_s
                warm = (now, progress.tokens)
            progress.elapsed_s = now - start
            # steady state after the first step; with one step in this process, its warm-up included
            tokens_per_s = (progress.tokens - warm[1]) / (now - warm[0]) if now > warm[0] else progress.tokens / progress.elapsed_s
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if progress.step % t.log_every == 0 and dist_info.main:
                logger.log(progress.step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                           "tokens_per_s": tokens_per_s})
            if received:
                checkpoint()
                handler = previous.get(received[0])
                if callable(handler) and handler is not signal.default_int_handler:
                    handler(received[0], None)  # e.g. submitit: requeue from this checkpoint
                raise Interrupted(received[0], progress.step)
            if t.checkpoint_every and progress.step % t.checkpoint_every == 0 and progress.step < t.max_steps:
                checkpoint()
    tuned.eval()
    if cache is not None and dist_info.main:
        print(f"reft-lab: {cache.summary()}")
    return TrainStats(progress.step, progress.last_loss, progress.elapsed_s, tokens_per_s, first_step_s)


def hot_path(tuned: TunedModel, t: TrainerConfig) -> ExitStack:
    """The training-time swaps of the model's forwards, undone on exit: compiled decoder blocks
    (``trainer.compile``), or else gated MLPs that recompute act(gate) (``trainer.recompute_mlp_act``;
    inductor already recomputes such ops in compiled blocks)."""
    stack = ExitStack()
    if t.compile:
        stack.enter_context(compiled_layers(tuned.base_model))
    elif t.recompute_mlp_act:
        stack.enter_context(lean_gated_mlps(tuned.base_model))
    return stack


def _prefix_cache(tuned: TunedModel, t: TrainerConfig, job_dir: Path | None) -> PrefixCache | None:
    if not (t.prefix_cache and isinstance(tuned, ReftModel)) or min(tuned.layer_ids) == 0:
        return None  # nothing frozen below the first intervened layer
    dropout = stochastic_prefix(tuned.model, min(tuned.layer_ids))
    if dropout is not None:
        print(f"reft-lab: trainer.prefix_cache is off for this model: dropout below the lowest intervened layer ({dropout})")
        return None
    cache = PrefixCache(int(t.prefix_cache_gb * 2**30), DTYPES[t.prefix_cache_dtype] if t.prefix_cache_dtype else None,
                        job_dir / "prefix_cache" if (t.prefix_cache_spill and job_dir) else None)
    cache.bind(tuned.model, min(tuned.layer_ids), tuned.base_fingerprint or fingerprint(tuned.base_model))
    return cache


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def versions() -> dict:
    import peft
    import transformers

    return {"reft_lab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def run_job(cfg: DictConfig, out: Path, group: str = "") -> dict | None:
    """One job; returns its metrics (already on disk), or None on a non-main torchrun process.
    Raises on failure (the caller records it)."""
    settings = RunSettings.from_cfg(cfg)
    settings.preflight()
    config = OmegaConf.to_container(cfg, resolve=True)
    dist_info = distributed.setup()
    seed_everything(settings.seed)  # same seed on every process: identical initial interventions
    task = load_task(settings.task, settings.seed)  # data errors surface before the model loads
    loaded = load_model(settings.model, device=dist_info.device())
    if loaded.on_meta:
        raise config_error("model.name_or_path", settings.model.name_or_path, "a model with weights: this one loads on the meta device (accounting only, see `reft-lab params`)")
    encoder = PromptEncoder(loaded.tokenizer, settings.model.chat_template)
    suite = Suite(task, encoder, settings.retention)
    fingerprint_before = fingerprint(loaded.model)
    if dist_info.main:
        base = TunedModel(loaded.model, NoneConfig())
        base_results = evaluate_base(base, suite, fingerprint_before)
        base_lp = base_logprobs(base, suite, base_results)
    distributed.barrier(dist_info)

    tuned = attach(loaded.model, settings.method, loaded.name, base_fingerprint=fingerprint_before)
    name = out.name
    tags = [settings.method.name, task.name, f"seed{settings.seed}"]
    logger = make_logger(settings.logger, out, name, group, tags, config) if dist_info.main else NullLogger()
    try:
        stats = train(tuned, encode_examples(encoder, task.train), settings, encoder.pad_id, logger, job_dir=out,
                      dist_info=dist_info)
        if not dist_info.main:
            return None
        after = evaluate_tuned(tuned, suite, base_results, base_lp)
        save_adapter(tuned, out / "adapter")
        params = param_report(tuned)
        before_score, after_score = base_results.task_scores[task.metric], after["task_scores"][task.metric]
        metrics = {
            "status": "ok", "error": None, "method": settings.method.name, "model": loaded.name, "task": task.name,
            "seed": settings.seed, **params.to_dict(), "task_metric": task.metric,
            "task_before": before_score, "task_after": after_score, "task_gain": after_score - before_score,
            "task_scores": {"before": base_results.task_scores, "after": after["task_scores"]},
            "retention": after["retention"], "train_wall_s": stats.wall_s, "tokens_per_s": stats.tokens_per_s,
            "first_step_s": stats.first_step_s,
            "peak_mem_bytes": peak_memory_bytes(next(tuned.parameters()).device), "final_loss": stats.final_loss,
            "steps": stats.steps, "torch_threads": torch.get_num_threads(), "world_size": dist_info.world, "base_fingerprint_before": fingerprint_before,
            "base_fingerprint_after": fingerprint(tuned.base_model), "versions": versions(), "config": config,
            "output_dir": str(out), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_predictions(out, task, base_results.task_outputs, after["task_outputs"])
        if lookup(metrics, settings.optimized_metric) is None:
            raise config_error("optimized_metric", settings.optimized_metric, "a metric this run produces (it is null here)")
        write_metrics(out, metrics)
        logger.summary({k: v for k, v in metrics.items() if k not in ("config", "versions")})
        return metrics
    finally:
        logger.finish()


def _write_predictions(out: Path, task, before: list[str], after: list[str]) -> None:
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for ex, b, a in zip(task.test, before, after):
            f.write(json.dumps({"prompt": ex.prompt, "expected": ex.response, "before": b, "after": a}, ensure_ascii=False) + "\n")


def failed_metrics(cfg: DictConfig, out: Path, err: BaseException) -> dict:
    def get(key):
        value = OmegaConf.select(cfg, key, default=None)
        return value if isinstance(value, (str, int)) else None

    message = f"{type(err).__name__}: {err}" if not isinstance(err, ReftLabError) else str(err)
    metrics = {key: None for key in SCHEMA if key != "schema_version"}
    metrics.update({"status": "failed", "error": message.splitlines()[0] if message else type(err).__name__,
                    "method": get("method.name"), "model": get("model.name_or_path"), "task": get("task.name"),
                    "seed": get("seed"), "output_dir": str(out), "versions": versions(),
                    "config": OmegaConf.to_container(cfg, resolve=False)})
    write_metrics(out, metrics)
    return metrics


# --- Hydra entry -----------------------------------------------------------------------------

FAILURE_LOG_ENV = "REFT_LAB_FAILURE_LOG"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {out} is not writable ({err.strerror}): set hydra.run.dir / hydra.sweep.dir") from err


def _completed(out: Path) -> dict | None:
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return metrics if metrics and metrics.get("status") == "ok" else None


def threads_per_job(hc, requested: int | None) -> int:
    """torch threads for one job, so parallel jobs never oversubscribe the cores: ``threads`` if
    set; joblib: cores ÷ n_jobs (2 cores, n_jobs=2 → 1 each); submitit (local or SLURM, which start
    every job at once): the launcher's cpus_per_task, else 1; the basic launcher: every core."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    target = str(hc.launcher.get("_target_", "")).lower()
    if "submitit" in target:
        return int(hc.launcher.get("cpus_per_task") or 1)
    if "joblib" in target:
        n_jobs = hc.launcher.get("n_jobs") or -1
        return max(1, cores // (cores if n_jobs < 0 else n_jobs))
    return max(1, cores // distributed.local_processes())  # torchrun: processes share the cores


def _record_failure(line: str) -> None:
    """Failures of jobs in other processes (joblib, submitit) reach the sweep through this file."""
    log_path = os.environ.get(FAILURE_LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line.replace("\n", " ") + "\n")


def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    optuna_search = multirun and "optuna" in str(hc.sweeper.get("_target_", "")).lower()
    torch.set_num_threads(threads_per_job(hc, cfg.get("threads")))
    group = Path(hc.sweep.dir).name if multirun else "single"
    done = _completed(out) if cfg.get("skip_completed", True) else None
    if done is not None:
        print(f"reft-lab train: {out} already has an ok metrics.json: skipped (skip_completed=false re-runs it)")
        value = lookup(done, cfg.optimized_metric)
        return float("nan" if value is None else value)
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        _check_writable(out)
        metrics = run_job(cfg, out, group)
    except Exception as err:  # noqa: BLE001  (every failure is recorded; bugs re-raise below)
        if not main_process:
            raise
        failed = failed_metrics(cfg, out, err) if out.is_dir() else {"error": str(err)}
        _record_failure(f"{out}: {failed['error']}")
        print(f"reft-lab train: job failed: {out}: {failed['error']}", file=sys.stderr)
        if isinstance(err, Interrupted):
            raise SystemExit(128 + err.signum) from None
        if optuna_search:
            raise TrialFailed(failed["error"]) from None  # the optuna sweeper records a FAIL trial
        if multirun:
            return float("nan")
        if isinstance(err, ReftLabError):
            raise SystemExit(2) from None
        raise
    if metrics is None:  # a non-main torchrun process: rank 0 reports
        return float("nan")
    value = float(lookup(metrics, cfg.optimized_metric))
    if not math.isfinite(value) and optuna_search:
        raise TrialFailed(f"{cfg.optimized_metric} is {value}")  # a failure for the search, not a result
    return value


def run_hydra(args: list[str]) -> int:
    """Run ``reft-lab train`` with Hydra; 0 when every job succeeded, else non-zero."""
    failure_log = tempfile.NamedTemporaryFile(prefix="reft_lab_failures_", suffix=".log", delete=False)
    failure_log.close()
    os.environ[FAILURE_LOG_ENV] = failure_log.name
    try:
        return _run_hydra(args, failure_log.name)
    finally:
        os.environ.pop(FAILURE_LOG_ENV, None)
        os.unlink(failure_log.name)


def resume_search(args: list[str]) -> list[str] | None:
    """For an optuna search with sqlite storage: create the storage's folder, and run only the
    trials the study still lacks (``hydra.sweeper.n_trials`` is the study's total). None when the
    study is already complete."""
    from reft_lab.config import compose

    if not any(a.startswith(("hparams_search=", "hydra/sweeper=")) for a in args):
        return args
    try:
        cfg = compose([a for a in args if not a.startswith("-")], with_hydra=True)
    except ConfigError:
        return args  # Hydra reports the problem itself
    sweeper = cfg.hydra.sweeper
    storage = str(sweeper.get("storage") or "")
    if "optuna" not in str(sweeper.get("_target_", "")).lower() or not storage.startswith("sqlite:///"):
        return args
    Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=sweeper.study_name, storage=storage)
    except KeyError:
        return args  # a new study
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    finished = sum(t.state in done_states for t in study.trials)
    remaining = int(sweeper.n_trials) - finished
    if remaining <= 0:
        print(f"reft-lab train: study {sweeper.study_name!r} already has {finished} finished trials (n_trials={sweeper.n_trials})")
        return None
    print(f"reft-lab train: resuming study {sweeper.study_name!r}: {finished} trials finished, {remaining} to go")
    # a re-seeded sampler would repeat its first suggestions: offset the seed by the trials done
    seed = int(OmegaConf.select(cfg, "hydra.sweeper.sampler.seed", default=0) or 0) + finished
    return [*args, f"hydra.sweeper.n_trials={remaining}", f"hydra.sweeper.sampler.seed={seed}"]


def _run_hydra(args: list[str], failure_log: str) -> int:
    import hydra

    from reft_lab.config import conf_dir

    args = resume_search(args)
    if args is None:
        return 0

    if not {"-m", "--multirun"} & set(args):
        # a single run is validated before Hydra makes its output directory: one line per mistake
        from reft_lab.config import compose

        settings = RunSettings.from_cfg(compose([a for a in args if not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]))
        settings.preflight()
    main = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_hydra_main)
    argv = sys.argv
    sys.argv = ["reft-lab train", *args]
    try:
        main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    failures = [line for line in Path(failure_log).read_text(encoding="utf-8").splitlines() if line]
    if failures:
        print(f"reft-lab train: {len(failures)} job(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.exit(run_hydra(sys.argv[1:]))


if __name__ == "__main__":
    main()
