"""Frozen-prefix activation cache for ReFT training.

With a frozen base, the hidden state entering the lowest intervened layer depends only on the
model and the input tokens. After an example's first pass, its [T, d] hidden state there is kept
(memory-bounded, optional spill to disk); a batch whose examples are all cached skips the decoder
layers below that layer: each of them returns the cached state. Embeddings, masks and rotary
tables are still computed (cheap), so the trick needs no per-architecture code.

Identity of the cache: base fingerprint + layer + dtype, checked by ``bind``; entries are keyed by
the example's token ids, so new data misses. Numerics: a cached state was computed inside another
batch (other left padding), so losses match the uncached path to float rounding, not bit for bit.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reft_lab.models.layers import decoder_layers


class PrefixCache:
    def __init__(self, max_bytes: int, dtype: torch.dtype | None = None, spill_dir: Path | None = None):
        self.max_bytes, self.dtype, self.spill_dir = max_bytes, dtype, spill_dir
        self.identity: str | None = None
        self.memory: dict[str, torch.Tensor] = {}
        self.on_disk: set[str] = set()
        self.bytes = 0
        self.hits = self.misses = 0

    def bind(self, model: torch.nn.Module, layer: int, fingerprint: str) -> None:
        """Use the cache for (model, layer); entries of another model or layer are dropped."""
        identity = f"{fingerprint}:{layer}:{self.dtype}"
        if identity != self.identity:
            self.clear()
            self.identity = identity
        self.blocks = decoder_layers(model)[:layer]
        self.model_dtype = next(model.parameters()).dtype  # cached states are handed on in this dtype

    def clear(self) -> None:
        self.memory.clear()
        for key in self.on_disk:
            (self.spill_dir / f"{key}.safetensors").unlink(missing_ok=True)
        self.on_disk.clear()
        self.bytes = 0

    @staticmethod
    def key(token_ids: list[int]) -> str:
        return hashlib.sha256(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]

    def _get(self, key: str, device) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if key in self.on_disk:
            return load_file(self.spill_dir / f"{key}.safetensors", device=str(device))["h"]
        return None

    def _put(self, key: str, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to(self.dtype or hidden.dtype).contiguous()
        size = hidden.numel() * hidden.element_size()
        if self.bytes + size <= self.max_bytes:
            self.memory[key] = hidden
            self.bytes += size
        elif self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            save_file({"h": hidden.cpu()}, self.spill_dir / f"{key}.safetensors")
            self.on_disk.add(key)

    def around_batch(self, batch, device):
        """``around`` for a TrainBatch: its examples' tokens are the keys."""
        keys = [self.key(e.prompt + e.response) for e in batch.examples]
        lengths = [len(e.prompt) + len(e.response) for e in batch.examples]
        return self.around(keys, lengths, batch.input_ids.shape[1], device)

    @contextmanager
    def around(self, keys: list[str], lengths: list[int], width: int, device):
        """Wrap one forward pass of a left-padded batch (row b holds ``lengths[b]`` tokens)."""
        if not self.blocks:
            yield
            return
        cached = [self._get(k, device) for k in keys]
        if all(c is not None for c in cached):
            self.hits += 1
            hidden = torch.zeros(len(keys), width, cached[0].shape[-1], dtype=self.model_dtype, device=device)
            for row, (h, n) in enumerate(zip(cached, lengths)):
                hidden[row, width - n:] = h.to(self.model_dtype)
            originals = [block.forward for block in self.blocks]
            for block in self.blocks:  # every skipped layer hands on the cached state
                block.forward = lambda *args, **kwargs: hidden
            try:
                yield
            finally:
                for block, forward in zip(self.blocks, originals):
                    block.forward = forward
            return
        self.misses += 1
        captured = {}
        handle = self.blocks[-1].register_forward_hook(lambda m, a, out: captured.update(h=out))
        try:
            yield
        finally:
            handle.remove()
        out = captured.get("h")
        if isinstance(out, torch.Tensor):  # layers that return tuples are not cached
            for row, (key, n) in enumerate(zip(keys, lengths)):
                if key not in self.memory and key not in self.on_disk:
                    self._put(key, out[row, width - n:])
