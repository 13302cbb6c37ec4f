"""NoReFT: LoReFT without the orthogonality constraint."""

from __future__ import annotations

import torch

from reft_lab.interventions.base import (
    Intervention,
    linear_init_,
    register_intervention,
)


@register_intervention("noreft")
class NoReFT(Intervention):
    """Φ(h) = h + Rᵀ(Wh + b − Rh) with R ∈ ℝ^{r×d} unconstrained (the LoReFT paper's ablation;
    pyreft's ``NoreftIntervention`` with ``add_bias=False``)."""

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, rank, dropout, dtype)
        self.R = self.new_param(rank, hidden_size)
        self.W = self.new_param(rank, hidden_size)
        self.b = self.new_param(rank)
        with torch.no_grad():
            linear_init_(self.R)
            linear_init_(self.W, self.b)

    def factors(self):
        return self.W - self.R, self.R, self.b
