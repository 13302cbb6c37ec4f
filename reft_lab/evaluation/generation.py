"""Batched greedy generation and teacher-forced log-probabilities through any TunedModel."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from reft_lab.data.batching import PromptEncoder, left_pad
from reft_lab.methods import TunedModel


def _by_length(sequences: list[list[int]], batch_size: int):
    """Batches of indices of similar length (less padding), in a fixed order."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(model: TunedModel, encoder: PromptEncoder, prompts: list[list[int]], max_new_tokens: int,
             batch_size: int, desc: str, adapter_ids: list[int] | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first end-of-sequence) for each prompt.
    ``adapter_ids``: for a model serving several adapters (``load_adapter_bank``), each prompt's."""
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=encoder.pad_id,
                              eos_token_id=encoder.eos_id)
    results: list[list[int]] = [[] for _ in prompts]
    for chunk in tqdm(_by_length(prompts, batch_size), desc=desc, leave=False, unit="batch"):
        ids, mask = left_pad([prompts[i] for i in chunk], encoder.pad_id)
        per_row = {} if adapter_ids is None else {"adapter_ids": torch.tensor([adapter_ids[i] for i in chunk], device=device)}
        out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config, **per_row)
        for row, index in enumerate(chunk):
            new = out[row, ids.shape[1]:].tolist()
            if encoder.eos_id in new:
                new = new[: new.index(encoder.eos_id)]
            results[index] = new
    return results


@torch.no_grad()
def continuation_logprobs(model: TunedModel, encoder: PromptEncoder, prompts: list[list[int]],
                          continuations: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """log p(· | prompt, continuation[:t]) at each continuation position: one [C_i, V] tensor each."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for chunk in _by_length([p + c for p, c in zip(prompts, continuations)], batch_size):
        ids, mask = left_pad([prompts[i] + continuations[i] for i in chunk], encoder.pad_id)
        counts = [len(continuations[i]) for i in chunk]
        predicts = torch.zeros_like(ids, dtype=torch.bool)  # the positions before each continuation token
        for row, n in enumerate(counts):
            predicts[row, ids.shape[1] - 1 - n: ids.shape[1] - 1] = True
        lengths = torch.tensor([len(prompts[i]) for i in chunk], device=device)
        logits = model(ids.to(device), attention_mask=mask.to(device), prompt_lengths=lengths,
                       logits_to_keep=predicts.to(device), use_cache=False).logits  # [Σ counts, V]
        logprobs = torch.log_softmax(logits.float(), -1).cpu()
        for index, rows in zip(chunk, logprobs.split(counts)):
            out[index] = rows
    return out
