"""Fused low-rank edit of selected rows: h ← h + Bᵀ(A h + b) at positions (b, index[b, p]).

Every ReFT variant here is this edit: LoReFT and NoReFT use A = W − R, B = R (A formed once per
forward of the model, outside the kernel); DiReFT uses A = W₁, B = W₂. Positions are (index, valid) tensors from
``reft_lab.positions``: no position appears twice, padding slots are invalid.

Forward, one program per block of selected rows: read each row once, z = A h + b (rank r, kept on
chip, fp32), write h + Bᵀz once; save the original rows (in their own dtype) and z for backward.
Backward, one program per row block: u = B dy and dh = dy + Aᵀu on the selected rows. The kernel
writes only the Aᵀu rows; autograd adds them into dy, without a copy of the whole gradient where
nothing else holds dy (``hidden_gradient_parts``). At the lowest edited layer of a frozen model
the hidden state needs no gradient and none is formed. The factor gradients are two skinny
matmuls over the selected rows, dA = uᵀH and dB = zᵀdY, and db = Σ u: [n, r] and [n, d] operands
instead of per-program [r, d] partial sums (which were grid × r × d fp32: 512 MiB at 128×32 rows
of d = 4096, r8). Autograd carries dA, dB to W, R (and through R's orthonormalisation) outside the
kernel.

Per-row adapter selection (inference): with K stacked adapters, A, B are [K, r, d] and each
selected row reads the factors of its batch row's adapter, so one launch serves a batch that mixes
many users' adapters on one base model.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from reft_lab.interventions.edit import low_rank_edit, sparse_rows

MAX_RANK = 64
MAX_HIDDEN = 16384  # one row is held on chip: next_power_of_2(d) elements
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_problem(device: torch.device, dtype: torch.dtype, hidden_size: int, rank: int) -> str | None:
    """Why the fused kernel cannot edit hidden states of this device, dtype and size at this rank
    (None when it can). Also asked before a model loads, of the device it will load on."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (device.type == "cuda" or interpret):
        return f"device {device.type} (the Triton kernel needs CUDA, or TRITON_INTERPRET=1)"
    if dtype not in DTYPES:
        return f"dtype {dtype} (supported: float32, bfloat16, float16)"
    if not 1 <= rank <= MAX_RANK:
        return f"rank {rank} (the kernel supports 1 to {MAX_RANK})"
    if hidden_size > MAX_HIDDEN:
        return f"hidden size {hidden_size} (the kernel supports up to {MAX_HIDDEN})"
    return None


def triton_usable(hidden: torch.Tensor, rank: int) -> str | None:
    """Why the fused kernel cannot run on these inputs (None when it can)."""
    return kernel_problem(hidden.device, hidden.dtype, hidden.shape[-1], rank)


@triton.jit
def _row_block(pid, ROWS, VALID, n_rows, d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's selected rows: slot ids m, which are live (in range and valid), their flat row
    offsets in the hidden state, the column range and the 2-D load/store mask."""
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    live = (m < n_rows) & (tl.load(VALID + m, mask=m < n_rows, other=0) != 0)
    row = tl.load(ROWS + m, mask=live, other=0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    return m, live, row, cols, cmask, live[:, None] & cmask[None, :]


@triton.jit
def _edit_fwd(H, ROWS, VALID, SAVED, Z, A, B, BIAS, ADAPTER, n_rows, d,
              RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SAVE: tl.constexpr,
              MULTI: tl.constexpr):
    pid = tl.program_id(0)
    m, live, row, cols, cmask, mask = _row_block(pid, ROWS, VALID, n_rows, d, BLOCK_M, BLOCK_D)
    ptrs = H + row[:, None] * d + cols[None, :]
    h_in = tl.load(ptrs, mask=mask, other=0.0)
    h = h_in.to(tl.float32)  # accumulate in fp32
    if SAVE:  # only when a gradient will be asked for, in h's own dtype (exact, half the bytes of fp32 for
        # bf16); slots not live save zeros (dA = uᵀH reads every slot)
        tl.store(SAVED + m[:, None] * d + cols[None, :], h_in, mask=(m < n_rows)[:, None] & cmask[None, :])
    if MULTI:  # each selected row's adapter: factor rows are read per row (from cache) instead of once
        ad = tl.load(ADAPTER + m, mask=live, other=0)
        factor = ad[:, None] * RANK * d + cols[None, :]
    delta = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k in tl.range(0, RANK):  # a loop, not unrolled: unrolled, the compiler hoisted every k's factor
        # rows ahead and spilled registers (experiments/kernels/kernel_resources.py)
        if MULTI:
            a_k = tl.load(A + factor + k * d, mask=mask, other=0.0).to(tl.float32)
            b_k = tl.load(B + factor + k * d, mask=mask, other=0.0).to(tl.float32)
            bias_k = tl.load(BIAS + ad * RANK + k, mask=live, other=0.0)
        else:
            a_k = tl.load(A + k * d + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            b_k = tl.load(B + k * d + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            bias_k = tl.load(BIAS + k)
        z_k = tl.sum(h * a_k, axis=1) + bias_k.to(tl.float32)  # z = A h + b
        z_k = tl.where(live, z_k, 0.0)
        if SAVE:
            tl.store(Z + m * RANK + k, z_k, mask=m < n_rows)
        delta += z_k[:, None] * b_k  # Δ = Bᵀ z
    tl.store(ptrs, (h + delta).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _edit_bwd(DY, CHANGE, COORDS, DY_ROWS, ROWS, VALID, U, A, B, n_rows, d, width,
              RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_GRAD: tl.constexpr):
    pid = tl.program_id(0)
    m, live, row, cols, cmask, mask = _row_block(pid, ROWS, VALID, n_rows, d, BLOCK_M, BLOCK_D)
    slot = m < n_rows
    dy = tl.load(DY + row[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # the selected rows' dy in fp32 for dB = zᵀdY (zeros on slots not live, where z is 0 too): saves a
    # gather and a cast launch, and a second read of those rows
    tl.store(DY_ROWS + m[:, None] * d + cols[None, :], dy, mask=slot[:, None] & cmask[None, :])
    change = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k in tl.range(0, RANK):
        b_k = tl.load(B + k * d + cols, mask=cmask, other=0.0).to(tl.float32)
        u_k = tl.sum(dy * b_k[None, :], axis=1)  # u = B dy (0 on slots not live)
        tl.store(U + m * RANK + k, u_k, mask=slot)
        if INPUT_GRAD:
            a_k = tl.load(A + k * d + cols, mask=cmask, other=0.0).to(tl.float32)
            change += u_k[:, None] * a_k[None, :]  # dL/dh = dy + Aᵀu: the Aᵀu part
    if INPUT_GRAD:  # Aᵀu per slot (0 where not live) and its (batch, position) for a sparse gradient
        tl.store(CHANGE + m[:, None] * d + cols[None, :], change.to(CHANGE.dtype.element_ty), mask=slot[:, None] & cmask[None, :])
        tl.store(COORDS + m, row // width, mask=slot)
        tl.store(COORDS + n_rows + m, row % width, mask=slot)


def _launch_shape(n_rows: int, d: int, per_row_adapter: bool = False) -> tuple[int, int, int, int]:
    """(rows per program, padded width, grid, warps). A program holds ~8K values of rows on chip, 32
    per thread; with per-row adapters ~4K, 16 per thread, as their factors are [rows, d] tiles too.
    Triton's default of 4 warps spilled registers (experiments/kernels/kernel_resources.py)."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, (4096 if per_row_adapter else 8192) // block_d))
    warps = max(4, min(16, block_m * block_d // (512 if per_row_adapter else 1024)))
    return block_m, block_d, triton.cdiv(max(n_rows, 1), block_m), warps


def flat_rows(index: torch.Tensor, valid: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's form of positions (index, valid) [batch, P] in a [batch, width, d] hidden state:
    flat row ids [batch·P] (int64) and live flags (int8). A caller editing many layers at the same
    positions (``ReftModel``) computes them once per batch instead of once per call."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None] * width + index
    return rows.reshape(-1).contiguous(), valid.reshape(-1).to(torch.int8).contiguous()


class _FusedEdit(torch.autograd.Function):
    """Inputs: hidden twice (the same tensor), rows, flags, A, B, b. Twice, so that the gradient of
    hidden comes back in two parts (``hidden_gradient_parts``): Aᵀu at the selected rows and the
    incoming gradient itself, which autograd sums, in place where nothing else holds the incoming
    gradient (out of place where something does, as when an addition handed one gradient to both
    operands). Python code that takes a tensor's ``untyped_storage()`` keeps its storage
    referenced: Triton's interpreter does, so on a CPU the sum is out of place."""

    @staticmethod
    def forward(ctx, hidden, _hidden_again, rows, flags, A, B, b):
        # Edit in place: only the selected rows are read and written. Autograd's version counter
        # still guards the input (an op that saved it would raise in backward, never go wrong).
        # A leaf that requires grad, or a strided view, is copied first.
        inplace = hidden.is_contiguous() and not (hidden.is_leaf and hidden.requires_grad)
        out = hidden if inplace else hidden.contiguous().clone()
        save = any(ctx.needs_input_grad[i] for i in (0, 4, 5, 6))
        n_rows, d, rank = rows.numel(), out.shape[-1], A.shape[0]
        saved = torch.empty(n_rows if save else 0, d, dtype=out.dtype, device=out.device)
        z = torch.empty(n_rows if save else 0, rank, dtype=torch.float32, device=out.device)
        block_m, block_d, grid, warps = _launch_shape(n_rows, d)
        _edit_fwd[(grid,)](out, rows, flags, saved, z, A.contiguous(), B.contiguous(), b.contiguous(), flags, n_rows, d,
                           RANK=rank, BLOCK_M=block_m, BLOCK_D=block_d, SAVE=save, MULTI=False, num_warps=warps)
        if inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(rows, flags, saved, z, A, B)
        ctx.launch, ctx.bias_dtype = (grid, block_m, block_d, warps), b.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, flags, saved, z, A, B = ctx.saved_tensors
        dy = grad_out.contiguous()
        input_grad = ctx.needs_input_grad[0]  # False at the lowest edited layer of a frozen model
        n_rows, d, rank = rows.numel(), dy.shape[-1], A.shape[0]
        n_changed = n_rows if input_grad else 0
        change = torch.empty(n_changed, d, dtype=dy.dtype, device=dy.device)
        coords = torch.empty(2, n_changed, dtype=torch.int64, device=dy.device)
        u = torch.empty(n_rows, rank, dtype=torch.float32, device=dy.device)
        dy_rows = torch.empty(n_rows, d, dtype=torch.float32, device=dy.device)
        grid, block_m, block_d, warps = ctx.launch
        _edit_bwd[(grid,)](dy, change, coords, dy_rows, rows, flags, u, A.contiguous(), B.contiguous(), n_rows, d, dy.shape[1],
                           RANK=rank, BLOCK_M=block_m, BLOCK_D=block_d, INPUT_GRAD=input_grad, num_warps=warps)
        # dA = Σ u hᵀ, dB = Σ z dyᵀ over the selected rows (z, u are 0 on padding slots), in fp32
        dA, dB, db = (u.T @ saved.float()).to(A.dtype), (z.T @ dy_rows).to(B.dtype), u.sum(0).to(ctx.bias_dtype)
        if not input_grad:
            return None, None, None, None, dA, dB, db
        return *hidden_gradient_parts(grad_out, coords, change), None, None, dA, dB, db


def hidden_gradient_parts(grad_out: torch.Tensor, coords: torch.Tensor, change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_out`` plus ``change`` at rows ``coords`` as the two parts of one input's gradient
    (``_FusedEdit``). The rows first: autograd sums the part that arrives second into the first in
    place, and the first stays referenced by the Function's outputs until all are summed."""
    return sparse_rows(coords, change, grad_out.shape), grad_out


def fused_low_rank_edit(hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                        A: torch.Tensor, B: torch.Tensor, b: torch.Tensor, adapter: torch.Tensor | None = None) -> torch.Tensor:
    """h[b, index[b, p]] += Bᵀ(A h + b) where valid[b, p]. hidden [batch, T, d]; A, B [r, d]; b [r].

    Per-row adapter selection (many adapters served on one base): A, B [K, r, d], b [K, r] and
    ``adapter`` [batch] ids in [0, K); batch row i is edited by adapter ``adapter[i]``. Inference
    only: it raises when a gradient is needed. Raises ValueError for inputs the kernel does not
    support (callers that want a fallback check ``triton_usable`` first and use
    ``reft_lab.interventions.edit.low_rank_edit``).
    """
    if hidden.dim() != 3 or index.shape != valid.shape or index.shape[0] != hidden.shape[0]:
        raise ValueError(f"shapes do not match: hidden {tuple(hidden.shape)}, index {tuple(index.shape)}, valid {tuple(valid.shape)}")
    stacked = 3 if adapter is not None else 2
    if A.dim() != stacked or A.shape != B.shape or A.shape[-1] != hidden.shape[-1] or b.shape != A.shape[:-1]:
        form = "A, B [K, r, d], b [K, r]" if adapter is not None else "A, B [r, d], b [r]"
        raise ValueError(f"A {tuple(A.shape)}, B {tuple(B.shape)}, b {tuple(b.shape)} do not fit hidden size "
                         f"{hidden.shape[-1]} ({form})")
    problem = triton_usable(hidden, A.shape[-2])
    if problem:
        raise ValueError(f"fused kernel unsupported for {problem}")
    if adapter is None:
        return fused_edit_rows(hidden, *flat_rows(index, valid, hidden.shape[1]), A, B, b)
    return _edit_per_row_adapter(hidden, index, valid, A, B, b, adapter)


def fused_edit_rows(hidden: torch.Tensor, rows: torch.Tensor, flags: torch.Tensor,
                    A: torch.Tensor, B: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``fused_low_rank_edit`` at positions already in the kernel's form (``flat_rows``). The caller
    has checked the shapes and ``triton_usable``."""
    return _FusedEdit.apply(hidden, hidden, rows, flags, A, B, b)


def _edit_per_row_adapter(hidden, index, valid, A, B, b, adapter):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, A, B, b)):
        raise ValueError("per-row adapter selection is inference-only: run it under torch.no_grad()")
    if adapter.shape != (hidden.shape[0],):
        raise ValueError(f"adapter ids {tuple(adapter.shape)}: expected one per batch row ({hidden.shape[0]},)")
    if adapter.numel() and not (0 <= int(adapter.min()) and int(adapter.max()) < A.shape[0]):
        raise ValueError(f"adapter ids must lie in [0, {A.shape[0] - 1}] (K = {A.shape[0]} stacked adapters)")
    out = hidden if hidden.is_contiguous() else hidden.contiguous()
    rows, flags = flat_rows(index, valid, out.shape[1])
    slot_adapter = adapter.to(torch.int32)[:, None].expand(index.shape).reshape(-1).contiguous()
    n_rows, d, rank = rows.numel(), out.shape[-1], A.shape[1]
    block_m, block_d, grid, warps = _launch_shape(n_rows, d, per_row_adapter=True)
    unused = torch.empty(0, dtype=torch.float32, device=out.device)
    _edit_fwd[(grid,)](out, rows, flags, unused, unused, A.contiguous(), B.contiguous(), b.contiguous(), slot_adapter, n_rows, d,
                       RANK=rank, BLOCK_M=block_m, BLOCK_D=block_d, SAVE=False, MULTI=True, num_warps=warps)
    return out


class FusedLowRankEdit(torch.nn.Module):
    """Module form: ``FusedLowRankEdit()(hidden, index, valid, A, B, b)``, falling back to the eager
    reference where the kernel cannot run (CPU without the interpreter, rank > 64, other dtypes)."""

    def forward(self, hidden, index, valid, A, B, b, adapter=None):
        if triton_usable(hidden, A.shape[-2]) is None:
            return fused_low_rank_edit(hidden, index, valid, A, B, b, adapter)
        return low_rank_edit(hidden, index, valid, A, B, b, adapter)
