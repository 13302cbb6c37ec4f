"""Intervention positions: the one place where a spec like ``f3+l3`` becomes index tensors.

A spec names the first n and/or last n tokens of the prompt (LoReFT paper, §4). For each batch
we build, once, an index tensor [B, P] (P = n_first + n_last) and a validity mask [B, P]:

* the prompt of row b starts at its first attended token (left padding is skipped) and has
  ``prompt_lengths[b]`` tokens (at inference: every attended token);
* a prompt shorter than n gets fewer positions: the unused slots are invalid;
* where the first-n and last-n windows overlap, the position belongs to the first group only,
  so no position is edited twice; padding is never edited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from reft_lab.errors import config_error

_SPEC = re.compile(r"^(?:f(\d+))?(\+)?(?:l(\d+))?$")
SPEC_HELP = "a prompt-position spec f<n>, l<n> or f<n>+l<n> with n ≥ 1, e.g. 'f3+l3'"


@dataclass(frozen=True)
class PositionSpec:
    first: int
    last: int

    @classmethod
    def parse(cls, spec: str, key: str = "method.positions") -> "PositionSpec":
        m = _SPEC.match(str(spec).strip())
        if not m or not (m.group(1) or m.group(3)) or (bool(m.group(2)) != bool(m.group(1) and m.group(3))):
            raise config_error(key, spec, SPEC_HELP)
        first, last = int(m.group(1) or 0), int(m.group(3) or 0)
        if (m.group(1) and first < 1) or (m.group(3) and last < 1):
            raise config_error(key, spec, SPEC_HELP)
        return cls(first, last)

    @property
    def width(self) -> int:
        return self.first + self.last

    def groups(self, tied: bool) -> dict[str, slice]:
        """Column ranges of the index tensor that each intervention owns.

        Tied: one intervention per layer for every position ("all"). Untied: one per group.
        """
        if tied or not (self.first and self.last):
            return {"all": slice(0, self.width)}
        return {"first": slice(0, self.first), "last": slice(self.first, self.width)}

    def __str__(self) -> str:
        return "+".join(p for p in (f"f{self.first}" if self.first else "", f"l{self.last}" if self.last else "") if p)


@dataclass
class Positions:
    """Index [B, P] into the sequence axis and validity mask [B, P] for one batch."""

    index: torch.Tensor
    valid: torch.Tensor

    @cached_property
    def coords(self) -> torch.Tensor:
        """[2, B·P]: (batch, position) of each index entry, row-major; what the eager edit's backward
        addresses its rows by. Built on first use and kept with the batch's positions, so every
        edited layer shares it."""
        return row_coords(self.index)


def row_coords(index: torch.Tensor) -> torch.Tensor:
    """[2, B·P] (batch, position) of each entry of an index [B, P] into the sequence axis."""
    batch_ids = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    return torch.stack((batch_ids, index.reshape(-1)))


def prompt_positions(
    spec: PositionSpec, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None = None
) -> Positions:
    mask = attention_mask.to(torch.long)
    device = mask.device
    n_attended = mask.sum(1)
    start = (mask.cumsum(1) == 0).sum(1)  # leading padding
    length = n_attended if prompt_lengths is None else torch.minimum(prompt_lengths.to(device), n_attended)
    length = length[:, None]

    j = torch.arange(spec.first, device=device)[None]
    first_valid = j < length
    k = torch.arange(spec.last, device=device)[None]
    offset_last = length - spec.last + k
    last_valid = offset_last >= torch.clamp(length, max=spec.first)

    offset = torch.cat([j.expand(len(mask), -1), offset_last], 1)
    valid = torch.cat([first_valid, last_valid], 1)
    index = torch.where(valid, start[:, None] + offset, torch.zeros_like(offset))
    return Positions(index=index, valid=valid)
