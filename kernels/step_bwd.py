"""Backward of one NCA step, handwritten: gradients for the stored state and every weight.

Nothing from the forward is kept but its input ``r`` (and the pending pre-mask bits ``q``):
the kernels recompute the neighbourhood, perception, hidden layer and update mask exactly as
``step_fwd`` did (same helpers in ``_math``, same Philox counter), so they need no activations.

With ``g = dL/d out`` for the raw update ``out = x + dx * fire`` of step_fwd:

    gdx   = g * fire                                  db2 = sum_i gdx,  dW2 = h^T gdx
    gh    = (gdx @ W2^T) * (h_pre > 0)                db1 = sum_i gh,   dW1_k = p_k^T gh
    gp_k  = gh @ W1_k^T                               (perception gradient, [cells, F, C])
    gx[j] = g[j] + sum_taps sum_k f_k[tap] * gp_k[j - tap]        (transposed stencil)
    gr[j] = gx[j] * keep[j]                           (the deferred alive mask is a constant)

Four kernels, none with atomics, so the same inputs give bitwise the same gradients:

0. ``_nca_step_bwd_keep_kernel`` (grid: tiles; only when the input owes a mask) writes
   keep = q and any(alpha > thr on the 3x3), one byte per cell: the others read keep[n] where
   the forward gathers a 5x5 alpha window per cell (25 more live registers in the weight kernel,
   which would do it once per hidden chunk).
1. ``_nca_step_bwd_gp_kernel`` (grid: tiles) recomputes perception and the hidden layer chunk by
   chunk and writes gp to a scratch buffer: the transposed stencil of a cell needs gp of its 8
   neighbours, which other programs compute.
2. ``_nca_step_bwd_weights_kernel`` (grid: programs x hidden chunks) is persistent: program
   (p, c) walks tiles p, p + P, ... in a fixed order and accumulates the gradients of hidden
   chunk c in registers, written once to its own slot of a [P, ...] buffer that the launcher
   sums in a fixed order. Splitting by chunk keeps the accumulators at 4*C*HC + HC*C floats
   (the whole-hidden version spilled on every variant); the price is recomputing perception
   once per chunk. Its perception walks the taps in a loop (``_perceive_rolled``: unrolled,
   every tap's loads and the F*9 filter weights are in flight at once), and dW1 is one dot
   P^T @ gh with P = [M, 4C] the F perception tiles side by side (a wgmma on sm_90a; F = 3 pads
   a zero tile).
3. ``_nca_step_bwd_input_kernel`` (grid: tiles) gathers gp through the transposed stencil, adds
   the identity path and applies the deferred alive mask; wide rows (F*C > 64) walk the taps
   in a loop (configs.select_transpose).

Scratch traffic: F*C*4 bytes per cell written and read once (192 B at the defaults). With
pending bits the keep kernel adds, per cell, q (1 B) and the 32-byte sector holding alpha read,
1 B written; the other kernels read that byte where they read q.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._math import (_alpha_hot, _cells, _concat_filters, _fire, _hidden_chunk, _mm, _neighbour,
                    _perceive, _perceive_rolled, _post_alive)
from .step_fwd import check_shapes


@triton.jit
def _nca_step_bwd_gp_kernel(
    # state and incoming gradient
    r_ptr,          # [B*H*W, C] stored input state of the step
    keep_ptr,       # [B*H*W] uint8 the deferred alive mask it owes (HAS_Q; the keep kernel)
    g_ptr,          # [B*H*W, C] dL/d out
    gp_ptr,         # [B*H*W, F, C] out: perception gradient (scratch for the input kernel)
    # parameters
    w1_ptr, b1_ptr, w2_ptr, filt_ptr,   # [F, C, HID], [HID], [HID, C], [F, 9]
    # step
    seed, step, fire_threshold,
    # sizes
    n_cells, HW, H, W,
    C: tl.constexpr, HID: tl.constexpr, NF: tl.constexpr,
    BLOCK_M: tl.constexpr, HC: tl.constexpr, HAS_Q: tl.constexpr,
    CIRCULAR: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    H = tl.cast(H, tl.int32)      # one grid fits int32 (configs.MAX_GRID_CELLS)
    W = tl.cast(W, tl.int32)
    cell, base, y, x, row_ok = _cells(pid, BLOCK_M, n_cells, HW, W, INT64)
    cols = tl.arange(0, C)
    dtype = r_ptr.dtype.element_ty

    # ---- recompute the forward's perception and mask
    p0, p1, p2, p3, _ = _perceive(r_ptr, keep_ptr, row_ok, filt_ptr, base, y, x, row_ok, H, W,
                                  0.0, C, NF, 0, HAS_Q, True, False, CIRCULAR)
    fire = _fire(seed, cell, step, fire_threshold, INT64)
    g = tl.load(g_ptr + cell[:, None] * C + cols[None, :], mask=row_ok[:, None], other=0.0)
    gdx = tl.where(fire[:, None], g, 0.0).to(dtype)

    # ---- per hidden chunk: gh = (gdx W2^T) * relu'(h_pre);  gp_k += gh W1_k^T
    gp0 = tl.zeros([BLOCK_M, C], dtype=dtype)
    gp1 = tl.zeros_like(gp0)
    gp2 = tl.zeros_like(gp0)
    gp3 = tl.zeros_like(gp0)
    for j0 in range(0, HID, HC):
        h_pre, w0, w1, w2, w3 = _hidden_chunk(p0, p1, p2, p3, w1_ptr, b1_ptr, j0, C, HID, HC,
                                              NF, PRECISION)
        hh = j0 + tl.arange(0, HC)
        w2c = tl.load(w2_ptr + hh[:, None] * C + cols[None, :])
        gh = tl.where(h_pre > 0, _mm(gdx, tl.trans(w2c), PRECISION), 0.0).to(dtype)
        gp0 += _mm(gh, tl.trans(w0), PRECISION)
        gp1 += _mm(gh, tl.trans(w1), PRECISION)
        gp2 += _mm(gh, tl.trans(w2), PRECISION)
        if NF == 4:
            gp3 += _mm(gh, tl.trans(w3), PRECISION)

    # ---- perception gradient to scratch
    offs = cell[:, None] * (NF * C) + cols[None, :]
    tl.store(gp_ptr + offs, gp0, mask=row_ok[:, None])
    tl.store(gp_ptr + offs + C, gp1, mask=row_ok[:, None])
    tl.store(gp_ptr + offs + 2 * C, gp2, mask=row_ok[:, None])
    if NF == 4:
        tl.store(gp_ptr + offs + 3 * C, gp3, mask=row_ok[:, None])


@triton.jit
def _nca_step_bwd_weights_kernel(
    r_ptr, keep_ptr, g_ptr,             # as in the gp kernel
    part_ptr,       # [programs, PART] out: this program's partial weight gradients
    w1_ptr, b1_ptr, w2_ptr, filt_ptr,
    seed, step, fire_threshold,
    n_cells, n_programs, tiles_per_program, HW, H, W,
    n_taps,         # 9: a run-time value, so that the compiler keeps the tap loop rolled
    C: tl.constexpr, HID: tl.constexpr, NF: tl.constexpr,
    BLOCK_M: tl.constexpr, HC: tl.constexpr, HAS_Q: tl.constexpr,
    CIRCULAR: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
):
    """Program (pid, chunk) walks tiles pid, pid + n_programs, ... and accumulates, in
    registers, the gradients of hidden units chunk*HC .. +HC: dW1_k[:, chunk], dW2[chunk, :],
    db1[chunk] (and db2, in chunk 0's programs). PART = F*C*HID + HID*C + HID + C."""
    pid = tl.program_id(0)
    H = tl.cast(H, tl.int32)      # one grid fits int32 (configs.MAX_GRID_CELLS)
    W = tl.cast(W, tl.int32)
    j0 = tl.program_id(1) * HC
    cols = tl.arange(0, C)
    hh = j0 + tl.arange(0, HC)
    dtype = r_ptr.dtype.element_ty
    w2c = tl.load(w2_ptr + hh[:, None] * C + cols[None, :])

    kc = tl.arange(0, 4 * C)
    kok = kc < NF * C
    dw1 = tl.zeros([4 * C, HC], dtype=dtype)
    dw2 = tl.zeros([HC, C], dtype=dtype)
    db1 = tl.zeros([HC], dtype=dtype)
    db2 = tl.zeros([C], dtype=dtype)

    for i in range(0, tiles_per_program):
        # tiles past the end have no cells in range: every load is masked, nothing accumulates
        cell, base, y, x, row_ok = _cells(pid + i * n_programs, BLOCK_M, n_cells, HW, W, INT64)
        p0, p1, p2, p3 = _perceive_rolled(r_ptr, keep_ptr, filt_ptr, base, y, x, row_ok, H, W,
                                          n_taps, C, NF, HAS_Q, CIRCULAR)
        fire = _fire(seed, cell, step, fire_threshold, INT64) & row_ok
        gdx = tl.load(g_ptr + cell[:, None] * C + cols[None, :], mask=fire[:, None], other=0.0)
        h_pre, _, _, _, _ = _hidden_chunk(p0, p1, p2, p3, w1_ptr, b1_ptr, j0, C, HID, HC, NF,
                                          PRECISION)
        h = tl.maximum(h_pre, 0.0).to(dtype)
        gh = tl.where(h_pre > 0, _mm(gdx, tl.trans(w2c), PRECISION), 0.0).to(dtype)
        db2 += tl.sum(gdx, axis=0)
        dw2 += _mm(tl.trans(h), gdx, PRECISION)
        db1 += tl.sum(gh, axis=0)
        dw1 += _mm(tl.trans(_concat_filters(p0, p1, p2, p3)), gh, PRECISION)

    # ---- this program's partial sums, written once into its own slot
    part = part_ptr + pid.to(tl.int64) * (NF * C * HID + HID * C + HID + C)
    tl.store(part + kc[:, None] * HID + hh[None, :], dw1, mask=kok[:, None])
    part = part + NF * C * HID
    tl.store(part + hh[:, None] * C + cols[None, :], dw2)
    part = part + HID * C
    tl.store(part + hh, db1)
    if j0 == 0:
        tl.store(part + HID + cols, db2)


@triton.jit
def _transposed_tap(acc, gp_ptr, filt_ptr, base, y, x, row_ok, tap, H, W,
                    C: tl.constexpr, NF: tl.constexpr, CIRCULAR: tl.constexpr):
    """acc + sum_k f_k[tap] * gp_k of the cell that reached each cell through ``tap``."""
    cols = tl.arange(0, C)
    sy, sx, ok = _neighbour(y, x, 1 - tap // 3, 1 - tap % 3, H, W, CIRCULAR)
    ok = ok & row_ok
    src = (base + sy * W + sx)[:, None] * (NF * C) + cols[None, :]
    for k in tl.static_range(NF):
        gp = tl.load(gp_ptr + src + k * C, mask=ok[:, None], other=0.0)
        acc += tl.load(filt_ptr + k * 9 + tap) * gp
    return acc


@triton.jit
def _nca_step_bwd_input_kernel(
    keep_ptr,       # [B*H*W] uint8 the deferred alive mask of the input (HAS_Q)
    g_ptr,          # [B*H*W, C] dL/d out (the identity path)
    gp_ptr,         # [B*H*W, F, C] perception gradient from kernel 1
    gr_ptr,         # [B*H*W, C] out: dL/d r
    filt_ptr,       # [F, 9]
    n_cells, HW, H, W,
    C: tl.constexpr, NF: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_Q: tl.constexpr, CIRCULAR: tl.constexpr, INT64: tl.constexpr,
    UNROLL: tl.constexpr,     # taps unrolled (constexpr offsets) or in a loop (configs.py)
):
    pid = tl.program_id(0)
    H = tl.cast(H, tl.int32)      # one grid fits int32 (configs.MAX_GRID_CELLS)
    W = tl.cast(W, tl.int32)
    cell, base, y, x, row_ok = _cells(pid, BLOCK_M, n_cells, HW, W, INT64)
    cols = tl.arange(0, C)
    acc = tl.load(g_ptr + cell[:, None] * C + cols[None, :], mask=row_ok[:, None], other=0.0)

    # ---- transposed stencil: cell j received f_k[tap] * x[j] from the cell j - tap
    if UNROLL:
        for tap in tl.static_range(9):
            acc = _transposed_tap(acc, gp_ptr, filt_ptr, base, y, x, row_ok, tap, H, W, C, NF,
                                  CIRCULAR)
    else:
        for tap in range(9):
            acc = _transposed_tap(acc, gp_ptr, filt_ptr, base, y, x, row_ok, tap, H, W, C, NF,
                                  CIRCULAR)

    # ---- the deferred alive mask the forward applied on load
    if HAS_Q:
        keep = tl.load(keep_ptr + cell, mask=row_ok, other=0) != 0
        acc = tl.where(keep[:, None], acc, 0.0)
    tl.store(gr_ptr + cell[:, None] * C + cols[None, :], acc.to(gr_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _nca_step_bwd_keep_kernel(
    r_ptr,          # [B*H*W, C] stored input state of the step
    q_ptr,          # [B*H*W] uint8 pending pre-mask bits
    keep_ptr,       # [B*H*W] uint8 out: the deferred alive mask, q and any(alpha > thr on 3x3)
    thr, n_cells, HW, H, W,
    C: tl.constexpr, ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
    CIRCULAR: tl.constexpr, INT64: tl.constexpr,
):
    """keep[i] = q[i] and any(r_alpha > thr on the 3x3 around i): the mask ``step_fwd`` applied
    to each cell of its input on load, computed once per cell for the three kernels above
    (which would each gather a 5x5 alpha window per cell, the weight kernel once per chunk)."""
    pid = tl.program_id(0)
    H = tl.cast(H, tl.int32)      # one grid fits int32 (configs.MAX_GRID_CELLS)
    W = tl.cast(W, tl.int32)
    cell, base, y, x, row_ok = _cells(pid, BLOCK_M, n_cells, HW, W, INT64)
    hot = _alpha_hot(r_ptr, base, y, x, row_ok, H, W, thr, C, ALPHA, CIRCULAR, 1)
    keep = (tl.load(q_ptr + cell, mask=row_ok, other=0) != 0) & _post_alive(hot, 0, 0)
    tl.store(keep_ptr + cell, keep.to(tl.uint8), mask=row_ok)


def nca_step_bwd(r: torch.Tensor, q, g: torch.Tensor, w1k, b1, w2t, b2, filters, *, seed: int,
                 step: int, fire_threshold: int, alive_threshold, alpha_channel: int,
                 circular: bool, precision: str, grad_r=None):
    """Gradients of one step_fwd call. r, g: [B, H, W, C]; q: [B, H, W] uint8 or None.

    Returns (grad_r [B, H, W, C], dw1k [F, C, HID], db1 [HID], dw2t [HID, C], db2 [C]), the
    weight gradients in the kernels' layouts (see step_fwd), summed over the programs' partials
    in a fixed order.
    """
    B, H, W, C, HID, F_ = check_shapes(r, w1k, b1, w2t, b2, filters)
    if tuple(g.shape) != (B, H, W, C) or g.dtype != r.dtype or g.device != r.device:
        raise ValueError(f"g: expected a {r.dtype} [B, H, W, C] = {(B, H, W, C)} gradient on "
                         f"{r.device}, got {g.dtype} {tuple(g.shape)} on {g.device}")
    if alive_threshold is None and q is not None:
        raise ValueError("q: pre-mask bits given but alive masking is off")
    r, g = r.contiguous(), g.contiguous()
    n = B * H * W
    gcfg = configs.select_backward(n, C, HID, F_, r.device, precision)
    wcfg = configs.select_weights(n, C, HID, F_, r.device, precision)
    tcfg = configs.select_transpose(n, C, F_)
    part_size = F_ * C * HID + HID * C + HID + C
    parts = torch.empty((wcfg.programs, part_size), dtype=r.dtype, device=r.device)
    gp = torch.empty((n, F_, C), dtype=r.dtype, device=r.device)
    w1k, b1, w2t, filters = w1k.contiguous(), b1.contiguous(), w2t.contiguous(), filters.contiguous()
    keep = r                           # any pointer: unread without pending bits
    if q is not None:
        keep = torch.empty_like(q)
        kcfg = configs.select_keep(n, C)
        _nca_step_bwd_keep_kernel[(configs.n_tiles(B, H * W, kcfg.block_m),)](
            r, q, keep, float(alive_threshold), n, H * W, H, W,
            C=C, ALPHA=alpha_channel, BLOCK_M=kcfg.block_m, CIRCULAR=circular,
            INT64=kcfg.int64, num_warps=kcfg.num_warps, num_stages=kcfg.num_stages,
            maxnreg=kcfg.maxnreg)
    common = dict(C=C, HID=HID, NF=F_, HAS_Q=q is not None, CIRCULAR=circular,
                  PRECISION=configs.PRECISION_CODES[precision])
    _nca_step_bwd_gp_kernel[(configs.n_tiles(B, H * W, gcfg.block_m),)](
        r, keep, g, gp, w1k, b1, w2t, filters,
        seed, step, fire_threshold, n, H * W, H, W,
        BLOCK_M=gcfg.block_m, HC=gcfg.hidden_chunk, INT64=gcfg.int64,
        num_warps=gcfg.num_warps, num_stages=gcfg.num_stages, maxnreg=gcfg.maxnreg, **common)
    w_tiles = configs.n_tiles(B, H * W, wcfg.block_m)
    _nca_step_bwd_weights_kernel[(wcfg.programs, HID // wcfg.hidden_chunk)](
        r, keep, g, parts, w1k, b1, w2t, filters,
        seed, step, fire_threshold,
        n, wcfg.programs, triton.cdiv(w_tiles, wcfg.programs), H * W, H, W, 9,
        BLOCK_M=wcfg.block_m, HC=wcfg.hidden_chunk, INT64=wcfg.int64,
        num_warps=wcfg.num_warps, num_stages=wcfg.num_stages, maxnreg=wcfg.maxnreg, **common)
    grad_r = torch.empty_like(r) if grad_r is None else grad_r
    _nca_step_bwd_input_kernel[(configs.n_tiles(B, H * W, tcfg.block_m),)](
        keep, g, gp, grad_r, filters,
        n, H * W, H, W,
        C=C, NF=F_, BLOCK_M=tcfg.block_m,
        HAS_Q=q is not None, CIRCULAR=circular, INT64=tcfg.int64 or gcfg.int64,
        UNROLL=tcfg.unroll_taps,
        num_warps=tcfg.num_warps, num_stages=tcfg.num_stages, maxnreg=tcfg.maxnreg,
    )
    total = parts.sum(0)
    o = 0
    dw1k = total[o:o + F_ * C * HID].view(F_, C, HID)
    o += F_ * C * HID
    dw2t = total[o:o + HID * C].view(HID, C)
    o += HID * C
    db1 = total[o:o + HID]
    db2 = total[o + HID:o + HID + C]
    return grad_r, dw1k, db1, dw2t, db2
