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
    """Map unconstrained [..., r, d] matrices (r ≤ d, full rank) to ones with orthonormal rows.

    The map is the reduced QR of rawᵀ with diag(T) > 0 (so an orthonormal input maps to itself, the
    map is smooth, and, unlike ``parametrizations.orthogonal``, invariant to the scale of ``raw``:
    weight decay cannot collapse R to zero). It is computed as CholeskyQR: L Lᵀ = raw rawᵀ, rows =
    L⁻¹ raw, which is that same QR (T = Lᵀ). A Gram matmul, an r × r Cholesky and a triangular solve
    are a few kernels for any number of stacked matrices, where torch's Householder QR is a LAPACK
    (CPU) or MAGMA (CUDA) call per matrix; ``cholesky_ex`` skips the status check that would make
    the host wait for the device. In fp64, because CholeskyQR squares the condition number: rows
    stay orthonormal to fp32 precision up to a condition number of 10⁴ (tested), far past the
    near-orthonormal ``raw`` that training keeps (it starts orthonormal; the map ignores scale).
    """
    x = raw.double()
    chol, _ = torch.linalg.cholesky_ex(x @ x.transpose(-1, -2))  # _ex: no host check of the status
    return torch.linalg.solve_triangular(chol, x, upper=False).to(raw.dtype)


def linear_init_(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """nn.Linear's default initialisation, so interventions start as pyreft's do."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


class Intervention(nn.Module):
    """Φ(h) = h + dropout(Δ(h)) on vectors h ∈ ℝ^d (any leading shape).

    Subclasses define ``factors`` (A, B, b of the low-rank form). Dropout acts on the edit only,
    never on h itself.
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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, b) with Δ(h) = Bᵀ(A h + b): what every variant is, and what the fused kernel runs."""
        raise NotImplementedError

    @classmethod
    def stacked_factors(cls, interventions: list["Intervention"]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each intervention's ``factors()``, computed together once per forward of the model. A
        variant whose factors cost kernels of their own (LoReFT's orthonormalisation) batches them
        here, so a small model's step is not a launch per intervention per factor."""
        return [intervention.factors() for intervention in interventions]

    def delta(self, h: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Δ(h) = Bᵀ(A h + b), from ``factors`` when the caller computed them already."""
        A, B, b = factors if factors is not None else self.factors()
        return (h @ A.T + b) @ B

    def edit(self, h: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Δ with dropout, in h's dtype: what the model adds to the residual stream."""
        return self.dropout(self.delta(h.to(self.dtype), factors)).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.edit(h)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, dtype={self.dtype}"
