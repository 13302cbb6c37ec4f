"""Base class and registry for ReFT interventions: Φ(h) = h + Δ(h), Δ applied at chosen positions."""

from __future__ import annotations

import math

import torch
from torch import nn

INTERVENTIONS: dict[str, type["Intervention"]] = {}


def register_intervention(name: str):
    def add(cls: type[Intervention]) -> type[Intervention]:
        if name in INTERVENTIONS:
            raise RuntimeError(f"intervention {name!r} registered twice")
        cls.method_name = name
        INTERVENTIONS[name] = cls
        return cls

    return add


def orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    """Map an unconstrained [r, d] matrix (r ≤ d) to one with orthonormal rows.

    Reduced QR of rawᵀ with the sign of each column fixed by diag(T) > 0, so an already-orthonormal
    input maps to itself and the map is smooth. Unlike ``parametrizations.orthogonal``, the result
    is invariant to the scale of ``raw``, so weight decay cannot collapse R to zero. QR runs in
    fp32 (no bf16 QR kernel) and the result is cast back.
    """
    q, t = torch.linalg.qr(raw.float().T, mode="reduced")
    signs = torch.sign(torch.diagonal(t))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).T.to(raw.dtype)


def linear_init_(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """nn.Linear's default initialisation, so interventions start as pyreft's do."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


class Intervention(nn.Module):
    """Φ(h) = h + dropout(Δ(h)) on vectors h ∈ ℝ^d (any leading shape).

    Subclasses define ``delta``. Dropout acts on the edit only, never on h itself.
    """

    method_name: str = ""
    #: names of parameters kept out of weight decay (orthonormalised bases)
    no_decay: tuple[str, ...] = ()

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__()
        self.hidden_size, self.rank = hidden_size, rank
        self.dtype = dtype or torch.get_default_dtype()
        self.dropout = nn.Dropout(dropout)

    def new_param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=self.dtype))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, b) with Δ(h) = Bᵀ(A h + b): the form the fused kernel computes."""
        raise NotImplementedError

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """Δ with dropout, in h's dtype: what the model adds to the residual stream."""
        return self.dropout(self.delta(h.to(self.dtype))).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.edit(h)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, dtype={self.dtype}"
