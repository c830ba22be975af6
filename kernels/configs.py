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
    tile_h: int = 0   # 2-D tiles: rows x columns of cells (block_m = tile_h * tile_w)
    tile_w: int = 0
    resident: bool = True   # weights loaded once per program (else once per tile)


# The filter banks the kernels hold as constants (``_tile._bank``: the Sobel pair's zero taps
# skipped, their 1/8 and the Laplacian's 1/16 folded into W1), as 3x3 taps; code 3 compiles as
# code 2 with W1's Laplacian rows scaled. nca_fast.config.FILTER_BANKS names the same banks
# (tests/test_kernels.py checks they agree).
_IDENTITY = (0, 0, 0, 0, 1, 0, 0, 0, 0)
_SOBEL_X = (-0.125, 0, 0.125, -0.25, 0, 0.25, -0.125, 0, 0.125)
_SOBEL_Y = (-0.125, -0.25, -0.125, 0, 0, 0, 0.125, 0.25, 0.125)
_LAPLACIAN = (1, 2, 1, 2, -12, 2, 1, 2, 1)
NAMED_BANKS = {
    1: (_IDENTITY, _SOBEL_X, _SOBEL_Y),
    2: (_IDENTITY, _SOBEL_X, _SOBEL_Y, _LAPLACIAN),
    3: (_IDENTITY, _SOBEL_X, _SOBEL_Y, tuple(v / 16 for v in _LAPLACIAN)),
}


def bank_code(filters) -> int:
    """The code of the named bank ``filters`` ([F, 3, 3] or [F, 9]) is, exactly, or 0 (taps
    read from memory: any other bank). Reads the taps on the host (a copy for a GPU tensor)."""
    import torch

    taps = filters.detach().to("cpu", torch.float64).reshape(filters.shape[0], 9)
    for code, bank in NAMED_BANKS.items():
        if torch.equal(torch.tensor(bank, dtype=torch.float64), taps):
            return code
    return 0


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
    """SMs of a CUDA device; 132 (an H200) otherwise, for launches recorded or compiled on a
    machine without one."""
    import torch

    if device is not None and getattr(device, "type", None) == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


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
                   device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        # The interpreter pays per program, not per cell: few, large tiles.
        return StepConfig(64 * 64, 4, 1, int64, 4, hidden, tile_h=64, tile_w=64)
    th, tw = 8, 16
    hc = min(hidden, 64)
    programs = 2 * _sm_count(device)
    return StepConfig(th * tw, 4, 1, int64, programs, hc, tile_h=th, tile_w=tw)


def select_backward(n_cells: int, channels: int, hidden: int, num_filters: int,
                    device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The perception-gradient kernel: persistent 2-D tiles, hidden in chunks."""
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        return StepConfig(64 * 64, 4, 1, int64, 4, hidden, tile_h=64, tile_w=64)
    th, tw = 4, 16
    hc = min(hidden, 64)
    programs = 2 * _sm_count(device)
    return StepConfig(th * tw, 4, 1, int64, programs, hc, tile_h=th, tile_w=tw)


def select_weights(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32") -> StepConfig:
    """The weight-gradient kernel: persistent 2-D tiles, hidden units as the MMA rows."""
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        return StepConfig(64 * 64, 4, 1, int64, 4, hidden, tile_h=64, tile_w=64)
    th, tw = 4, 16
    # hidden_chunk = HR, the hidden units (MMA rows) of one program: 128 at most. 8 warps: the
    # two warpgroups take half of them each; ~170 registers a thread, so one program per SM.
    hr = min(hidden, 128)
    programs = max(1, _sm_count(device) // (hidden // hr))
    return StepConfig(th * tw, 8 if hr >= 128 else 4, 1, int64, programs, hr, tile_h=th,
                      tile_w=tw)


def select_transpose(n_cells: int, channels: int, num_filters: int, device=None,
                     bank: int = 0) -> StepConfig:
    """The transposed-stencil kernel: a gather of neighbours' perception gradients."""
    int64 = needs_int64(n_cells, channels, 0, num_filters)
    if interpreting():
        return StepConfig(64 * 64, 4, 1, int64, 4, 0, tile_h=64, tile_w=64)
    th, tw = 8, 16
    programs = 4 * _sm_count(device)
    return StepConfig(th * tw, 4, 1, int64, programs, 0, tile_h=th, tile_w=tw)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
