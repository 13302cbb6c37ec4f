"""Token ids for prompts and responses, and left-padded batches.

Batches are left-padded so every response ends at the last position: the positions that predict a
response token are the n before the last one in each row (``predicting_positions``), and ReFT
positions start at the first attended token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reft_lab.tasks import Example


class PromptEncoder:
    """Turns a user prompt into model input ids (through the chat template when enabled)."""

    def __init__(self, tokenizer, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.chat = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            return list(ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """Plain tokens of ``text``: no special tokens, no end of sequence."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def response_ids(self, response: str) -> list[int]:
        return self.text_ids(response) + ([self.eos_id] if self.eos_id is not None else [])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class EncodedExample:
    prompt: list[int]
    response: list[int]


def encode_examples(encoder: PromptEncoder, examples: list[Example], max_length: int | None = None,
                    overlong: str = "refuse") -> list[EncodedExample]:
    """Prompt and response ids of each example, each at most ``max_length`` tokens together:
    over it, ``overlong="truncate"`` drops prompt tokens from the left; "refuse" (or a response
    that alone does not fit) raises one line naming the example's file and line."""
    encoded = []
    for e in examples:
        prompt, response = encoder.prompt_ids(e.prompt), encoder.response_ids(e.response)
        encoded.append(EncodedExample(fit_prompt(prompt, len(response), max_length, overlong, e.source, "response"), response))
    return encoded


def fit_prompt(prompt: list[int], reserved: int, max_length: int | None, overlong: str, source: str,
               reserved_for: str = "max_new_tokens") -> list[int]:
    """``prompt`` with room for ``reserved`` more tokens within ``max_length`` (see ``encode_examples``)."""
    if max_length is None or len(prompt) + reserved <= max_length:
        return prompt
    where = source or "an example"
    if overlong == "truncate" and reserved < max_length:
        return prompt[len(prompt) + reserved - max_length:]
    from reft_lab.errors import ConfigError

    raise ConfigError(f"{where}: prompt {len(prompt)} + {reserved_for} {reserved} tokens exceed task.max_length={max_length} "
                      "(null: the model's context): shorten it, raise task.max_length"
                      + (", or set task.overlong=truncate" if reserved < max_length else ""))


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, each sequence right-aligned; T is the longest length rounded
    up to ``multiple``."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Positions counted over attended tokens only (padding gets 0), from ``start`` per row: what
    ``generate`` uses, so models with absolute position embeddings (GPT-2) see the same positions in
    training, teacher-forced scoring and generation, whatever the padding."""
    start = start[:, None] if isinstance(start, torch.Tensor) else start
    return ((attention_mask.long().cumsum(-1) - 1).clamp(min=0) + start) * attention_mask.long()


def predicting_positions(width: int, counts: torch.Tensor) -> torch.Tensor:
    """[B, width] bool: in a left-padded batch whose row b ends with ``counts[b]`` scored tokens, the
    positions whose next token is one of them (what ``models.head.logits_at`` takes)."""
    cols = torch.arange(width, device=counts.device)
    return (cols >= width - 1 - counts[:, None]) & (cols < width - 1)


@dataclass
class TrainBatch:
    """A left-padded training batch, with everything its step needs built on the host: the step
    then reads no value back from the device before its loss (no boolean indexing, whose size the
    host would have to wait for)."""

    input_ids: torch.Tensor  # [B, T], left-padded prompt + response
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # [B, T] (``position_ids``)
    prompt_lengths: torch.Tensor  # [B]
    scored: torch.Tensor  # [N]: flat indices into B·T of the positions whose next token is a response token, row-major
    targets: torch.Tensor  # [N]: those next tokens
    n_tokens: int  # attended tokens (for tokens/s)
    examples: list["EncodedExample"] | None = None  # for the prefix cache

    def to(self, device) -> "TrainBatch":
        """The batch on ``device`` in one copy: its int64 tensors packed into one buffer. To a GPU the
        buffer is pinned and copied without the host waiting (a plain copy from pageable memory waits
        for the device's queue to drain, as a read-back does: six of them per batch)."""
        device = torch.device(device)
        tensors = (self.input_ids, self.attention_mask, self.position_ids, self.prompt_lengths, self.scored, self.targets)
        flat = torch.cat([t.reshape(-1).long() for t in tensors])
        flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
        moved = [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        return TrainBatch(*moved, self.n_tokens, self.examples)


def collate_train(examples: list[EncodedExample], pad_id: int, length_multiple: int = 1) -> TrainBatch:
    if any(not e.prompt for e in examples):  # tasks refuse empty prompts; this guards the row arithmetic below
        raise ValueError("a training example has no prompt tokens: its first response token has no position to be predicted from")
    ids, mask = left_pad([e.prompt + e.response for e in examples], pad_id, length_multiple)
    counts = torch.tensor([len(e.response) for e in examples])
    scored = predicting_positions(ids.shape[1], counts).reshape(-1).nonzero().squeeze(1)  # flat, row-major, on the host
    targets = torch.tensor([token for e in examples for token in e.response], dtype=torch.long)
    lengths = torch.tensor([len(e.prompt) for e in examples], dtype=torch.long)
    return TrainBatch(ids, mask, position_ids(mask), lengths, scored, targets, int(mask.sum()), examples)
