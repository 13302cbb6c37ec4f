"""Training: setup → evaluate before → train → evaluate after → save. One readable file."""

from __future__ import annotations

import torch

from reft_lab.methods import TunedModel


def build_optimizer(tuned: TunedModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable state. Biases, norms and orthonormalised bases get no weight decay:
    decay on an orthogonally parametrised R is what collapses it (see interventions.base)."""
    no_decay = tuned.no_decay_parameter_names()
    params = tuned.trainable_state()
    groups = [
        {"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak rate over ``warmup_ratio·max_steps``, then linear decay to 0."""
    warmup = int(round(warmup_ratio * max_steps))

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
