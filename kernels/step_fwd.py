"""Forward of one NCA step, fused: one read of the state, one write (persistent 2-D tiles).

Maths (docs in nca_fast), per cell i of a channels-last state ``r [B*H*W, C]``:

    x[n]   = r[n] * keep[n]        keep[n] = q[n] and any(r_alpha > thr on the 3x3 around n)
    p_k[i] = sum_taps f_k[tap] * x[i + tap]                                (k < F filters)
    h      = relu(sum_k p_k[i] @ W1_k + b1)                                W1_k: [C, hidden]
    dx     = h @ W2 + b2                                                   W2:   [hidden, C]
    out[i] = x[i] + dx * fire(seed, i, step)
    hq_out[i] = pre[i] | (out_alpha[i] > thr) << 1,   pre[i] = any(x_alpha > thr on the 3x3)

The post-update alive mask needs the updated alpha of the 8 neighbours, which other programs
compute: it is deferred. A step stores its raw update ``out`` and one byte per cell, ``hq``: bit
0 the pre-update mask ``q`` still owed, bit 1 ``hot`` = raw alpha above the threshold. The next
step reads the hq bytes of the 5x5 window around each cell and derives from them, once per cell,
a word of bits: which of the 9 neighbours exist and are kept, its own pre-update mask (a kept
neighbour with alpha above the threshold is exactly ``q and hot`` there), and whether it fires.

Grid: persistent programs walk tiles of TH x TW cells of one grid; the weights are loaded once
per program. Per tile: the cell words in a one-cell-per-thread layout (the 25 window bytes, one
Philox call per cell), the 9 neighbour rows as masked loads, the filter bank (constexpr for the
named banks: the Sobel taps' zeros skipped), two dense layers on tensor cores (the bias of the
first folded into its K as a constant-1 column), the update, the store.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from . import spec as codes
from .spec import StepSpec, StepWeights
from ._dense import (_bias_rows, _concat4, _join_rows, _mlp_chunk, _mlp_chunk_fma, _split_rows,
                     _w1_block, _w1_tile, _w2_rows)
from ._tile import (CW_FIRE, CW_PRE, HQ_HOT, IEEE, _bank, _filter_taps, _fire_bit, _hq_index,
                    _load_taps, _loop_zero, _pack_cw, _plain_bits, _static_shapes, _tap_bit,
                    _tile_cells, _tile_next, _tile_start, _window_bits)


# ------------------------------------------------------------------------------ dense layers
@triton.jit
def _chunk_weights(w1_ptr, b1_ptr, w2_ptr, lap, r_ptr, C: tl.constexpr, HID: tl.constexpr,
                   HC: tl.constexpr, NF: tl.constexpr, BANK: tl.constexpr,
                   PRECISION: tl.constexpr):
    """(w1s, bss, w2s): every hidden chunk's weights in the state's dtype. FMA dots (IEEE):
    W1 per filter (w1s[j * NF + k]) and b1 as a row; tensor cores: W1 as one [4C, HC] tile
    and b1 as the K block of the constant-1 column."""
    dtype = r_ptr.dtype.element_ty
    w1s = ()
    bss = ()
    w2s = ()
    for j in tl.static_range(HID // HC):
        if PRECISION == IEEE:
            for k in tl.static_range(NF):
                w1s = w1s + (_w1_block(w1_ptr, lap, k, j * HC, C, HID, HC, BANK).to(dtype),)
            bss = bss + (tl.load(b1_ptr + j * HC + tl.arange(0, HC)).to(dtype),)
        else:
            w1s = w1s + (_w1_tile(w1_ptr, b1_ptr, lap, j * HC, C, HID, HC, NF, BANK,
                                  BIAS=True, HIDDEN_ROWS=False, K_ORDER=IEEE).to(dtype),)
            bss = bss + (_bias_rows(b1_ptr, j * HC, C, HC).to(dtype),)
        w2s = w2s + (_w2_rows(w2_ptr, j * HC, C, HC, PRECISION),)
    return w1s, bss, w2s


@triton.jit
def _dense_fma(p0, p1, p2, p3, dx, w1s, bss, w2s, w1p, b1p, w2p, lap, C: tl.constexpr,
               HID: tl.constexpr, HC: tl.constexpr, NF: tl.constexpr, BANK: tl.constexpr,
               RESIDENT: tl.constexpr):
    """dx + the update of the dense layers in FMA dots (IEEE), chunk by chunk: the weights
    ``_chunk_weights`` loaded (RESIDENT), or loaded here from the tile's pointers."""
    dtype = dx.dtype
    for j in tl.static_range(HID // HC):
        if RESIDENT:
            dx = _mlp_chunk_fma(p0, p1, p2, p3, w1s[j * NF], w1s[j * NF + 1], w1s[j * NF + 2],
                                w1s[j * NF + NF - 1], bss[j], w2s[j], dx, NF)
        else:
            dx = _mlp_chunk_fma(
                p0, p1, p2, p3,
                _w1_block(w1p, lap, 0, j * HC, C, HID, HC, BANK).to(dtype),
                _w1_block(w1p, lap, 1, j * HC, C, HID, HC, BANK).to(dtype),
                _w1_block(w1p, lap, 2, j * HC, C, HID, HC, BANK).to(dtype),
                _w1_block(w1p, lap, NF - 1, j * HC, C, HID, HC, BANK).to(dtype),
                tl.load(b1p + j * HC + tl.arange(0, HC)).to(dtype),
                _w2_rows(w2p, j * HC, C, HC, IEEE), dx, NF)
    return dx


@triton.jit
def _dense_mma(pc, ones, dx, w1s, bss, w2s, w1p, b1p, w2p, lap, lz, C: tl.constexpr,
               HID: tl.constexpr, HC: tl.constexpr, NF: tl.constexpr, BANK: tl.constexpr,
               PRECISION: tl.constexpr, RESIDENT: tl.constexpr, SPLIT_ROWS: tl.constexpr):
    """dx + the update of the dense layers on tensor cores (TF32, BF16), one K = 4C dot per
    chunk: the weights resident (on the tile's two halves of rows with SPLIT_ROWS), or
    loaded per tile in a loop."""
    dtype = dx.dtype
    NCH: tl.constexpr = HID // HC
    if SPLIT_ROWS:
        # the tile's two halves of M / 2 cells one after the other (an m64 MMA each on
        # sm_90a at M = 128): half the perception rows and accumulators live at a time,
        # each row's products and sums as in one [M, .] dot
        pa, pb = _split_rows(pc)
        oa, ob = _split_rows(ones)
        dxa, dxb = _split_rows(dx)
        for j in tl.static_range(NCH):
            dxa = _mlp_chunk(pa, oa, w1s[j], bss[j], w2s[j], dxa, NF, PRECISION)
        for j in tl.static_range(NCH):
            dxb = _mlp_chunk(pb, ob, w1s[j], bss[j], w2s[j], dxb, NF, PRECISION)
        dx = _join_rows(dxa, dxb)
    elif RESIDENT:
        for j in tl.static_range(NCH):
            dx = _mlp_chunk(pc, ones, w1s[j], bss[j], w2s[j], dx, NF, PRECISION)
    else:
        # a loop whose trip count the compiler cannot see (lz), so that it is not unrolled and
        # one chunk's weights and activations are live at once
        for j in range(0, NCH + lz):
            dx = _mlp_chunk(pc, ones,
                            _w1_tile(w1p, b1p, lap, j * HC, C, HID, HC, NF, BANK, BIAS=True,
                                     HIDDEN_ROWS=False, K_ORDER=IEEE).to(dtype),
                            _bias_rows(b1p, j * HC, C, HC).to(dtype),
                            _w2_rows(w2p, j * HC, C, HC, PRECISION), dx, NF, PRECISION)
    return dx


# ---------------------------------------------------------------------------------- the kernel
@triton.jit(do_not_specialize=configs.RUNTIME_INTS)
def _nca_step_fwd_kernel(
    # state
    r_ptr,          # [B*H*W, C] stored state (raw update of the previous step, or a true state)
    hq_ptr,         # [B, H+4, W+4] uint8 hq bytes of r (HAS_Q): bit 0 pending pre-mask, 1 hot
    out_ptr,        # [B*H*W, C] this step's raw update
    hq_out_ptr,     # [B, H+4, W+4] uint8 this step's hq bytes (ALIVE; the border stays zero)
    cw_out_ptr,     # [B*H*W] int16 the cells' words for the backward (SAVE_CW): taps, fire
    # parameters
    w1_ptr,         # [F, C, HID]  W1_k[c, j] = w1[j, c*F + k]
    b1_ptr,         # [HID]
    w2_ptr,         # [HID, C]     transpose of w2
    b2_ptr,         # [C]
    filt_ptr,       # taps as data, row-major 3x3: [F, 9] (BANK_DATA), [F, 9, C] (BANK_CHANNELS)
    lap,            # the Laplacian's scale in a named bank (1 or 1/16)
    # step (the seed always 64-bit: one compile for seeds below 2**31 and above)
    seed: tl.int64, step, fire_threshold, thr,
    # sizes: tiles of TH x TW cells, tiles_y x tiles_x per grid; the persistent programs step
    # num_programs = step_b * tiles_y * tiles_x + step_y * tiles_x + step_x tiles at a time
    H, W, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x,
    C: tl.constexpr, HID: tl.constexpr, NF: tl.constexpr, ALPHA: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, HC: tl.constexpr, BANK: tl.constexpr,
    HAS_Q: tl.constexpr, ALIVE: tl.constexpr, PADDING: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, RESIDENT: tl.constexpr, SAVE_CW: tl.constexpr,
    SPLIT_ROWS: tl.constexpr,
):
    _static_shapes(C, NF, HID, HC)
    tl.static_assert(HC <= HID, "HC: a chunk of the hidden units")
    tl.static_assert(ALPHA < C, "ALPHA: a channel of the state")
    tl.static_assert(not SPLIT_ROWS or (PRECISION != IEEE and RESIDENT),
                     "SPLIT_ROWS: tensor cores, weights resident")
    M: tl.constexpr = TH * TW
    cols = tl.arange(0, C)
    dtype = r_ptr.dtype.element_ty
    ones = (tl.where(cols[None, :] == 0, 1.0, 0.0) + tl.zeros([M, C], dtype=tl.float32)).to(dtype)
    b2 = tl.load(b2_ptr + cols)
    # ---- parameters, once per program (RESIDENT) or once per tile (in the dense helpers)
    w1s, bss, w2s = (), (), ()
    if RESIDENT:
        w1s, bss, w2s = _chunk_weights(w1_ptr, b1_ptr, w2_ptr, lap, r_ptr, C, HID, HC, NF, BANK,
                                       PRECISION)

    pid = tl.program_id(0)
    b, ty, tx = _tile_start(pid, tiles_x, tiles_y * tiles_x)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        base, y, x, ok = _tile_cells(b, ty, tx, H, W, TH, TW, INT64)
        cell = base + y * W + x

        # ---- per-cell word: neighbours kept, pre-update mask (CW_PRE), fire (CW_FIRE)
        if HAS_Q:
            cw = _window_bits(hq_ptr, b, y, x, H, W, PADDING, INT64)
        else:
            cw = _plain_bits(r_ptr, base, y, x, H, W, thr, C, ALPHA, ALIVE, PADDING)
        key = seed
        if SPLIT_ROWS:
            # the key through lz: the Philox key schedule (20 words of the seed) computed per
            # tile, not hoisted out of the tile loop and held across it
            key = seed + _loop_zero(tx)
        cw |= _fire_bit(key, cell, step, fire_threshold, INT64) * CW_FIRE
        if SAVE_CW:
            tl.store(cw_out_ptr + cell, _pack_cw(cw).to(tl.int16), mask=ok)

        # ---- neighbourhood and perception: [M, 4C], a constant-1 column after F = 3 filters
        lz = _loop_zero(tx)
        # weights staged per tile (not RESIDENT): addressed through lz, or the compiler hoists
        # their loads out of the tile loop and holds every chunk's weights in registers
        w1p = w1_ptr + lz
        b1p = b1_ptr + lz
        w2p = w2_ptr + lz
        taps = _load_taps(r_ptr, cw, base, y, x, H, W, lz, C, PADDING)
        # a bank read as data: its taps per tile (held across the loop they cost registers)
        p0, p1, p2, p3 = _bank(taps, _filter_taps(filt_ptr, NF, C, BANK), NF, BANK)
        v4 = taps[4]
        if NF == 3:
            p3 = (tl.where(cols[None, :] == 0, 1.0, 0.0) + tl.zeros_like(p3)).to(dtype)
        pc = _concat4(p0, p1, p2, p3)

        # ---- dense layers, hidden in chunks of HC
        dx = tl.zeros([M, C], dtype=dtype)
        if PRECISION == IEEE:
            dx = _dense_fma(p0, p1, p2, p3, dx, w1s, bss, w2s, w1p, b1p, w2p, lap, C, HID, HC,
                            NF, BANK, RESIDENT)
        else:
            dx = _dense_mma(pc, ones, dx, w1s, bss, w2s, w1p, b1p, w2p, lap, lz, C, HID, HC,
                            NF, BANK, PRECISION, RESIDENT, SPLIT_ROWS)
        dx += b2[None, :]
        if SPLIT_ROWS:
            # the tile's cells and the cell's own row again (integer operations, an L1 hit)
            # rather than held across the dense layers, where the registers are scarcest
            base, y, x, ok = _tile_cells(b, ty + _loop_zero(ty), tx, H, W, TH, TW, INT64)
            cell = base + y * W + x
            v4 = tl.load(r_ptr + cell[:, None] * C + (cols + _loop_zero(ty))[None, :],
                         mask=((cw & _tap_bit(4)) != 0)[:, None], other=0.0)

        # ---- stochastic update, store
        out = v4 + tl.where((cw & CW_FIRE)[:, None] != 0, dx, 0.0)
        tl.store(out_ptr + cell[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])
        if ALIVE:
            a = tl.sum(tl.where(cols[None, :] == ALPHA, out, 0.0), axis=1)
            hq = (cw & CW_PRE) | ((a > thr).to(tl.int32) * HQ_HOT)
            tl.store(hq_out_ptr + _hq_index(b, y, x, H, W, INT64), hq.to(tl.uint8), mask=ok)
        b, ty, tx = _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y)


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
              "filters": (filters, (F_, 9, C) if filters.dim() == 3 else (F_, 9))}
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
    if r.dtype == torch.float64 and not configs.interpreting():
        raise TypeError(f"r: {configs.FP64_COMPILED}")
    return B, H, W, C, HID, F_


def kernel_taps(filters: torch.Tensor, channels: int) -> torch.Tensor:
    """The taps as the kernels read them, contiguous, tap t row-major 3 x 3: [F, 9] from a bank
    for every channel ([F, 3, 3] or [F, 9]), [F, 9, C] from taps per channel ([F, C, 3, 3], or
    [F, 9, C] as is). Differentiable."""
    f = filters.shape[0]
    if filters.dim() == 3 and tuple(filters.shape[1:]) == (9, channels):
        return filters.contiguous()
    if filters.dim() == 4:
        if tuple(filters.shape[1:]) != (channels, 3, 3):
            raise ValueError(f"filters: expected [F, C={channels}, 3, 3] per-channel taps, got "
                             f"{tuple(filters.shape)}")
        return filters.reshape(f, channels, 9).transpose(1, 2).contiguous()
    if filters.numel() != 9 * f:
        raise ValueError(f"filters: expected [F, 3, 3], [F, 9], [F, C, 3, 3] or [F, 9, C] taps, "
                         f"got {tuple(filters.shape)}")
    return filters.reshape(f, 9).contiguous()


def hq_plane(B: int, H: int, W: int, device, n: int = 0) -> torch.Tensor:
    """A zeroed hq plane [B, H + 4, W + 4] (or [n, B, H + 4, W + 4] when n > 0): the border of
    HALO cells must be zero and stays so (the kernels write only the interior)."""
    shape = (B, H + 2 * codes.HALO, W + 2 * codes.HALO)
    return torch.zeros(shape if n == 0 else (n, *shape), dtype=torch.uint8, device=device)


def as_hq_plane(r: torch.Tensor, q: torch.Tensor, thr: float, alpha: int) -> torch.Tensor:
    """The hq plane of a stored state r [B, H, W, C] that owes the pre-mask bits q [B, H, W]."""
    B, H, W, _ = r.shape
    plane = hq_plane(B, H, W, r.device)
    inner = slice(codes.HALO, -codes.HALO)
    plane[:, inner, inner] = (torch.where(q != 0, codes.HQ_Q, 0)
                              | torch.where(r[..., alpha] > thr, codes.HQ_HOT, 0))
    return plane


def persistent_grid(B: int, H: int, W: int, cfg):
    """(programs, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x) of a persistent launch."""
    tiles_x = triton.cdiv(W, cfg.tile_w)
    tiles_y = triton.cdiv(H, cfg.tile_h)
    n_tiles = B * tiles_x * tiles_y
    programs = max(1, min(n_tiles, cfg.programs))
    step_b, rest = divmod(programs, tiles_x * tiles_y)
    step_y, step_x = divmod(rest, tiles_x)
    return programs, tiles_x, tiles_y, n_tiles, step_b, step_y, step_x


def nca_step_fwd(r: torch.Tensor, q, w1k, b1, w2t, b2, filters, *, seed: int, step: int,
                 fire_threshold: int, alive_threshold, alpha_channel: int, padding: str,
                 precision: str, named_bank: Optional[int] = None, out=None, q_out=None,
                 cw_out=None):
    """One fused step. r: [B, H, W, C] (made contiguous); q: the hq plane of r
    ([B, H + 4, W + 4] uint8, ``hq_plane``) or None for a state that owes no mask.

    Returns (out [B, H, W, C], q_out: this step's hq plane, or None when alive masking is off).
    ``out`` / ``q_out`` may be given (e.g. slices of a rollout's storage; a given q_out's
    border must be zero). ``cw_out``: an int16 [B, H, W] tensor that receives the cells' words
    for ``nca_step_bwd`` (which neighbours the step kept, which cells fired). named_bank: the
    code of a named filter bank (``configs.bank_code``: 1 "sobel", 2 "sobel_laplacian", 3
    "sobel_laplacian16"), whose taps the kernels then hold as constants, 0 to read ``filters``;
    None: found from ``filters``.
    """
    filters = kernel_taps(filters, r.shape[-1])
    named_bank = configs.launch_bank(filters, named_bank)
    B, H, W, C, HID, F_ = check_shapes(r, w1k, b1, w2t, b2, filters)
    r = r.contiguous()
    alive = alive_threshold is not None
    if q is not None and not alive:
        raise ValueError("q: pre-mask bits given but alive masking is off")
    if q is not None and q.dtype == torch.uint8 and tuple(q.shape) == (B, H, W):
        q = as_hq_plane(r, q, alive_threshold, alpha_channel)
    if q is not None and (tuple(q.shape) != (B, H + 4, W + 4) or q.dtype != torch.uint8):
        raise ValueError(f"q: expected a uint8 hq plane [B, H + 4, W + 4] = "
                         f"{(B, H + 4, W + 4)} (or pre-mask bits [B, H, W]), got {q.dtype} "
                         f"{tuple(q.shape)}")
    spec = StepSpec(padding=padding, precision=precision, bank=named_bank,
                    alive_threshold=alive_threshold, alpha_channel=alpha_channel,
                    fire_threshold=fire_threshold, seed=seed)      # checks them
    cfg = configs.select_forward(B * H * W, C, HID, F_, r.device, precision, spec.bank)
    weights = StepWeights(w1k, b1, w2t, b2, filters).contiguous()
    return launch_fwd(cfg, r, q, weights, spec=spec, step=step, out=out, q_out=q_out,
                      cw_out=cw_out)


def launch_fwd(cfg, r, q, weights: StepWeights, *, spec: StepSpec, step: int, out=None,
               q_out=None, cw_out=None):
    """``nca_step_fwd`` without its checks, for a caller that validated the operands (contiguous,
    shapes, dtypes, devices) and chose ``cfg = configs.select_forward(...)`` once for many
    steps: a rollout."""
    B, H, W, C = r.shape
    F_, _, HID = weights.w1k.shape
    out = torch.empty_like(r) if out is None else out
    if spec.alive and q_out is None:
        q_out = hq_plane(B, H, W, r.device)
    programs, *sizes = persistent_grid(B, H, W, cfg)
    _nca_step_fwd_kernel[(programs,)](
        r, q if q is not None else r, out, q_out if spec.alive else out,
        cw_out if cw_out is not None else out,
        *weights, spec.lap_scale,
        spec.seed, step, spec.fire_threshold,
        float(spec.alive_threshold) if spec.alive else 0.0,
        H, W, *sizes,
        C=C, HID=HID, NF=F_, ALPHA=spec.alpha_channel, TH=cfg.tile_h, TW=cfg.tile_w,
        HC=cfg.hidden_chunk, BANK=spec.kernel_bank, HAS_Q=q is not None, ALIVE=spec.alive,
        PADDING=spec.padding_code, PRECISION=spec.precision_code, INT64=cfg.int64,
        RESIDENT=cfg.resident, SPLIT_ROWS=cfg.split_rows, SAVE_CW=cw_out is not None,
        **cfg.launch_options(),
    )
    return out, (q_out if spec.alive else None)
