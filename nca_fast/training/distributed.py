"""Multi-process training: the process group torchrun describes, and the collectives a step uses.

Every rank draws the same random choices from the same generator; ranks differ only in the
shards of the batch and of the pool they own (``nca_fast.training.trainer``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..devices import resolve_device


@dataclass
class Dist:
    """This process's place in the process group (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor of equal length from every rank, in rank order."""
        if not self.enabled:
            return t
        import torch.distributed as dist
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (one all-reduce)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    info = Dist(rank=rank, world=world, local_rank=local)
    device = resolve_device(device_name, index=local)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        info.owns_group = True
    return info
