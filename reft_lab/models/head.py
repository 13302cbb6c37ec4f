"""The LM head on chosen positions only, on every transformers version pyproject allows.

Training and teacher-forced scoring need logits at the positions whose next token is scored, a
few percent of the positions. transformers' own ``logits_to_keep`` takes a [B, T] mask of them
only from 5.23 on (older versions index ``hidden_states[:, mask, :]`` and raise), so
reft_lab narrows the head's input itself: a forward pre-hook on the output embeddings hands the
head the selected rows [N, d], and the model returns logits [N, V], one contiguous matmul, with no
logits for the prompt or padding. The model runs with its default ``logits_to_keep`` (all
positions), which every version accepts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def output_head(model: nn.Module) -> nn.Module:
    """The LM head of a Hugging Face causal LM, through DDP and reft_lab's wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    model = getattr(model, "base_model", model)  # TunedModel: the Hugging Face model as loaded
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to score positions with")
    return head


@contextmanager
def logits_at(model: nn.Module, positions: torch.Tensor):
    """Inside, a forward of ``model`` returns logits [N, V] at N chosen positions instead of [B, T, V]:
    ``positions`` is a [B, T] bool mask (its true entries, row-major) or [N] flat indices into B·T.
    The indices need no read-back from the device (a mask's count does: the host waits there)."""
    def narrow(module, args):
        hidden = args[0]
        if positions.dtype == torch.bool:
            if hidden.shape[:2] != positions.shape:
                raise ValueError(f"LM head input {tuple(hidden.shape)} does not match the positions {tuple(positions.shape)}")
            return (hidden[positions], *args[1:])
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), *args[1:])

    handle = output_head(model).register_forward_pre_hook(narrow)
    try:
        yield
    finally:
        handle.remove()
