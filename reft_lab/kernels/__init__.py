"""Fused intervention kernels: the GPU hot path (Triton), with the eager reference beside them.

Import this package only when a kernel is wanted: Triton reads TRITON_INTERPRET when the kernels
are defined (tests set it to run them on the CPU).
"""

from reft_lab.kernels.low_rank_edit import (
    MAX_HIDDEN,
    MAX_RANK,
    FusedLowRankEdit,
    fused_low_rank_edit,
    kernel_problem,
    low_rank_edit_reference,
    triton_usable,
)

__all__ = ["MAX_HIDDEN", "MAX_RANK", "FusedLowRankEdit", "fused_low_rank_edit", "kernel_problem", "low_rank_edit_reference", "triton_usable"]
