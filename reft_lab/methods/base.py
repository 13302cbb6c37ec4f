"""The interface every method shares: a config dataclass and a TunedModel that wraps the base."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reft_lab.errors import ConfigError, config_error


@dataclass(kw_only=True)
class MethodConfig:
    """Fields common to every method. Subclasses add theirs and validate in ``__post_init__``."""

    name: str
    lr: float  # per-method default learning rate (the trainer uses it unless trainer.lr is set)

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0):
            raise config_error("method.lr", self.lr, "a number > 0 (a run at rate 0 learns nothing)")

    def check_device(self, device: torch.device, dtype: torch.dtype, hidden: int) -> None:
        """Raise a ConfigError when the method cannot run on a model of this device, parameter
        dtype and hidden size. Asked before the weights load (of the device they will load on)."""

    def base_dtype_attached(self, loaded: torch.dtype) -> torch.dtype:
        """The dtype the base's weights have once the method is attached to a base loaded in
        ``loaded`` (the same, unless the method trains them in another)."""
        return loaded


class TunedModel(nn.Module):
    """A causal LM with a method attached. ``forward`` and ``generate`` take the usual inputs plus
    ``prompt_lengths`` (ReFT positions are taken over the prompt; other methods ignore it)."""

    def __init__(self, model: nn.Module, config: MethodConfig):
        super().__init__()
        self.model = model
        self.config = config
        # set by methods.attach from the model before the method touched it
        self.base_params = 0
        self.base_name = ""
        self.base_fingerprint: str | None = None  # None: computed from the (frozen) base on demand
        self.base_dtype: str | None = None  # the base's weights as loaded (full fine-tuning trains an fp32 copy)

    def forward(self, input_ids, attention_mask=None, prompt_lengths=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        """The Hugging Face model as loaded (what the fingerprint hashes)."""
        return self.model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Exactly what an adapter saves: every parameter that requires grad, by its name here."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The adapter file's tensors, under the names that file format uses (here: ours)."""
        return self.trainable_state()

    def load_saved_state(self, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Load what ``saved_state`` wrote."""
        self.load_trainable_state(state, source)

    def peft_config(self) -> dict | None:
        """peft's adapter_config.json when the adapter is also a peft adapter (LoRA/DoRA), else None."""
        return None

    def no_decay_parameter_names(self) -> set[str]:
        """Parameters that must stay out of weight decay (biases, norms, orthonormal bases)."""
        return {n for n, p in self.trainable_state().items() if p.ndim < 2}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        own = self.trainable_state()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            raise ConfigError(
                f"{source}: tensors do not match method={self.config.name} on this model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        for name, param in own.items():
            value = state[name]
            if value.shape != param.shape or value.dtype != param.dtype:
                raise ConfigError(
                    f"{source}: tensor {name} is {value.dtype}{list(value.shape)}, "
                    f"the model expects {param.dtype}{list(param.shape)}"
                )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name])
