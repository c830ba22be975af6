"""Memory estimated before allocating: refuse what cannot fit, with the flags that ask for it.

``grow`` and ``train`` take sizes from flags (grid, scale, hidden units, pool size, batch) and
from files; a size that cannot fit used to end in the allocator's traceback or in the kernel's
OOM killer, after minutes. Each command lists what it will hold (``Term``: the flags that set
it, what it is, its bytes and where it lives) and ``check`` compares the sums with the memory of
the machine (host) and, on CUDA, the device's free memory.

The estimates count the large buffers (states, saved activations, the pool, rendered frames)
that a run surely allocates, not every temporary, and nothing whose size depends on how many
cells are alive: they are lower bounds of the peak, so a run they refuse cannot fit, while a
run they accept may still be too large.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

HOST = "host"
DEVICE = "device"


class MemoryLimitError(ValueError):
    """A run whose estimated memory exceeds what the machine (or the device) has."""


@dataclass(frozen=True)
class Term:
    """``nbytes`` of ``what``, set by ``flags`` (e.g. "--pool-size 1024"), held on ``where``
    (HOST or DEVICE)."""

    flags: str
    what: str
    nbytes: int
    where: str = HOST


def format_seconds(s: float) -> str:
    """A duration in readable units: "40 s", "7.4 minutes", "2.5 hours"."""
    if s < 90:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.2g} minutes" if s < 600 else f"{s / 60:.0f} minutes"
    return f"{s / 3600:.2g} hours"


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def host_memory_bytes() -> Optional[int]:
    """Physical memory of this machine, or the cgroup's limit when it is lower (containers);
    None where neither can be read."""
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory of a CUDA device; None for other devices (their memory is the host's)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def check(terms: Iterable[Term], device: torch.device, action: str) -> None:
    """Raise MemoryLimitError when the terms of a memory (host, or a CUDA device) add up to more
    than it has; the message names the largest term's flags and the estimate."""
    terms = list(terms)
    on_device = device.type == "cuda"
    pools = [(HOST, host_memory_bytes(), "this machine's memory")]
    if on_device:
        pools.append((DEVICE, device_memory_bytes(device), f"the free memory of {device}"))
    for where, limit, name in pools:
        mine = [t for t in terms if (t.where == DEVICE and on_device) == (where == DEVICE)]
        total = sum(t.nbytes for t in mine)
        if limit is None or total <= limit or not mine:
            continue
        worst = max(mine, key=lambda t: t.nbytes)
        raise MemoryLimitError(
            f"{worst.flags}: {action} needs about {format_bytes(total)}, more than "
            f"{name} ({format_bytes(limit)}); the largest part is {worst.what} (about "
            f"{format_bytes(worst.nbytes)})")


def rollout_bytes(backend: str, cells: int, channels: int, hidden: int, num_filters: int,
                  steps: int, segment: Optional[int], alive: bool, grad: bool,
                  element_size: int = 4) -> int:
    """The large buffers of one rollout of ``steps`` over ``cells`` cells (all images).

    triton: ``nca_fast.functional.rollout_bytes``, what the custom op keeps for its backward
    and the backward's scratch. torch: only what it surely allocates, the padded state and a
    band buffer, the update masks of every step (one byte per cell-step) and the states at
    segment starts; the records of the cells that update (bands and hidden activations) depend
    on how many cells are alive and are not counted.
    """
    if steps <= 0:
        return cells * channels * element_size
    if backend == "triton":
        from .functional import rollout_bytes as triton_bytes
        seg = steps if not grad else (segment or 1)
        return triton_bytes((1, channels, cells, 1), steps, seg, num_filters, alive,
                            element_size, grad)
    state = cells * channels * element_size
    total = 2 * state + (cells * steps if grad else 0)
    if grad and segment is not None:
        total += math.ceil(steps / min(segment, steps)) * state
    return total


__all__ = ["Term", "MemoryLimitError", "check", "host_memory_bytes", "device_memory_bytes",
           "rollout_bytes", "format_bytes", "HOST", "DEVICE"]
