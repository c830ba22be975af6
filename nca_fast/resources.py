"""Memory estimated before allocating: refuse what cannot fit, with the flags that ask for it.

``grow`` and ``train`` take sizes from flags (grid, scale, hidden units, pool size, batch) and
from files; a size that cannot fit would otherwise end in the allocator's traceback or in the
kernel's OOM killer, after minutes. Each command lists what it will hold (``Term``: the flags
that set it, what it is, its bytes and where it lives) and ``check`` compares the sums with the
memory of the machine (host) and, on CUDA, the device's free memory.

The estimates count the large buffers (states, saved activations, the pool, rendered frames)
that a run surely allocates, not every temporary, and nothing whose size depends on how many
cells are alive: they are lower bounds of the peak, so a run they refuse cannot fit, while a
run they accept may still be too large.

The fused kernels' custom op (``nca_fast.functional.rollout``) checks each rollout itself
before launching: ``check_fits`` with ``triton_rollout_bytes``, its exact peak.
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


def triton_rollout_bytes(shape, steps: int, segment: int, num_filters: int, alive: bool,
                         element_size: int = 4, grad: bool = True) -> int:
    """Device bytes a rollout of the fused kernels' op on a B x C x H x W state allocates at its
    peak: the states kept for backward (with their cell words, or hq planes at segment
    boundaries), two working states and hq planes, the output and mask bytes, and, with
    ``grad``, the backward's scratch: two perception-gradient buffers (F*C per cell, each grid
    with a border of one cell), two
    incoming gradients, the outgoing one and a recomputed segment. ``segment``: steps per
    checkpoint segment (1: every step's input kept)."""
    b, c, h, w = shape
    cells = b * h * w
    state = cells * c * element_size
    plane = b * (h + 4) * (w + 4) if alive else 0
    saved = (steps - 1) // segment
    words = 2 * cells * steps if segment == 1 else 0
    recompute = min(segment, steps) * (state + 2 * cells) if segment > 1 else 0
    forward = saved * (state + (plane if segment > 1 else 0)) + words + 3 * (state + plane)
    if not grad:
        return forward
    gp = b * (h + 2) * (w + 2) * num_filters * c * element_size
    backward = 2 * gp + 3 * state + recompute
    return forward + backward


def check_fits(x: torch.Tensor, steps: int, segment: int, num_filters: int, alive: bool,
               grad: bool = True) -> None:
    """Fail before the fused kernels launch anything when their rollout cannot fit the CUDA
    device's free memory (its backward's too when ``grad``: a gradient will be asked for).
    Raises ``torch.cuda.OutOfMemoryError``; does nothing off CUDA (the host allocator reports
    its own errors)."""
    free = device_memory_bytes(x.device)
    if free is None:
        return
    need = triton_rollout_bytes(tuple(x.shape), steps, segment, num_filters, alive,
                                x.element_size(), grad)
    if need > free:
        gib = 2.0 ** 30
        raise torch.cuda.OutOfMemoryError(
            f"x: a rollout of {steps} steps on a {'x'.join(map(str, x.shape))} state needs about "
            f"{need / gib:.1f} GiB on {x.device}, but {free / gib:.1f} GiB are free; use "
            f"checkpoint='sqrt' (or a longer segment), fewer steps or a smaller grid")


def rollout_bytes(backend: str, cells: int, channels: int, hidden: int, num_filters: int,
                  steps: int, segment: Optional[int], alive: bool, grad: bool,
                  element_size: int = 4) -> int:
    """The large buffers of one rollout of ``steps`` over ``cells`` cells (all images).

    triton: ``triton_rollout_bytes``, what the custom op keeps for its backward and the
    backward's scratch. torch: only what it surely allocates, the padded state and a band
    buffer, the update masks of every step (one byte per cell-step) and the states at segment
    starts; the records of the cells that update (bands and hidden activations) depend on how
    many cells are alive and are not counted.
    """
    if steps <= 0:
        return cells * channels * element_size
    if backend == "triton":
        seg = steps if not grad else (segment or 1)
        return triton_rollout_bytes((1, channels, cells, 1), steps, seg, num_filters, alive,
                                    element_size, grad)
    state = cells * channels * element_size
    total = 2 * state + (cells * steps if grad else 0)
    if grad and segment is not None:
        total += math.ceil(steps / min(segment, steps)) * state
    return total


__all__ = ["Term", "MemoryLimitError", "check", "host_memory_bytes", "device_memory_bytes",
           "rollout_bytes", "triton_rollout_bytes", "check_fits", "format_bytes",
           "format_seconds", "HOST", "DEVICE"]
