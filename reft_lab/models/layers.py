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


def _mark_batch_and_length_dynamic(module, args, kwargs) -> None:
    """Forward pre-hook: the batch and sequence dims of a block's inputs may vary, so the first
    compile is shape-generic and later lengths reuse it. Without the hint, dynamo compiles the first
    length statically and recompiles at the second (about 20 s per graph for SmolLM2 on 2 CPU cores).
    Float [B, T, hidden] tensors (hidden states, rotary tables) keep their last dim static; masks,
    position ids and cache positions hint every dim."""
    def mark(t) -> None:
        if isinstance(t, (tuple, list)):
            for item in t:
                mark(item)
        elif isinstance(t, torch.Tensor):
            dims = (0, 1) if t.is_floating_point() and t.dim() == 3 else range(t.dim())
            for d in dims:
                if t.shape[d] > 1:  # size-1 dims specialise anyway
                    torch._dynamo.maybe_mark_dynamic(t, d)

    mark(args)
    mark(list(kwargs.values()))


@contextmanager
def compiled_layers(model: nn.Module):
    """Each decoder block's forward through ``torch.compile`` while the context lasts.

    Regional compilation: the blocks share one class, so one graph serves them all and a cold compile
    takes seconds, not the minutes of a whole-model compile. Batch and sequence dims are hinted
    dynamic, so a run compiles two graphs (blocks below the lowest intervened layer get no gradient)
    and new batch shapes reuse them. Hooks (the ReFT edits) stay eager around the compiled forward.
    Inductor fuses the pointwise ops and, for backward, recomputes cheap ones instead of saving them
    (less activation memory). Restored on exit, so generation afterwards runs the plain layers (its
    growing KV cache would only trigger recompiles).
    """
    blocks = decoder_layers(model)
    handles = [block.register_forward_pre_hook(_mark_batch_and_length_dynamic, with_kwargs=True) for block in blocks]
    try:
        with swapped_forwards(blocks, lambda block: torch.compile(block.forward)):
            yield
    finally:
        for handle in handles:
            handle.remove()
