"""One job on several devices (torchrun / accelerate launch start one process per device).

Gradients of the trainable state are averaged across processes (DDP); each process reads its own
slice of every global batch; rank 0 alone evaluates, logs, writes checkpoints, saves the adapter
and writes metrics.json. Single-process runs are untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reft_lab.errors import ReftLabError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device | None:
        """The device this process trains on, when it is one of several CUDA processes."""
        return torch.device("cuda", self.local_rank) if self.world > 1 and torch.cuda.is_available() else None


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        raise ReftLabError(f"process {local_rank} of {local_processes()} on this node has no GPU: {torch.cuda.device_count()} "
                           "visible; start at most one process per GPU (torchrun --nproc_per_node), or hide them "
                           "(CUDA_VISIBLE_DEVICES=) to train on the CPU")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank, world, local_rank)


def barrier(info: Dist) -> None:
    if info.world > 1:
        dist.barrier()


def wrap(tuned: torch.nn.Module, info: Dist) -> torch.nn.Module:
    """DDP around the tuned model: averages the gradients of what trains (the frozen base is skipped)."""
    if info.world <= 1:
        return tuned
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(tuned, device_ids=ids)


def mean_and_sum(value: float, count: int, device: torch.device) -> tuple[float, int]:
    """Mean of ``value`` and sum of ``count`` over all processes (for logging)."""
    buffer = torch.tensor([value, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    return float(buffer[0]) / dist.get_world_size(), int(buffer[1])


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
