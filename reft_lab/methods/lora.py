"""LoRA and DoRA through peft, the field's reference implementation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS,
)
from torch import nn

from reft_lab.errors import ConfigError, config_error
from reft_lab.methods.base import MethodConfig, TunedModel


@dataclass(kw_only=True)
class LoraConfig(MethodConfig):
    """LoRA (arXiv 2106.09685): W + (alpha/r)·BA on target modules; DoRA (arXiv 2402.09353) adds a
    learned magnitude per output column (``name: dora``)."""

    name: str = "lora"
    lr: float = 5e-4
    rank: int = 8  # r: higher = more capacity and parameters
    alpha: float = 16  # scale alpha/r on the update (alpha/√r with rslora)
    rslora: bool = False  # rank-stabilised LoRA (arXiv 2312.03732): scale alpha/√r, so high ranks keep their update's size
    dropout: float = 0.05  # on the LoRA branch input
    target_modules: list[str] | None = None  # null = peft's default for the architecture (q/v projections)

    def __post_init__(self):
        super().__post_init__()
        if self.name not in ("lora", "dora"):
            raise config_error("method", self.name, "lora or dora")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise config_error("method.rank", self.rank, "an integer ≥ 1")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise config_error("method.alpha", self.alpha, "a number > 0")
        if not isinstance(self.rslora, bool):
            raise config_error("method.rslora", self.rslora, "true or false")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise config_error("method.dropout", self.dropout, "a number in [0, 1)")
        if self.target_modules is not None:
            self.target_modules = [str(m) for m in self.target_modules]
            if not self.target_modules:
                raise config_error("method.target_modules", [], "null (architecture default) or a non-empty list of module names")


class PeftTunedModel(TunedModel):
    """LoRA/DoRA as peft builds them; adapters are saved in peft's own format, so peft,
    transformers' ``load_adapter`` and vLLM read them as they are."""

    @property
    def base_model(self) -> nn.Module:
        return self.model.get_base_model()

    def saved_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_saved_state(self, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        from peft.utils import set_peft_model_state_dict

        expected = self.saved_state()
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise ConfigError(f"{source}: tensors do not match method={self.config.name} on this model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise ConfigError(f"{source}: tensor {name} is {list(value.shape)}, the model expects {list(expected[name].shape)}")
        set_peft_model_state_dict(self.model, state)

    def peft_config(self) -> dict:
        """peft's adapter_config.json for this adapter, as ``PeftConfig.save_pretrained`` writes it."""
        import json
        import tempfile

        config = self.model.peft_config["default"]
        config.base_model_name_or_path = self.base_name or config.base_model_name_or_path
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            return json.loads((Path(tmp) / "adapter_config.json").read_text(encoding="utf-8"))


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    model_type = model.config.model_type
    targets = config.target_modules or PEFT_DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise config_error("method.target_modules", None, f"a list of module names: peft has no default for model type {model_type!r}")
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(
            f"method.target_modules={list(targets)!r}: {missing} not found in {type(model).__name__}; "
            f"its linear modules are {linear}"
        )
    return list(targets)


def attach_lora(model, config: LoraConfig) -> PeftTunedModel:
    peft_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=_targets(model, config),
        use_dora=config.name == "dora",
        use_rslora=config.rslora,
        task_type="CAUSAL_LM",
    )
    return PeftTunedModel(peft.get_peft_model(model, peft_config), config)
