"""The eager edit of selected rows, in plain torch: gather the rows at (b, index[b, p]), add Δ where
valid[b, p], scatter back (out of place). The hook of ``ReftModel`` and the fused kernel's
fallback and tests all go through ``edit_rows``; ``low_rank_edit`` is its factor form, the
reference the Triton kernel is checked against.
"""

from __future__ import annotations

from typing import Callable

import torch


def edit_rows(hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
              delta: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """hidden [batch, T, d]; index, valid [batch, P]; ``delta(rows [batch, P, d]) → [batch, P, d]``."""
    idx = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    change = delta(hidden.gather(1, idx))
    change = change * valid.unsqueeze(-1).to(change.dtype)
    return hidden.scatter_add(1, idx, change.to(hidden.dtype))


def low_rank_edit(hidden, index, valid, A, B, b, adapter=None):
    """Δ = Bᵀ(A h + b) in fp32. With ``adapter`` ([batch] ids), A, B are [K, r, d] and b [K, r]:
    batch row i uses adapter ``adapter[i]``."""
    if adapter is None:
        return edit_rows(hidden, index, valid, lambda rows: (rows.float() @ A.float().T + b.float()) @ B.float())
    A, B, b = A[adapter].float(), B[adapter].float(), b[adapter].float()  # [batch, r, d], [batch, r]
    return edit_rows(hidden, index, valid, lambda rows: (rows.float() @ A.transpose(1, 2) + b[:, None]) @ B)
