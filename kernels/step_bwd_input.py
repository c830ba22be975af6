"""The transposed stencil of a step's backward: dL/d r from the perception gradient.

    gx[j] = g[j] + sum_taps sum_k f_k[tap] * gp_k[j - tap]        (the filters flipped)
    gr[j] = gx[j] * keep[j]                                       (the deferred alive mask)

A gather, not a scatter: each cell reads the gp of its 9 neighbours (stored by
``_nca_step_bwd_gp_kernel``, step_bwd.py), so no two programs write one cell. The gp buffer has
a border of one zero cell around each grid (``gp_buffer``), where a neighbour across the edge
reads zero, with no mask (a masked load costs its zeroing too). Under replicate
and reflect padding a cell at the edge also receives what its neighbours read of it across the
edge: the gathered taps are folded first (``_fold_edges``). ``_input_grad`` is
shared: the weight kernel computes the next step's g with it (step_bwd.py, NEXT), and
``_nca_step_bwd_input_kernel`` the rollout's first step's. For a named bank gp's first slot holds
g + gp_0 (the identity has its centre tap only) and the Sobel / Laplacian taps are constants.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._tile import (BANK_CHANNELS, BANK_DATA, CIRCULAR, PACKED_KEEP, REFLECT, REPLICATE, ZEROS,
                    _col, _gp_index, _loop_zero, _program_taps, _static_shapes, _tile_cells,
                    _tile_next, _tile_start, _tile_taps, _wrap1)
from .spec import StepSpec, spec_of
from .step_fwd import persistent_grid


# ---------------------------------------------------------------------------- stencil helpers
@triton.jit
def _gp_taps(gp_ptr, b, y, x, H, W, lz, k: tl.constexpr, C: tl.constexpr, NF: tl.constexpr,
             PADDING: tl.constexpr, INT64: tl.constexpr):
    """gp_k of the 9 neighbours [M, C] of every cell (a tuple, tap t as in ``_load_taps``),
    zero where the neighbour does not exist: the buffer's zero border (``_gp_index``)."""
    cols = tl.arange(0, C) + lz
    taps = ()
    if PADDING == CIRCULAR:
        p = gp_ptr + k * C + cols[None, :]
        nbs = ()
        for t in tl.static_range(9):
            nbs = nbs + (_gp_index(b, _wrap1(y + (t // 3 - 1), H), _wrap1(x + (t % 3 - 1), W),
                                   H, W, INT64),)
        for t in tl.static_range(9):
            taps = taps + (tl.load(p + nbs[t][:, None] * (NF * C)),)
    else:
        p = gp_ptr + _gp_index(b, y, x, H, W, INT64)[:, None] * (NF * C) + k * C + cols[None, :]
        rows = (p - (W + 2) * (NF * C), p, p + (W + 2) * (NF * C))
        for t in tl.static_range(9):
            taps = taps + (tl.load(_col(rows[t // 3], t % 3 - 1, NF * C)),)
    return taps


@triton.jit
def _fold_edges(z, y, x, H, W, PADDING: tl.constexpr):
    """The gathered taps z (gp of the 9 neighbours, zero across the edge) with what the
    neighbours read of this cell across the edge added, so that the transposed stencil of the
    result is the cell's whole gradient: tap t then holds the gp of every cell whose flipped
    tap lands here. Replicate: the cell's copies (edge cells: itself at the centre tap's
    neighbours); reflect: the cell one further in reads it. Columns within each row of taps,
    then rows, each from the values before it (the two axes' maps compose)."""
    if PADDING == REPLICATE:
        lo_x = x == 0
        hi_x = x == W - 1
        lo_y = y == 0
        hi_y = y == H - 1
    else:
        lo_x = x == 1
        hi_x = x == W - 2
        lo_y = y == 1
        hi_y = y == H - 2
    lo_x = lo_x[:, None]
    hi_x = hi_x[:, None]
    lo_y = lo_y[:, None]
    hi_y = hi_y[:, None]
    rows = ()
    for r in tl.static_range(3):
        a = z[3 * r]
        c = z[3 * r + 1]
        e = z[3 * r + 2]
        if PADDING == REPLICATE:
            rows = rows + ((a + tl.where(hi_x, c, 0.0), c, e + tl.where(lo_x, c, 0.0)),)
        else:
            rows = rows + ((a + tl.where(hi_x, e, 0.0), c, e + tl.where(lo_x, a, 0.0)),)
    top = rows[0]
    mid = rows[1]
    bot = rows[2]
    out = ()
    for i in tl.static_range(3):
        if PADDING == REPLICATE:
            out = out + (top[i] + tl.where(hi_y, mid[i], 0.0),)
        else:
            out = out + (top[i] + tl.where(hi_y, bot[i], 0.0),)
    out = out + mid
    for i in tl.static_range(3):
        if PADDING == REPLICATE:
            out = out + (bot[i] + tl.where(lo_y, mid[i], 0.0),)
        else:
            out = out + (bot[i] + tl.where(lo_y, top[i], 0.0),)
    return out


@triton.jit
def _taps_of(gp_ptr, b, y, x, H, W, lz, k: tl.constexpr, C: tl.constexpr, NF: tl.constexpr,
             PADDING: tl.constexpr, INT64: tl.constexpr):
    """``_gp_taps``, folded at the edges under replicate and reflect padding."""
    if PADDING == REPLICATE or PADDING == REFLECT:
        return _fold_edges(_gp_taps(gp_ptr, b, y, x, H, W, lz, k, C, NF, ZEROS, INT64),
                           y, x, H, W, PADDING)
    else:
        return _gp_taps(gp_ptr, b, y, x, H, W, lz, k, C, NF, PADDING, INT64)


@triton.jit
def _transposed(z, f, k: tl.constexpr):
    """sum_taps f_k[tap] * z[-tap]: the filter flipped (the cell at -tap received tap's weight);
    f: the bank's taps (``_filter_taps``)."""
    acc = f[9 * k + 8] * z[0]
    for t in tl.static_range(1, 9):
        acc = acc + f[9 * k + 8 - t] * z[t]
    return acc


@triton.jit
def _input_grad(gp_ptr, cw_ptr, g_ptr, f, b, y, x, cell, H, W, lz,
                C: tl.constexpr, NF: tl.constexpr, BANK: tl.constexpr,
                PADDING: tl.constexpr, INT64: tl.constexpr):
    """dL/d r [M, C] of the tile's cells: the transposed stencil of gp, the identity path and
    the deferred alive mask (PACKED_KEEP: the cell's own keep). f: a bank read as data's taps
    (``_filter_taps``)."""
    cl = tl.arange(0, C) + lz
    keep = (tl.load(cw_ptr + cell).to(tl.int32) & PACKED_KEEP) != 0
    if BANK == BANK_DATA or BANK == BANK_CHANNELS:
        acc = tl.load(g_ptr + cell[:, None] * C + cl[None, :])
        for k in tl.static_range(NF):
            acc += _transposed(_taps_of(gp_ptr, b, y, x, H, W, lz, k, C, NF, PADDING, INT64),
                               f, k)
    else:
        # slot 0 holds g + gp_0 (the identity: its centre tap only); 8 x Sobel, flipped
        gi = _gp_index(b, y, x, H, W, INT64)
        acc = tl.load(gp_ptr + gi[:, None] * (NF * C) + cl[None, :])
        z = _taps_of(gp_ptr, b, y, x, H, W, lz, 1, C, NF, PADDING, INT64)
        acc -= ((z[2] - z[0]) + (z[8] - z[6])) + 2.0 * (z[5] - z[3])
        z = _taps_of(gp_ptr, b, y, x, H, W, lz, 2, C, NF, PADDING, INT64)
        acc -= ((z[6] - z[0]) + (z[8] - z[2])) + 2.0 * (z[7] - z[1])
        if NF == 4:
            z = _taps_of(gp_ptr, b, y, x, H, W, lz, 3, C, NF, PADDING, INT64)
            acc += (((z[0] + z[2]) + (z[6] + z[8])) + 2.0 * ((z[1] + z[3]) + (z[5] + z[7]))
                    - 12.0 * z[4])
    return tl.where(keep[:, None], acc, 0.0)


# ---------------------------------------------------------------------------------- the kernel
@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_bwd_input_kernel(
    gp_ptr,         # [B, H + 2, W + 2, F, C] perception gradient (_nca_step_bwd_gp_kernel)
    cw_ptr,         # [B*H*W] int16 the step's cell words (PACKED_KEEP: the cell's own mask)
    g_ptr,          # [B*H*W, C] dL/d out (read only for taps as data)
    gr_ptr,         # [B*H*W, C] out: dL/d r
    filt_ptr,       # taps as data: [F, 9] (BANK_DATA) or [F, 9, C] (BANK_CHANNELS)
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, NF: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BANK: tl.constexpr, PADDING: tl.constexpr, INT64: tl.constexpr,
):
    _static_shapes(C, NF)
    held = _program_taps(filt_ptr, NF, C, BANK)
    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x
        lz = _loop_zero(tx)
        acc = _input_grad(gp_ptr, cw_ptr, g_ptr, _tile_taps(held, filt_ptr, NF, C, BANK), b,
                          y, x, cell, H, W, lz, C, NF, BANK, PADDING, INT64)
        cl = tl.arange(0, C) + lz
        tl.store(gr_ptr + cell[:, None] * C + cl[None, :], acc.to(gr_ptr.dtype.element_ty),
                 mask=ok[:, None])
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)


# ---------------------------------------------------------------------------------- launchers
def gp_buffer(B: int, H: int, W: int, F_: int, C: int, dtype, device) -> torch.Tensor:
    """A step's perception-gradient buffer: [B, H + 2, W + 2, F, C], its border zero (the
    kernels write only the grid's cells, so a buffer can be used again for other steps)."""
    return torch.zeros((B, H + 2, W + 2, F_, C), dtype=dtype, device=device)


def check_gp(gp: torch.Tensor, B: int, H: int, W: int, F_: int, C: int) -> None:
    if tuple(gp.shape) != (B, H + 2, W + 2, F_, C) or not gp.is_contiguous():
        raise ValueError(f"gp: expected a contiguous [B, H + 2, W + 2, F, C] = "
                         f"{(B, H + 2, W + 2, F_, C)} buffer (gp_buffer), got "
                         f"{tuple(gp.shape)}")


def gp_int64(cfg, gp: torch.Tensor) -> bool:
    """64-bit offsets: the launch configuration's choice, or the gp buffer's border needs
    them (its indices are up to 9 x the grid's for 1 x 1 grids)."""
    return cfg.int64 or gp.numel() >= 2**31


def bwd_input(gp, cw, g, filters, shape, *, spec: Optional[StepSpec] = None, grad_r=None,
              cfg=None, **options):
    """Kernel 3: dL/d r of a step from its perception gradient gp (``bwd_gp``'s buffer, with
    its zero border), the transposed stencil. cfg: ``configs.select_transpose(...)``."""
    spec = spec_of(spec, options)
    B, H, W, C = shape
    F_ = gp.shape[-2]
    check_gp(gp, B, H, W, F_, C)
    cfg = cfg or configs.select_transpose(B * H * W, C, F_, gp.device, spec.bank)
    programs, *sizes = persistent_grid(B, H, W, cfg)
    grad_r = torch.empty(shape, dtype=gp.dtype, device=gp.device) if grad_r is None else grad_r
    _nca_step_bwd_input_kernel[(programs,)](
        gp, cw, g, grad_r, filters,
        H, W, *sizes,
        C=C, NF=F_, TH=cfg.tile_h, TW=cfg.tile_w, BANK=spec.kernel_bank,
        PADDING=spec.padding_code, INT64=gp_int64(cfg, gp), **cfg.launch_options())
    return grad_r
