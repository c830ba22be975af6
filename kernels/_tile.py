"""Tile helpers shared by the step kernels: 2-D tiles, per-cell bit words, constexpr banks."""
import triton
import triton.language as tl

from . import spec

# ---- the named codes of kernels/spec.py, as constexprs the kernels compare against
# constexpr PRECISION
IEEE: tl.constexpr = tl.constexpr(spec.IEEE)
TF32: tl.constexpr = tl.constexpr(spec.TF32)
BF16: tl.constexpr = tl.constexpr(spec.BF16)
# constexpr PADDING
ZEROS: tl.constexpr = tl.constexpr(spec.ZEROS)
CIRCULAR: tl.constexpr = tl.constexpr(spec.CIRCULAR)
REPLICATE: tl.constexpr = tl.constexpr(spec.REPLICATE)
REFLECT: tl.constexpr = tl.constexpr(spec.REFLECT)
# constexpr BANK (a bank code as ``spec.kernel_bank`` compiles it)
BANK_DATA: tl.constexpr = tl.constexpr(spec.BANK_DATA)
BANK_CHANNELS: tl.constexpr = tl.constexpr(spec.BANK_CHANNELS)
BANK_SOBEL: tl.constexpr = tl.constexpr(spec.BANK_SOBEL)
BANK_SOBEL_LAPLACIAN: tl.constexpr = tl.constexpr(spec.BANK_SOBEL_LAPLACIAN)
SOBEL_SCALE: tl.constexpr = tl.constexpr(spec.SOBEL_SCALE)
# hq bytes live in a padded plane per grid, [B, H + 2 HALO, W + 2 HALO], whose border is zero: a
# 5x5 window under zero padding never leaves it and needs no bounds checks.
HALO: tl.constexpr = tl.constexpr(spec.HALO)
HQ_HOT: tl.constexpr = tl.constexpr(spec.HQ_HOT)
# The per-cell word ``cw``: the 3x3 neighbourhood in three 10-bit rows, tap (dy, dx) at bit
# 10 * (dy + 1) + 2 * (dx + 2) (``_tap_bit``); CW_PRE: pre-update mask; CW_FIRE: fire.
CW_PRE: tl.constexpr = tl.constexpr(spec.CW_PRE)
CW_FIRE: tl.constexpr = tl.constexpr(spec.CW_FIRE)
ROW_HOT: tl.constexpr = tl.constexpr(spec.ROW_HOT)
ROW_Q_INNER: tl.constexpr = tl.constexpr(spec.ROW_Q_INNER)
# The 16-bit word saved for the backward (``_pack_cw``): tap t at bit t, fire at bit 9.
PACKED_KEEP: tl.constexpr = tl.constexpr(spec.PACKED_KEEP)
PACKED_FIRE: tl.constexpr = tl.constexpr(spec.PACKED_FIRE)


@triton.jit
def _static_shapes(C: tl.constexpr, NF: tl.constexpr, HID: tl.constexpr = 0,
                  HC: tl.constexpr = 0):
    """The shapes every kernel is written for (the launchers check the supported sets)."""
    tl.static_assert(C > 0 and (C & (C - 1)) == 0, "C: a power of two (a tl.dot dimension)")
    tl.static_assert(NF == 3 or NF == 4, "NF: 3 or 4 filters (the constant-1 column: 4 blocks)")
    if HID > 0:
        tl.static_assert((HID & (HID - 1)) == 0, "HID: a power of two (a tl.dot dimension)")
        tl.static_assert(HC > 0 and (HC & (HC - 1)) == 0, "HC: a power of two (hidden units)")


@triton.jit
def _tap_bit(t: tl.constexpr, PACKED: tl.constexpr = False):
    """The bit of tap t = (dy + 1) * 3 + dx + 1 in ``cw`` (PACKED: in the saved 16-bit word)."""
    if PACKED:
        return 1 << t
    else:
        return 1 << (10 * (t // 3) + 2 * (t % 3) + 2)


@triton.jit
def _pack_cw(cw):
    """The 16-bit word the forward saves for the backward: tap bits 0..8, fire at bit 9."""
    r = cw >> 2
    lo = (r & 1) | ((r >> 1) & 2) | ((r >> 2) & 4)           # each row: bits 0, 2, 4 -> 0, 1, 2
    r = cw >> 12
    mid = (r & 1) | ((r >> 1) & 2) | ((r >> 2) & 4)
    r = cw >> 22
    hi = (r & 1) | ((r >> 1) & 2) | ((r >> 2) & 4)
    return lo | (mid << 3) | (hi << 6) | ((cw & CW_FIRE) << 8)


@triton.jit
def _tile_start(tile, tiles_x, tiles_per_grid):
    """(grid, tile row, tile column) of a tile index: two scalar divisions, once per program."""
    b = tile // tiles_per_grid
    t = tile - b * tiles_per_grid
    ty = t // tiles_x
    return b, ty, t - ty * tiles_x


@triton.jit
def _tile_next(b, ty, tx, step_b, step_y, step_x, tiles_x, tiles_y):
    """(b, ty, tx) of the tile ``num_programs`` further on, by carries instead of divisions
    (num_programs = step_b * tiles_y * tiles_x + step_y * tiles_x + step_x)."""
    tx = tx + step_x
    cx = tx >= tiles_x
    tx = tl.where(cx, tx - tiles_x, tx)
    ty = ty + step_y + cx.to(tl.int32)
    cy = ty >= tiles_y
    ty = tl.where(cy, ty - tiles_y, ty)
    return b + step_b + cy.to(tl.int32), ty, tx


@triton.jit
def _tile_cells(b, ty, tx, H, W, TH: tl.constexpr, TW: tl.constexpr, INT64: tl.constexpr):
    """Flat index of the grid's first cell, rows and columns [M] of the tile's cells, and which
    are in the grid. Rows and columns past the grid's edge are clamped to it, so that every
    address a tile computes is inside its grid; only the stores look at ``ok``."""
    m = tl.arange(0, TH * TW)
    y = ty * TH + m // TW
    x = tx * TW + m % TW
    ok = (y < H) & (x < W)
    if INT64:
        base = b.to(tl.int64) * (H * W)
    else:
        base = b * (H * W)
    return base, tl.minimum(y, H - 1), tl.minimum(x, W - 1), ok


@triton.jit
def _wrap1(v, n):
    """v mod n for v in [-2, n + 1], n >= 1 (two conditional steps each way)."""
    v = tl.where(v < 0, v + n, v)
    v = tl.where(v < 0, v + n, v)
    v = tl.where(v >= n, v - n, v)
    return tl.where(v >= n, v - n, v)


@triton.jit
def _hq_index(b, y, x, H, W, INT64: tl.constexpr):
    """Index of cell (y, x) of grid b in the padded hq plane."""
    if INT64:
        return (b.to(tl.int64) * (H + 2 * HALO) + (y + HALO)) * (W + 2 * HALO) + (x + HALO)
    else:
        return (b * (H + 2 * HALO) + (y + HALO)) * (W + 2 * HALO) + (x + HALO)


@triton.jit
def _gp_index(b, y, x, H, W, INT64: tl.constexpr):
    """Index of cell (y, x) of grid b in the perception-gradient buffer, whose grids have a
    border of one zero cell ([B, H + 2, W + 2, F, C]): the transposed stencil reads a missing
    neighbour's zeros there, with no mask (y, x in [-1, H] x [-1, W])."""
    if INT64:
        return (b.to(tl.int64) * (H + 2) + (y + 1)) * (W + 2) + (x + 1)
    else:
        return (b * (H + 2) + (y + 1)) * (W + 2) + (x + 1)


@triton.jit
def _bordered(cell, b, ty, H, W, TH: tl.constexpr, TW: tl.constexpr, INT64: tl.constexpr):
    """``_gp_index`` of the tile's cells from their flat indices (``_tile_cells``), right for
    the cells inside the grid (the clamped others are not stored): (y + 1)(W + 2) + x + 1 per
    grid is y W + x + 2 y + W + 3, and y's tile row comes from the lane, not a register."""
    row = tl.arange(0, TH * TW) // TW
    if INT64:
        b = b.to(tl.int64)
    return cell + (b * (2 * H + 2 * W + 4) + 2 * ty * TH + W + 3) + 2 * row


@triton.jit
def _window_bits(hq_ptr, b, y, x, H, W, PADDING: tl.constexpr, INT64: tl.constexpr):
    """The per-cell word ``cw`` from the hq bytes of the 5x5 window around each cell: the tap
    bits (the neighbour exists and its deferred alive mask keeps it: q there, and hot somewhere
    on the 3x3 around it) and bit 0, the pre-update alive mask (a kept neighbour with alpha
    above the threshold: q and hot there).

    Each window row is packed into 10 bits, 2 per cell (bit 2k = q, 2k + 1 = hot, k = dx + 2).
    Zero padding reads the padded plane without bounds checks; circular padding wraps the
    window's rows and columns into the plane's interior. Replicate and reflect read it as zero
    padding does, then give a tap across the edge the bit of the cell it copies (``_edge_bits``).
    """
    if PADDING == CIRCULAR:
        r0 = _row_word_wrap(hq_ptr, b, _wrap1(y - 2, H), x, H, W, INT64)
        r1 = _row_word_wrap(hq_ptr, b, _wrap1(y - 1, H), x, H, W, INT64)
        r2 = _row_word_wrap(hq_ptr, b, y, x, H, W, INT64)
        r3 = _row_word_wrap(hq_ptr, b, _wrap1(y + 1, H), x, H, W, INT64)
        r4 = _row_word_wrap(hq_ptr, b, _wrap1(y + 2, H), x, H, W, INT64)
    else:
        row = hq_ptr + _hq_index(b, y - 2, x - 2, H, W, INT64)
        wp = W + 2 * HALO
        r0 = _row_word(row)
        r1 = _row_word(row + wp)
        r2 = _row_word(row + 2 * wp)
        r3 = _row_word(row + 3 * wp)
        r4 = _row_word(row + 4 * wp)
    # hot on the 3 columns around k, at bit 2k + 1
    h0 = _hor3(r0 & ROW_HOT)
    h1 = _hor3(r1 & ROW_HOT)
    h2 = _hor3(r2 & ROW_HOT)
    h3 = _hor3(r3 & ROW_HOT)
    h4 = _hor3(r4 & ROW_HOT)
    # keep at (dy, k) = q there and hot on the 3x3 around: rows dy = -1, 0, 1 (k = 1..3)
    k0 = ((h0 | h1 | h2) >> 1) & r1 & ROW_Q_INNER
    k1 = ((h1 | h2 | h3) >> 1) & r2 & ROW_Q_INNER
    k2 = ((h2 | h3 | h4) >> 1) & r3 & ROW_Q_INNER
    pre = (((r1 & (r1 >> 1)) | (r2 & (r2 >> 1)) | (r3 & (r3 >> 1))) & ROW_Q_INNER) != 0
    if PADDING == REPLICATE or PADDING == REFLECT:
        k0, k1, k2 = _edge_bits(k0, k1, k2, y, x, H, W, PADDING)
    return k0 | (k1 << 10) | (k2 << 20) | pre.to(tl.int32)


@triton.jit
def _edge_bits(k0, k1, k2, y, x, H, W, PADDING: tl.constexpr):
    """The kept-tap rows (dy = -1, 0, 1; tap dx at bit 2 (dx + 2)) of cells at the grid's edge
    under replicate or reflect padding: a tap across the edge is the cell it copies (replicate:
    the edge cell; reflect: the cell one further in), whose bit the zero-padded window holds at
    another tap. Rows first (from the unchanged rows), then columns within each row."""
    if PADDING == REPLICATE:
        n0 = tl.where(y == 0, k1, k0)
        n2 = tl.where(y == H - 1, k1, k2)
    else:
        n0 = tl.where(y == 0, k2, k0)
        n2 = tl.where(y == H - 1, k0, k2)
    return _edge_cols(n0, x, W, PADDING), _edge_cols(k1, x, W, PADDING), \
        _edge_cols(n2, x, W, PADDING)


@triton.jit
def _edge_cols(k, x, W, PADDING: tl.constexpr):
    """One kept-tap row with its taps across the left and right edges filled (``_edge_bits``):
    dx = -1 at bit 2, dx = 0 at bit 4, dx = 1 at bit 6."""
    if PADDING == REPLICATE:
        left = (k >> 2) & 4
        right = (k << 2) & 64
    else:
        left = (k >> 4) & 4
        right = (k << 4) & 64
    return k | tl.where(x == 0, left, 0) | tl.where(x == W - 1, right, 0)


@triton.jit
def _row_word(p):
    """The 5 hq bytes at p .. p + 4 packed 2 bits each (byte k at bits 2k, 2k + 1)."""
    w = tl.load(p).to(tl.int32)
    w |= tl.load(p + 1).to(tl.int32) << 2
    w |= tl.load(p + 2).to(tl.int32) << 4
    w |= tl.load(p + 3).to(tl.int32) << 6
    return w | (tl.load(p + 4).to(tl.int32) << 8)


@triton.jit
def _row_word_wrap(hq_ptr, b, y, x, H, W, INT64: tl.constexpr):
    """``_row_word`` of row y around column x on a torus."""
    row = hq_ptr + _hq_index(b, y, 0, H, W, INT64)
    w = tl.load(row + _wrap1(x - 2, W)).to(tl.int32)
    w |= tl.load(row + _wrap1(x - 1, W)).to(tl.int32) << 2
    w |= tl.load(row + x).to(tl.int32) << 4
    w |= tl.load(row + _wrap1(x + 1, W)).to(tl.int32) << 6
    return w | (tl.load(row + _wrap1(x + 2, W)).to(tl.int32) << 8)


@triton.jit
def _hor3(v):
    return v | (v << 2) | (v >> 2)


@triton.jit
def _edge_index(v, n, PADDING: tl.constexpr):
    """The in-grid index that index v in [-2, n + 1] reads across an edge of n cells: wrapped
    (circular), clamped (replicate), mirrored about the edge cell (reflect; v in [-1, n]), or v
    itself (zeros)."""
    if PADDING == CIRCULAR:
        return _wrap1(v, n)
    elif PADDING == REPLICATE:
        return tl.minimum(tl.maximum(v, 0), n - 1)
    elif PADDING == REFLECT:
        v = tl.where(v < 0, -v, v)
        return tl.where(v >= n, 2 * n - 2 - v, v)
    else:
        return v


@triton.jit
def _nb(y, x, dy: tl.constexpr, dx: tl.constexpr, H, W, PADDING: tl.constexpr):
    """In-grid index of the cell at (dy, dx) from (y, x) and whether it exists (always, but
    under zero padding)."""
    ny = _edge_index(y + dy, H, PADDING)
    nx = _edge_index(x + dx, W, PADDING)
    if PADDING == ZEROS:
        ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
    else:
        ok = ny >= 0
    return ny * W + nx, ok


@triton.jit
def _plain_bits(r_ptr, base, y, x, H, W, thr,
                C: tl.constexpr, ALPHA: tl.constexpr, ALIVE: tl.constexpr,
                PADDING: tl.constexpr):
    """``cw`` for an input that owes no mask (the first step of a rollout, or alive masking
    off): the tap bits say the neighbour exists; CW_PRE (ALIVE): alpha > thr on the 3x3."""
    bits = tl.zeros_like(y)
    for t in tl.static_range(9):
        nb, ok = _nb(y, x, t // 3 - 1, t % 3 - 1, H, W, PADDING)
        bits |= tl.where(ok, _tap_bit(t), 0)
        if ALIVE:
            a = tl.load(r_ptr + (base + nb) * C + ALPHA, mask=ok, other=0.0)
            bits |= (ok & (a > thr)).to(tl.int32)
    return bits


@triton.jit
def _fire_bit(seed, cell, step, fire_threshold, INT64: tl.constexpr):
    """1 where the cell updates: Philox4x32-10 keyed by seed, counter (cell lo, cell hi, step, 0);
    the top 24 bits of the first word below ``fire_threshold`` (nca_fast.rng)."""
    if INT64:
        lo = (cell & 0xFFFFFFFF).to(tl.uint32)
        hi = (cell >> 32).to(tl.uint32)
    else:
        lo = cell.to(tl.uint32)
        hi = lo * 0
    # step and seed may arrive as the constant 1 (the JIT specialises an int argument equal to
    # 1): only arithmetic with tensors, no methods on them
    word, _, _, _ = tl.philox(seed, lo, hi, (lo * 0 + step).to(tl.uint32), lo * 0)
    return ((word >> 8).to(tl.int32) < fire_threshold).to(tl.int32)


@triton.jit
def _layout_anchor(x, ON: tl.constexpr):
    """x itself; with ON, through an opaque move (compiled code only: the interpreter runs no
    PTX) that the layout pass cannot rematerialise. Without it, the conversions of a
    perception tile built from the taps by additions alone (the named banks) are pushed back
    onto the 9 taps, one copy of each per consumer layout: the Laplacian bank's weight kernel
    then needs more than 255 registers and ptxas settles at 32 (bench/NOTES.md, section 6)."""
    if ON:
        if x.dtype == tl.bfloat16:
            return tl.inline_asm_elementwise("mov.b16 $0, $1;", "=h,h", [x], dtype=tl.bfloat16,
                                             is_pure=False, pack=1)
        else:
            return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=False, pack=1)
    else:
        return x


@triton.jit
def _loop_zero(v):
    """0 for a v >= 0 that the compiler cannot prove non-negative (a tile coordinate).

    Index tensors built in a loop from constants alone are hoisted out of it and then held in
    registers across every iteration ([M, 4C] offsets: 32 registers a thread); adding this
    zero keeps them in the loop, where they fold into the address arithmetic.
    """
    return tl.minimum(v, 0) * 64        # a multiple of 64: keeps vectorised loads aligned


@triton.jit
def _load_taps(r_ptr, cw, base, y, x, H, W, lz,
               C: tl.constexpr, PADDING: tl.constexpr, PACKED: tl.constexpr = False):
    """The 9 neighbour rows [M, C] of every cell (a tuple, tap t = (dy + 1) * 3 + dx + 1), zero
    where the tap's bit of ``cw`` is clear. lz: ``_loop_zero``."""
    cols = tl.arange(0, C) + lz
    cw = cw[:, None]
    taps = ()
    if PADDING != ZEROS:
        p = r_ptr + cols[None, :]
        nbs = ()
        for t in tl.static_range(9):
            nb, _ = _nb(y, x, t // 3 - 1, t % 3 - 1, H, W, PADDING)
            nbs = nbs + (nb,)
        for t in tl.static_range(9):
            taps = taps + (tl.load(p + (base + nbs[t])[:, None] * C,
                                   mask=(cw & _tap_bit(t, PACKED)) != 0, other=0.0),)
    else:
        # three row pointers; the columns are constant offsets from them (+-C elements)
        p = r_ptr + (base + y * W + x)[:, None] * C + cols[None, :]
        rows = (p - W * C, p, p + W * C)
        for t in tl.static_range(9):
            taps = taps + (tl.load(_col(rows[t // 3], t % 3 - 1, C),
                                   mask=(cw & _tap_bit(t, PACKED)) != 0, other=0.0),)
    return taps


@triton.jit
def _col(row, dx: tl.constexpr, STRIDE: tl.constexpr):
    """The pointers ``row`` moved dx cells along the row (cells STRIDE elements apart)."""
    if dx < 0:
        return row - STRIDE
    elif dx > 0:
        return row + STRIDE
    else:
        return row


@triton.jit
def _filter_taps(filt_ptr, NF: tl.constexpr, C: tl.constexpr, BANK: tl.constexpr):
    """The taps of a bank read as data, loaded once for every use (tap 9 k + t of filter k):
    a number for every channel (BANK_DATA, filt_ptr [F, 9]) or a [1, C] row, one per channel
    (BANK_CHANNELS, filt_ptr [F, 9, C]). A named bank: none (its taps are constants)."""
    taps = ()
    if BANK == BANK_DATA or BANK == BANK_CHANNELS:
        for i in tl.static_range(9 * NF):
            if BANK == BANK_CHANNELS:
                taps = taps + (tl.load(filt_ptr + i * C + tl.arange(0, C))[None, :],)
            else:
                taps = taps + (tl.load(filt_ptr + i),)
    return taps


@triton.jit
def _program_taps(filt_ptr, NF: tl.constexpr, C: tl.constexpr, BANK: tl.constexpr,
                  ROWS: tl.constexpr = False):
    """The taps a program loads once, before its tile loop (a tile reloading them costs each
    warp 9 F loads): a shared bank's 9 F numbers (BANK_DATA) and, with ROWS, the 9 F rows of C
    of taps per channel (BANK_CHANNELS; where the kernel has the registers to hold them across
    the loop); else none: ``_tile_taps`` loads them per tile."""
    taps = ()
    if BANK == BANK_DATA or (BANK == BANK_CHANNELS and ROWS):
        taps = _filter_taps(filt_ptr, NF, C, BANK)
    return taps


@triton.jit
def _tile_taps(held, filt_ptr, NF: tl.constexpr, C: tl.constexpr, BANK: tl.constexpr,
               ROWS: tl.constexpr = False):
    """A tile's taps: those the program holds (``_program_taps`` with the same ROWS), or the
    rows per channel, loaded here."""
    if BANK == BANK_CHANNELS and not ROWS:
        return _filter_taps(filt_ptr, NF, C, BANK)
    else:
        return held


@triton.jit
def _bank(v, f, NF: tl.constexpr, BANK: tl.constexpr):
    """The F perception tiles p0..p3 [M, C] (p3 zero when F = 3) from the 9 taps ``v``; a bank
    read as data: its taps f (``_filter_taps``)."""
    if BANK == BANK_DATA or BANK == BANK_CHANNELS:
        C: tl.constexpr = v[0].shape[1]
        ps = ()
        for k in tl.static_range(4):
            if k < NF:
                pk = f[9 * k] * v[0]
                for t in tl.static_range(1, 9):
                    pk = pk + f[9 * k + t] * v[t]
            else:
                pk = tl.zeros_like(v[4])
            ps = ps + (pk,)
        p0, p1, p2, p3 = ps
    else:
        # 8 x the Sobel filters (their 1/8 and the Laplacian's 1/16 are folded into W1's rows,
        # ``_w1_tile``, ``_w1_block``): the two share the corner differences
        a = v[8] - v[0]
        c = v[2] - v[6]
        p0 = v[4]
        p1 = (a + c) + 2.0 * (v[5] - v[3])
        p2 = (a - c) + 2.0 * (v[7] - v[1])
        if BANK == BANK_SOBEL:
            p3 = tl.zeros_like(v[4])
        else:
            p3 = (((v[0] + v[2]) + (v[6] + v[8])) + 2.0 * ((v[1] + v[3]) + (v[5] + v[7]))
                  - 12.0 * v[4])
    return p0, p1, p2, p3
