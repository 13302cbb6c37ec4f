"""DiReFT: ReFT with a direct (non-orthogonal) low-rank edit."""

from __future__ import annotations

import torch

from reft_lab.interventions.base import (
    Intervention,
    linear_init_,
    register_intervention,
)


@register_intervention("direft")
class DiReFT(Intervention):
    """Φ(h) = h + W₂ᵀ(W₁h + b)  (arXiv 2404.03592, eq. 3), W₁, W₂ ∈ ℝ^{r×d}, b ∈ ℝ^r.

    No orthogonality and no subtraction of the projected state: a LoRA-like low-rank edit on the
    hidden state. pyreft names this ``NodireftIntervention`` (its ``DireftIntervention`` keeps an
    orthonormal W₂); we use the paper's name.
    """

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, rank, dropout, dtype)
        self.W1 = self.new_param(rank, hidden_size)
        self.b = self.new_param(rank)
        self.W2 = self.new_param(rank, hidden_size)
        with torch.no_grad():
            linear_init_(self.W1, self.b)
            linear_init_(self.W2)

    def factors(self):
        return self.W1, self.W2, self.b
