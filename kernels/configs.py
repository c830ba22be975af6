"""Launch configurations: small named selectors, one reason per choice (no autotune lists).

Register budgets below come from the ahead-of-time compile report (bench/compile_report.py,
ptxas for sm_90a and sm_80): every configuration selected here must compile without spills.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# Shapes the kernels are written and verified for. C and hidden are tl.dot dimensions
# (powers of two, >= 16 for bf16 operands on tensor cores); F is unrolled in the kernels.
SUPPORTED_CHANNELS = (16, 32)
SUPPORTED_HIDDEN = (32, 64, 128, 256)
SUPPORTED_FILTERS = (3, 4)
PRECISION_CODES = {"ieee": 0, "tf32": 1, "bf16": 2}
# Cells of one grid (H*W): the kernels index inside a grid in int32 (only the flat index over the
# batch is 64-bit), and a tile may start up to 8,192 cells (the largest, interpreted tile) before
# a grid's end. A grid this large would hold 128 GiB of state at C = 16.
MAX_GRID_CELLS = 2**31 - 8192


@dataclass(frozen=True)
class StepConfig:
    block_m: int      # cells per tile (rows of every tl.dot)
    num_warps: int
    num_stages: int
    int64: bool       # 64-bit cell offsets
    programs: int     # backward weight kernel: persistent programs (= partial sums per chunk)
    hidden_chunk: int  # hidden units per chunk of the dense layers
    unroll_taps: bool = True  # bwd_input: the 9 taps unrolled, or in a loop
    maxnreg: Optional[int] = None  # register ceiling for ptxas (None: ptxas picks)


def n_tiles(batch: int, grid_cells: int, block_m: int) -> int:
    """Programs of a tiled kernel: tiles never straddle two grids (``_math._cells``)."""
    return batch * (-(-grid_cells // block_m))


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


def hidden_chunk(channels: int, hidden: int, num_filters: int) -> int:
    """64 hidden units at a time keeps [BLOCK_M, 64] activations and F [C, 64] weight slices
    live; the widest inputs (F*C = 128) take 32 so the backward's accumulators fit too."""
    return min(hidden, 64 if channels * num_filters <= 64 else 32)


def _tile(channels, num_filters, precision):
    """(BLOCK_M, num_warps) of the dense kernels.

    64 cells: one warpgroup's wgmma M on sm_90a (32-row tiles fall back to mma.sync there).
    Wide inputs (F*C = 96 or 128) keep F perception tiles [64, C] live: 8 warps spread them.
    "ieee" dots run on CUDA cores as FMA chains holding whole operand tiles: 32 cells.
    """
    warps = 4 if channels * num_filters <= 64 else 8
    return (32 if precision == "ieee" else 64), warps


def _maxnreg(precision):
    """The ptxas register ceiling of the dense kernels.

    "ieee" (FMA dots): uncapped (255). Left to itself, ptxas holds these kernels to 80
    registers at 8 warps or 128 at 4 (an occupancy target) and spills 4-20 B (11 of the 96
    circular, 64-bit, mid-rollout variants); uncapped, all spill-free. Tensor-core precisions:
    ptxas's own choice, except where a ``select_*`` rule below uncaps a class it was measured to
    spill in (bench/NOTES.md, section 6). Uncapping them all made ptxas fill all 255 registers
    and spill where it had fitted (bwd_gp sm_80 C = 32 hidden 32 F = 4 bf16: 222 registers,
    none spilled -> 24 B).
    """
    return 255 if precision == "ieee" else None


def select_forward(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32") -> StepConfig:
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    hc = hidden_chunk(channels, hidden, num_filters)
    if precision == "ieee":
        # [32, 64] FMA chunks still spilled 4 B uncapped (sm_80, C = 16, hidden 128)
        hc = min(hc, 32)
    if interpreting():
        # The interpreter pays per program, not per cell: few, large tiles.
        block = min(8192, max(16, _next_pow2(n_cells)))
        return StepConfig(block, 4, 1, int64, 1, hc)
    # (at 128 cells the default variant spilled 164-260 B at 255 registers)
    block, warps = _tile(channels, num_filters, precision)
    maxnreg = _maxnreg(precision)
    if precision == "ieee" and warps == 8:
        # FMA dots over the widest inputs: [32, 32] chunks took 254 registers and spilled 8 B
        # (sm_90a, C = 32, hidden 32, F = 4, alive masking, 64-bit); [32, 16]: 109-156, none.
        hc = min(hc, 16)
    if warps == 8 and hidden > hc:
        # wide inputs with a chunk loop: left to itself ptxas holds the kernel to 128 registers
        # (2 blocks of 8 warps) and spills 4-12 B outside the loop (sm_80, C = 32, hidden 256,
        # alive masking, circular); uncapped it takes 169-215. With a single chunk (hidden 32)
        # uncapping made it fill all 255 and spill 8-16 B (bf16, F = 4, 64-bit), so not there.
        maxnreg = 255
    if precision != "ieee" and channels * num_filters == 64 and hidden > hc:
        # C = 16, F = 4 with a chunk loop: ptxas held sm_80 tf32 hidden 128 (alive, circular,
        # 64-bit) to 168 registers and spilled 12 B; uncapped, 127-255 and none spilled.
        maxnreg = 255
    if precision == "tf32" and warps == 4:
        # ptxas held sm_80 C = 16 F = 3 to 80 registers (hidden 64, 64-bit) or 168 (hidden 128,
        # the defaults with circular padding and 64-bit offsets) and spilled 4-8 B; uncapped,
        # every tf32 4-warp variant (C = 16, F = 3 and 4, any hidden) takes 123-255, none spilled.
        maxnreg = 255
    return StepConfig(block, warps, 2, int64, 1, hc, maxnreg=maxnreg)


def select_backward(n_cells: int, channels: int, hidden: int, num_filters: int,
                    device=None, precision: str = "tf32") -> StepConfig:
    """The perception-gradient kernel (grid: tiles)."""
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    # 32-unit chunks: gh and F gp dots per chunk; at 64 it spilled 4 B at 255 registers on sm_80
    # (C = 16, hidden 256, F = 3, tf32, circular + 64-bit), at 32 it takes 182 (127 on sm_90a).
    hc = min(hidden, 32)
    if interpreting():
        return StepConfig(min(4096, max(16, _next_pow2(n_cells))), 4, 1, int64, 1, hc)
    block, warps = _tile(channels, num_filters, precision)
    maxnreg = _maxnreg(precision)
    if warps == 8 and hidden == hc:
        # wide inputs, a single chunk: ptxas unrolls it whole (sm_80, C = 32, hidden 32, F = 4,
        # bf16: 255 registers, 24-32 B spilled). Two 16-unit chunks, uncapped: 127-255
        # registers, none spilled (capped by ptxas itself at 128, F = 3 bf16 spilled 8 B).
        hc, maxnreg = 16, 255
    elif precision == "bf16" and channels * num_filters == 64 and hidden <= 64:
        # ptxas held sm_80 C = 16 F = 4 bf16 to 128 registers and spilled 4-8 B (hidden 32, 64);
        # uncapped, none spilled (hidden 64: 194-202 registers on sm_80, 139-159 on sm_90a).
        maxnreg = 255
    elif precision == "tf32" and hidden == hc:
        # one 32-unit chunk: ptxas held sm_80 C = 16 F = 3 (alive, circular, 64-bit) to 96
        # registers and spilled 4 B; uncapped, 128-168 and none spilled (C = 16, F = 3 and 4).
        maxnreg = 255
    return StepConfig(block, warps, 1, int64, 1, hc, maxnreg=maxnreg)


def select_weights(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32") -> StepConfig:
    """The weight-gradient kernel (grid: programs x hidden chunks), each program accumulating
    its chunk's F*C*HC + HC*C gradients in registers across its tiles."""
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    # wide inputs: 16-unit chunks (C = 32, F = 4, tf32, sm_90a, circular + 64-bit: 32 spills
    # 24 B at 255 registers; 16 fits; 8 lost wgmma when measured before, bench/NOTES.md)
    hc = min(hidden, 16) if channels * num_filters > 64 else hidden_chunk(channels, hidden,
                                                                          num_filters)
    chunks = hidden // hc
    if interpreting():
        block = min(4096, max(16, _next_pow2(n_cells)))
        tiles = -(-n_cells // block)
        return StepConfig(block, 4, 1, int64, min(tiles, 2), hc)
    block, _ = _tile(channels, num_filters, precision)
    tiles = -(-n_cells // block)
    # 8 warps: the accumulators on top of the recomputed forward spilled 72 B at 4 warps.
    # ~4 resident programs per SM over all chunks: enough to fill the GPU, few enough that the
    # [programs, ...] partial sums stay small (a few MB).
    programs = max(1, min(tiles, 4 * _sm_count(device) // chunks))
    return StepConfig(block, 8, 1, int64, programs, hc, maxnreg=_maxnreg(precision))


def select_transpose(n_cells: int, channels: int, num_filters: int) -> StepConfig:
    int64 = needs_int64(n_cells, channels, 0, num_filters)
    # Wide rows (F*C > 64) walk the taps in a loop: unrolled, their 36 gp loads and 36 filter
    # weights were scheduled together and spilled at 255 registers (C = 32, F = 4, circular,
    # 64-bit: 4 B on sm_80 at 8 warps, 20 B on sm_90a at 4 warps); in a loop 123-143 registers.
    # Narrow rows keep the unrolled taps (constexpr offsets: fewer instructions, 94 registers).
    unroll = channels * num_filters <= 64
    if interpreting():
        return StepConfig(min(8192, max(16, _next_pow2(n_cells))), 4, 1, int64, 1, 0, unroll)
    # Pure gather-stencil, memory bound: 128 cells x C per program keeps loads in flight; the
    # widest rows (C = 32, F = 4) take 8 warps (132 B of spills at 4 warps on sm_80).
    warps = 8 if channels * num_filters > 64 else 4
    # ptxas caps the rolled variant at 64-80 registers on its own (occupancy) and spills 4-16 B
    # (sm_80 C = 32 F = 3, 4 with Q; sm_90a F = 4 Q+i64); uncapped it takes 96-127, no spills.
    # The unrolled one must not be uncapped: it then fills 255 registers and spills 4-32 B.
    return StepConfig(128, warps, 2, int64, 1, 0, unroll, None if unroll else 255)


def select_keep(n_cells: int, channels: int) -> StepConfig:
    """The backward's deferred-mask kernel: a 3x3 alpha gather per cell, no dense layer."""
    int64 = needs_int64(n_cells, channels, 0, 1)
    if interpreting():
        return StepConfig(min(8192, max(16, _next_pow2(n_cells))), 4, 1, int64, 1, 0)
    return StepConfig(128, 4, 1, int64, 1, 0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
