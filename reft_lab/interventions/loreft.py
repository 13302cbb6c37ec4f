"""LoReFT: low-rank linear subspace ReFT."""

from __future__ import annotations

import torch
from torch import nn

from reft_lab.interventions.base import (
    Intervention,
    linear_init_,
    orthonormal_rows,
    register_intervention,
)


@register_intervention("loreft")
class LoReFT(Intervention):
    """Φ(h) = h + Rᵀ(Wh + b − Rh)  (Wu et al. 2024, arXiv 2404.03592, eq. 2).

    R ∈ ℝ^{r×d} has orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝ^r. R is stored unconstrained as
    ``rotation`` and orthonormalised once per forward of the model, for every intervention at once
    (``stacked_factors``); the edit computes Δ = Rᵀ((W − R)h + b), one projection instead of
    pyreft's two.
    """

    no_decay = ("rotation",)

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, rank, dropout, dtype)
        self.rotation = self.new_param(rank, hidden_size)
        self.W = self.new_param(rank, hidden_size)
        self.b = self.new_param(rank)
        with torch.no_grad():
            # QR has no bf16/fp16 kernel: draw the orthogonal init in fp32
            self.rotation.copy_(nn.init.orthogonal_(torch.empty_like(self.rotation, dtype=torch.float32)))
            linear_init_(self.W, self.b)

    @property
    def R(self) -> torch.Tensor:
        return orthonormal_rows(self.rotation)

    def factors(self):
        R = self.R
        return self.W - R, R, self.b

    @classmethod
    def stacked_factors(cls, interventions):
        """All rotations orthonormalised in one batched call, A = W − R in one subtraction."""
        R = orthonormal_rows(torch.stack([i.rotation for i in interventions]))
        A = torch.stack([i.W for i in interventions]) - R
        return [(a, r, i.b) for a, r, i in zip(A.unbind(), R.unbind(), interventions)]
