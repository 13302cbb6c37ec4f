"""The method registry: ``method=<name>`` → a config dataclass and how it attaches to a model.

ReFT variants register themselves in ``reft_lab.interventions``; every registered intervention is
a method here, sharing ``ReftConfig`` and ``attach_reft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from reft_lab.config import build_section, plain
from reft_lab.errors import config_error
from reft_lab.interventions import INTERVENTIONS
from reft_lab.methods.base import MethodConfig, TunedModel
from reft_lab.methods.full import FullConfig, attach_full
from reft_lab.methods.lora import LoraConfig, attach_lora
from reft_lab.methods.none import NoneConfig, attach_none
from reft_lab.methods.reft import ReftConfig, ReftModel, attach_reft
from reft_lab.models.layers import weights_dtype


@dataclass(frozen=True)
class Method:
    config: type[MethodConfig]
    attach: Callable[[nn.Module, MethodConfig], TunedModel]
    is_reft: bool = False


WEIGHT_METHODS: dict[str, Method] = {
    "lora": Method(LoraConfig, attach_lora),
    "dora": Method(LoraConfig, attach_lora),
    "full": Method(FullConfig, attach_full),
    "none": Method(NoneConfig, attach_none),
}


def methods() -> dict[str, Method]:
    """Every method: each registered intervention (read now, so a variant registered after this
    module was imported is one too), then the weight methods."""
    return {**{name: Method(ReftConfig, attach_reft, is_reft=True) for name in INTERVENTIONS}, **WEIGHT_METHODS}


def method_config(raw: dict | MethodConfig) -> MethodConfig:
    """Validate a ``method`` config mapping (from Hydra or a saved adapter) into its dataclass."""
    if isinstance(raw, MethodConfig):
        return raw
    raw = plain(raw)
    name = raw.get("name") if isinstance(raw, dict) else raw
    known = methods()
    if name not in known:
        raise config_error("method", name, f"one of {', '.join(known)}")
    return build_section(known[name].config, raw, "method")


def attach(model: nn.Module, config: dict | MethodConfig, base_name: str = "", base_fingerprint: str | None = None) -> TunedModel:
    """Attach a method to a loaded model; the base's size (and, for methods that train base
    weights, its fingerprint, unless the caller already has it) is taken before the method touches it."""
    from reft_lab.accounting import count_parameters, fingerprint

    config = method_config(config)
    base_params, base_dtype = count_parameters(model), weights_dtype(model)
    if base_fingerprint is None and config.name == "full":
        base_fingerprint = fingerprint(model)
    tuned = methods()[config.name].attach(model, config)
    tuned.base_params, tuned.base_name, tuned.base_fingerprint, tuned.base_dtype = base_params, base_name, base_fingerprint, base_dtype
    return tuned.eval()  # deterministic until the trainer calls .train()


__all__ = ["Method", "MethodConfig", "ReftConfig", "ReftModel", "TunedModel", "attach", "method_config", "methods"]
