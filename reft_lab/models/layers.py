"""Locating the residual stream of any transformers causal LM, without a per-architecture table."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from reft_lab.errors import ConfigError


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(model: nn.Module) -> int:
    return int(_text_config(model).hidden_size)


def weights_dtype(model: nn.Module) -> str:
    """The dtype the model's weights were loaded in (``model.dtype``'s value): its first floating-point
    parameter's (the embeddings, in a transformers model)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(first.dtype if first is not None else torch.float32).removeprefix("torch.")


def context_length(config) -> int | None:
    """The longest sequence the model takes (its position table), from a model or its config; None when unstated."""
    config = getattr(config, "config", config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the shallowest nn.ModuleList of ``num_hidden_layers`` blocks of
    one class. Their outputs are the residual stream ReFT edits."""
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (n_layers is None or len(module) == n_layers)
        and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ConfigError(
            f"cannot find the decoder-layer list of {type(model).__name__}: no nn.ModuleList of "
            f"{n_layers} identical blocks; ReFT methods need one (LoRA, full and none do not)"
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


@contextmanager
def swapped_forwards(blocks, forward_for):
    """Each block's ``forward`` replaced by ``forward_for(block)`` while the context lasts, then put
    back exactly as it was: a block without its own ``forward`` attribute gets none, so no bound
    method (a reference cycle) is left on the instance, and nested swaps unwind in order."""
    originals = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = forward_for(block)
    try:
        yield
    finally:
        for block, original in zip(blocks, originals):
            if original is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = original
