"""Backward of one NCA step, handwritten: gradients for the stored state and every weight.

Nothing from the forward is kept but its input ``r`` and one 16-bit word per cell that the
forward computed anyway (``nca_step_fwd(..., cw_out=)``): which of the 9 neighbours the deferred
alive mask kept, and whether the cell fired. So the backward recomputes the perception and the
hidden layer, but not the masks or the random numbers.

With ``g = dL/d out`` for the raw update ``out = x + dx * fire`` of step_fwd:

    gdx   = g * fire                                  db2 = sum_i gdx,  dW2 = h^T gdx
    gh    = (gdx @ W2^T) * (h_pre > 0)                db1 = sum_i gh,   dW1_k = p_k^T gh
    gp_k  = gh @ W1_k^T                               (perception gradient, [cells, F, C])
    gx[j] = g[j] + sum_taps sum_k f_k[tap] * gp_k[j - tap]        (transposed stencil)
    gr[j] = gx[j] * keep[j]                           (the deferred alive mask is a constant)

Three kernels, no atomics (the same inputs give bitwise the same gradients):

1. ``_nca_step_bwd_gp_kernel`` (persistent, 2-D tiles, 4 warps): the perception and the hidden
   layer again, gh, and gp to a scratch buffer (the transposed stencil of a cell needs the gp of
   its 8 neighbours, which other programs compute), whose grids have a border of one zero cell
   ([B, H + 2, W + 2, F, C], ``gp_buffer``): a neighbour across the edge reads zero unmasked.
   For a named bank the identity path rides in gp's first slot (g + gp_0: the identity filter
   has its centre tap only).
2. ``_nca_step_bwd_weights_kernel`` (persistent, 2-D tiles, 8 warps): the weight gradients of a
   step, accumulated in registers across the program's tiles and added once at its end to the
   program's own row of a [programs, PART] buffer that the rollout sums once, in a fixed order.
   Hidden units are the MMA's M dimension (h^T = W1^T p^T): the two warpgroups take half the
   hidden units each, and gh^T, h^T are already in registers as the A operands of dW1^T = gh^T p
   and dW2 = h^T gdx. Fused with the transposed stencil of the *next* step (NEXT): that
   computes this step's g = dL/d out from the next step's gp, so g is written once and never
   read back here.
3. ``_nca_step_bwd_input_kernel`` (step_bwd_input.py, with the transposed stencil's helpers):
   the transposed stencil alone, for the rollout's first step (the gradient of its input).

The weight kernel could not join the gp kernel: the weight-gradient accumulators, the operands
of five dots and the hoisted shared-memory descriptors of their k-steps need more than 255
registers a thread (bench/NOTES.md, section 2).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._dense import (_as_k_operand, _bias_rows, _concat4, _k_rows, _mm, _w1_block, _w1_tile,
                     _w2_cols)
from ._tile import (BANK_CHANNELS, BANK_DATA, IEEE, PACKED_FIRE, _bank, _bordered,
                    _layout_anchor, _load_taps, _loop_zero, _program_taps, _static_shapes,
                    _tile_cells, _tile_next, _tile_start, _tile_taps)
from .spec import StepSpec, StepWeights, spec_of, w1_scales
from .step_bwd_input import (_input_grad, bwd_input, check_gp, gp_buffer,  # noqa: F401
                             gp_int64)             # (bwd_input, gp_buffer: launchers here too)
from .step_fwd import check_shapes, kernel_taps, nca_step_fwd, persistent_grid


# ---------------------------------------------------------------------------- 1. the gp kernel
@triton.jit
def _gp_chunk(pc, gdx, ones, w1c, bc, w1tc, w2c, gp, NF: tl.constexpr, PRECISION: tl.constexpr):
    """gp + gh @ W1^T over one hidden chunk: the chunk's pre-activation again, then gh."""
    hp = _mm(pc, w1c, tl.zeros([pc.shape[0], w1c.shape[1]], dtype=gdx.dtype), PRECISION)
    if NF == 4:
        hp = _mm(ones, bc, hp, PRECISION)
    gh = tl.where(hp > 0, _mm(gdx, w2c, tl.zeros_like(hp), PRECISION), 0.0)
    return _mm(_as_k_operand(gh, PRECISION), w1tc, gp, PRECISION)


@triton.jit
def _gp_chunk_fma(p0, p1, p2, p3, gdx, w0, w1, w2, w3, b1c, t0, t1, t2, t3, w2c, g0, g1, g2, g3,
                  NF: tl.constexpr):
    """``_gp_chunk`` for "ieee" (FMA dots, ``_mlp_chunk_fma``): one dot per filter each way, no
    bias block in K, no padded gp_3 at F = 3; g0..g3 accumulate gp_k."""
    hp = _mm(p0, w0, tl.zeros([p0.shape[0], w0.shape[1]], dtype=gdx.dtype), IEEE)
    hp = _mm(p1, w1, hp, IEEE)
    hp = _mm(p2, w2, hp, IEEE)
    if NF == 4:
        hp = _mm(p3, w3, hp, IEEE)
    hp += b1c[None, :]
    gh = tl.where(hp > 0, _mm(gdx, w2c, tl.zeros_like(hp), IEEE), 0.0)
    g0 = _mm(gh, t0, g0, IEEE)
    g1 = _mm(gh, t1, g1, IEEE)
    g2 = _mm(gh, t2, g2, IEEE)
    if NF == 4:
        g3 = _mm(gh, t3, g3, IEEE)
    return g0, g1, g2, g3


@triton.jit
def _gp_weights(w1_ptr, b1_ptr, w2_ptr, lap, r_ptr, C: tl.constexpr, HID: tl.constexpr,
                HC: tl.constexpr, NF: tl.constexpr, BANK: tl.constexpr,
                PRECISION: tl.constexpr):
    """(w1s, bss, wts, w2s): every hidden chunk's W1, b1, W1^T and W2 in the state's dtype.
    FMA dots (IEEE): W1_k and W1_k^T per filter (index j * NF + k), b1 as a row; tensor
    cores: [4C, HC] / [HC, 4C] tiles, b1 as the K block of the constant-1 column."""
    dtype = r_ptr.dtype.element_ty
    w1s = ()
    bss = ()
    wts = ()
    w2s = ()
    for j in tl.static_range(HID // HC):
        if PRECISION == IEEE:
            for k in tl.static_range(NF):
                w1s = w1s + (_w1_block(w1_ptr, lap, k, j * HC, C, HID, HC, BANK).to(dtype),)
                wts = wts + (_w1_block(w1_ptr, lap, k, j * HC, C, HID, HC, BANK,
                                       TRANS=True).to(dtype),)
            bss = bss + (tl.load(b1_ptr + j * HC + tl.arange(0, HC)).to(dtype),)
        else:
            w1s = w1s + (_w1_tile(w1_ptr, b1_ptr, lap, j * HC, C, HID, HC, NF, BANK,
                                  BIAS=True, HIDDEN_ROWS=False, K_ORDER=IEEE).to(dtype),)
            bss = bss + (_bias_rows(b1_ptr, j * HC, C, HC).to(dtype),)
            wts = wts + (_w1_tile(w1_ptr, b1_ptr, lap, j * HC, C, HID, HC, NF, BANK,
                                  BIAS=False, HIDDEN_ROWS=True, K_ORDER=PRECISION).to(dtype),)
        w2s = w2s + (_w2_cols(w2_ptr, j * HC, C, HC),)
    return w1s, bss, wts, w2s


@triton.jit
def _gp_fma(p0, p1, p2, p3, gdx, g, ok, w1s, bss, wts, w2s, w1p, b1p, w2p, lap,
            C: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, NF: tl.constexpr,
            BANK: tl.constexpr, RESIDENT: tl.constexpr):
    """The perception gradient [M, 4C] in FMA dots (IEEE): one accumulator per filter, the
    weights resident (``_gp_weights``) or loaded here from the tile's pointers."""
    dtype = gdx.dtype
    M: tl.constexpr = gdx.shape[0]
    if BANK != BANK_DATA and BANK != BANK_CHANNELS:
        g0 = tl.where(ok[:, None], g, 0.0).to(dtype)
    else:
        g0 = tl.zeros([M, C], dtype=dtype)
    g1 = tl.zeros([M, C], dtype=dtype)
    g2 = tl.zeros([M, C], dtype=dtype)
    g3 = tl.zeros([M, C], dtype=dtype)
    for j in tl.static_range(HID // HC):
        if RESIDENT:
            g0, g1, g2, g3 = _gp_chunk_fma(
                p0, p1, p2, p3, gdx, w1s[j * NF], w1s[j * NF + 1], w1s[j * NF + 2],
                w1s[j * NF + NF - 1], bss[j], wts[j * NF], wts[j * NF + 1],
                wts[j * NF + 2], wts[j * NF + NF - 1], w2s[j], g0, g1, g2, g3, NF)
        else:
            g0, g1, g2, g3 = _gp_chunk_fma(
                p0, p1, p2, p3, gdx,
                _w1_block(w1p, lap, 0, j * HC, C, HID, HC, BANK).to(dtype),
                _w1_block(w1p, lap, 1, j * HC, C, HID, HC, BANK).to(dtype),
                _w1_block(w1p, lap, 2, j * HC, C, HID, HC, BANK).to(dtype),
                _w1_block(w1p, lap, NF - 1, j * HC, C, HID, HC, BANK).to(dtype),
                tl.load(b1p + j * HC + tl.arange(0, HC)).to(dtype),
                _w1_block(w1p, lap, 0, j * HC, C, HID, HC, BANK, TRANS=True).to(dtype),
                _w1_block(w1p, lap, 1, j * HC, C, HID, HC, BANK, TRANS=True).to(dtype),
                _w1_block(w1p, lap, 2, j * HC, C, HID, HC, BANK, TRANS=True).to(dtype),
                _w1_block(w1p, lap, NF - 1, j * HC, C, HID, HC, BANK, TRANS=True).to(dtype),
                _w2_cols(w2p, j * HC, C, HC), g0, g1, g2, g3, NF)
    return _concat4(g0, g1, g2, g3)


@triton.jit
def _gp_mma(pc, gdx, ones, g, ok, cl, w1s, bss, wts, w2s, w1p, b1p, w2p, lap, lz,
            C: tl.constexpr, HID: tl.constexpr, HC: tl.constexpr, NF: tl.constexpr,
            BANK: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr):
    """The perception gradient [M, 4C] on tensor cores (TF32, BF16), one K = 4C dot per chunk
    each way: the weights resident, or loaded per tile in a loop."""
    dtype = gdx.dtype
    M: tl.constexpr = gdx.shape[0]
    NCH: tl.constexpr = HID // HC
    if BANK != BANK_DATA and BANK != BANK_CHANNELS:
        # the identity path joins gp's first slot: the accumulator starts at [g, 0, 0, 0]
        zero = tl.where(cl[None, :] < 0, g, 0.0)
        gp = _concat4(tl.where(ok[:, None], g, 0.0), zero, zero, zero)
    else:
        gp = tl.zeros([M, 4 * C], dtype=dtype)
    if RESIDENT:
        for j in tl.static_range(NCH):
            gp = _gp_chunk(pc, gdx, ones, w1s[j], bss[j], wts[j], w2s[j], gp, NF, PRECISION)
    else:
        # a loop whose trip count the compiler cannot see (lz), so that it is not unrolled and
        # one chunk's weights and activations are live at once
        for j in range(0, NCH + lz):
            gp = _gp_chunk(pc, gdx, ones,
                           _w1_tile(w1p, b1p, lap, j * HC, C, HID, HC, NF, BANK, BIAS=True,
                                    HIDDEN_ROWS=False, K_ORDER=IEEE).to(dtype),
                           _bias_rows(b1p, j * HC, C, HC).to(dtype),
                           _w1_tile(w1p, b1p, lap, j * HC, C, HID, HC, NF, BANK, BIAS=False,
                                    HIDDEN_ROWS=True, K_ORDER=PRECISION).to(dtype),
                           _w2_cols(w2p, j * HC, C, HC), gp, NF, PRECISION)
    return gp


@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_bwd_gp_kernel(
    r_ptr,          # [B*H*W, C] the step's stored input state
    cw_ptr,         # [B*H*W] int16 the step's cell words (nca_step_fwd cw_out)
    g_ptr,          # [B*H*W, C] dL/d out
    gp_ptr,         # [B, H + 2, W + 2, F, C] out: perception gradient (slot 0 + g for a named
                    # bank); its zero border is not written
    w1_ptr, b1_ptr, w2_ptr,     # [F, C, HID], [HID], [HID, C]
    filt_ptr,                   # taps as data: [F, 9] (BANK_DATA) or [F, 9, C] (BANK_CHANNELS)
    lap,                        # the Laplacian's scale in a named bank (1 or 1/16)
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, HID: tl.constexpr, NF: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, HC: tl.constexpr, BANK: tl.constexpr,
    PADDING: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    RESIDENT: tl.constexpr, ANCHOR: tl.constexpr,
):
    _static_shapes(C, NF, HID, HC)
    tl.static_assert(HC <= HID, "HC: a chunk of the hidden units")
    M: tl.constexpr = TH * TW
    cols = tl.arange(0, C)
    dtype = r_ptr.dtype.element_ty
    ones = (tl.where(cols[None, :] == 0, 1.0, 0.0) + tl.zeros([M, C], dtype=tl.float32)).to(dtype)
    # ---- parameters, once per program (RESIDENT) or once per tile (in the dense helpers)
    held = _program_taps(filt_ptr, NF, C, BANK)
    w1s, bss, wts, w2s = (), (), (), ()
    if RESIDENT:
        w1s, bss, wts, w2s = _gp_weights(w1_ptr, b1_ptr, w2_ptr, lap, r_ptr, C, HID, HC, NF,
                                         BANK, PRECISION)

    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x
        cw = tl.load(cw_ptr + cell).to(tl.int32)
        lz = _loop_zero(tx)
        cl = tl.arange(0, C) + lz                       # index tensors built in the loop
        w1p = w1_ptr + lz       # weights staged per tile: in the loop too (step_fwd)
        b1p = b1_ptr + lz
        w2p = w2_ptr + lz

        # ---- the forward's perception again: [M, 4C], a constant-1 column after F = 3
        taps = _load_taps(r_ptr, cw, base, y, x, H, W, lz, C, PADDING, PACKED=True)
        p0, p1, p2, p3 = _bank(taps, _tile_taps(held, filt_ptr, NF, C, BANK), NF, BANK)
        if NF == 3:
            p3 = tl.where((cl[None, :] == 0) & (cw >= 0)[:, None], 1.0, 0.0).to(dtype)
        pc = _layout_anchor(_concat4(p0, p1, p2, p3), ANCHOR)

        # ---- the update's gradient: the cells that fired (and are in the grid)
        g = tl.load(g_ptr + cell[:, None] * C + cl[None, :])
        gdx = tl.where(((cw & PACKED_FIRE) != 0)[:, None] & ok[:, None], g, 0.0).to(dtype)
        # ---- hidden chunks: gp += gh @ W1^T (for a named bank gp_0 starts at g: the identity)
        if PRECISION == IEEE:
            gp = _gp_fma(p0, p1, p2, p3, gdx, g, ok, w1s, bss, wts, w2s, w1p, b1p, w2p, lap, C,
                         HID, HC, NF, BANK, RESIDENT)
        else:
            gp = _gp_mma(pc, gdx, ones, g, ok, cl, w1s, bss, wts, w2s, w1p, b1p, w2p, lap, lz,
                         C, HID, HC, NF, BANK, PRECISION, RESIDENT)

        # ---- perception gradient to scratch, [cell, k, c] inside the zero border
        kc = tl.arange(0, 4 * C) + lz
        gi = _bordered(cell, b, ty, H, W, TH, TW, INT64)
        tl.store(gp_ptr + gi[:, None] * (NF * C) + kc[None, :], gp,
                 mask=ok[:, None] & (kc < NF * C)[None, :])
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)


# ------------------------------------------------------------------------ 2. the weight kernel
@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_bwd_weights_kernel(
    # this step
    r_ptr,          # [B*H*W, C] the step's stored input state
    cw_ptr,         # [B*H*W] int16 the step's cell words
    g_ptr,          # [B*H*W, C] dL/d out of this step: read, or written when NEXT
    part_ptr,       # [programs, PART] in/out: each program adds its sums to its own row
    # the next step (NEXT): its perception gradient, cell words, dL/d out (BANK == 0 only)
    gpn_ptr, cwn_ptr, gn_ptr,       # gpn: [B, H + 2, W + 2, F, C] (gp_buffer)
    # parameters
    w1_ptr, b1_ptr, w2_ptr, filt_ptr,
    lap,            # the Laplacian's scale in a named bank (1 or 1/16)
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, HID: tl.constexpr, NF: tl.constexpr, HR: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BANK: tl.constexpr, NEXT: tl.constexpr,
    PADDING: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    ANCHOR: tl.constexpr,
):
    """Program (p, j) walks tiles p, p + P, ... for hidden units j*HR .. j*HR + HR (HR = HID
    unless the accumulators of every unit would not fit). PART = 4C*HID (dW1 as [4C, HID],
    rows k*C + c; with F = 3 row 3C is db1) + HID*C (dW2^T) + C (db2) + HID (db1 when F = 4).
    dW1's filter rows carry the scale ``_w1_tile`` folds into W1 for a named bank; the launcher
    takes it out. With NEXT every j computes g, the first one stores it; db2 is j = 0's."""
    _static_shapes(C, NF, HID, HR)
    M: tl.constexpr = TH * TW
    cols = tl.arange(0, C)
    dtype = r_ptr.dtype.element_ty
    j0 = tl.program_id(1) * HR
    hh = j0 + tl.arange(0, HR)
    hok = hh < HID          # HR may pad a small hidden layer to the MMA's 64 rows

    # ---- parameters, once per program: hidden units as rows
    w1t = _w1_tile(w1_ptr, b1_ptr, lap, j0, C, HID, HR, NF, BANK, BIAS=True, HIDDEN_ROWS=True,
                   K_ORDER=IEEE).to(dtype)
    w2t = tl.load(w2_ptr + hh[:, None] * C + cols[None, :], mask=hok[:, None], other=0.0)
    if NF == 4:
        b1c = tl.where((cols == 0)[None, :] & hok[:, None],
                       tl.load(b1_ptr + hh, mask=hok, other=0.0)[:, None], 0.0).to(dtype)
        ones_t = (tl.where((cols == 0)[:, None], 1.0, 0.0)
                  + tl.zeros([C, M], dtype=tl.float32)).to(dtype)          # [C, M]
    dw1 = tl.zeros([HR, 4 * C], dtype=dtype)
    dw2 = tl.zeros([HR, C], dtype=dtype)
    db1 = tl.zeros([HR], dtype=dtype)
    db2 = tl.zeros([M, C], dtype=dtype)
    held = _program_taps(filt_ptr, NF, C, BANK, ROWS=True)      # registers to spare

    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x
        lz = _loop_zero(tx)
        cl = tl.arange(0, C) + lz
        f = _tile_taps(held, filt_ptr, NF, C, BANK, ROWS=True)      # both stencils' taps

        # ---- dL/d out of this step: the next step's input gradient, or given
        if NEXT:
            g = _input_grad(gpn_ptr, cwn_ptr, gn_ptr, f, b, y, x, cell, H, W, lz,
                            C, NF, BANK, PADDING, INT64)
            if j0 == 0:
                tl.store(g_ptr + cell[:, None] * C + cl[None, :], g.to(g_ptr.dtype.element_ty),
                         mask=ok[:, None])
        else:
            g = tl.load(g_ptr + cell[:, None] * C + cl[None, :])
        cw = tl.load(cw_ptr + cell).to(tl.int32)
        gdx = tl.where(((cw & PACKED_FIRE) != 0)[:, None] & ok[:, None], g, 0.0).to(dtype)
        db2 += gdx

        # ---- the forward's perception again
        taps = _load_taps(r_ptr, cw, base, y, x, H, W, lz, C, PADDING, PACKED=True)
        p0, p1, p2, p3 = _bank(taps, f, NF, BANK)
        if NF == 3:
            p3 = tl.where((cl[None, :] == 0) & (cw >= 0)[:, None], 1.0, 0.0).to(dtype)
        pc = _layout_anchor(_concat4(p0, p1, p2, p3), ANCHOR)

        # ---- hidden units as rows: h^T = W1^T p^T, gh^T = (W2^T gdx^T) * (h_pre > 0)
        hp = _mm(w1t, tl.trans(pc), tl.zeros([HR, M], dtype=dtype), PRECISION)
        if NF == 4:
            hp = _mm(b1c, ones_t, hp, PRECISION)
        live = hp > 0
        gh = tl.where(live, _mm(w2t, tl.trans(gdx), tl.zeros_like(hp), PRECISION), 0.0)
        # the cells are the K of the weight-gradient dots: gh^T and h^T are their register
        # operands as they are (the K order of _as_k_operand), the rows of p and gdx follow it
        dw1 = _mm(_as_k_operand(gh, PRECISION), _k_rows(pc, PRECISION), dw1, PRECISION)
        dw2 = _mm(_as_k_operand(tl.where(live, hp, 0.0), PRECISION), _k_rows(gdx, PRECISION),
                  dw2, PRECISION)
        if NF == 4:
            db1 += tl.sum(gh, axis=1)
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)

    # ---- this program's sums, added to its own row (hidden units j0 .. j0 + HR)
    part = part_ptr + pid.to(tl.int64) * (4 * C * HID + HID * C + C + HID)
    kk = tl.arange(0, 4 * C)
    p = part + kk[None, :] * HID + hh[:, None]
    tl.store(p, tl.load(p, mask=hok[:, None]) + dw1, mask=hok[:, None])
    p = part + 4 * C * HID + hh[:, None] * C + cols[None, :]
    tl.store(p, tl.load(p, mask=hok[:, None]) + dw2, mask=hok[:, None])
    p = part + 4 * C * HID + HID * C + cols
    if j0 == 0:
        tl.store(p, tl.load(p) + tl.sum(db2, axis=0))
    if NF == 4:
        p = part + 4 * C * HID + HID * C + C + hh
        tl.store(p, tl.load(p, mask=hok) + db1, mask=hok)


# --------------------------------------------------------------------------------- launchers
def part_size(C: int, HID: int) -> int:
    """Floats per program in the weight-gradient buffer of ``nca_step_bwd``."""
    return 4 * C * HID + HID * C + C + HID


def weight_grads(parts: torch.Tensor, C: int, HID: int, F_: int, spec: StepSpec):
    """(dw1k [F, C, HID], db1 [HID], dw2t [HID, C], db2 [C]) from a [programs, PART] buffer,
    summed over programs in a fixed order, the scale ``_w1_tile`` folds into W1 taken out."""
    total = parts.sum(0)
    dw1 = total[:4 * C * HID].view(4 * C, HID)
    o = 4 * C * HID
    dw2t = total[o:o + HID * C].view(HID, C).clone()
    db2 = total[o + HID * C:o + HID * C + C].clone()
    db1 = dw1[3 * C].clone() if F_ == 3 else total[o + HID * C + C:].clone()
    dw1k = dw1[:F_ * C].view(F_, C, HID).clone()
    for k, scale in enumerate(w1_scales(spec.bank, F_)):
        if scale != 1.0:
            dw1k[k] *= scale
    return dw1k, db1, dw2t, db2


def new_parts(B: int, H: int, W: int, C: int, HID: int, F_: int, device, precision: str,
              dtype=torch.float32, bank: int = 0, cfg=None) -> torch.Tensor:
    """A zeroed weight-gradient buffer for ``bwd_weights`` (one row per program), sized by the
    launch configuration it will be used with: ``cfg``, or ``configs.select_weights`` for
    ``bank`` (the filter bank changes the tiles, hence the programs)."""
    cfg = cfg or configs.select_weights(B * H * W, C, HID, F_, device, precision, bank)
    programs, *_ = persistent_grid(B, H, W, cfg)
    return torch.zeros((programs, part_size(C, HID)), dtype=dtype, device=device)


def cell_words(r, q, w1k, b1, w2t, b2, filters, **kw) -> torch.Tensor:
    """The int16 [B, H, W] cell words of a step (as ``nca_step_fwd(cw_out=)`` saves them),
    by running the step: for callers of ``nca_step_bwd`` that did not keep them."""
    B, H, W, _ = r.shape
    cw = torch.empty((B, H, W), dtype=torch.int16, device=r.device)
    nca_step_fwd(r, q, w1k, b1, w2t, b2, filters, cw_out=cw, **kw)
    return cw


def _check_cw(cw, B, H, W):
    if tuple(cw.shape) != (B, H, W) or cw.dtype != torch.int16:
        raise ValueError(f"cw: expected int16 [B, H, W] = {(B, H, W)} cell words, got "
                         f"{cw.dtype} {tuple(cw.shape)}")


# The three launchers check nothing: ``nca_step_bwd`` validates, a rollout validates once. Each
# takes the step's ``spec`` (``StepSpec``), or the keyword options that make one
# (``StepSpec``'s fields: padding, precision, bank, ...), and ``cfg``, the launch configuration
# of its selector when the caller chose it once for many steps.
def bwd_gp(r, cw, g, w1k, b1, w2t, filters, *, spec: Optional[StepSpec] = None, gp=None,
           cfg=None, **options):
    """Kernel 1: the perception gradient of a step (slot 0 + g, named banks) in ``gp``, a
    [B, H + 2, W + 2, F, C] buffer with a zero border (``gp_buffer``; a new one when None).
    cfg: ``configs.select_backward(...)``."""
    spec = spec_of(spec, options)
    B, H, W, C = r.shape
    F_, _, HID = w1k.shape
    cfg = cfg or configs.select_backward(B * H * W, C, HID, F_, r.device, spec.precision,
                                         spec.bank)
    programs, *sizes = persistent_grid(B, H, W, cfg)
    if gp is None:
        gp = gp_buffer(B, H, W, F_, C, r.dtype, r.device)
    check_gp(gp, B, H, W, F_, C)
    _nca_step_bwd_gp_kernel[(programs,)](
        r, cw, g, gp, w1k, b1, w2t, filters, spec.lap_scale,
        H, W, *sizes,
        C=C, HID=HID, NF=F_, TH=cfg.tile_h, TW=cfg.tile_w, HC=cfg.hidden_chunk,
        BANK=spec.kernel_bank, PADDING=spec.padding_code, PRECISION=spec.precision_code,
        INT64=gp_int64(cfg, gp), RESIDENT=cfg.resident, ANCHOR=cfg.anchor,
        **cfg.launch_options())
    return gp


def bwd_weights(r, cw, g, parts, w1k, b1, w2t, filters, *, spec: Optional[StepSpec] = None,
                next_step=None, cfg=None, **options):
    """Kernel 2: add a step's weight gradients to ``parts``. next_step = (gp, cw, g) of the
    following step: then this step's g is computed from them (and written into ``g``) first.
    cfg: ``configs.select_weights(...)``."""
    spec = spec_of(spec, options)
    B, H, W, C = r.shape
    F_, _, HID = w1k.shape
    cfg = cfg or configs.select_weights(B * H * W, C, HID, F_, r.device, spec.precision,
                                        spec.bank)
    programs, *sizes = persistent_grid(B, H, W, cfg)
    if tuple(parts.shape) != (programs, part_size(C, HID)) or parts.dtype != r.dtype:
        raise ValueError(f"parts: expected a {r.dtype} [{programs}, {part_size(C, HID)}] buffer "
                         f"(new_parts), got {parts.dtype} {tuple(parts.shape)}")
    gpn, cwn, gn = next_step if next_step is not None else (g, cw, g)
    if next_step is not None:
        check_gp(gpn, B, H, W, F_, C)
    _nca_step_bwd_weights_kernel[(programs, triton.cdiv(HID, cfg.hidden_chunk))](
        r, cw, g, parts, gpn, cwn, gn, w1k, b1, w2t, filters, spec.lap_scale,
        H, W, *sizes,
        C=C, HID=HID, NF=F_, HR=cfg.hidden_chunk, TH=cfg.tile_h, TW=cfg.tile_w,
        BANK=spec.kernel_bank, NEXT=next_step is not None, PADDING=spec.padding_code,
        PRECISION=spec.precision_code, INT64=gp_int64(cfg, gpn), ANCHOR=cfg.anchor,
        **cfg.launch_options())


def nca_step_bwd(r: torch.Tensor, q, g: torch.Tensor, w1k, b1, w2t, b2, filters, *, seed: int,
                 step: int, fire_threshold: int, alive_threshold, alpha_channel: int,
                 padding: str, precision: str, named_bank: Optional[int] = None, cw=None,
                 grad_r=None):
    """Gradients of one step_fwd call, all three kernels. r, g: [B, H, W, C]; q: the input's
    hq plane (or an unpadded [B, H, W] pre-mask) or None. cw: the step's int16 cell words from
    ``nca_step_fwd(cw_out=)`` (computed here when None).

    Returns (grad_r [B, H, W, C], dw1k [F, C, HID], db1 [HID], dw2t [HID, C], db2 [C]). A rollout
    calls the kernels itself (``bwd_gp``, ``bwd_weights``, ``bwd_input``) to chain the steps.
    """
    filters = kernel_taps(filters, r.shape[-1])
    named_bank = configs.launch_bank(filters, named_bank)
    B, H, W, C, HID, F_ = check_shapes(r, w1k, b1, w2t, b2, filters)
    if tuple(g.shape) != (B, H, W, C) or g.dtype != r.dtype or g.device != r.device:
        raise ValueError(f"g: expected a {r.dtype} [B, H, W, C] = {(B, H, W, C)} gradient on "
                         f"{r.device}, got {g.dtype} {tuple(g.shape)} on {g.device}")
    if alive_threshold is None and q is not None:
        raise ValueError("q: pre-mask bits given but alive masking is off")
    r, g = r.contiguous(), g.contiguous()
    w = StepWeights(w1k, b1, w2t, b2, filters).contiguous()
    spec = StepSpec(padding=padding, precision=precision, bank=named_bank,
                    alive_threshold=alive_threshold, alpha_channel=alpha_channel,
                    fire_threshold=fire_threshold, seed=seed)
    if cw is None:
        cw = cell_words(r, q, *w, seed=seed, step=step, fire_threshold=fire_threshold,
                        alive_threshold=alive_threshold, alpha_channel=alpha_channel,
                        padding=padding, precision=precision, named_bank=spec.bank)
    _check_cw(cw, B, H, W)
    parts = new_parts(B, H, W, C, HID, F_, r.device, precision, r.dtype, spec.bank)
    gp = bwd_gp(r, cw, g, w.w1k, w.b1, w.w2t, w.filters, spec=spec)
    bwd_weights(r, cw, g, parts, w.w1k, w.b1, w.w2t, w.filters, spec=spec)
    grad_r = bwd_input(gp, cw, g, w.filters, (B, H, W, C), spec=spec, grad_r=grad_r)
    return (grad_r, *weight_grads(parts, C, HID, F_, spec))
