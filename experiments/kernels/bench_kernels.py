"""Fused low-rank edit kernel vs the eager composite vs pyreft's LoreftIntervention (CUDA only).

    python experiments/kernels/bench_kernels.py [--out experiments/kernels/results.csv]

Rows: provider (triton, eager, pyreft; triton_8_adapters and eager_8_adapters: per-row adapter
selection among 8 stacked adapters, forward only), mode (fwd, bwd, full), shape, median/p20/p80
time (triton.testing.do_bench), bytes moved by an ideal kernel (selected rows read and written
once, in the input dtype), achieved GB/s, the same GPU's measured device-to-device copy bandwidth,
GPU name, versions and date. The end-to-end training step, fused vs eager, is
`reft-lab bench --providers reft_lab_loreft reft_lab_loreft_eager pyreft_loreft`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def copy_bandwidth_gbs(numel: int = 1 << 28) -> float:
    from triton.testing import do_bench

    src = torch.empty(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def pyreft_edit(intervention):
    """pyreft's path for one intervention: gather the rows, its module, scatter them back (as pyvene does)."""

    def edit(hidden, index, valid, A, B, b):
        idx = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        rows = hidden.gather(1, idx)
        return hidden.scatter(1, idx, intervention(rows))

    return edit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/kernels/results.csv"))
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (GPU results stay pending)", file=sys.stderr)
        return 1
    import triton
    from triton.testing import do_bench

    from reft_lab.kernels import fused_low_rank_edit, low_rank_edit_reference

    gpu, date = torch.cuda.get_device_name(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    # (batch, T, d, rank, positions per row): ≥ 16M edited elements in the large shapes
    for batch, T, d, rank, P in [(8, 512, 576, 4, 6), (64, 256, 4096, 4, 64), (128, 512, 4096, 8, 32), (256, 128, 2048, 16, 64)]:
        for dtype in (torch.bfloat16, torch.float32):
            h0 = torch.randn(batch, T, d, device="cuda", dtype=dtype)
            index = torch.stack([torch.randperm(T, device="cuda")[:P] for _ in range(batch)])
            valid = torch.ones(batch, P, dtype=torch.bool, device="cuda")
            A = (torch.randn(rank, d, device="cuda") / d ** 0.5).to(dtype).requires_grad_()
            B = (torch.randn(rank, d, device="cuda") / d ** 0.5).to(dtype).requires_grad_()
            b = torch.zeros(rank, device="cuda", dtype=dtype).requires_grad_()
            edited = batch * P * d
            ideal_bytes = 2 * edited * h0.element_size()
            providers = {"triton": fused_low_rank_edit, "eager": low_rank_edit_reference}
            try:
                import pyreft

                module = pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank, dtype=dtype).to("cuda", dtype)
                providers["pyreft"] = pyreft_edit(module)
            except ImportError:
                pass
            for name, fn in providers.items():
                for mode in ("fwd", "bwd", "full"):
                    h = (h0.clone() * 1.0).requires_grad_(mode != "fwd")

                    def fwd():
                        return fn(h * 1.0 if mode != "fwd" else h, index, valid, A, B, b)

                    if mode == "fwd":
                        with torch.no_grad():
                            ms, p20, p80 = do_bench(fwd, quantiles=[0.5, 0.2, 0.8])
                    else:
                        out = fwd()
                        grad = torch.randn_like(out)
                        run = (lambda: torch.autograd.grad(out, (h, A, B, b), grad, retain_graph=True)) if mode == "bwd" else \
                              (lambda: torch.autograd.grad(fwd(), (h, A, B, b), grad))
                        ms, p20, p80 = do_bench(run, quantiles=[0.5, 0.2, 0.8])
                    moved = ideal_bytes * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)
                    rows.append({"provider": name, "mode": mode, "shape": f"{batch}x{T}x{d} r{rank} P{P}", "dtype": str(dtype).removeprefix("torch."),
                                 "edited_elements": edited, "median_ms": ms, "p20_ms": p20, "p80_ms": p80, "bytes_moved": moved,
                                 "gbs": moved / (ms * 1e-3) / 1e9, "copy_gbs": copy_gbs, "gpu": gpu,
                                 "torch": torch.__version__, "triton": triton.__version__, "date": date})
                    print(rows[-1], flush=True)
            adapters = 8  # per-row selection: each batch row picks one of 8 stacked adapters
            stacked = [torch.stack([t.detach() * (1 + k / adapters) for k in range(adapters)]) for t in (A, B, b)]
            ids = torch.randint(0, adapters, (batch,), device="cuda")
            for name, fn in (("triton_8_adapters", fused_low_rank_edit), ("eager_8_adapters", low_rank_edit_reference)):
                h = h0.clone()
                with torch.no_grad():
                    ms, p20, p80 = do_bench(lambda: fn(h, index, valid, *stacked, ids), quantiles=[0.5, 0.2, 0.8])
                rows.append({**rows[-1], "provider": name, "mode": "fwd", "median_ms": ms, "p20_ms": p20, "p80_ms": p80,
                             "bytes_moved": ideal_bytes, "gbs": ideal_bytes / (ms * 1e-3) / 1e9})
                print(rows[-1], flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    new = not opts.out.exists()
    with open(opts.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
