"""Registers, spilled bytes and compile time of the fused edit kernels, compiled for a GPU by Triton's
own compiler and read back with its bundled cuobjdump: no GPU needed.

    python experiments/kernels/kernel_resources.py [--target 90] [--widths 576 4096] [--ranks 4 16]
                                                    [--out experiments/kernels/kernel_resources.csv]

For each dtype, hidden size and rank: the training forward (saving for backward), the backward and
the serving forward (per-row adapters), each with the launch configuration ``_launch_shape`` gives it
(rows per program, warps). A kernel whose values do not fit the registers spills them to local
memory ("stack" bytes per thread), which costs memory traffic in a kernel that is memory-bound
already. Compile time is the JIT warm-up a first fused step pays, on this machine's CPU (a fresh
Triton cache each time). Static facts of the compiled code; the time on a GPU is measured by
``bench_kernels.py``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles for a GPU: unset TRITON_INTERPRET")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="reft_lab_triton_cache_")  # every compile timed cold
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said explicitly (newer Triton warns)

import triton  # noqa: E402
import triton.backends.nvidia as nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from reft_lab.bench import append_csv  # noqa: E402
from reft_lab.kernels import low_rank_edit as kernels  # noqa: E402

TRITON_TYPES = {"bfloat16": "bf16", "float32": "fp32"}


def launch(n_rows: int, d: int, per_row_adapter: bool) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) as the kernel module launches them. Commits before
    the warp choice returned three values and used Triton's default of 4 warps for every launch:
    read so this script measures those too."""
    try:
        shape = kernels._launch_shape(n_rows, d, per_row_adapter=per_row_adapter)
    except TypeError:
        shape = kernels._launch_shape(n_rows, d)
    return shape[0], shape[1], shape[3] if len(shape) > 3 else 4


def resources(fn, signature: dict, constexprs: dict, warps: int, target: GPUTarget) -> tuple[int, int, float]:
    """(registers per thread, stack bytes per thread, compile seconds) of one kernel."""
    typed = {name: t for name, t in signature.items() if t != "constexpr"}
    forms = ({"signature": signature, "constexprs": constexprs},  # Triton ≥ 3.3
             {"signature": typed, "constants": constexprs},  # 3.1–3.2: constants apart, by name
             {"signature": dict(enumerate(typed.values())), "constants": constexprs})  # 3.0: by position
    for form in forms:
        try:
            source = ASTSource(fn=fn, **form)
            break
        except TypeError:
            continue
    else:
        raise RuntimeError(f"this Triton ({triton.__version__}) takes none of the ASTSource forms this script knows")
    start = time.perf_counter()
    compiled = triton.compile(source, target=target, options={"num_warps": warps})
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    dump = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", dump).group(1)), int(re.search(r"STACK:(\d+)", dump).group(1)), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 2048, 4096, 8192, 16384], help="hidden sizes")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=list(TRITON_TYPES), choices=list(TRITON_TYPES))
    parser.add_argument("--out", type=Path, default=Path("experiments/kernels/kernel_resources.csv"))
    parser.add_argument("--label", default="", help="what this checkout is (written in each row)")
    opts = parser.parse_args()
    target = GPUTarget("cuda", opts.target, 32)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for dtype in opts.dtypes:
        t = TRITON_TYPES[dtype]
        forward = {"H": f"*{t}", "ROWS": "*i64", "VALID": "*i8", "SAVED": f"*{t}", "Z": "*fp32", "A": f"*{t}", "B": f"*{t}",
                   "BIAS": f"*{t}", "ADAPTER": "*i32", "n_rows": "i32", "d": "i32", "RANK": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "SAVE": "constexpr", "MULTI": "constexpr"}
        backward = {"DY": f"*{t}", "CHANGE": f"*{t}", "COORDS": "*i64", "DY_ROWS": "*fp32", "ROWS": "*i64", "VALID": "*i8", "U": "*fp32",
                    "A": f"*{t}", "B": f"*{t}", "n_rows": "i32", "d": "i32", "width": "i32", "RANK": "constexpr", "BLOCK_M": "constexpr",
                    "BLOCK_D": "constexpr", "INPUT_GRAD": "constexpr"}
        for d in opts.widths:
            for rank in opts.ranks:
                for name, fn, signature, multi, extra in (
                        ("train_fwd", kernels._edit_fwd, forward, False, {"SAVE": True, "MULTI": False}),
                        ("train_bwd", kernels._edit_bwd, backward, False, {"INPUT_GRAD": True}),
                        ("serve_fwd", kernels._edit_fwd, forward, True, {"SAVE": False, "MULTI": True})):
                    block_m, block_d, warps = launch(4096, d, multi)
                    regs, stack, seconds = resources(fn, signature, {"RANK": rank, "BLOCK_M": block_m, "BLOCK_D": block_d, **extra},
                                                     warps, target)
                    rows.append({"label": opts.label, "kernel": name, "dtype": dtype, "d": d, "rank": rank, "rows_per_program": block_m,
                                 "warps": warps, "registers": regs, "stack_bytes": stack, "compile_s": round(seconds, 2),
                                 "target": f"sm_{opts.target}", "triton": triton.__version__, "date": date})
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in ("target", "triton", "date")), flush=True)
    append_csv(opts.out, rows)
    print(f"wrote {len(rows)} rows to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
