"""The order training examples are seen in: seeded, resumable, shardable across processes."""

from __future__ import annotations

from typing import Iterator

import torch

from reft_lab.data.batching import EncodedExample, TrainBatch, collate_train


class BatchStream:
    """Endless batches. Epoch e is the permutation drawn from seed (seed, e), so the position
    (epoch, offset) is all a checkpoint needs to continue the same order."""

    def __init__(self, data: list[EncodedExample], batch_size: int, pad_id: int, seed: int, epoch: int = 0,
                 offset: int = 0, rank: int = 0, world: int = 1, group_by_length: bool = False, length_multiple: int = 1):
        self.data, self.batch_size, self.pad_id, self.seed = data, batch_size, pad_id, seed
        self.length_multiple = length_multiple  # batch lengths padded up to a multiple of it
        self.group_by_length = group_by_length
        self.epoch, self.offset, self._order = epoch, offset, None
        self.rank, self.world = rank, world  # each process takes its slice of every global batch

    def order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.data), generator=generator).tolist()
            if self.group_by_length:  # sort within windows of 50 global batches: less padding, still shuffled
                window = 50 * self.batch_size * self.world
                length = lambda i: len(self.data[i].prompt) + len(self.data[i].response)  # noqa: E731
                order = [i for w in range(0, len(order), window) for i in sorted(order[w: w + window], key=length, reverse=True)]
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        if self.offset + self.world > len(self.data):  # every process needs at least one example
            self.epoch, self.offset = self.epoch + 1, 0
        chunk = self.order()[self.offset: self.offset + self.batch_size * self.world]
        self.offset += len(chunk)
        return collate_train([self.data[j] for j in chunk[self.rank:: self.world]], self.pad_id, self.length_multiple)
