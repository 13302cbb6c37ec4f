"""Frozen-prefix activation cache for ReFT training.

With a frozen base, the hidden state entering the lowest intervened layer depends only on the
model and the input tokens. After an example's first pass, its [T, d] hidden state there is kept
(memory-bounded, optional spill to disk); a batch whose examples are all cached skips the decoder
layers below that layer: each of them returns the cached state. Embeddings, masks and rotary
tables are still computed (cheap), so the trick needs no per-architecture code. Entries live on
the device the model runs on: on a GPU a hit assembles the batch's state there and a miss keeps
its rows with a device-to-device copy, so neither waits on a host transfer (host-resident entries,
a synchronous copy per batch, made GPU training slower than no cache). On a GPU the bound is also
capped at a quarter of the device memory free when the cache is bound; past it, entries spill to
disk when a spill directory is set, else the example simply misses later.

Identity of the cache: base fingerprint + layer + dtype, checked by ``bind``; entries are keyed by
the example's token ids, so new data misses. Numerics: a cached state was computed inside another
batch (other left padding), so losses match the uncached path to float rounding, not bit for bit.
A prefix with active dropout is not deterministic, so it is never cached (``stochastic_prefix``).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reft_lab.models.layers import decoder_layers, swapped_forwards


def stochastic_prefix(model: torch.nn.Module, layer: int) -> str | None:
    """The first dropout (p > 0) that feeds the hidden state entering decoder block ``layer`` in
    training mode, as "<module>: p=<p>", or None when that state depends only on the weights and the
    tokens. Caching a stochastic state would replay the first epoch's dropout masks in every later
    epoch. Conservative: every module outside blocks ``layer`` onwards counts, so a dropout after the
    last block (none in the supported architectures) would also turn the cache off."""
    blocks = decoder_layers(model)
    above = {id(m) for block in blocks[layer:] for m in block.modules()}
    for name, module in model.named_modules():
        if id(module) in above:
            continue
        p = module.p if isinstance(module, torch.nn.Dropout) else getattr(module, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            return f"{name}: p={p}"
    return None


class PrefixCache:
    def __init__(self, max_bytes: int, dtype: torch.dtype | None = None, spill_dir: Path | None = None):
        self.max_bytes, self.dtype, self.spill_dir = max_bytes, dtype, spill_dir
        self.bound = max_bytes  # max_bytes, capped by bind on a GPU
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
        param = next(model.parameters())
        self.model_dtype, self.device = param.dtype, param.device  # cached states are handed on in this dtype, kept here
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.bound = min(self.max_bytes, free // 4)

    def clear(self) -> None:
        self.memory.clear()
        for key in self.on_disk:
            (self.spill_dir / f"{key}.safetensors").unlink(missing_ok=True)
        self.on_disk.clear()
        self.bytes = 0

    def summary(self) -> str:
        skipped = f"layers 0-{len(self.blocks) - 1}" if len(self.blocks) > 1 else "layer 0"
        spilled = f", {len(self.on_disk)} spilled to disk" if self.on_disk else ""
        where = "in memory" if self.device.type == "cpu" else f"on {self.device}"
        return (f"prefix cache: {self.hits} of {self.hits + self.misses} batches skipped {skipped} "
                f"({len(self.memory)} examples, {self.bytes / 2**20:.1f} MiB {where}{spilled})")

    @staticmethod
    def key(token_ids: list[int]) -> str:
        return hashlib.sha256(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if key in self.on_disk:
            return load_file(self.spill_dir / f"{key}.safetensors", device=str(self.device))["h"]
        return None

    def _put(self, key: str, hidden: torch.Tensor) -> None:
        """``hidden``: one row of the batch's state; cloned, so an entry never keeps the whole
        batch's storage alive behind the byte count."""
        hidden = hidden.clone()
        size = hidden.numel() * hidden.element_size()
        if self.bytes + size <= self.bound:
            self.memory[key] = hidden
            self.bytes += size
        elif self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            save_file({"h": hidden.cpu()}, self.spill_dir / f"{key}.safetensors")
            self.on_disk.add(key)

    def around_batch(self, batch):
        """``around`` for a TrainBatch: its examples' tokens are the keys."""
        keys = [self.key(e.prompt + e.response) for e in batch.examples]
        lengths = [len(e.prompt) + len(e.response) for e in batch.examples]
        return self.around(keys, lengths, batch.input_ids.shape[1])

    @contextmanager
    def around(self, keys: list[str], lengths: list[int], width: int):
        """Wrap one forward pass of a left-padded batch (row b holds ``lengths[b]`` tokens)."""
        if not self.blocks:
            yield
            return
        cached = [self._get(k) for k in keys]
        if all(c is not None for c in cached):
            self.hits += 1
            hidden = torch.zeros(len(keys), width, cached[0].shape[-1], dtype=self.model_dtype, device=self.device)
            for row, (h, n) in enumerate(zip(cached, lengths)):
                hidden[row, width - n:] = h
            with swapped_forwards(self.blocks, lambda block: lambda *args, **kwargs: hidden):
                yield  # every skipped layer hands on the cached state
            return
        self.misses += 1
        captured = {}
        handle = self.blocks[-1].register_forward_hook(lambda m, a, out: captured.update(h=out))
        try:
            yield
        finally:
            handle.remove()
        out = captured.get("h")
        new = list({key: row for row, key in reversed(list(enumerate(keys)))
                    if key not in self.memory and key not in self.on_disk}.values())  # a repeated example once
        if isinstance(out, torch.Tensor) and new:  # layers that return tuples are not cached
            rows = out.detach()[new].to(self.dtype or out.dtype)
            for i, row in enumerate(new):
                self._put(keys[row], rows[i, width - lengths[row]:])
