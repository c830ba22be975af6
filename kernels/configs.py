"""Launch configurations: small named selectors, one reason per choice (no autotune lists)."""
from __future__ import annotations

import os
from dataclasses import dataclass

# Shapes the kernels are written and verified for. C and hidden are tl.dot dimensions
# (powers of two, >= 16 for bf16 operands on tensor cores); F is unrolled in the kernels.
SUPPORTED_CHANNELS = (16, 32)
SUPPORTED_HIDDEN = (32, 64, 128, 256)
SUPPORTED_FILTERS = (3, 4)
PRECISION_CODES = {"ieee": 0, "tf32": 1, "bf16": 2}


@dataclass(frozen=True)
class StepConfig:
    block_m: int      # cells per tile (rows of every tl.dot)
    num_warps: int
    num_stages: int
    int64: bool       # 64-bit cell offsets
    programs: int     # backward: persistent programs (= weight-gradient partial sums)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def needs_int64(n_cells: int, channels: int, hidden: int, num_filters: int) -> bool:
    """64-bit offsets once any flat index can reach 2**31: the state (cells*C) or the backward's
    perception-gradient buffer (cells*F*C), whichever is larger."""
    return n_cells * channels * max(num_filters, 1) >= 2**31 or n_cells >= 2**31


def _sm_count(device) -> int:
    import torch

    if device is not None and getattr(device, "type", None) == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def select_forward(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None) -> StepConfig:
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        # The interpreter pays per program, not per cell: few, large tiles.
        block = min(8192, max(16, _next_pow2(n_cells)))
        return StepConfig(block, 4, 1, int64, 1)
    # 128 cells x hidden 128 fp32 activations = 64 KB of registers at 4 warps: the largest tile
    # that keeps h on-chip; wider hidden layers halve the tile to stay spill-free.
    block = 128 if hidden <= 128 else 64
    warps = 4 if hidden * channels <= 128 * 16 else 8
    return StepConfig(block, warps, 2, int64, 1)


def select_backward(n_cells: int, channels: int, hidden: int, num_filters: int,
                    device=None) -> StepConfig:
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        block = min(4096, max(16, _next_pow2(n_cells)))
        tiles = -(-n_cells // block)
        return StepConfig(block, 4, 1, int64, min(tiles, 2))
    # Weight-gradient accumulators (F*C*hidden + hidden*C floats) live in registers for the
    # whole persistent loop: spread them over enough warps to keep <= ~64 per thread.
    acc = num_filters * channels * hidden + hidden * channels
    warps = 4
    while warps < 16 and acc / (warps * 32) > 64:
        warps *= 2
    block = 64
    tiles = -(-n_cells // block)
    return StepConfig(block, warps, 1, int64, max(1, min(tiles, 2 * _sm_count(device))))


def select_transpose(n_cells: int, channels: int, num_filters: int) -> StepConfig:
    int64 = needs_int64(n_cells, channels, 0, num_filters)
    if interpreting():
        return StepConfig(min(8192, max(16, _next_pow2(n_cells))), 4, 1, int64, 1)
    # Pure gather-stencil: memory bound, 128 cells x C per program is plenty of loads in flight.
    return StepConfig(128, 4, 2, int64, 1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
