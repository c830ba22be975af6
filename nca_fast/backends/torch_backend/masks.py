"""Update masks for the torch backend: every mask of a rollout from one vectorised Philox pass.

The masks of steps ``first_step ..`` are hashed over a (step, cell) counter grid with torch
integer ops, bit-identical to ``nca_fast.rng.update_mask`` (docs/MODEL.md, "Update masks").
"""
from __future__ import annotations

import sys
from typing import Tuple

import torch

from ...rng import KEY_A, KEY_B, MASK32, ROUND_A, ROUND_B, check_seed, fire_threshold, philox

# Elements of the (step, cell) counter grid hashed per pass: int64 buffers of 512 KiB (L2).
_MASK_CHUNK = 1 << 16


def _s32(v: int) -> int:
    """A uint32 as the int32 with the same bits (for xor into an int32 view)."""
    v &= MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


def _halves(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of a contiguous int64 tensor, as strided int32 views."""
    v = t.view(torch.int32).view(-1, 2)
    return v[:, 0], v[:, 1]


def update_masks(batch: int, height: int, width: int, *, fire_rate: float, seed: int,
                 first_step: int, steps: int, device=None) -> torch.Tensor:
    """The update masks of steps ``first_step .. first_step + steps - 1``, as one bool tensor.

    Returns ``steps x B x H x W`` bool; entry ``[t]`` equals
    ``nca_fast.rng.update_mask(B, H, W, fire_rate=..., seed=..., step=first_step + t) > 0``.
    """
    check_seed(seed)
    n = batch * height * width
    out = torch.empty(steps, n, dtype=torch.bool, device=device)
    mask_block(out, 0, fire_rate, seed, first_step)
    return out.view(steps, batch, height, width)


def mask_block(out: torch.Tensor, cell0: int, fire_rate: float, seed: int,
                first_step: int) -> None:
    """Fill ``out`` (steps x n bool) with the masks of cells cell0 .. cell0 + n - 1.

    Philox4x32-10 on torch integer ops, vectorised over a (step, cell) counter grid. Words are
    held zero-extended in int64 so one int64 multiply gives the 64-bit product; its high and low
    halves are then free int32 views (no shifts or masks), and each new word is written by an
    int32 xor straight into the low half of a zeroed int64 buffer. Rounds 1 and 2 depend on the
    step and the cell separately, so they are computed per step (Python ints) and per cell.
    """
    steps, n = out.shape
    device = out.device
    thr = fire_threshold(fire_rate)
    if thr <= 0 or thr >= (1 << 24) or steps == 0 or n == 0:
        out.fill_(thr > 0)      # the 24 random bits are always below 2**24, never below 0
        return
    if sys.byteorder != "little" or cell0 + n >= (1 << 32):
        _mask_block_plain(out, cell0, fire_rate, seed, first_step)
        return
    keys = []
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        keys.append((k0, k1))
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    i64 = dict(dtype=torch.int64, device=device)
    # Round 1 with counter (cell, 0, step, 0): the per-cell half.
    pa = torch.arange(cell0, cell0 + n, **i64).mul_(ROUND_A)
    c2_r1 = torch.zeros(n, **i64)
    torch.bitwise_xor(_halves(pa)[1], _s32(keys[0][1]), out=_halves(c2_r1)[0])
    c3_r1 = _halves(pa)[0]
    # Round 2, per-cell half: c2_r1 * B gives c1 (its low word) and part of c0.
    pb2 = c2_r1 * ROUND_B
    pb2_lo, pb2_hi = _halves(pb2)
    per = max(1, _MASK_CHUNK // n) if device.type == "cpu" else steps
    cur = [torch.zeros(min(per, steps) * n, **i64) for _ in range(2)]       # c0, c2
    prods = [torch.empty(min(per, steps) * n, **i64) for _ in range(4)]     # pb, pa, old pb, pa
    for t0 in range(0, steps, per):
        s = min(per, steps - t0)
        c0, c2 = (b[:s * n] for b in cur)
        c0l, c2l = _halves(c0)[0], _halves(c2)[0]
        # (buffer, its low half, its high half), made once per chunk: views cost time too.
        pb, pa, pb_old, pa_old = ((b[:s * n],) + _halves(b[:s * n]) for b in prods)
        for i in range(s):
            step = (first_step + t0 + i) & MASK32
            hi1, lo1 = (step * ROUND_B) >> 32, (step * ROUND_B) & MASK32     # round 1, per step
            c0_r1 = hi1 ^ keys[0][0]
            p = c0_r1 * ROUND_A                                              # round 2, per step
            rows = slice(i * n, (i + 1) * n)
            torch.bitwise_xor(pb2_hi, _s32(lo1 ^ keys[1][0]), out=c0l[rows])
            torch.bitwise_xor(c3_r1, _s32(((p >> 32) & MASK32) ^ keys[1][1]), out=c2l[rows])
            # c3 after round 2 is the per-step low word of p, kept where round 3 reads c3.
            pa_old[0].view(s, n)[i].fill_(p & MASK32)
        # Round 3: c1 is per cell (pb2_lo), c3 per step (held in pa_old's rows).
        torch.mul(c2, ROUND_B, out=pb[0])
        torch.mul(c0, ROUND_A, out=pa[0])
        torch.bitwise_xor(pb[2].view(s, n), pb2_lo, out=c0l.view(s, n))
        c0l.bitwise_xor_(_s32(keys[2][0]))
        torch.bitwise_xor(pa[2], pa_old[1], out=c2l)
        c2l.bitwise_xor_(_s32(keys[2][1]))
        for r in range(3, 10):
            pb, pb_old = pb_old, pb
            pa, pa_old = pa_old, pa
            torch.mul(c2, ROUND_B, out=pb[0])
            last = r == 9
            if not last:                    # the last round's c2 is never read
                torch.mul(c0, ROUND_A, out=pa[0])
            torch.bitwise_xor(pb[2], pb_old[1], out=c0l)
            c0l.bitwise_xor_(_s32(keys[r][0]))
            if not last:
                torch.bitwise_xor(pa[2], pa_old[1], out=c2l)
                c2l.bitwise_xor_(_s32(keys[r][1]))
        # Fires when the top 24 bits are below thr, i.e. the (zero-extended) word < thr * 256.
        torch.lt(c0.view(s, n), thr << 8, out=out[t0:t0 + s])


def _mask_block_plain(out, cell0, fire_rate, seed, first_step):
    """rng.update_mask's own code, for cell counters past 2**32 or big-endian machines."""
    steps, n = out.shape
    cell = torch.arange(cell0, cell0 + n, dtype=torch.int64, device=out.device)
    zero = torch.zeros_like(cell)
    for t in range(steps):
        step = torch.full_like(cell, (first_step + t) & MASK32)
        word = philox(seed, cell & MASK32, cell >> 32, step, zero)[0]
        out[t] = (word >> 8) < fire_threshold(fire_rate)
