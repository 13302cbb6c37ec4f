"""Fused low-rank edit kernel vs the eager composite vs pyreft's LoreftIntervention (CUDA only).

    python experiments/kernels/bench_kernels.py [--out experiments/kernels/results.csv] [--shapes gpu|tiny]

Rows: provider (triton, eager, pyreft; triton_8_adapters and eager_8_adapters: per-row adapter
selection among 8 stacked adapters, forward only), mode (fwd, bwd: the gradients of the hidden
state and of the provider's own parameters; full: both), shape, median/p20/p80
time (triton.testing.do_bench), bytes moved by an ideal kernel (selected rows read and written
once, in the input dtype), achieved GB/s, the same GPU's measured device-to-device copy bandwidth,
GPU name, versions and date. The script holds dL/dy for the backward, so the fused backward sums
its rows into a copy of it here (in a model it sums them in place: nothing else holds the incoming
gradient there). The end-to-end training step, fused vs eager, is
`reft-lab bench --providers reft_lab_loreft reft_lab_loreft_eager pyreft_loreft`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

SHAPES = {  # (batch, T, d, rank, positions per row): ≥ 16M edited elements in the three large shapes
    "gpu": [(8, 512, 576, 4, 6), (64, 256, 4096, 4, 64), (128, 512, 4096, 8, 32), (256, 128, 2048, 16, 64)],
    "tiny": [(2, 16, 48, 4, 3)],  # a CPU run in Triton's interpreter: proves every row is produced, measures nothing useful
}


def copy_bandwidth_gbs(numel: int = 1 << 28) -> float | None:
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench

    src = torch.empty(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def bench(fn) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: triton.testing.do_bench on CUDA, wall-clock rounds elsewhere."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    import statistics
    import time

    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return statistics.median(times), times[1], times[3]


def pyreft_provider(d: int, rank: int, device: str, dtype: torch.dtype):
    """pyreft's path for one intervention, as pyvene runs it: gather the rows, the module, scatter
    them back. The module stays fp32 whatever the rows' dtype: its orthogonal parametrization has
    no bf16 QR on CUDA ("orgqr_cuda" not implemented for 'BFloat16'), so bf16 rows are cast to fp32
    and back, as a pyreft user on bf16 activations must. Returns (edit, its trainable parameters)."""
    import pyreft

    module = pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank, dtype=torch.float32).to(device)

    def edit(hidden, index, valid):
        idx = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        rows = hidden.gather(1, idx)
        return hidden.scatter(1, idx, module(rows.float()).to(hidden.dtype))

    return edit, [p for p in module.parameters() if p.requires_grad]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/kernels/results.csv"))
    parser.add_argument("--shapes", choices=list(SHAPES), default="gpu")
    opts = parser.parse_args()
    if not torch.cuda.is_available() and opts.shapes == "gpu":
        print("no CUDA device: nothing measured (GPU results stay pending); --shapes tiny runs the rows in the interpreter",
              file=sys.stderr)
        return 1
    import triton

    from reft_lab.bench import append_csv
    from reft_lab.interventions.edit import low_rank_edit
    from reft_lab.kernels import fused_low_rank_edit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for batch, T, d, rank, P in SHAPES[opts.shapes]:
        for dtype in (torch.bfloat16, torch.float32):
            h0 = torch.randn(batch, T, d, device=device, dtype=dtype)
            index = torch.stack([torch.randperm(T, device=device)[:P] for _ in range(batch)])
            valid = torch.ones(batch, P, dtype=torch.bool, device=device)
            A = (torch.randn(rank, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
            B = (torch.randn(rank, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
            b = torch.zeros(rank, device=device, dtype=dtype).requires_grad_()
            edited = batch * P * d
            ideal_bytes = 2 * edited * h0.element_size()
            # each provider: (edit(hidden, index, valid), the parameters its backward differentiates)
            providers = {"triton": (lambda h, i, v: fused_low_rank_edit(h, i, v, A, B, b), [A, B, b]),
                         "eager": (lambda h, i, v: low_rank_edit(h, i, v, A, B, b), [A, B, b])}
            try:
                providers["pyreft"] = pyreft_provider(d, rank, device, dtype)
            except ImportError:
                print("pyreft is not installed: no pyreft rows", file=sys.stderr)
            for name, (fn, params) in providers.items():
                for mode in ("fwd", "bwd", "full"):
                    h = h0.clone().requires_grad_(mode != "fwd")
                    wrt = (h, *params)

                    def fwd():
                        return fn(h * 1.0 if mode != "fwd" else h, index, valid)

                    if mode == "fwd":
                        with torch.no_grad():
                            ms, p20, p80 = bench(fwd)
                    else:
                        out = fwd()
                        grad = torch.randn_like(out)
                        run = (lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True)) if mode == "bwd" else \
                              (lambda: torch.autograd.grad(fwd(), wrt, grad))
                        ms, p20, p80 = bench(run)
                    moved = ideal_bytes * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)
                    rows.append({"provider": name, "mode": mode, "shape": f"{batch}x{T}x{d} r{rank} P{P}",
                                 "dtype": str(dtype).removeprefix("torch."), "params_dtype": "float32" if name == "pyreft" else str(dtype).removeprefix("torch."),
                                 "edited_elements": edited, "median_ms": ms, "p20_ms": p20, "p80_ms": p80, "bytes_moved": moved,
                                 "gbs": moved / (ms * 1e-3) / 1e9, "copy_gbs": copy_gbs, "gpu": gpu,
                                 "torch": torch.__version__, "triton": triton.__version__, "date": date})
                    print(rows[-1], flush=True)
            adapters = 8  # per-row selection: each batch row picks one of 8 stacked adapters
            stacked = [torch.stack([t.detach() * (1 + k / adapters) for k in range(adapters)]) for t in (A, B, b)]
            ids = torch.randint(0, adapters, (batch,), device=device)
            for name, fn in (("triton_8_adapters", fused_low_rank_edit), ("eager_8_adapters", low_rank_edit)):
                h = h0.clone()
                with torch.no_grad():
                    ms, p20, p80 = bench(lambda: fn(h, index, valid, *stacked, ids))
                rows.append({**rows[-1], "provider": name, "mode": "fwd", "params_dtype": str(dtype).removeprefix("torch."),
                             "median_ms": ms, "p20_ms": p20, "p80_ms": p80,
                             "bytes_moved": ideal_bytes, "gbs": ideal_bytes / (ms * 1e-3) / 1e9})
                print(rows[-1], flush=True)
    append_csv(opts.out, rows)
    print(f"wrote {len(rows)} rows to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
