"""LoReFT's per-step factors: one batched CholeskyQR for every intervention against a Householder QR
per intervention (how the factors were computed before, one call per hooked layer and group).

    python experiments/kernels/bench_factors.py [--interventions 60] [--hidden 576] [--rank 4]
                                                [--device cpu|cuda] [--out experiments/kernels/factors.csv]

What a training step spends on factors: (A, B, b) of K interventions, forward and backward (a
weighted sum of them as the loss), median of --repeats timed steps after --warmup, and the number of
aten ops the factors dispatch in one step, forward and backward (torch.profiler, less the loss's own
ops; on CUDA each is about one kernel launch). The defaults
are SmolLM2-135M's: 30 layers × 2 position groups, d 576, rank 4. Both providers run in the same
process, interleaved, so the ratio is a same-run ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from reft_lab.bench import append_csv, dispatched_ops
from reft_lab.interventions import INTERVENTIONS


def householder_factors(interventions):
    """The earlier path: each intervention's R by its own sign-fixed Householder QR."""
    out = []
    for i in interventions:
        q, t = torch.linalg.qr(i.rotation.float().T)
        R = (q * torch.sign(torch.diagonal(t))).T.to(i.rotation.dtype)
        out.append((i.W - R, R, i.b))
    return out


PROVIDERS = {"per_intervention_householder": householder_factors,
             "stacked_cholesky": lambda items: type(items[0]).stacked_factors(items)}


def step(factors_of, interventions, weights):
    """Factors, then a loss of two ops (one cat, one dot) and its backward: the rest is the factors'."""
    factors = factors_of(interventions)
    (torch.cat([t.reshape(-1) for triple in factors for t in triple]) @ weights).backward()


def op_count(factors_of, interventions, weights) -> int:
    """aten ops of one step (``reft_lab.bench.dispatched_ops``), less those of the loss alone (the
    same loss over leaf tensors)."""
    def count(fn) -> int:
        with torch.profiler.profile() as prof:
            step(fn, interventions, weights)
        return dispatched_ops(prof)

    leaves = [tuple(t.detach().requires_grad_() for t in triple) for triple in householder_factors(interventions)]
    return count(factors_of) - count(lambda _: leaves)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interventions", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="experiments/kernels/factors.csv")
    opts = parser.parse_args(argv)
    torch.manual_seed(0)
    interventions = [INTERVENTIONS["loreft"](opts.hidden, opts.rank, dtype=torch.float32).to(opts.device)
                     for _ in range(opts.interventions)]
    weights = torch.randn(opts.interventions * opts.rank * (2 * opts.hidden + 1), device=opts.device)
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)
    times = {p: [] for p in PROVIDERS}
    for k in range(opts.warmup + opts.repeats):
        for provider in PROVIDERS:  # interleaved: both see the same machine load
            sync()
            start = time.perf_counter()
            step(PROVIDERS[provider], interventions, weights)
            sync()
            if k >= opts.warmup:
                times[provider].append(time.perf_counter() - start)
    ops = {p: op_count(fn, interventions, weights) for p, fn in PROVIDERS.items()}
    base = statistics.median(times["per_intervention_householder"])
    name = torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu"
    rows = [{"provider": p, "interventions": opts.interventions, "hidden": opts.hidden, "rank": opts.rank,
             "median_ms": f"{statistics.median(t) * 1e3:.3f}", "vs_householder": f"{statistics.median(t) / base:.3f}",
             "aten_ops": ops[p], "device": name, "torch": torch.__version__,
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")} for p, t in times.items()]
    for row in rows:
        print(f"{row['provider']:>30}: {row['median_ms']} ms fwd+bwd (×{row['vs_householder']}), {row['aten_ops']} aten ops")
    append_csv(Path(opts.out), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
