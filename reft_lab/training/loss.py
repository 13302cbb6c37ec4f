"""The training loss: cross-entropy over response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reft_lab.data.batching import TrainBatch
from reft_lab.models.head import logits_at


class BlockedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of [N, V] logits, computed in fp32 one block of rows at a time (about
    ``BLOCK_ELEMENTS`` logits, ``GPU_BLOCK_ELEMENTS`` off the CPU; at most ``MAX_BLOCKS`` blocks), so
    no fp32 copy of a large-vocabulary logit matrix exists at once. Autograd would keep every row's
    fp32 log-probabilities for backward (4 bytes a logit: at a 128K vocabulary, 0.5 GB per thousand
    scored tokens) and build the gradient of the whole matrix at once (three more fp32 copies). This
    keeps the logits themselves (2 bytes a logit in bf16) and, in backward, recomputes each block's
    log-probabilities and differentiates them by autograd's own formulas: each logit's gradient is
    bit-identical (the loss, a sum of block sums, may differ from one sum in its last bit)."""

    BLOCK_ELEMENTS = 2**20  # 4 MiB per fp32 copy of a block: a small transient...
    GPU_BLOCK_ELEMENTS = 2**22  # ...but on a GPU each block costs a dozen kernel launches: 4× fewer blocks
    MAX_BLOCKS = 32  # and never more blocks than this

    @staticmethod
    def _blocks(logits: torch.Tensor):
        n, vocab = logits.shape
        cls = BlockedCrossEntropy
        block = cls.BLOCK_ELEMENTS if logits.device.type == "cpu" else cls.GPU_BLOCK_ELEMENTS
        rows = max(1, block // vocab, -(-n // cls.MAX_BLOCKS))
        return [slice(i, i + rows) for i in range(0, n, rows)]

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        return sum((F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum")
                    for rows in BlockedCrossEntropy._blocks(logits)), logits.new_zeros((), dtype=torch.float32))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows in BlockedCrossEntropy._blocks(logits):
            with torch.enable_grad():
                leaf = logits[rows].detach().requires_grad_()
                loss = F.cross_entropy(leaf.float(), targets[rows], reduction="sum")
            grad_logits[rows] = torch.autograd.grad(loss, leaf, grad)[0]
        return grad_logits, None


def response_loss(tuned: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Mean cross-entropy over response tokens. The LM head runs only on the positions whose next
    token is supervised (``logits_at``: one contiguous [N, d] matmul, no logits for prompt or
    padding), and ``BlockedCrossEntropy`` keeps no fp32 copy of a large-vocabulary logit matrix."""
    with logits_at(tuned, batch.scored):
        logits = tuned(batch.input_ids, attention_mask=batch.attention_mask, prompt_lengths=batch.prompt_lengths,
                       position_ids=batch.position_ids, use_cache=False).logits  # [N, V]
    return BlockedCrossEntropy.apply(logits, batch.targets) / max(len(batch.targets), 1)
