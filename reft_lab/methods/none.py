"""The ``none`` method: the untouched base model, the "before" of every before/after."""

from __future__ import annotations

from dataclasses import dataclass

from reft_lab.errors import config_error
from reft_lab.methods.base import MethodConfig, TunedModel


@dataclass(kw_only=True)
class NoneConfig(MethodConfig):
    """The untouched base: nothing trains; task and retention metrics of the base itself."""

    name: str = "none"
    lr: float = 0.0  # nothing to train

    def __post_init__(self):
        if self.lr != 0:
            raise config_error("method.lr", self.lr, "0: method=none trains nothing")


def attach_none(model, config: NoneConfig) -> TunedModel:
    model.requires_grad_(False)
    return TunedModel(model, config)
