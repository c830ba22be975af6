"""The filters' gradient of a step's backward, for a bank that is learned:

    dL/d f_k[tap, c] = sum_i gp_k[i, c] * x[i + tap, c]

x: the step's kept input as the forward read it (the taps of the cell words' tap bits); gp: the
perception gradient ``_nca_step_bwd_gp_kernel`` wrote (slot k is gp_k alone: a learned bank is
always read as data). Each persistent program keeps one elementwise sum per filter,
[16 taps (9 used), M cells, C], over its tiles, reduces it over the cells once at the end and
adds the [16, C] results to its own row of ``parts``: a rollout accumulates its steps there and
sums the rows in a fixed order (``filter_grads``), so the gradient is bitwise the same on
every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._tile import _edge_index, _static_shapes, _tile_cells, _tile_next, _tile_start
from .spec import StepSpec
from .step_fwd import persistent_grid

TAP_ROWS = 16           # the 9 taps padded to a power of two (a tensor dimension)


@triton.jit
def _filter_products(r_ptr, gp_ptr, cw, base, y, x, cell, ok, H, W, k: tl.constexpr,
                     C: tl.constexpr, NF: tl.constexpr, PADDING: tl.constexpr):
    """[16, M, C]: gp_k of every cell times each of its 9 kept neighbours (rows 9..15 zero)."""
    t = tl.arange(0, 16)
    ny = _edge_index(y[None, :] + (t // 3 - 1)[:, None], H, PADDING)
    nx = _edge_index(x[None, :] + (t % 3 - 1)[:, None], W, PADDING)
    use = (((cw[None, :] >> t[:, None]) & 1) != 0) & (t < 9)[:, None]
    cols = tl.arange(0, C)
    v = tl.load(r_ptr + (base + ny * W + nx)[:, :, None] * C + cols[None, None, :],
                mask=use[:, :, None], other=0.0)
    g = tl.load(gp_ptr + cell[:, None] * (NF * C) + k * C + cols[None, :], mask=ok[:, None],
                other=0.0)
    return v * g[None, :, :]


@triton.jit
def _add_row(parts_ptr, pid, acc, k: tl.constexpr, C: tl.constexpr):
    """parts[pid, k] += the cells' sum of ``acc`` [16, M, C]."""
    t = tl.arange(0, 16)
    p = parts_ptr + ((pid * 4 + k) * 16 + t[:, None]) * C + tl.arange(0, C)[None, :]
    tl.store(p, tl.load(p) + tl.sum(acc, axis=1))


@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_bwd_filters_kernel(
    r_ptr,          # [B*H*W, C] the step's stored input state
    cw_ptr,         # [B*H*W] int16 the step's cell words (tap t kept: bit t)
    gp_ptr,         # [B*H*W, F, C] the step's perception gradient
    parts_ptr,      # [programs, 4, 16, C] the filters' gradient, one row per program (added to)
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, NF: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    PADDING: tl.constexpr, INT64: tl.constexpr,
):
    _static_shapes(C, NF)
    M: tl.constexpr = TH * TW
    dtype = r_ptr.dtype.element_ty
    acc0 = tl.zeros([16, M, C], dtype=dtype)
    acc1 = tl.zeros([16, M, C], dtype=dtype)
    acc2 = tl.zeros([16, M, C], dtype=dtype)
    acc3 = tl.zeros([16, M, C], dtype=dtype)
    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x
        cw = tl.load(cw_ptr + cell).to(tl.int32)
        acc0 += _filter_products(r_ptr, gp_ptr, cw, base, y, x, cell, ok, H, W, 0, C, NF,
                                 PADDING)
        acc1 += _filter_products(r_ptr, gp_ptr, cw, base, y, x, cell, ok, H, W, 1, C, NF,
                                 PADDING)
        acc2 += _filter_products(r_ptr, gp_ptr, cw, base, y, x, cell, ok, H, W, 2, C, NF,
                                 PADDING)
        if NF == 4:
            acc3 += _filter_products(r_ptr, gp_ptr, cw, base, y, x, cell, ok, H, W, 3, C, NF,
                                     PADDING)
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)
    _add_row(parts_ptr, pid, acc0, 0, C)
    _add_row(parts_ptr, pid, acc1, 1, C)
    _add_row(parts_ptr, pid, acc2, 2, C)
    if NF == 4:
        _add_row(parts_ptr, pid, acc3, 3, C)


# ---------------------------------------------------------------------------------- launchers
def new_filter_parts(B: int, H: int, W: int, C: int, F_: int, device, dtype=torch.float32,
                     cfg=None) -> torch.Tensor:
    """A zeroed buffer for ``bwd_filters``: one [4, 16, C] row per program of ``cfg``
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
