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
def _neighbour(y, x, dy, dx, H, W, CIRCULAR: tl.constexpr):
    """Row and column of the cell at offset (dy, dx), and whether it exists.

    Under circular padding the grid is a torus: every neighbour exists. Offsets are in [-2, 2],
    so adding 2*H (2*W) keeps the operand of ``%`` non-negative whatever the sign convention.
    """
    ny = y + dy
    nx = x + dx
    if CIRCULAR:
        ny = (ny + 2 * H) % H
        nx = (nx + 2 * W) % W
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
    """[M, 32] bool: raw alpha > thr on the (2R+1)^2 window around each cell (R = 1 or 2).

    Column j stands for offset (j // 5 - 2, j % 5 - 2); columns outside the window are False.
    """
    j = tl.arange(0, 32)
    ey = j // 5 - 2
    ex = j % 5 - 2
    in_win = (j < 25) & (ey >= -R) & (ey <= R) & (ex >= -R) & (ex <= R)
    ny, nx, ok = _neighbour(y[:, None], x[:, None], ey[None, :], ex[None, :], H, W, CIRCULAR)
    ok = ok & in_win[None, :] & row_ok[:, None]
    a = tl.load(r_ptr + (base[:, None] + ny * W + nx) * C + ALPHA, mask=ok, other=0.0)
    return ok & (a > thr)


@triton.jit
def _post_alive(hot, dy, dx):
    """[M] bool: any hot cell in the 3x3 window around offset (dy, dx) of the 5x5 ``hot``."""
    j = tl.arange(0, 32)
    ey = j // 5 - 2
    ex = j % 5 - 2
    sel = (j < 25) & (ey - dy <= 1) & (dy - ey <= 1) & (ex - dx <= 1) & (dx - ex <= 1)
    return tl.max(tl.where(sel[None, :] & hot, 1, 0), axis=1) > 0


@triton.jit
def _perceive(r_ptr, q_ptr, filt_ptr, base, y, x, row_ok, H, W, thr,
              C: tl.constexpr, NF: tl.constexpr, ALPHA: tl.constexpr,
              HAS_Q: tl.constexpr, ALIVE: tl.constexpr, CIRCULAR: tl.constexpr):
    """Gather a tile's 3x3 neighbourhoods and apply the filter bank.

    The stored state may still owe the previous step's alive mask (HAS_Q): then the true state
    of a neighbour n is ``r[n] * (q[n] and any(r_alpha > thr on the 3x3 around n))``, which needs
    raw alpha on the 5x5 window around each cell. Returns the F perception tiles p0..p3
    ([M, C] each; p3 is zero when NF == 3), the cell's own true state [M, C], and the pre-update
    alive mask [M] (all True when alive masking is off).
    """
    cols = tl.arange(0, C)
    if HAS_Q:
        hot = _alpha_hot(r_ptr, base, y, x, row_ok, H, W, thr, C, ALPHA, CIRCULAR, 2)
    p0 = tl.zeros([y.shape[0], C], dtype=r_ptr.dtype.element_ty)
    p1 = tl.zeros_like(p0)
    p2 = tl.zeros_like(p0)
    p3 = tl.zeros_like(p0)
    center = tl.zeros_like(p0)
    if ALIVE:
        pre = row_ok & (y < 0)  # nothing alive yet: the taps below set it
    else:
        pre = row_ok
    for tap in tl.static_range(9):
        dy = tap // 3 - 1              # constexpr: tap is
        dx = tap % 3 - 1
        ny, nx, ok = _neighbour(y, x, dy, dx, H, W, CIRCULAR)
        ok = ok & row_ok
        nb = base + ny * W + nx
        v = tl.load(r_ptr + nb[:, None] * C + cols[None, :], mask=ok[:, None], other=0.0)
        if HAS_Q:
            qn = tl.load(q_ptr + nb, mask=ok, other=0) != 0
            keep = ok & qn & _post_alive(hot, dy, dx)
            v = tl.where(keep[:, None], v, 0.0)
        if ALIVE:
            a = tl.sum(tl.where(cols[None, :] == ALPHA, v, 0.0), axis=1)
            pre = pre | (ok & (a > thr))
        p0 += tl.load(filt_ptr + 0 * 9 + tap) * v
        p1 += tl.load(filt_ptr + 1 * 9 + tap) * v
        p2 += tl.load(filt_ptr + 2 * 9 + tap) * v
        if NF == 4:
            p3 += tl.load(filt_ptr + 3 * 9 + tap) * v
        if tap == 4:
            center = v
    return p0, p1, p2, p3, center, pre


@triton.jit
def _cells(pid, BLOCK_M: tl.constexpr, n_cells, HW, W, INT64: tl.constexpr):
    """Flat cell indices of tile ``pid`` and their (grid base, row, column, in range)."""
    if INT64:
        cell = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    else:
        cell = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = cell < n_cells
    b = cell // HW
    rem = cell - b * HW
    y = rem // W
    x = rem - y * W
    return cell, b * HW, y, x, row_ok


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
