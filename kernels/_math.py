"""Pure-math ``@triton.jit`` helpers shared by the forward and backward step kernels.

Cells are addressed by their flat index ``cell = b*H*W + y*W + x`` into a channels-last state
``[B*H*W, C]``. The helpers here turn cells into neighbour addresses under either padding, draw
the update mask, run a dense layer at the configured precision, and gather one tile's
perception. Everything that decides *what* a step computes lives here once, so the forward and
the backward kernels cannot disagree about it.
"""
import triton
import triton.language as tl

# Precision codes (constexpr): dense-layer operands in fp32 (exact), TF32, or bf16.
PREC_IEEE = 0
PREC_TF32 = 1
PREC_BF16 = 2


@triton.jit
def _wrap(v, n):
    """``v mod n`` for v in [-2, n + 1] (a coordinate plus an offset in [-2, 2]), n >= 1.

    Two conditional adds and subtracts instead of ``%``: a runtime-divisor remainder costs ~20
    instructions (a 64-bit one a division subroutine), and a grid may be a single cell wide.
    """
    v = tl.where(v < 0, v + n, v)
    v = tl.where(v < 0, v + n, v)
    v = tl.where(v >= n, v - n, v)
    return tl.where(v >= n, v - n, v)


@triton.jit
def _neighbour(y, x, dy, dx, H, W, CIRCULAR: tl.constexpr):
    """Row and column of the cell at offset (dy, dx), in [-2, 2], and whether it exists.

    Under circular padding the grid is a torus: every neighbour exists.
    """
    ny = y + dy
    nx = x + dx
    if CIRCULAR:
        ny = _wrap(ny, H)
        nx = _wrap(nx, W)
        ok = ny >= 0
    else:
        ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
    return ny, nx, ok


@triton.jit
def _fire(seed, cell, step, fire_threshold, INT64: tl.constexpr):
    """The update mask: Philox4x32-10 keyed by ``seed``, counter (cell_lo, cell_hi, step, 0).

    A cell fires when the top 24 bits of the first output word are below ``fire_threshold``
    (an integer in [0, 2**24]); nca_fast.rng computes the same bits with torch.
    """
    if INT64:
        lo = (cell & 0xFFFFFFFF).to(tl.uint32)
        hi = (cell >> 32).to(tl.uint32)
    else:
        lo = cell.to(tl.uint32)
        hi = lo * 0
    word, _, _, _ = tl.philox(seed, lo, hi, lo * 0 + step.to(tl.uint32), lo * 0)
    return (word >> 8).to(tl.int32) < fire_threshold


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 (or fp64) accumulation at the configured operand precision."""
    if PRECISION == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == 1:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _alpha_hot(r_ptr, base, y, x, row_ok, H, W, thr,
               C: tl.constexpr, ALPHA: tl.constexpr, CIRCULAR: tl.constexpr, R: tl.constexpr):
    """[M] int32 bit set: bit j is raw alpha > thr at offset (j // 5 - 2, j % 5 - 2) from each
    cell, on the (2R+1)^2 window (R = 1 or 2); bits outside it are 0.

    One word per cell rather than an [M, 32] tile: a few registers across the taps, and a tap's
    mask test (``_post_alive``) is an AND instead of a reduction over the window.
    """
    j = tl.arange(0, 32)
    ey = j // 5 - 2
    ex = j % 5 - 2
    in_win = (j < 25) & (ey >= -R) & (ey <= R) & (ex >= -R) & (ex <= R)
    ny, nx, ok = _neighbour(y[:, None], x[:, None], ey[None, :], ex[None, :], H, W, CIRCULAR)
    ok = ok & in_win[None, :] & row_ok[:, None]
    a = tl.load(r_ptr + (base + ny * W + nx) * C + ALPHA, mask=ok, other=0.0)
    return tl.sum(tl.where(ok & (a > thr), 1 << j[None, :], 0), axis=1)


@triton.jit
def _post_alive(hot, dy, dx):
    """[M] bool: any bit of ``hot`` (``_alpha_hot``) set on the 3x3 window around offset
    (dy, dx), dy and dx in [-1, 1]. 7399 = bits 0-2, 5-7, 10-12: the 3x3 window at the corner."""
    return (hot & (7399 << ((dy + 1) * 5 + dx + 1))) != 0


@triton.jit
def _tap(r_ptr, q_ptr, hot, base, y, x, row_ok, dy, dx, H, W,
         C: tl.constexpr, HAS_Q: tl.constexpr, KEEP: tl.constexpr, CIRCULAR: tl.constexpr):
    """The true state of every cell's neighbour at (dy, dx) [M, C], and whether it exists [M].

    The stored state may still owe the previous step's alive mask (HAS_Q): then the true state
    of a neighbour n is ``r[n] * keep[n]``, keep = ``q[n] and any(r_alpha > thr on the 3x3
    around n)``. With KEEP, ``q_ptr`` holds keep itself (the backward computes it once per cell,
    ``step_bwd._nca_step_bwd_keep_kernel``); otherwise ``q`` and ``hot``, raw alpha > thr on the
    5x5 window around each cell (``_alpha_hot``).
    """
    cols = tl.arange(0, C)
    ny, nx, ok = _neighbour(y, x, dy, dx, H, W, CIRCULAR)
    ok = ok & row_ok
    nb = base + ny * W + nx
    v = tl.load(r_ptr + nb[:, None] * C + cols[None, :], mask=ok[:, None], other=0.0)
    if HAS_Q:
        keep = ok & (tl.load(q_ptr + nb, mask=ok, other=0) != 0)
        if not KEEP:
            keep = keep & _post_alive(hot, dy, dx)
        v = tl.where(keep[:, None], v, 0.0)
    return v, ok


@triton.jit
def _perceive(r_ptr, q_ptr, hot, filt_ptr, base, y, x, row_ok, H, W, thr,
              C: tl.constexpr, NF: tl.constexpr, ALPHA: tl.constexpr,
              HAS_Q: tl.constexpr, KEEP: tl.constexpr, ALIVE: tl.constexpr,
              CIRCULAR: tl.constexpr):
    """Gather a tile's 3x3 neighbourhoods and apply the filter bank (taps unrolled).

    Returns the F perception tiles p0..p3 ([M, C] each; p3 is zero when NF == 3) and the
    pre-update alive mask [M] (all True when alive masking is off). HAS_Q, KEEP, ``hot``: as in
    ``_tap`` (``hot`` unread unless HAS_Q and not KEEP).
    """
    cols = tl.arange(0, C)
    p0 = tl.zeros([y.shape[0], C], dtype=r_ptr.dtype.element_ty)
    p1 = tl.zeros_like(p0)
    p2 = tl.zeros_like(p0)
    p3 = tl.zeros_like(p0)
    if ALIVE:
        pre = row_ok & (y < 0)  # nothing alive yet: the taps below set it
    else:
        pre = row_ok
    for tap in tl.static_range(9):
        dy = tap // 3 - 1              # constexpr: tap is
        dx = tap % 3 - 1
        v, ok = _tap(r_ptr, q_ptr, hot, base, y, x, row_ok, dy, dx, H, W, C, HAS_Q, KEEP,
                     CIRCULAR)
        if ALIVE:
            a = tl.sum(tl.where(cols[None, :] == ALPHA, v, 0.0), axis=1)
            pre = pre | (ok & (a > thr))
        p0 += tl.load(filt_ptr + 0 * 9 + tap) * v
        p1 += tl.load(filt_ptr + 1 * 9 + tap) * v
        p2 += tl.load(filt_ptr + 2 * 9 + tap) * v
        if NF == 4:
            p3 += tl.load(filt_ptr + 3 * 9 + tap) * v
    return p0, p1, p2, p3, pre


@triton.jit
def _perceive_rolled(r_ptr, keep_ptr, filt_ptr, base, y, x, row_ok, H, W, n_taps,
                     C: tl.constexpr, NF: tl.constexpr, HAS_Q: tl.constexpr,
                     CIRCULAR: tl.constexpr):
    """The perception tiles p0..p3 of ``_perceive`` alone, from keep bits (HAS_Q, KEEP), the
    taps in a loop that is not unrolled: for kernels that perceive tile after tile (a
    persistent loop), where unrolled taps have all 9 neighbour loads and F*9 filter weights in
    flight at once (224 live registers measured in the weight kernel, C = 32, F = 4).
    ``n_taps`` is 9, passed at run time: with a constant trip count LLVM unrolls the loop
    again. The same products are summed in the same order, so the result is bitwise that of
    ``_perceive``.
    """
    p0 = tl.zeros([y.shape[0], C], dtype=r_ptr.dtype.element_ty)
    p1 = tl.zeros_like(p0)
    p2 = tl.zeros_like(p0)
    p3 = tl.zeros_like(p0)
    for tap in range(n_taps):
        v, ok = _tap(r_ptr, keep_ptr, row_ok, base, y, x, row_ok, tap // 3 - 1, tap % 3 - 1,
                     H, W, C, HAS_Q, True, CIRCULAR)
        p0 += tl.load(filt_ptr + 0 * 9 + tap) * v
        p1 += tl.load(filt_ptr + 1 * 9 + tap) * v
        p2 += tl.load(filt_ptr + 2 * 9 + tap) * v
        if NF == 4:
            p3 += tl.load(filt_ptr + 3 * 9 + tap) * v
    return p0, p1, p2, p3


@triton.jit
def _cells(tile, BLOCK_M: tl.constexpr, n_cells, HW, W, INT64: tl.constexpr):
    """Flat cell indices of tile ``tile`` [M] and their (grid base, row, column, in range).

    Tiles never straddle two grids: grid b takes tiles b*T .. b*T + T - 1, T = cdiv(HW, BLOCK_M),
    its last one partial. So the grid is one scalar division per tile, and row and column come
    from the int32 position inside the grid (one grid holds fewer than 2**31 - BLOCK_M cells,
    configs.MAX_GRID_CELLS): no per-cell division by HW, and with INT64 no 64-bit division at
    all (ptxas makes that a subroutine call, which spilled around it). Tiles past the last grid
    (the weight kernel's loop) have no cell in range.
    """
    hw = tl.cast(HW, tl.int32)
    w = tl.cast(W, tl.int32)
    per_grid = (hw + BLOCK_M - 1) // BLOCK_M
    b = tile // per_grid
    pos = (tile - b * per_grid) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        base = b.to(tl.int64) * hw
    else:
        base = b * hw
    cell = base + pos
    y = pos // w
    x = pos - y * w
    return cell, base, y, x, (pos < hw) & (cell < n_cells)


@triton.jit
def _hidden_chunk(p0, p1, p2, p3, w1_ptr, b1_ptr, j0, C: tl.constexpr, HID: tl.constexpr,
                  HC: tl.constexpr, NF: tl.constexpr, PRECISION: tl.constexpr):
    """Pre-activation of hidden units j0 .. j0+HC: sum_k p_k @ W1_k[:, chunk] + b1[chunk].

    The hidden layer is walked in chunks of HC so that only [M, HC] activations and [C, HC]
    weight slices are live at once (registers and shared memory stay bounded for hidden 256).
    Returns (h_pre [M, HC], the chunk's W1_k slices w0..w3 [C, HC] for the backward).
    """
    cols = tl.arange(0, C)
    hh = j0 + tl.arange(0, HC)
    offs = cols[:, None] * HID + hh[None, :]
    w0 = tl.load(w1_ptr + offs)
    w1 = tl.load(w1_ptr + C * HID + offs)
    w2 = tl.load(w1_ptr + 2 * C * HID + offs)
    h = _mm(p0, w0, PRECISION) + _mm(p1, w1, PRECISION) + _mm(p2, w2, PRECISION)
    if NF == 4:
        w3 = tl.load(w1_ptr + 3 * C * HID + offs)
        h += _mm(p3, w3, PRECISION)
    else:
        w3 = w0
    return h + tl.load(b1_ptr + hh)[None, :], w0, w1, w2, w3


@triton.jit
def _concat_filters(p0, p1, p2, p3):
    """[M, 4C]: column k*C + c holds p_k[:, c] (the perception row in W1's row order).

    One [4C, HC] weight-gradient dot P^T @ gh instead of F [C, HC] ones: its M = 4C >= 64 makes
    it a wgmma on sm_90a (M = C fell back to register-operand mma.sync); 4C pads F = 3.
    """
    z = tl.join(tl.join(p0, p1), tl.join(p2, p3))      # [M, C, 2, 2]: [m, c, i, j] = p_{2j+i}
    z = tl.permute(z, (0, 3, 2, 1))                     # [m, j, i, c]
    return tl.reshape(z, (p0.shape[0], 4 * p0.shape[1]))
