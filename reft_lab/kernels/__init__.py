"""Fused intervention kernels: the GPU hot path (Triton); the eager
reference they are checked against is ``reft_lab.interventions.edit.low_rank_edit``.

Import this package only when a kernel is wanted: Triton reads TRITON_INTERPRET when the kernels
are defined (tests set it to run them on the CPU).
"""

from reft_lab.kernels.low_rank_edit import (
    MAX_HIDDEN,
    MAX_RANK,
    FusedLowRankEdit,
    flat_rows,
    fused_edit_rows,
    fused_low_rank_edit,
    kernel_problem,
    triton_usable,
)

__all__ = ["MAX_HIDDEN", "MAX_RANK", "FusedLowRankEdit", "flat_rows", "fused_edit_rows", "fused_low_rank_edit", "kernel_problem", "triton_usable"]
