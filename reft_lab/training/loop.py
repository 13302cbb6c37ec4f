"""The training loop: optimizer, schedule, checkpoints and resume, stop signals, the NaN guard."""

from __future__ import annotations

import math
import random
import signal
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from reft_lab import distributed
from reft_lab.checkpoint import (
    Progress,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from reft_lab.data.batching import EncodedExample
from reft_lab.errors import ReftLabError
from reft_lab.methods import TunedModel
from reft_lab.training import loss as training_loss
from reft_lab.training.config import TrainerConfig
from reft_lab.training.speedups import hot_path, prefix_cache
from reft_lab.training.stream import BatchStream


def build_optimizer(tuned: TunedModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable state. Biases, norms and orthonormalised bases get no weight decay:
    decay on an orthogonally parametrised R is what collapses it (see interventions.base). On CUDA
    the fused implementation: a launch or two per step where the default multi-tensor one takes one
    per operation, which counts in a launch-bound step (on the CPU the default loop stays, and with
    it every CPU result)."""
    no_decay = tuned.no_decay_parameter_names()
    params = tuned.trainable_state()
    groups = [
        {"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0},
    ]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params.values())
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if fused else {}))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak rate over ``warmup_ratio·max_steps``, then linear decay to 0."""
    warmup = int(round(warmup_ratio * max_steps))

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


DIVERGENCE_NATS = 1.0  # the loss's end may exceed its start by this much, or by half the start, before a run counts as diverged


def loss_window(steps: int) -> int:
    """Steps averaged (as a median) at each end of the loss curve: a fifth of the run, 1 to 10."""
    return max(1, min(10, steps // 5))


def divergence(losses: list[float], params: list[torch.Tensor]) -> str | None:
    """Why a finished run counts as diverged, or None: a trainable tensor that is not finite, or a
    loss whose median over the last ``loss_window`` steps ends above the lowest of the first
    ``loss_window`` by more than max(DIVERGENCE_NATS, half that start). The lowest early loss is the
    start because a blow-up can begin at step 2; the median at the end ignores a few late spikes;
    a run that learns slowly or not at all is not diverged, only one that got worse."""
    bad = sum(not bool(torch.isfinite(p).all()) for p in params)
    if bad:
        return f"{bad} trainable tensor(s) hold NaN or infinite values after training"
    if len(losses) < 2:
        return None
    k = loss_window(len(losses))
    start, end = min(losses[:k]), statistics.median(losses[-k:])
    if end > start + max(DIVERGENCE_NATS, 0.5 * start):
        return (f"the loss rose from {start:.4g} (lowest of the first {k} steps) to {end:.4g} (median of the last {k}): "
                "lower trainer.lr or set trainer.max_grad_norm")
    return None


@dataclass
class TrainStats:
    steps: int = 0
    final_loss: float | None = None
    wall_s: float = 0.0
    tokens_per_s: float | None = None  # steady state: after this process's first step
    first_step_s: float | None = None  # this process's first step, with its Triton JIT / compile warm-up
    diverged: str | None = None  # ``divergence``'s reason, None for a sound run


class Interrupted(ReftLabError):
    """A stop signal during training: a checkpoint was written; re-running the job resumes."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint saved; "
                         "re-run the same job directory to resume")


class Diverged(ReftLabError):
    """Training finished, but its weights or loss blew up: the job records ``status: "diverged"``."""

    def __init__(self, stats: "TrainStats"):
        self.stats = stats
        super().__init__(f"diverged after {stats.steps} steps: {stats.diverged}")


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


def train(tuned: TunedModel, data: list[EncodedExample], t: TrainerConfig, *, lr: float, seed: int, pad_id: int,
          logger, job_dir: Path | None = None, run_id: str = "", dist_info: distributed.Dist = distributed.Dist(),
          on_eval: Callable[[int], None] | None = None) -> TrainStats:
    """The loop: ``t.max_steps`` optimizer steps at peak rate ``lr`` over ``data`` in the order drawn
    from ``seed``. With ``job_dir`` it checkpoints every ``t.checkpoint_every`` steps and on
    SIGTERM/SIGINT, and resumes from the newest complete checkpoint there whose ``run_id`` (the
    run's configuration fingerprint) matches. Under torchrun each process trains on its slice of
    every batch and rank 0 writes the checkpoints. ``on_eval(step)`` runs after each step of
    ``t.eval_at`` (the model in eval mode; its time is not training time)."""
    params = list(tuned.trainable_state().values())
    if not params:
        return TrainStats()
    device = params[0].device
    optimizer = build_optimizer(tuned, lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.max_steps, t.warmup_ratio)
    progress = Progress()
    latest = latest_checkpoint(job_dir) if job_dir is not None and t.resume else None
    if latest is not None:
        progress = load_checkpoint(latest, tuned, optimizer, scheduler, run_id)
        print(f"reft-lab: resuming from {latest} (step {progress.step})")
    saved_step = progress.step  # the newest checkpoint on disk: the one resumed, then each one written
    stream = BatchStream(data, t.batch_size, pad_id, seed, progress.epoch, progress.offset,
                         dist_info.rank, dist_info.world, t.group_by_length, t.length_multiple)
    model = distributed.wrap(tuned, dist_info)
    cache = prefix_cache(tuned, t, job_dir)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and t.bf16 else nullcontext()

    def checkpoint() -> None:
        nonlocal saved_step
        if job_dir is not None and dist_info.main:
            progress.epoch, progress.offset = stream.epoch, stream.offset
            save_checkpoint(job_dir, tuned, optimizer, scheduler, progress, run_id, t.keep_checkpoints)
            saved_step = progress.step

    if t.gradient_checkpointing:
        # non-reentrant: correct with a frozen base (no input requires grad) and with the edit hooks
        tuned.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned.train()
    start = time.perf_counter() - progress.elapsed_s
    warm: tuple[float, int] | None = None  # (clock, tokens) after this process's first step (its read-back synchronises)
    first_step_s = tokens_per_s = None

    def one_step(step: int) -> None:
        nonlocal warm, first_step_s, tokens_per_s
        losses, step_tokens = [], 0
        for _ in range(t.grad_accum):
            batch = next(stream).to(device)
            if t.cuda_graphs:  # the last forward's graph outputs are done with: replays may overwrite them
                torch.compiler.cudagraph_mark_step_begin()
            with autocast, cache.around_batch(batch) if cache else nullcontext():
                loss = training_loss.response_loss(model, batch) / t.grad_accum
            loss.backward()
            losses.append(loss.detach().float())
            step_tokens += batch.n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        # the step's one read-back from the device: each read makes the host wait for the device's
        # queue to drain, and a small model's step is bound by the host's launches
        step_loss, grad_norm = torch.stack([sum(losses), grad_norm.float()]).tolist()
        if dist_info.world > 1:  # log the mean loss and all processes' tokens
            step_loss, step_tokens = distributed.mean_and_sum(step_loss, step_tokens, device)
        progress.tokens += step_tokens
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
            kept = f"the last good checkpoint is step {saved_step}" if saved_step else "no checkpoint was written"
            raise ReftLabError(f"{what} at step {step + 1}: training stopped ({kept}); lower trainer.lr or check the data")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step, progress.last_loss = step + 1, step_loss
        progress.losses.append(step_loss)
        now = time.perf_counter()
        if warm is None:
            first_step_s = now - start - progress.elapsed_s
            warm = (now, progress.tokens)
        progress.elapsed_s = now - start
        # steady state after the first step; with one step in this process, its warm-up included
        tokens_per_s = (progress.tokens - warm[1]) / (now - warm[0]) if now > warm[0] else progress.tokens / progress.elapsed_s
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)  # drawn by update, at most 10×/s
        bar.update(1)
        if progress.step % t.log_every == 0 and dist_info.main:
            logger.log(progress.step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                       "tokens_per_s": tokens_per_s})

    bar = tqdm(initial=progress.step, total=t.max_steps, desc=f"train {tuned.config.name}", unit="step",
               dynamic_ncols=True, disable=not dist_info.main)
    # segments end at each evaluation step, outside the hot path (its swapped forwards are for training
    # only); a run resumed at an evaluation step evaluates first (on_eval skips a point already saved)
    ends = sorted({s for s in t.eval_at if s >= progress.step} | {t.max_steps}) if on_eval else [t.max_steps]
    with stop_signals() as (received, previous):
        for end in ends:
            with hot_path(tuned, t):
                for step in range(progress.step, end):
                    one_step(step)
                    if received:
                        checkpoint()
                        handler = previous.get(received[0])
                        if callable(handler) and handler is not signal.default_int_handler:
                            handler(received[0], None)  # e.g. submitit: requeue from this checkpoint
                        raise Interrupted(received[0], progress.step)
                    if t.checkpoint_every and progress.step % t.checkpoint_every == 0 and progress.step < t.max_steps:
                        checkpoint()
            if end < t.max_steps:
                paused = time.perf_counter()
                tuned.eval()
                on_eval(end)
                tuned.train()
                bar.unpause()  # the bar's rate is training's, not the evaluation's
                evaluating_s = time.perf_counter() - paused  # not training time: the clocks skip it
                start += evaluating_s
                if warm is not None:
                    warm = (warm[0] + evaluating_s, warm[1])
                distributed.barrier(dist_info)
    bar.close()
    tuned.eval()
    if cache is not None and dist_info.main:
        print(f"reft-lab: {cache.summary()}")
    return TrainStats(progress.step, progress.last_loss, progress.elapsed_s, tokens_per_s, first_step_s,
                      divergence(progress.losses, params))
