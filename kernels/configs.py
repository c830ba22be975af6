"""Launch configurations: small named selectors, one reason per choice (no autotune lists).

Register budgets below come from the ahead-of-time compile report (bench/compile_report.py,
ptxas for sm_90a and sm_80): every configuration selected here must compile without spills.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .spec import BANK_DATA, NAMED_BANKS, PRECISION_CODES  # noqa: F401  (re-exported)

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
# compile for another machine): sm_90. bench/compile_report.py sets it to each variant's arch.
TARGET_CAPABILITY = (9, 0)


# The kernels' runtime ints, never specialised (``triton.jit(do_not_specialize=...)``): the JIT
# would otherwise make a constant of one equal to 1 and mark multiples of 16, a compile of its
# own for each combination (a 1 x 1 grid, step 0 or 1, sizes of 16 n): tens of seconds each on
# a GPU. All but W: a W known to be a multiple of 16 keeps bwd_gp at C32 hidden 256 Laplacian
# tf32 spill-free on sm_90a (249 registers; 40 B spilled without it), so W still compiles once
# for multiples of 16 and once for other widths. Names a kernel lacks are ignored.
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
    anchor: bool = False    # backward dense kernels: the perception tile through an opaque move (_layout_anchor)
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
    """The code of the named bank ``filters`` ([F, 3, 3] or [F, 9]) is, exactly, or 0 (taps
    read from memory: any other bank). Reads the taps on the host (a copy for a GPU tensor)."""
    import torch

    return named_bank(filters.detach().to("cpu", torch.float64).reshape(filters.shape[0], 9)
                      .tolist())


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
    departs from the C = 16 configuration is for these; C = 16 compiles as it always has, but
    for the Laplacian bank's layout anchor (select_backward, select_weights)."""
    return channels * num_filters >= 96


def _dense_programs(num_warps: int, device) -> int:
    """Persistent programs of a dense kernel: 2 per SM at 4 warps; 1 at 8 warps, whose
    170-255 registers x 256 threads leave room for one program per SM."""
    return (2 if num_warps == 4 else 1) * _sm_count(device)


def select_forward(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The forward: persistent 8 x 16 tiles, weights resident, hidden in chunks of 64.

    Rules (bench/NOTES.md, section 6, has the compile report's rows):

    - C*F >= 96 on tensor cores (tf32, bf16): 8 warps, weights per tile, chunks of 32 in a
      loop. Resident, the F [C, 64] weight slices of every chunk and the 9 taps of a 128-cell
      tile spill 20-1936 B at 4 warps (C = 32, F = 3 and 4, hidden 32-256); so configured, all
      compile spill-free on sm_90a and sm_80.
    - C*F >= 96 in "ieee" (FMA dots, operands in registers): 8 warps: hidden 32 spills
      208-336 B at 4 warps, none at 8 (hidden 64 and more still spill: section 6).
    - C*F = 48 or 64 on tensor cores, sm_90 and later: the dense layers on the tile's two
      halves of 64 cells (``split_rows``), hidden in chunks of 128: under triton 3.9 the
      resident weights' shared-memory descriptors spill across the tile loop otherwise
      (sm_90a, chunks of 64: 232-252 B); on sm_80 the split spills ~11.5 KB, so not there.
    """
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        # The interpreter pays per program, not per cell: few, large tiles.
        return StepConfig(64, 64, 4, int64, 4, hidden)
    th, tw, warps, resident, hc, split = 8, 16, 4, True, min(hidden, 64), False
    if _wide(channels, num_filters):
        if precision == "ieee":
            warps = 8
        else:
            warps, resident, hc = 8, False, min(hidden, 32)
    elif precision != "ieee" and _capability(device) >= (9, 0):
        split, hc = True, min(hidden, 128)  # sm_90a: spill-free under triton 3.9 (sm_80 spills)
    return StepConfig(th, tw, warps, int64, _dense_programs(warps, device), hc,
                      resident=resident, split_rows=split)


def select_backward(n_cells: int, channels: int, hidden: int, num_filters: int,
                    device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The perception-gradient kernel: persistent 4 x 16 tiles, weights resident, hidden in
    chunks of 64.

    Rules (bench/NOTES.md, section 6):

    - C*F = 128, the Laplacian bank, tensor cores: the perception tile through a layout
      anchor (``_layout_anchor``): without it the 9 taps are converted to the tile's layout
      one by one and, on sm_80, ptxas settles at 32 registers: 7.9-38.8 KB spilled (hidden
      32-256); so, hidden 32 / 64 compile spill-free at 4 x 16 on both archs (bf16 no longer
      needs 8 x 16 tiles at 8 warps). C = 16 with the Laplacian bank takes it too: spill-free
      either way, 3-12% fewer warp-instructions per cell anchored (hidden 32 / 128, both archs).
    - C*F = 128 on tensor cores, hidden >= 128: weights per tile, in a loop of 32-unit
      chunks: resident they need 196-360 KB of shared memory and spill 108-648 B on sm_90a;
      so, none there (8 x 16 tiles at 8 warps still spill 4-12 B).
    - C*F = 96 on tensor cores, hidden >= 128: 2 x 16 tiles (32 cells), weights per tile in a
      loop of 32-unit chunks: resident, tf32 needs 184-328 KB of shared memory (over sm_80's
      164 KB) and spills 40-2144 B (bf16 on sm_80: 112-204 B); at 4 x 16 in the loop 20-620 B;
      so, none on either arch (206-250 registers), at ~3x the instructions of a 64-cell tile.
    """
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, hidden)
    th, tw, warps, resident, hc = 4, 16, 4, True, min(hidden, 64)
    anchor = bank >= 2 and precision != "ieee"
    if channels * num_filters >= 128 and precision != "ieee" and hidden >= 128:
        resident, hc = False, 32
    elif channels * num_filters == 96 and precision != "ieee" and hidden >= 128:
        th, resident, hc = 2, False, 32
    return StepConfig(th, tw, warps, int64, _dense_programs(warps, device), hc,
                      resident=resident, anchor=anchor)


def select_weights(n_cells: int, channels: int, hidden: int, num_filters: int,
                   device=None, precision: str = "tf32", bank: int = 0) -> StepConfig:
    """The weight-gradient kernel: persistent 2-D tiles, hidden units as the MMA rows.

    Rules (bench/NOTES.md, section 6):

    - C*F = 128, the Laplacian bank (codes 2, 3), tensor cores: the perception tile through
      a layout anchor (``_layout_anchor``). Its conversions were otherwise pushed back onto the
      9 taps (18 [M, C] conversions instead of two): ptxas settled at 32 registers and spilled
      10-26 KB (sm_80 at every hidden size, sm_90a at hidden 32).
    - C = 16, the Laplacian bank, tensor cores: the same anchor: the same 32 registers and
      7.8-11.6 KB spilled (sm_80 hidden 32-256, sm_90a hidden 32, tf32 / bf16, next); anchored
      none, at 65-278 warp-instr / cell instead of 405-1724 (sm_90a hidden >= 64 unchanged).
    - C*F >= 96 on tensor cores: 4 x 8 tiles (32 cells, the K of the weight-gradient dots):
      the [HR, 64] activations next to the [HR, 4C] accumulators spill 20-492 B at 64 cells
      (C*F = 128, sm_90a, hidden 64-256), and 496-716 B at hidden 32 with the anchor; C*F = 96
      (next) 4-400 B (sobel and data banks, hidden 32-256, one arch or both); none at 32 cells
      (sm_90a cost at C*F = 96: 0.97-1.18x warp-instr / cell).
    - C*F = 96, the Sobel bank, tensor cores: the anchor too: at 4 x 8 it saves 1-12% of the
      warp-instructions (sm_90a h32 tf32 170.5 -> 149.9) and is spill-free on both archs.
    - C*F = 128, taps as data (bank 0), hidden 32: 2 x 8 tiles (16 cells): 4 x 8 spills 8 B
      (sm_80) / 64 B (sm_90a), 2 x 8 none, at 1.13x on sm_90a (8 warps: none, 1.47x).
    """
    int64 = needs_int64(n_cells, channels, hidden, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, hidden)
    th, tw = 4, 16
    if _wide(channels, num_filters) and precision != "ieee":
        tw = 8
        if bank == 0 and channels * num_filters >= 128 and hidden == 32:
            th = 2
    # hidden_chunk = HR, the hidden units (MMA rows) of one program: 128 at most. 8 warps: the
    # two warpgroups take half of them each; ~170 registers a thread, so one program per SM.
    hr = min(hidden, 128)
    programs = max(1, _sm_count(device) // (hidden // hr))
    anchor = precision != "ieee" and (bank >= 2 or (bank == 1 and _wide(channels, num_filters)))
    return StepConfig(th, tw, 8 if hr >= 128 else 4, int64, programs, hr, anchor=anchor)


def select_transpose(n_cells: int, channels: int, num_filters: int, device=None,
                     bank: int = 0) -> StepConfig:
    """The transposed-stencil kernel: a gather of neighbours' perception gradients.

    Rule (bench/NOTES.md, section 6): C*F >= 96: 8 warps: the 9 gathered [128, 32] taps
    spill 28-100 B at 4 warps with circular padding and 64-bit offsets (sm_90a), none at 8.
    """
    int64 = needs_int64(n_cells, channels, 0, num_filters)
    if interpreting():
        return StepConfig(64, 64, 4, int64, 4, 0)
    th, tw = 8, 16
    warps = 8 if _wide(channels, num_filters) else 4
    programs = 4 * _sm_count(device)
    return StepConfig(th, tw, warps, int64, programs, 0)

