"""Forward of one NCA step, fused: one read of the state, one write.

Maths (shared/docs/NCA_SPEC.md), per cell i of a channels-last state ``r [B*H*W, C]``:

    x[n]   = r[n] * keep[n]            keep[n] = q[n] and any(r_alpha > thr on 3x3 around n)
    p_k[i] = sum_taps f_k[tap] * x[i + tap]                                (k < F filters)
    h      = relu(sum_k p_k[i] @ W1_k + b1)                                W1_k: [C, hidden]
    dx     = h @ W2 + b2                                                   W2:   [hidden, C]
    out[i] = x[i] + dx * fire(seed, i, step)
    q_out[i] = pre[i] = any(x_alpha > thr on 3x3 around i)

The post-update alive mask needs the *updated* alpha of the 8 neighbours, which another program
computes. It is deferred instead of recomputed on a halo: a step stores its raw update ``out``
with the pre-mask bit ``q_out``, and the next step (or the rollout's final masking) applies
``keep`` when it loads. With ``HAS_Q`` off (the first step of a rollout, or alive masking off)
the input is already a true state and keep is 1.

Grid: one program per tile of BLOCK_M consecutive cells of one grid (row-major over H, W; a
grid's last tile is partial, tiles never straddle two grids, so a cell's row and column come
from an int32 position without a per-cell division by H*W). The dense layers run on tensor
cores, walking hidden in chunks of HC units: per chunk F dots with K = C, then one with K = HC
accumulating dx, so only [BLOCK_M, HC] activations are live (no spills at hidden 256). Nothing
is stored for backward: ``step_bwd`` recomputes all of this from ``r`` and ``q``.
Limits: C in {16, 32}, hidden in {32, 64, 128, 256}, F in {3, 4}; one grid below 2**31 - 8192
cells (configs.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._math import _alpha_hot, _cells, _fire, _hidden_chunk, _mm, _perceive, _post_alive


@triton.jit
def _nca_step_fwd_kernel(
    # state
    r_ptr,          # [B*H*W, C] stored state (raw update of the previous step, or a true state)
    q_ptr,          # [B*H*W] uint8 pre-mask bits the stored state still owes (HAS_Q)
    out_ptr,        # [B*H*W, C] this step's raw update
    q_out_ptr,      # [B*H*W] uint8 this step's pre-mask bits (ALIVE)
    # parameters
    w1_ptr,         # [F, C, HID]  W1_k[c, j] = w1[j, c*F + k]
    b1_ptr,         # [HID]
    w2_ptr,         # [HID, C]     transpose of w2
    b2_ptr,         # [C]
    filt_ptr,       # [F, 9] filter taps, row-major 3x3
    # step
    seed, step, fire_threshold, thr,
    # sizes
    n_cells, HW, H, W,
    C: tl.constexpr, HID: tl.constexpr, NF: tl.constexpr, ALPHA: tl.constexpr,
    BLOCK_M: tl.constexpr, HC: tl.constexpr, HAS_Q: tl.constexpr, ALIVE: tl.constexpr,
    CIRCULAR: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    H = tl.cast(H, tl.int32)      # one grid fits int32 (configs.MAX_GRID_CELLS)
    W = tl.cast(W, tl.int32)
    cell, base, y, x, row_ok = _cells(pid, BLOCK_M, n_cells, HW, W, INT64)
    cols = tl.arange(0, C)

    # ---- load neighbourhood, perceive
    hot = row_ok
    if HAS_Q:
        hot = _alpha_hot(r_ptr, base, y, x, row_ok, H, W, thr, C, ALPHA, CIRCULAR, 2)
    p0, p1, p2, p3, pre = _perceive(r_ptr, q_ptr, hot, filt_ptr, base, y, x, row_ok, H, W, thr,
                                    C, NF, ALPHA, HAS_Q, False, ALIVE, CIRCULAR)

    # ---- dense layers, chunked over hidden: h = relu(sum_k p_k W1_k + b1), dx = h W2 + b2
    dx = tl.zeros([BLOCK_M, C], dtype=p0.dtype)
    for j0 in range(0, HID, HC):
        h, _, _, _, _ = _hidden_chunk(p0, p1, p2, p3, w1_ptr, b1_ptr, j0, C, HID, HC, NF,
                                      PRECISION)
        h = tl.maximum(h, 0.0).to(p0.dtype)
        hh = j0 + tl.arange(0, HC)
        dx += _mm(h, tl.load(w2_ptr + hh[:, None] * C + cols[None, :]), PRECISION)
    dx += tl.load(b2_ptr + cols)[None, :]

    # ---- stochastic update, store. The cell's own true state is read again (an L1 hit) rather
    # than held in registers across the dense layers.
    center = tl.load(r_ptr + cell[:, None] * C + cols[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_Q:
        keep = (tl.load(q_ptr + cell, mask=row_ok, other=0) != 0) & _post_alive(hot, 0, 0)
        center = tl.where(keep[:, None], center, 0.0)
    fire = _fire(seed, cell, step, fire_threshold, INT64)
    out = center + tl.where(fire[:, None], dx, 0.0)
    tl.store(out_ptr + cell[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    if ALIVE:
        tl.store(q_out_ptr + cell, pre.to(tl.uint8), mask=row_ok)


def check_shapes(r, w1k, b1, w2t, b2, filters):
    """Validate the launcher's operands; returns (B, H, W, C, HID, F)."""
    if r.dim() != 4:
        raise ValueError(f"r: expected a [B, H, W, C] channels-last state, got {tuple(r.shape)}")
    B, H, W, C = r.shape
    if w1k.dim() != 3 or w1k.shape[1] != C:
        raise ValueError(f"w1k: expected [F, C={C}, hidden], got {tuple(w1k.shape)}")
    F_, _, HID = w1k.shape
    if H * W > configs.MAX_GRID_CELLS:
        raise ValueError(f"r: a {H} x {W} grid has more than {configs.MAX_GRID_CELLS} cells, the "
                         f"kernels' int32 in-grid index; use backend='torch'")
    if C not in configs.SUPPORTED_CHANNELS:
        raise ValueError(f"channels: the Triton kernels support C in "
                         f"{configs.SUPPORTED_CHANNELS}, got {C}; use backend='torch'")
    if HID not in configs.SUPPORTED_HIDDEN:
        raise ValueError(f"hidden: the Triton kernels support hidden in "
                         f"{configs.SUPPORTED_HIDDEN}, got {HID}; use backend='torch'")
    if F_ not in configs.SUPPORTED_FILTERS:
        raise ValueError(f"filters: the Triton kernels support F in {configs.SUPPORTED_FILTERS} "
                         f"filters, got {F_}; use backend='torch'")
    expect = {"b1": (b1, (HID,)), "w2t": (w2t, (HID, C)), "b2": (b2, (C,)),
              "filters": (filters, (F_, 9))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    for name, t in (("w1k", w1k), ("b1", b1), ("w2t", w2t), ("b2", b2), ("filters", filters)):
        if t.device != r.device:
            raise ValueError(f"{name}: on {t.device}, but the state is on {r.device}")
        if t.dtype != r.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from the state's {r.dtype}")
    if r.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"r: expected a float32 (or float64, for checks) state, got {r.dtype}")
    return B, H, W, C, HID, F_


def nca_step_fwd(r: torch.Tensor, q, w1k, b1, w2t, b2, filters, *, seed: int, step: int,
                 fire_threshold: int, alive_threshold, alpha_channel: int, circular: bool,
                 precision: str, out=None, q_out=None):
    """One fused step. r: [B, H, W, C] (made contiguous); q: [B, H, W] uint8 or None.

    Returns (out [B, H, W, C], q_out [B, H, W] uint8, or None when alive masking is off).
    ``out`` / ``q_out`` may be given (e.g. slices of a rollout's storage) to avoid allocation.
    """
    B, H, W, C, HID, F_ = check_shapes(r, w1k, b1, w2t, b2, filters)
    r = r.contiguous()
    alive = alive_threshold is not None
    if q is not None and not alive:
        raise ValueError("q: pre-mask bits given but alive masking is off")
    if q is not None and (tuple(q.shape) != (B, H, W) or q.dtype != torch.uint8):
        raise ValueError(f"q: expected a uint8 [B, H, W] = {(B, H, W)} tensor, got "
                         f"{q.dtype} {tuple(q.shape)}")
    if precision not in configs.PRECISION_CODES:
        raise ValueError(f"precision: expected one of {tuple(configs.PRECISION_CODES)}, "
                         f"got {precision!r}")
    n = B * H * W
    out = torch.empty_like(r) if out is None else out
    if alive:
        q_out = torch.empty((B, H, W), dtype=torch.uint8, device=r.device) if q_out is None else q_out
    cfg = configs.select_forward(n, C, HID, F_, r.device, precision)
    grid = (configs.n_tiles(B, H * W, cfg.block_m),)
    _nca_step_fwd_kernel[grid](
        r, q if q is not None else r, out, q_out if alive else out,
        w1k.contiguous(), b1.contiguous(), w2t.contiguous(), b2.contiguous(), filters.contiguous(),
        seed, step, fire_threshold, float(alive_threshold) if alive else 0.0,
        n, H * W, H, W,
        C=C, HID=HID, NF=F_, ALPHA=alpha_channel, BLOCK_M=cfg.block_m, HC=cfg.hidden_chunk,
        HAS_Q=q is not None, ALIVE=alive, CIRCULAR=circular,
        PRECISION=configs.PRECISION_CODES[precision], INT64=cfg.int64,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )
    return out, (q_out if alive else None)
