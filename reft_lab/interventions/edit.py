"""The eager edit of selected rows, in plain torch: gather the rows at (b, index[b, p]), add Δ where
valid[b, p], scatter back. The hook of ``ReftModel`` and the fused kernel's fallback and tests all go
through ``edit_rows``; ``low_rank_edit`` is its factor form, the reference the Triton kernel is
checked against.

Backward adds only the selected rows' gradient into the hidden state's: the gather hands it back
as a sparse tensor (``sparse_rows``), which autograd adds to a copy of the incoming gradient (the
incoming one arrives first, and torch sums a sparse part into a dense one only out of place),
where torch's gather would make a zero-filled tensor of the whole hidden state, scatter the rows
into it and add that. torch's gather would also keep the whole unedited hidden state until
backward, for its shape; this one keeps the index and the rows' (batch, position) coordinates.
"""

from __future__ import annotations

from typing import Callable

import torch

from reft_lab.positions import row_coords


def edit_rows(hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
              delta: Callable[[torch.Tensor], torch.Tensor], in_place: bool = False,
              coords: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [batch, T, d]; index, valid [batch, P]; ``delta(rows [batch, P, d]) → [batch, P, d]``.

    Out of place, unless ``in_place`` (a model's layer output, which nothing else has read yet):
    then the rows are added into ``hidden`` itself where autograd allows it (not a leaf that
    requires grad, not a view), with no copy of the whole hidden state. ``coords``: ``row_coords
    (index)``, from a caller that edits many layers at the same positions (``Positions.coords``);
    else built in backward, only where a gradient is asked for."""
    change = delta(_GatherRows.apply(hidden, index, coords))
    change = (change * valid.unsqueeze(-1).to(change.dtype)).to(hidden.dtype)
    idx = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    if in_place and hidden._base is None and not (hidden.is_leaf and hidden.requires_grad):
        return hidden.scatter_add_(1, idx, change)
    return hidden.scatter_add(1, idx, change)


def sparse_rows(coords: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A [batch, T, d] gradient that is ``values`` [n, d] at rows ``coords`` [2, n] of (batch,
    position) and 0 elsewhere, as a sparse tensor. Under create_graph autograd sums gradients out
    of place and torch adds no sparse tensor to a dense one in that order, so it is dense there."""
    rows = torch.sparse_coo_tensor(coords, values, shape, check_invariants=False)
    return rows.to_dense() if torch.is_grad_enabled() else rows


class _GatherRows(torch.autograd.Function):
    """rows = hidden[b, index[b, p]] ([batch, P, d]); saves only the index and the rows' coords
    ([2, batch·P], ``row_coords(index)``; None: built from the index in backward)."""

    @staticmethod
    def forward(ctx, hidden, index, coords):
        ctx.save_for_backward(index, coords)
        ctx.shape = hidden.shape
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def backward(ctx, grad_rows):
        index, coords = ctx.saved_tensors
        coords = row_coords(index) if coords is None else coords
        return sparse_rows(coords, grad_rows.reshape(-1, grad_rows.shape[-1]), ctx.shape), None, None


def low_rank_edit(hidden, index, valid, A, B, b, adapter=None):
    """Δ = Bᵀ(A h + b) in fp32. With ``adapter`` ([batch] ids), A, B are [K, r, d] and b [K, r]:
    batch row i uses adapter ``adapter[i]``."""
    if adapter is None:
        return edit_rows(hidden, index, valid, lambda rows: (rows.float() @ A.float().T + b.float()) @ B.float())
    A, B, b = A[adapter].float(), B[adapter].float(), b[adapter].float()  # [batch, r, d], [batch, r]
    return edit_rows(hidden, index, valid, lambda rows: (rows.float() @ A.transpose(1, 2) + b[:, None]) @ B)
