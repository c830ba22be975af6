"""The filters' gradient of a step's backward, for a bank that is learned:

    dL/d f_k[tap, c] = sum_i gp_k[i, c] * x[i + tap, c]

x: the step's kept input as the forward read it (the taps of the cell words' tap bits); gp: the
perception gradient ``_nca_step_bwd_gp_kernel`` wrote (slot k is gp_k alone: a learned bank is
always read as data). Each persistent program loads a tile's neighbours once for every filter
and keeps one elementwise sum per filter over its tiles (taps 0..7 as [8, M, C], tap 8 as
[M, C]), reduces them over the cells once at the end and adds the [9, C] results to its own
row of ``parts``: a rollout accumulates its steps there and sums the rows in a fixed order
(``filter_grads``), so the gradient is bitwise the same on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._tile import _edge_index, _static_shapes, _tile_cells, _tile_next, _tile_start
from .spec import StepSpec
from .step_fwd import persistent_grid

TAP_ROWS = 9            # a filter's rows in the parts buffer: its 9 taps


@triton.jit
def _neighbours(r_ptr, cw, base, y, x, H, W, C: tl.constexpr, PADDING: tl.constexpr):
    """The kept neighbours of the tile's cells as the forward read them: taps 0..7 [8, M, C]
    and tap 8 [M, C] (a tap the cell word does not keep reads zero)."""
    cols = tl.arange(0, C)
    t = tl.arange(0, 8)
    ny = _edge_index(y[None, :] + (t // 3 - 1)[:, None], H, PADDING)
    nx = _edge_index(x[None, :] + (t % 3 - 1)[:, None], W, PADDING)
    use = ((cw[None, :] >> t[:, None]) & 1) != 0
    v = tl.load(r_ptr + (base + ny * W + nx)[:, :, None] * C + cols[None, None, :],
                mask=use[:, :, None], other=0.0)
    n8 = base + _edge_index(y + 1, H, PADDING) * W + _edge_index(x + 1, W, PADDING)
    v8 = tl.load(r_ptr + n8[:, None] * C + cols[None, :], mask=(((cw >> 8) & 1) != 0)[:, None],
                 other=0.0)
    return v, v8


@triton.jit
def _slot(gp_ptr, cell, ok, k: tl.constexpr, C: tl.constexpr, NF: tl.constexpr):
    """gp_k [M, C] of the tile's cells (zero for cells outside the grid)."""
    cols = tl.arange(0, C)
    return tl.load(gp_ptr + cell[:, None] * (NF * C) + k * C + cols[None, :], mask=ok[:, None],
                   other=0.0)


@triton.jit
def _add_row(parts_ptr, pid, acc, acc8, k: tl.constexpr, C: tl.constexpr):
    """parts[pid, k, 0:8] += the cells' sum of ``acc`` [8, M, C]; parts[pid, k, 8] += acc8's."""
    t = tl.arange(0, 8)
    cols = tl.arange(0, C)
    p = parts_ptr + ((pid * 4 + k) * 9 + t[:, None]) * C + cols[None, :]
    tl.store(p, tl.load(p) + tl.sum(acc, axis=1))
    p8 = parts_ptr + ((pid * 4 + k) * 9 + 8) * C + cols
    tl.store(p8, tl.load(p8) + tl.sum(acc8, axis=0))


@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_bwd_filters_kernel(
    r_ptr,          # [B*H*W, C] the step's stored input state
    cw_ptr,         # [B*H*W] int16 the step's cell words (tap t kept: bit t)
    gp_ptr,         # [B*H*W, F, C] the step's perception gradient
    parts_ptr,      # [programs, 4, 9, C] the filters' gradient, one row per program (added to)
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, NF: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    PADDING: tl.constexpr, INT64: tl.constexpr,
):
    _static_shapes(C, NF)
    M: tl.constexpr = TH * TW
    dtype = r_ptr.dtype.element_ty
    a0 = tl.zeros([8, M, C], dtype=dtype)
    a1 = tl.zeros([8, M, C], dtype=dtype)
    a2 = tl.zeros([8, M, C], dtype=dtype)
    a3 = tl.zeros([8, M, C], dtype=dtype)
    e0 = tl.zeros([M, C], dtype=dtype)
    e1 = tl.zeros([M, C], dtype=dtype)
    e2 = tl.zeros([M, C], dtype=dtype)
    e3 = tl.zeros([M, C], dtype=dtype)
    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x
        cw = tl.load(cw_ptr + cell).to(tl.int32)
        v, v8 = _neighbours(r_ptr, cw, base, y, x, H, W, C, PADDING)
        g = _slot(gp_ptr, cell, ok, 0, C, NF)
        a0 += v * g[None, :, :]
        e0 += v8 * g
        g = _slot(gp_ptr, cell, ok, 1, C, NF)
        a1 += v * g[None, :, :]
        e1 += v8 * g
        g = _slot(gp_ptr, cell, ok, 2, C, NF)
        a2 += v * g[None, :, :]
        e2 += v8 * g
        if NF == 4:
            g = _slot(gp_ptr, cell, ok, 3, C, NF)
            a3 += v * g[None, :, :]
            e3 += v8 * g
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)
    _add_row(parts_ptr, pid, a0, e0, 0, C)
    _add_row(parts_ptr, pid, a1, e1, 1, C)
    _add_row(parts_ptr, pid, a2, e2, 2, C)
    if NF == 4:
        _add_row(parts_ptr, pid, a3, e3, 3, C)


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
    [B, H, W, C]; cw: its int16 cell words; gp: its perception gradient [B*H*W, F, C]."""
    B, H, W, C = r.shape
    F_ = gp.shape[1]
    cfg = cfg or configs.select_filters(B * H * W, C, F_, r.device)
    programs, *sizes = persistent_grid(B, H, W, cfg)
    if parts.shape[0] != programs:
        raise ValueError(f"parts: expected {programs} rows (the launch's programs), got "
                         f"{parts.shape[0]}")
    _nca_step_bwd_filters_kernel[(programs,)](
        r, cw, gp, parts, H, W, *sizes,
        C=C, NF=F_, TH=cfg.tile_h, TW=cfg.tile_w, PADDING=spec.padding_code, INT64=cfg.int64,
        **cfg.launch_options())
    return parts


def filter_grads(parts: torch.Tensor, F_: int) -> torch.Tensor:
    """[F, 9, C]: the filters' gradient, the programs' rows summed in a fixed order."""
    return parts.sum(0)[:F_, :9].clone()
