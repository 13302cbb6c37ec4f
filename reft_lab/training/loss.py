"""The training loss: cross-entropy over response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reft_lab.data.batching import TrainBatch
from reft_lab.models.head import logits_at

CE_CHUNK_ELEMENTS = 2**24  # logits upcast to fp32 per chunk of rows: bounded memory for large vocabularies


def response_loss(tuned: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Mean cross-entropy over response tokens. The LM head runs only on the positions whose next
    token is supervised (``logits_at``: one contiguous [N, d] matmul, no logits for prompt or
    padding), and the loss runs over row chunks so no full fp32 copy of a large-vocabulary logit
    tensor is made."""
    with logits_at(tuned, batch.scored):
        logits = tuned(batch.input_ids, attention_mask=batch.attention_mask, prompt_lengths=batch.prompt_lengths,
                       position_ids=batch.position_ids, use_cache=False).logits  # [N, V]
    targets = batch.targets
    rows = max(1, CE_CHUNK_ELEMENTS // logits.shape[-1])
    total = sum(F.cross_entropy(logits[i: i + rows].float(), targets[i: i + rows], reduction="sum")
                for i in range(0, len(targets), rows))
    return total / max(len(targets), 1)
