"""Full fine-tuning: every base parameter trains (the baseline ReFT is measured against)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from reft_lab.methods.base import MethodConfig, TunedModel


@dataclass(kw_only=True)
class FullConfig(MethodConfig):
    """Full fine-tuning: every base weight trains (largest capacity, largest drift from the base)."""

    name: str = "full"
    lr: float = 2e-5  # small: every weight moves


def attach_full(model, config: FullConfig) -> TunedModel:
    """Every weight trains, in float32 whatever dtype the base loaded in. An AdamW step (about lr per
    element) smaller than half a bf16 ulp of its weight (at least |w|/512) rounds away: at lr 2e-5
    no weight above about 0.01 in magnitude would move. So a bf16/fp16 base (the same base, and base
    evaluation, as the sweep's other methods) trains as an fp32 copy of itself, as peft keeps LoRA's
    and reft_lab keeps the interventions' trainable state in fp32."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        model.float()
        print(f"reft-lab: method=full on a {'/'.join(low)} base: its weights are held and trained in float32 "
              "(AdamW steps would round away in the base's dtype)", file=sys.stderr)
    model.requires_grad_(True)
    return TunedModel(model, config)
