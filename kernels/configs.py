"""Launch configurations: small named selectors, one reason per choice (no autotune lists).

Every configuration selected here must compile without spills for sm_90a and sm_80 (the
ahead-of-time compile report, bench/compile/); the compile report's figures behind
each rule are in bench/NOTES.md (section 6, and section 8 for the rules as written here).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .spec import (BANK_CHANNELS, BANK_DATA, BANK_SOBEL, BANK_SOBEL_LAPLACIAN,  # noqa: F401
                   DATA_BANKS, NAMED_BANKS, PRECISION_CODES, kernel_bank)

# Shapes the kernels are written and verified for. C and hidden are tl.dot dimensions
# (powers of two, >= 16 for bf16 operands on tensor cores); F is unrolled in the kernels.
SUPPORTED_CHANNELS = (16, 32)
SUPPORTED_HIDDEN = (32, 64, 128, 256)
SUPPORTED_FILTERS = (3, 4)
# float64 states run in the interpreter only (the CPU checks: gradcheck, property tests).
# Compiled, a float64 tl.dot has no form for these shapes: triton stops with "Currently fp64
# don't support largeK MMA" (sm_80, sm_90) after an MLIR dump.
FP64_COMPILED = ("float64 runs only in Triton's interpreter (TRITON_INTERPRET=1, checks on a "
                 "CPU): compiled, the kernels' float64 dots have no tensor-core form; use "
                 "float32, or backend='torch' for float64")
# Cells of one grid (H*W): the kernels index inside a grid in int32 (only the flat index over the
# batch is 64-bit), and a tile may start up to 8,192 cells (the largest, interpreted tile) before
# a grid's end. A grid this large would hold 128 GiB of state at C = 16.
MAX_GRID_CELLS = 2**31 - 8192
# Floating-point fusion (a * b + c as one FMA) in every launch, set rather than left to
# Triton's default, which Triton 3.10 turns off: the kernels' numerics and instruction counts
# are verified with it on (docs/MODEL.md, "Numerics").
FP_FUSION = True
# The compute capability the selectors assume for a launch not on a CUDA device (a recording, a
# compile for another machine): sm_90. bench.compile.capture sets it to each variant's arch.
TARGET_CAPABILITY = (9, 0)


# The kernels' runtime ints, never specialised (``triton.jit(do_not_specialize=...)``): the JIT
# would otherwise make a constant of one equal to 1 and mark multiples of 16, a compile of its
# own for each combination (a 1 x 1 grid, step 0 or 1, sizes of 16 n): tens of seconds each on
# a GPU. All but W: a W known to be a multiple of 16 keeps bwd_gp at C32 hidden 256 Laplacian
# tf32 spill-free on sm_90a, so W compiles once for multiples of 16 and once for other widths.
# Names a kernel lacks are ignored.
RUNTIME_INTS = ("seed", "step", "fire_threshold", "H", "tiles_x", "tiles_y", "n_tiles",
                "step_b", "step_y", "step_x")


@dataclass(frozen=True)
class StepConfig:
    tile_h: int       # 2-D tiles: rows x columns of cells
    tile_w: int
    num_warps: int
    int64: bool       # 64-bit cell offsets
    programs: int     # persistent programs (the weight kernel: partial sums per hidden chunk)
    hidden_chunk: int  # hidden units per chunk of the dense layers
    num_stages: int = 1
    maxnreg: Optional[int] = None  # register ceiling for ptxas (None: ptxas picks)
    resident: bool = True   # weights loaded once per program (else once per tile)
    anchor: bool = False    # backward dense kernels: the perception tile via _layout_anchor
    split_rows: bool = False  # forward: the dense layers on the tile's two halves of rows

    @property
    def block_m(self) -> int:
        """Cells per tile (the rows of every tl.dot)."""
        return self.tile_h * self.tile_w

    def launch_options(self) -> dict:
        """The compile options of a launch with this configuration."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg,
                    enable_fp_fusion=FP_FUSION)


def bank_code(filters) -> int:
    """The code of the named bank ``filters`` ([F, 3, 3] or [F, 9]) is, exactly, or BANK_DATA
    (taps read from memory: any other bank), or BANK_CHANNELS for taps per channel. Reads the
    taps on the host (a copy for a GPU tensor)."""
    import torch

    if filters.numel() != 9 * filters.shape[0]:
        return BANK_CHANNELS
    return named_bank(filters.detach().to("cpu", torch.float64).reshape(filters.shape[0], 9)
                      .tolist())


def launch_bank(taps, bank: Optional[int]) -> int:
    """The bank code a launcher compiles for its kernel-layout ``taps`` (``kernel_taps``):
    BANK_CHANNELS for taps per channel, else ``bank`` (None: found by ``bank_code``)."""
    if taps.dim() == 3:
        return BANK_CHANNELS
    if bank is None:
        return bank_code(taps)
    return BANK_DATA if bank == BANK_CHANNELS else bank


def named_bank(taps) -> int:
    """``bank_code`` of taps given as numbers (F filters of 3 x 3 or of 9), in plain Python: no
    tensor, so nothing to copy and nothing for torch.compile to trace."""
    def flat(bank):
        return tuple(tuple(float(v) for v in (f if len(f) == 9 else [v for row in f for v in row]))
                     for f in bank)

    taps = flat(taps)
    for code, bank in NAMED_BANKS.items():
        if taps == flat(bank):
            return code
    return BANK_DATA


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


def _capability(device) -> tuple:
    """(major, minor) compute capability of a CUDA device; TARGET_CAPABILITY otherwise."""
    import torch

    if device is not None and getattr(device, "type", None) == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return tuple(TARGET_CAPABILITY)


def _wide(channels: int, num_filters: int) -> bool:
    """The wide inputs: C = 32 (C*F = 96 or 128 perception features). Every rule below that
    departs from the C = 16 configuration is for these, but the Laplacian bank's layout
    anchor (select_backward, select_weights)."""
    return channels * num_filters >= 96


def _dense_programs(num_warps: int, device) -> int:
    """Persistent programs of a dense kernel: 2 per SM at 4 warps; 1 at 8 warps, whose
    registers x 256 threads leave room for one program per SM."""
    return (2 if num_warps == 4 else 1) * _sm_count(device)


def select_forward(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The forward: persistent 8 x 16 tiles, weights resident, hidden in chunks of 64.

    - C*F >= 96, tensor cores: 8 warps, weights per tile, chunks of 32 in a loop: every
      chunk's resident weight slices beside the 9 taps of a tile spill.
    - C*F >= 96, "ieee": 8 warps: the FMA dots' operand tiles in registers spill at 4.
    - C*F >= 128, "ieee": 4 x 16 tiles: 128 cells spill under triton 3.9.
    - C*F = 48 / 64, tensor cores, sm_90 and later: the dense layers on the tile's two halves
      of rows (``split_rows``), chunks of 128: the resident weights' shared-memory descriptors
      spill across the tile loop otherwise (sm_80 spills with the split: not there).
    - C*F = 48 / 64, hidden >= 128, before sm_90: tf32 weights per tile, bf16 at 8 warps in
      chunks of 128: resident at 4 warps they spill under triton 3.7-3.9.
    """
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        # the interpreter pays per program, not per cell: few, large tiles
        return StepConfig(64, 64, 4, int64, 4, hidden)
    th, tw, warps, resident, hc, split = 8, 16, 4, True, min(hidden, 64), False
    if _wide(channels, num_filters):
        if precision == "ieee":
            warps = 8
            th = 4 if channels * num_filters >= 128 else th
        else:
            warps, resident, hc = 8, False, min(hidden, 32)
    elif precision != "ieee" and _capability(device) >= (9, 0):
        split, hc = True, min(hidden, 128)
    elif precision == "tf32" and hidden >= 128:
        resident = False
    elif precision == "bf16" and hidden >= 128:
        warps, hc = 8, min(hidden, 128)
    return StepConfig(th, tw, warps, int64, _dense_programs(warps, device), hc,
                      resident=resident, split_rows=split)


def select_backward(n_cells: int, channels: int, hidden: int, num_filters: int,
                    device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The perception-gradient kernel: persistent 4 x 16 tiles, weights resident, hidden in
    chunks of 64.

    - The Laplacian bank, tensor cores: the perception tile through a layout anchor
      (``_layout_anchor``): else its layout conversions land on the 9 taps and ptxas spills.
    - C*F = 128, tensor cores, hidden >= 128: weights per tile in a loop of 32-unit chunks:
      resident they exceed the shared memory and spill.
    - C*F = 96, tensor cores, hidden >= 128: the same loop on 2 x 16 tiles: resident, or at
      4 x 16, they spill (or exceed sm_80's shared memory).
    """
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, hidden)
    th, tw, warps, resident, hc = 4, 16, 4, True, min(hidden, 64)
    anchor = kernel_bank(bank) == BANK_SOBEL_LAPLACIAN and precision != "ieee"
    if channels * num_filters >= 128 and precision != "ieee" and hidden >= 128:
        resident, hc = False, 32
    elif channels * num_filters == 96 and precision != "ieee" and hidden >= 128:
        th, resident, hc = 2, False, 32
    return StepConfig(th, tw, warps, int64, _dense_programs(warps, device), hc,
                      resident=resident, anchor=anchor)


def select_weights(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The weight-gradient kernel: persistent 4 x 16 tiles, hidden units as the MMA rows.

    - The Laplacian bank, tensor cores: the perception tile through a layout anchor
      (``_layout_anchor``): else its layout conversions land on the 9 taps and ptxas spills.
    - C*F >= 96, tensor cores: 4 x 8 tiles (32 cells, the K of the weight-gradient dots): at
      64 cells the activations beside the [HR, 4C] accumulators spill.
    - The Sobel bank, tensor cores: the anchor too: fewer instructions (sm_80), no spill
      (sm_80 under triton 3.9).
    - C*F = 128, taps as data, hidden 32: 2 x 8 tiles: 4 x 8 spills.
    """
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, hidden)
    th, tw = 4, 16
    if _wide(channels, num_filters) and precision != "ieee":
        tw = 8
        if bank in DATA_BANKS and channels * num_filters >= 128 and hidden == 32:
            th = 2
    # hidden_chunk = HR, the hidden units (MMA rows) of one program: 128 at most. 8 warps: the
    # two warpgroups take half of them each, one program per SM.
    hr = min(hidden, 128)
    programs = max(1, _sm_count(device) // (hidden // hr))
    anchor = precision != "ieee" and bank not in DATA_BANKS
    return StepConfig(th, tw, 8 if hr >= 128 else 4, int64, programs, hr, anchor=anchor)


def select_transpose(n_cells: int, channels: int, num_filters: int, device=None,
                     bank: int = 0) -> StepConfig:
    """The transposed-stencil kernel: a gather of neighbours' perception gradients.

    - C*F >= 96: 8 warps: the 9 gathered [128, 32] taps spill at 4 (circular, 64-bit offsets).
    - C*F = 48 / 64, taps as data: 2 x 16 tiles: 8 x 16 spills under triton 3.9 (taps per
      channel, and replicate / reflect padding).
    """
    int64 = needs_int64(n_cells, channels, 0, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, 0)
    th, tw = 8, 16
    warps = 8 if _wide(channels, num_filters) else 4
    if bank in DATA_BANKS and not _wide(channels, num_filters):
        th = 2
    programs = 4 * _sm_count(device)
    return StepConfig(th, tw, warps, int64, programs, 0)


def select_filters(n_cells: int, channels: int, num_filters: int, device=None) -> StepConfig:
    """The filters' gradient kernel (a learned bank): 4 warps, one elementwise sum of
    [M / 2, C] per filter and tap held across the program's tiles. M * C = 1024 cells x
    channels a tile (4 registers a thread for each of the 27 sums at F = 3, C = 16); 512 where
    the taps and sums would not fit (C * F > 48: 8 B to 80 B spilled at C = 32, F = 4). Half the
    tile (512 at C = 16) shares the loop's fixed costs among half the cells."""
    int64 = needs_int64(n_cells, channels, 0, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, 0)
    tile = 1024 if channels * num_filters <= 48 else 512
    return StepConfig(max(1, tile // channels // 16), 16, 4, int64, 4 * _sm_count(device), 0)
