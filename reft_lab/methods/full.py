"""Full fine-tuning: every base parameter trains (the baseline ReFT is measured against)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from reft_lab.errors import config_error
from reft_lab.methods.base import MethodConfig, TunedModel
from reft_lab.models.loading import DTYPES


@dataclass(kw_only=True)
class FullConfig(MethodConfig):
    """Full fine-tuning: every base weight trains (largest capacity, largest drift from the base)."""

    name: str = "full"
    lr: float = 2e-5  # small: every weight moves
    dtype: str | None = None  # the trained weights: null = float32 whatever dtype the base loaded in; bfloat16/float16 keep such a base as loaded (half the memory, but AdamW steps below half an ulp of a weight round away)

    def __post_init__(self):
        super().__post_init__()
        if self.dtype is not None and self.dtype not in DTYPES:
            raise config_error("method.dtype", self.dtype, f"null or one of {', '.join(DTYPES)}")

    def base_dtype_attached(self, loaded: torch.dtype) -> torch.dtype:
        return DTYPES[self.dtype] if self.dtype else torch.float32


def attach_full(model, config: FullConfig) -> TunedModel:
    """Every weight trains, by default in float32 whatever dtype the base loaded in. An AdamW step
    (about lr per element) smaller than half a bf16 ulp of its weight (at least |w|/512) rounds
    away: at lr 2e-5 no weight above about 0.01 in magnitude would move. So a bf16/fp16 base (the
    same base, and base evaluation, as the sweep's other methods) trains as an fp32 copy of itself,
    as peft keeps LoRA's and reft_lab keeps the interventions' trainable state in fp32;
    ``method.dtype`` asks for another."""
    weights = [p for p in model.parameters() if p.is_floating_point()]
    trained = config.base_dtype_attached(weights[0].dtype)
    if any(p.dtype != trained for p in weights):
        print(f"reft-lab: method=full on a {str(weights[0].dtype).removeprefix('torch.')} base: its weights are held "
              f"and trained in {str(trained).removeprefix('torch.')} (method.dtype)", file=sys.stderr)
        with torch.no_grad():
            for p in weights:  # parameters only: buffers such as rotary frequencies keep their dtype
                p.data = p.data.to(trained)
    model.requires_grad_(True)
    return TunedModel(model, config)
