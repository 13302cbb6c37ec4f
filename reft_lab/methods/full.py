"""Full fine-tuning: every base parameter trains (the baseline ReFT is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from reft_lab.methods.base import MethodConfig, TunedModel


@dataclass(kw_only=True)
class FullConfig(MethodConfig):
    """Full fine-tuning: every base weight trains (largest capacity, largest drift from the base)."""

    name: str = "full"
    lr: float = 2e-5  # small: every weight moves


def attach_full(model, config: FullConfig) -> TunedModel:
    model.requires_grad_(True)
    return TunedModel(model, config)
