"""The filters' gradient of a step's backward, for a bank that is learned:

    dL/d f_k[tap, c] = sum_i gp_k[i, c] * x[i + tap, c]

x: the step's kept input as the forward read it (the taps of the cell words' tap bits); gp: the
perception gradient ``_nca_step_bwd_gp_kernel`` wrote (slot k is gp_k alone: a learned bank is
always read as data). Each persistent program loads a tile's 9 kept neighbours and its F
gp slots once and keeps one elementwise sum per filter and tap over its tiles, the products of
the tile's two halves of rows added first (sums of [M / 2, C]: half the registers of the
tile's own shape, so a tile of twice the cells shares the loop's fixed costs); it reduces them
over the cells once at the end and adds the [9, C] results to its own row of ``parts``. A
rollout accumulates its steps there and sums the rows in a fixed order (``filter_grads``), so
the gradient is bitwise the same on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._dense import _split_rows
from ._tile import (_gp_index, _load_taps, _loop_zero, _static_shapes, _tile_cells, _tile_next,
                    _tile_start)
from .spec import StepSpec
from .step_bwd_input import check_gp, gp_int64
from .step_fwd import persistent_grid

TAP_ROWS = 9            # a filter's rows in the parts buffer: its 9 taps


@triton.jit
def _sums(acc, taps, g):
    """acc[t] + the products taps[t] * g [M, C] of the tile's two halves of rows added
    ([M / 2, C]), for the 9 taps."""
    g0, g1 = _split_rows(g)
    out = ()
    for t in tl.static_range(9):
        v0, v1 = _split_rows(taps[t])
        out = out + (acc[t] + v0 * g0 + v1 * g1,)
    return out


@triton.jit
def _add_row(parts_ptr, pid, acc, k: tl.constexpr, C: tl.constexpr):
    """parts[pid, k, t] += the sum of acc[t] [M / 2, C] over its rows, for the 9 taps."""
    cols = tl.arange(0, C)
    for t in tl.static_range(9):
        p = parts_ptr + ((pid * 4 + k) * 9 + t) * C + cols
        tl.store(p, tl.load(p) + tl.sum(acc[t], axis=0))


@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_bwd_filters_kernel(
    r_ptr,          # [B*H*W, C] the step's stored input state
    cw_ptr,         # [B*H*W] int16 the step's cell words (tap t kept: bit t)
    gp_ptr,         # [B, H + 2, W + 2, F, C] the step's perception gradient
    parts_ptr,      # [programs, 4, 9, C] the filters' gradient, one row per program (added to)
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, NF: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    PADDING: tl.constexpr, INT64: tl.constexpr,
):
    _static_shapes(C, NF)
    M: tl.constexpr = TH * TW
    dtype = r_ptr.dtype.element_ty
    z = tl.zeros([M // 2, C], dtype=dtype)
    a0 = (z, z, z, z, z, z, z, z, z)
    a1 = (z, z, z, z, z, z, z, z, z)
    a2 = (z, z, z, z, z, z, z, z, z)
    a3 = (z, z, z, z, z, z, z, z, z)
    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x
        cw = tl.load(cw_ptr + cell).to(tl.int32)
        lz = _loop_zero(tx)
        cl = tl.arange(0, C) + lz
        taps = _load_taps(r_ptr, cw, base, y, x, H, W, lz, C, PADDING, PACKED=True)
        p = gp_ptr + _gp_index(b, y, x, H, W, INT64)[:, None] * (NF * C) + cl[None, :]
        a0 = _sums(a0, taps, tl.load(p, mask=ok[:, None], other=0.0))
        a1 = _sums(a1, taps, tl.load(p + C, mask=ok[:, None], other=0.0))
        a2 = _sums(a2, taps, tl.load(p + 2 * C, mask=ok[:, None], other=0.0))
        if NF == 4:
            a3 = _sums(a3, taps, tl.load(p + 3 * C, mask=ok[:, None], other=0.0))
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)
    _add_row(parts_ptr, pid, a0, 0, C)
    _add_row(parts_ptr, pid, a1, 1, C)
    _add_row(parts_ptr, pid, a2, 2, C)
    if NF == 4:
        _add_row(parts_ptr, pid, a3, 3, C)


# ---------------------------------------------------------------------------------- launchers
def new_filter_parts(B: int, H: int, W: int, C: int, F_: int, device, dtype=torch.float32,
                     cfg=None) -> torch.Tensor:
    """A zeroed buffer for ``bwd_filters``: one [4, 9, C] row per program of ``cfg``
    (``configs.select_filters``)."""
    cfg = cfg or configs.select_filters(B * H * W, C, F_, device)
    programs, *_ = persistent_grid(B, H, W, cfg)
    return torch.zeros((programs, 4, TAP_ROWS, C), dtype=dtype, device=device)


def bwd_filters(r, cw, gp, parts, *, spec: StepSpec, cfg=None):
    """Adds a step's filter gradient to ``parts`` (``new_filter_parts``). r: the step's input
    [B, H, W, C]; cw: its int16 cell words; gp: its perception gradient (``bwd_gp``'s buffer)."""
    B, H, W, C = r.shape
    F_ = gp.shape[-2]
    check_gp(gp, B, H, W, F_, C)
    cfg = cfg or configs.select_filters(B * H * W, C, F_, r.device)
    programs, *sizes = persistent_grid(B, H, W, cfg)
    if parts.shape[0] != programs:
        raise ValueError(f"parts: expected {programs} rows (the launch's programs), got "
                         f"{parts.shape[0]}")
    _nca_step_bwd_filters_kernel[(programs,)](
        r, cw, gp, parts, H, W, *sizes,
        C=C, NF=F_, TH=cfg.tile_h, TW=cfg.tile_w, PADDING=spec.padding_code,
        INT64=gp_int64(cfg, gp),
        **cfg.launch_options())
    return parts


def filter_grads(parts: torch.Tensor, F_: int) -> torch.Tensor:
    """[F, 9, C]: the filters' gradient, the programs' rows summed in a fixed order."""
    return parts.sum(0)[:F_, :9].clone()
