"""Methods that train base weights directly: full fine-tuning, and ``none`` (the untouched base)."""

from __future__ import annotations

from dataclasses import dataclass

from reft_lab.methods.base import MethodConfig, TunedModel


@dataclass(kw_only=True)
class FullConfig(MethodConfig):
    """Full fine-tuning: every base parameter trains (the baseline ReFT is measured against)."""

    name: str = "full"
    lr: float = 2e-5


@dataclass(kw_only=True)
class NoneConfig(MethodConfig):
    """The untouched base model: nothing trains; the "before" of every before/after."""

    name: str = "none"
    lr: float = 0.0


def attach_full(model, config: FullConfig) -> TunedModel:
    model.requires_grad_(True)
    return TunedModel(model, config)


def attach_none(model, config: NoneConfig) -> TunedModel:
    model.requires_grad_(False)
    return TunedModel(model, config)
