"""Batched greedy generation and teacher-forced log-probabilities through any TunedModel."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from reft_lab.data.batching import (
    PromptEncoder,
    left_pad,
    position_ids,
    predicting_positions,
)
from reft_lab.methods import TunedModel
from reft_lab.models.head import logits_at


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
def _teacher_forced(model: TunedModel, encoder: PromptEncoder, prompts: list[list[int]], continuations: list[list[int]],
                    batch_size: int, desc: str):
    """Yields (i, log p(· | prompt_i, continuation_i[:t]) for each t: [C_i, V]), batched by length.
    The LM head runs on the continuation positions only (``logits_at``)."""
    device = next(model.parameters()).device
    for chunk in tqdm(_by_length([p + c for p, c in zip(prompts, continuations)], batch_size), desc=desc, leave=False, unit="batch"):
        ids, mask = left_pad([prompts[i] + continuations[i] for i in chunk], encoder.pad_id)
        counts = [len(continuations[i]) for i in chunk]
        predicts = predicting_positions(ids.shape[1], torch.tensor(counts))
        lengths = torch.tensor([len(prompts[i]) for i in chunk], device=device)
        with logits_at(model, predicts.to(device)):
            logits = model(ids.to(device), attention_mask=mask.to(device), prompt_lengths=lengths,
                           position_ids=position_ids(mask).to(device), use_cache=False).logits  # [Σ counts, V]
        yield from zip(chunk, torch.log_softmax(logits.float(), -1).split(counts))


def continuation_logprobs(model: TunedModel, encoder: PromptEncoder, prompts: list[list[int]],
                          continuations: list[list[int]], batch_size: int, desc: str = "log-probs") -> list[torch.Tensor]:
    """log p(· | prompt, continuation[:t]) at each continuation position: one [C_i, V] tensor each (CPU)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for index, rows in _teacher_forced(model, encoder, prompts, continuations, batch_size, desc):
        out[index] = rows.cpu()
    return out


@torch.no_grad()
def option_scores(model: TunedModel, encoder: PromptEncoder, prompts: list[list[int]], options: list[list[list[int]]],
                  batch_size: int, desc: str = "scores") -> list[list[float]]:
    """Σ_t log p(option[t] | prompt, option[:t]) for every option of every prompt. Each prompt runs
    once: its KV cache (edited as at inference) is shared by its options, which then run on the
    method's model without new edits (ReFT edits prompt positions only)."""
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in prompts]
    for chunk in tqdm(_by_length(prompts, batch_size), desc=desc, leave=False, unit="batch"):
        ids, mask = left_pad([prompts[i] for i in chunk], encoder.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        lengths = torch.tensor([len(prompts[i]) for i in chunk], device=device)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[:, -1] = True
        with logits_at(model, last):
            first = model(ids, attention_mask=mask, prompt_lengths=lengths, position_ids=position_ids(mask), use_cache=True)
        first_logprobs = torch.log_softmax(first.logits.float(), -1)  # [B, V]: each option's first token
        rows = [(b, option) for b, i in enumerate(chunk) for option in options[i]]
        owner = torch.tensor([b for b, _ in rows], device=device)
        first_tokens = torch.tensor([option[0] if option else 0 for _, option in rows], device=device)
        scores = first_logprobs[owner, first_tokens] * torch.tensor([bool(o) for _, o in rows], device=device)
        width = max((len(option) for _, option in rows), default=0)
        if width > 1:  # the later tokens of every option, teacher-forced on its prompt's cache
            option_ids = torch.full((len(rows), width), encoder.pad_id, dtype=torch.long)
            option_mask = torch.zeros(len(rows), width, dtype=torch.long)
            predicts = torch.zeros(len(rows), width, dtype=torch.bool)  # every token but each option's last
            for r, (_, option) in enumerate(rows):
                option_ids[r, :len(option)], option_mask[r, :len(option)] = torch.tensor(option), 1
                predicts[r, :max(len(option) - 1, 0)] = True
            cache = first.past_key_values
            cache.reorder_cache(owner)  # one copy of its prompt's cache per option
            option_mask = option_mask.to(device)
            with logits_at(model, predicts.to(device)):
                logits = model.model(input_ids=option_ids.to(device), attention_mask=torch.cat([mask[owner], option_mask], 1),
                                     position_ids=position_ids(option_mask, mask.sum(-1)[owner]), past_key_values=cache,
                                     use_cache=False).logits  # row-major over (option, token)
            targets = torch.tensor([t for _, option in rows for t in option[1:]], device=device)
            which = torch.tensor([r for r, (_, option) in enumerate(rows) for _ in option[1:]], device=device)
            token_logprobs = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
            scores = scores.index_add(0, which, token_logprobs)
        scores = scores.tolist()
        position = 0
        for i in chunk:
            out[i] = scores[position: position + len(options[i])]
            position += len(options[i])
    return out
