"""Dense-layer helpers shared by the step kernels: the tl.dot operands' orders and layouts,
W1 and W2 tiles with a named bank's scales folded in, one hidden chunk of the MLP."""
import triton
import triton.language as tl

from ._tile import BANK_CHANNELS, BANK_DATA, BF16, IEEE, SOBEL_SCALE, TF32


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 (fp64 for checks) accumulation at the configured precision."""
    if PRECISION == BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _k_order(j, PRECISION: tl.constexpr):
    """Which hidden unit sits at K position j of the second dense layer.

    tf32: the first layer's accumulator is used as the second layer's register operand without
    a shuffle. In an m64nNk8 accumulator a thread holds columns 2c, 2c + 1 of every group of 8;
    a tf32 k8 operand fragment wants columns c, c + 4. Reading the groups as (c, e) -> 4e + c
    (``_as_k_operand``) and ordering W2's rows the same way gives the same sum.
    """
    if PRECISION == TF32:
        return (j // 8) * 8 + (j % 4) * 2 + (j % 8) // 4
    else:
        return j


@triton.jit
def _as_k_operand(h, PRECISION: tl.constexpr):
    if PRECISION == TF32:
        M: tl.constexpr = h.shape[0]
        N: tl.constexpr = h.shape[1]
        return tl.reshape(tl.permute(tl.reshape(h, (M, N // 8, 4, 2)), (0, 1, 3, 2)), (M, N))
    else:
        return h


@triton.jit
def _concat4(p0, p1, p2, p3):
    """[M, 4C]: column k*C + c holds p_k[:, c] (the perception row in W1's row order), so the
    first layer is one dot with K = 4C."""
    z = tl.join(tl.join(p0, p1), tl.join(p2, p3))      # [M, C, 2, 2]: [m, c, i, j] = p_{2j+i}
    z = tl.permute(z, (0, 3, 2, 1))                     # [m, j, i, c]
    return tl.reshape(z, (p0.shape[0], 4 * p0.shape[1]))


@triton.jit
def _split_rows(x):
    """The two halves [M / 2, N] of x [M, N]: rows 0 .. M / 2 - 1 and M / 2 .. M - 1."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, (2, M // 2, N)), (1, 2, 0)))


@triton.jit
def _join_rows(a, b):
    """[M, N] from its two halves [M / 2, N] (``_split_rows``)."""
    M: tl.constexpr = 2 * a.shape[0]
    N: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (M, N))


@triton.jit
def _w1_tile(w1_ptr, b1_ptr, lap, j0, C: tl.constexpr, HID: tl.constexpr, NJ: tl.constexpr,
             NF: tl.constexpr, BANK: tl.constexpr, BIAS: tl.constexpr,
             HIDDEN_ROWS: tl.constexpr, K_ORDER: tl.constexpr):
    """W1 for hidden units j0 .. j0 + NJ: [4C, NJ] with feature k*C + c as row (the layout of
    ``_concat4``), or [NJ, 4C] when HIDDEN_ROWS.

    For a named bank the rows of Sobel-x and -y carry the filters' 1/8 and the Laplacian's rows
    ``lap`` (1 or 1/16), which ``_bank`` leaves out: powers of two, so the products are exactly
    the same. BIAS (F = 3): b1 in row 3C, the constant-1 column of ``_concat4``; otherwise that
    block is zero. K_ORDER: the hidden units in the K order of ``_as_k_operand`` (tf32).
    """
    k = tl.arange(0, 4 * C)
    j = j0 + _k_order(tl.arange(0, NJ), K_ORDER)
    if HIDDEN_ROWS:
        kk = k[None, :]
        jj = j[:, None]
    else:
        kk = k[:, None]
        jj = j[None, :]
    w = tl.load(w1_ptr + kk * HID + jj, mask=(kk < NF * C) & (jj < HID), other=0.0)
    if BANK != BANK_DATA and BANK != BANK_CHANNELS:
        w = w * tl.where((kk >= C) & (kk < 3 * C), SOBEL_SCALE, tl.where(kk >= 3 * C, lap, 1.0))
    if BIAS:
        if NF == 3:
            w = tl.where(kk == 3 * C, tl.load(b1_ptr + jj, mask=jj < HID, other=0.0), w)
    return w


@triton.jit
def _bias_rows(b1_ptr, j0, C: tl.constexpr, HC: tl.constexpr):
    """[C, HC]: b1 in the first row, zeros (the K block of a constant-1 column)."""
    k = tl.arange(0, C)
    hh = j0 + tl.arange(0, HC)
    return tl.where((k == 0)[:, None], tl.load(b1_ptr + hh)[None, :], 0.0)


@triton.jit
def _w2_rows(w2_ptr, j0, C: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr):
    """Rows j0 .. j0 + HC of W2^T [HID, C] in the K order of ``_as_k_operand``."""
    kk = j0 + _k_order(tl.arange(0, HC), PRECISION)
    return tl.load(w2_ptr + kk[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _mlp_chunk(pc, ones, w1c, bc, w2c, dx, NF: tl.constexpr, PRECISION: tl.constexpr):
    """dx + relu(pc @ w1c [+ ones @ bc]) @ w2c for one hidden chunk (F = 4: bias as a K block
    of its own)."""
    acc = _mm(pc, w1c, tl.zeros([pc.shape[0], w1c.shape[1]], dtype=dx.dtype), PRECISION)
    if NF == 4:
        acc = _mm(ones, bc, acc, PRECISION)
    h = _as_k_operand(tl.maximum(acc, 0.0), PRECISION)
    return _mm(h, w2c, dx, PRECISION)


@triton.jit
def _w1_block(w1_ptr, lap, k: tl.constexpr, j0, C: tl.constexpr, HID: tl.constexpr,
              NJ: tl.constexpr, BANK: tl.constexpr, TRANS: tl.constexpr = False):
    """W1_k [C, NJ], filter k's rows for hidden units j0 .. j0 + NJ ([NJ, C] when TRANS), with
    the named bank's scale of ``_w1_tile``."""
    c = k * C + tl.arange(0, C)
    j = j0 + tl.arange(0, NJ)
    if TRANS:
        w = tl.load(w1_ptr + c[None, :] * HID + j[:, None])
    else:
        w = tl.load(w1_ptr + c[:, None] * HID + j[None, :])
    if BANK != BANK_DATA and BANK != BANK_CHANNELS:
        if k == 3:
            w = w * lap
        elif k != 0:
            w = w * SOBEL_SCALE
    return w


@triton.jit
def _mlp_chunk_fma(p0, p1, p2, p3, w0, w1, w2, w3, b1c, w2c, dx, NF: tl.constexpr):
    """``_mlp_chunk`` for "ieee" (FMA dots on CUDA cores, which pay for every K): one K = C dot
    per filter and b1 added, not the K = 4C dot whose fourth block is the bias column (at F = 3
    a quarter of its FMAs multiply zeros)."""
    acc = _mm(p0, w0, tl.zeros([p0.shape[0], w0.shape[1]], dtype=dx.dtype), IEEE)
    acc = _mm(p1, w1, acc, IEEE)
    acc = _mm(p2, w2, acc, IEEE)
    if NF == 4:
        acc = _mm(p3, w3, acc, IEEE)
    return _mm(tl.maximum(acc + b1c[None, :], 0.0), w2c, dx, IEEE)


@triton.jit
def _k_rows(v, PRECISION: tl.constexpr):
    """Rows of v [M, N] in the K order of ``_as_k_operand`` (for a B operand whose K runs over
    cells: row 4e + c of each group of 8 holds row 2c + e)."""
    if PRECISION == TF32:
        M: tl.constexpr = v.shape[0]
        N: tl.constexpr = v.shape[1]
        return tl.reshape(tl.permute(tl.reshape(v, (M // 8, 4, 2, N)), (0, 2, 1, 3)), (M, N))
    else:
        return v


@triton.jit
def _w2_cols(w2_ptr, j0, C: tl.constexpr, HC: tl.constexpr):
    """[C, HC]: W2 for hidden units j0 .. j0 + HC (w2_ptr holds W2^T, [HID, C])."""
    return tl.load(w2_ptr + (j0 + tl.arange(0, HC))[None, :] * C + tl.arange(0, C)[:, None])
