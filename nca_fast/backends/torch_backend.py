"""The torch backend: the NCA step in PyTorch ops, rewritten for a CPU's caches, on any device.

The reference (``nca_fast.reference``) states each step as the common PyTorch port does: a
depthwise convolution, two 1x1 convolutions over every cell, a full-grid mask multiply, max-pools.
This module computes the same numbers with far less work:

* Layout. The state is kept between steps as a padded channels-last grid ``B x (H+2) x (W+2) x C``
  (a cell's C channels contiguous, a one-cell halo that is zero or wraps), so a 3x3 neighbour is a
  fixed row offset and the dense layers are plain ``cells x C`` matmuls.
* Only the cells that matter are computed: those whose mask fires within one cell of a live
  (pre-alive) cell. Any other cell's update is zeroed by the alive mask and reaches no survivor's
  post-alive max-pool. At fire_rate 0.5 that is at most half the grid. The cells are gathered by
  index and the MLP runs on them alone, in row chunks small enough that the ``cells x hidden``
  activations stay in L2; relu is an in-place clamp on the chunk.
* Perception without a convolution. Each 3x3 filter is split into row patterns (a horizontal
  pass shared between filters, e.g. Sobel-x's [-1, 0, 1] and Sobel-y's [1, 2, 1]) and a vertical
  pass, each one or two full-grid adds with contiguous inner runs. A filter that is a pure shift
  (the identity) costs nothing: its band is gathered straight from the state. The filter's scale
  (Sobel's 1/8) is folded into the first layer's weights, permuted band-major, so the first
  layer is one K = F*C matmul on the gathered bands.
* Masks. All update masks of a rollout come from one vectorised Philox pass over a (step, cell)
  grid (``update_masks``), bit-identical to ``nca_fast.rng.update_mask`` (docs/MODEL.md,
  "Update masks").
* Threads. The batch is split into up to ``torch.get_num_threads()`` parts, each run start to
  end by a worker thread whose torch ops are single-threaded: images are independent, so a
  forward or backward pass joins once instead of meeting an OpenMP barrier at every op.
* Backward. The whole rollout is one autograd node with a handwritten backward: the gathered
  bands and hidden activations of the computed cells are saved (far less than autograd keeps for
  the port), weight gradients are accumulated chunk by chunk in a fixed order (deterministic),
  and perception's adjoint replays the same passes transposed. With ``segment=k`` only each
  segment's first state is kept and the segment is recomputed by the same code, so gradients
  are bitwise those of the run without checkpoints.

No ``torch.compile``: see bench/NOTES.md for the measurements behind these choices.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..params import Params, bands as w1_bands
from ..rng import KEY_A, KEY_B, MASK32, ROUND_A, ROUND_B, check_seed, fire_threshold, philox
from .interface import check_rollout, run_in_frames
# Elements of the (step, cell) counter grid hashed per pass: int64 buffers of 512 KiB (L2).
_MASK_CHUNK = 1 << 16
# Bytes of hidden activations per MLP chunk on a CPU (the 2 cores' L2 together).
_CHUNK_BYTES = 1 << 20


# ---------------------------------------------------------------------------------- masks
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
    _mask_block(out, 0, fire_rate, seed, first_step)
    return out.view(steps, batch, height, width)


def _mask_block(out: torch.Tensor, cell0: int, fire_rate: float, seed: int,
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


# ----------------------------------------------------------------------------- perception
@dataclass(frozen=True)
class _Term:
    """``dst += coef * src`` shifted by ``dy`` rows (vertical pass) or ``dx`` columns."""
    shift: int
    src: int        # horizontal pass: unused (always the state); vertical: index of a pattern
    coef: float


@dataclass(frozen=True)
class _Pattern:
    """A horizontal pass over all H+2 rows: a view of the state shifted by ``view_dx`` columns
    when it has one tap of weight 1, else a buffer computed from ``terms``."""
    view_dx: Optional[int]
    terms: Tuple[_Term, ...]


@dataclass(frozen=True)
class _Band:
    """Filter k as computed: ``scale * sum(terms)``; a pure shift of a pattern when ``view``."""
    scale: float
    terms: Tuple[_Term, ...]

    @property
    def view(self) -> bool:
        return len(self.terms) == 1


@functools.lru_cache(maxsize=64)
def _perception_plan(filters) -> Tuple[Tuple[_Pattern, ...], Tuple[_Band, ...]]:
    """Split each 3x3 filter into shared row patterns and a vertical combination of them.

    Rows are normalised by their first non-zero tap, so a row and its multiples share a pattern
    (Sobel-x's three rows are one pattern); a band's first coefficient becomes its scale, which
    is folded into the first layer's weights.
    """
    patterns: List[Tuple[float, float, float]] = []
    bands = []
    for f in filters:
        terms = []
        for dy in (-1, 0, 1):
            row = tuple(float(v) for v in f[dy + 1])
            nz = [j for j in range(3) if row[j] != 0.0]
            if not nz:
                continue
            lead = row[nz[0]]
            pat = tuple(v / lead for v in row)
            if pat not in patterns:
                patterns.append(pat)
            terms.append((dy, patterns.index(pat), lead))
        if not terms:
            # An all-zero filter: any band (the state itself) times a zero scale, which zeroes
            # its first-layer weights, as the reference's zero perception does.
            if (0.0, 1.0, 0.0) not in patterns:
                patterns.append((0.0, 1.0, 0.0))
            bands.append(_Band(0.0, (_Term(0, patterns.index((0.0, 1.0, 0.0)), 1.0),)))
            continue
        scale = terms[0][2]
        bands.append(_Band(scale, tuple(_Term(dy, p, c / scale) for dy, p, c in terms)))
    pats = []
    for pat in patterns:
        nz = [j for j in range(3) if pat[j] != 0.0]
        if len(nz) == 1:                    # normalised, so the tap is exactly 1
            pats.append(_Pattern(nz[0] - 1, ()))
        else:
            pats.append(_Pattern(None, tuple(_Term(j - 1, 0, pat[j]) for j in nz)))
    return tuple(pats), tuple(bands)


def _accumulate(dst: torch.Tensor, srcs) -> None:
    """dst = sum(coef * src) over (src, coef), in as few passes as possible."""
    (s0, c0), rest = srcs[0], srcs[1:]
    if rest and c0 == 1.0:
        (s1, c1), rest = rest[0], rest[1:]
        torch.add(s0, s1, alpha=c1, out=dst)
    elif c0 == 1.0:
        dst.copy_(s0)
    else:
        torch.mul(s0, c0, out=dst)
    for src, coef in rest:
        dst.add_(src, alpha=coef)


class _Plan:
    """Everything a rollout's steps share: shapes, the perception plan, scratch buffers."""

    def __init__(self, config, shape, dtype, device):
        b, h, w, c = shape
        self.b, self.h, self.w, self.c = b, h, w, c
        self.hp, self.wp = h + 2, w + 2
        self.np = b * self.hp * self.wp
        self.dtype, self.device = dtype, device
        self.circular = config.padding == "circular"
        self.thr = config.alive_threshold
        self.alpha = config.alpha_channel
        self.patterns, self.bands = _perception_plan(config.filters)
        # A band that is a pure shift of a pure shift of the state is gathered from the state.
        self.band_offsets = []
        for band in self.bands:
            if band.view:
                t = band.terms[0]
                pat = self.patterns[t.src]
                dx = pat.view_dx if pat.view_dx is not None else 0
                self.band_offsets.append(t.shift * self.wp + dx)
            else:
                self.band_offsets.append(0)
        hidden = config.hidden
        cpu = torch.device(device).type == "cpu"
        esize = torch.empty((), dtype=dtype).element_size()
        # A multiple of 64 rows keeps every chunk 64-byte aligned whatever the row size, so a
        # recomputed segment calls MKL on identically aligned data (bitwise-equal results).
        self.chunk = max(256, _CHUNK_BYTES // (esize * hidden)) // 64 * 64 if cpu else 1 << 62
        self._scratch = {}
        self._active = torch.zeros(b, self.hp, self.wp, dtype=torch.bool, device=device)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._scratch.values())

    def scratch(self, name, shape, dtype=None) -> torch.Tensor:
        """A buffer reused across steps (contents undefined). Fresh multi-MB allocations cost
        their page faults again on every step; reusing them was worth ~20% of a CPU step."""
        dtype = dtype or self.dtype
        buf = self._scratch.get(name)
        numel = 1
        for d in shape:
            numel *= d
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:numel].view(shape)

    # -------------------------------------------------------------- forward perception
    def _pattern_slice(self, k: int, xp: torch.Tensor, bufs) -> Tuple[torch.Tensor, int]:
        """(tensor in the padded layout, column shift) holding pattern k's values."""
        pat = self.patterns[k]
        if pat.view_dx is not None:
            return xp, pat.view_dx
        return bufs[k], 0

    def perceive(self, xp: torch.Tensor):
        """The F bands' sources: list of (b*(H+2)*(W+2) x C tensor, row offset of the gather),
        for the b images of ``xp``.

        Computes the buffers that patterns and bands need, interior columns (patterns: all rows)
        only; their halo entries are never gathered.
        """
        w = self.w
        rows = xp.shape[0] * self.hp * self.wp
        pbufs = {}
        for k, pat in enumerate(self.patterns):
            if pat.view_dx is None:
                buf = self.scratch(("pattern", k), xp.shape)
                _accumulate(buf[:, :, 1:-1],
                            [(xp[:, :, 1 + t.shift:1 + t.shift + w], t.coef) for t in pat.terms])
                pbufs[k] = buf
        sources = []
        for j, (band, off) in enumerate(zip(self.bands, self.band_offsets)):
            if band.view:
                src, _ = self._pattern_slice(band.terms[0].src, xp, pbufs)
                sources.append((src.view(rows, self.c), off))
                continue
            buf = self.scratch(("band", j), xp.shape)
            srcs = []
            for t in band.terms:
                src, dx = self._pattern_slice(t.src, xp, pbufs)
                srcs.append((src[:, 1 + t.shift:1 + t.shift + self.h, 1 + dx:1 + dx + w],
                             t.coef))
            _accumulate(buf[:, 1:-1, 1:-1], srcs)
            sources.append((buf.view(rows, self.c), 0))
        return sources

    # -------------------------------------------------------------- adjoint perception
    def perceive_adjoint(self, gx: torch.Tensor, pidx: torch.Tensor, gbands) -> None:
        """gx += perception^T applied to the band gradients ``gbands`` (n x F x C, at pidx)."""
        w, h = self.w, self.h
        gpat = {}

        def pattern_grad(k, region_rows=None):
            """(buffer, column shift, fresh): a pattern's gradient buffer. With region_rows
            (r0, r1), a fresh buffer is zeroed outside those rows only, and the caller
            overwrites them (saves a full-grid zero per pattern); the halo columns of a
            pattern's gradient are never read."""
            if self.patterns[k].view_dx is not None:
                return gx, self.patterns[k].view_dx, False
            if k in gpat:
                return gpat[k], 0, False
            buf = self.scratch(("gpattern", k), gx.shape)
            if region_rows is None:
                buf.zero_()
            else:
                buf[:, :region_rows[0], 1:-1].zero_()
                buf[:, region_rows[1]:, 1:-1].zero_()
            gpat[k] = buf
            return buf, 0, region_rows is not None

        for j, (band, off) in enumerate(zip(self.bands, self.band_offsets)):
            g = gbands[:, j]
            if band.view:
                t = band.terms[0]
                dst, _, _ = pattern_grad(t.src)
                dst.view(self.np, self.c).index_add_(0, pidx + off if off else pidx, g)
                continue
            gb = self.scratch(("gband", j), gx.shape).zero_()
            gb.view(self.np, self.c).index_copy_(0, pidx, g)
            inner = gb[:, 1:-1, 1:-1]
            for t in band.terms:
                rows = (1 + t.shift, 1 + t.shift + h)
                dst, dx, fresh = pattern_grad(t.src, rows)
                region = dst[:, rows[0]:rows[1], 1 + dx:1 + dx + w]
                if fresh:
                    torch.mul(inner, t.coef, out=region)
                else:
                    region.add_(inner, alpha=t.coef)
        for k, gp in gpat.items():
            inner = gp[:, :, 1:-1]
            for t in self.patterns[k].terms:
                gx[:, :, 1 + t.shift:1 + t.shift + w].add_(inner, alpha=t.coef)

    # -------------------------------------------------------------- alive masks and halo
    def alive(self, xp: torch.Tensor) -> torch.Tensor:
        """B x H x W bool: 3x3 max of alpha > threshold, read from the padded state
        (docs/MODEL.md, "Alive masks"). A zero halo stands in for the reference's -inf padding
        because the threshold is >= 0."""
        a = self.scratch("alpha", (self.b, self.hp, self.wp))
        a.copy_(xp[..., self.alpha])          # one strided read, then contiguous max passes
        m = self.scratch("alpha_max_v", (self.b, self.h, self.wp))
        torch.maximum(a[:, :-2], a[:, 2:], out=m)
        torch.maximum(m, a[:, 1:-1], out=m)
        m2 = self.scratch("alpha_max_h", (self.b, self.h, self.w))
        torch.maximum(m[:, :, :-2], m[:, :, 2:], out=m2)
        torch.maximum(m2, m[:, :, 1:-1], out=m2)
        return m2 > self.thr

    def fill_halo(self, xp: torch.Tensor) -> None:
        """Circular padding: copy the wrapped interior into the halo (columns, then rows)."""
        h, w = self.h, self.w
        xp[:, 1:-1, 0].copy_(xp[:, 1:-1, w])
        xp[:, 1:-1, w + 1].copy_(xp[:, 1:-1, 1])
        xp[:, 0].copy_(xp[:, h])
        xp[:, h + 1].copy_(xp[:, 1])

    def fold_halo(self, g: torch.Tensor) -> None:
        """Adjoint of ``fill_halo``: add the halo's gradient onto the cells it copies."""
        h, w = self.h, self.w
        g[:, h].add_(g[:, 0])
        g[:, 1].add_(g[:, h + 1])
        g[:, 1:-1, w].add_(g[:, 1:-1, 0])
        g[:, 1:-1, 1].add_(g[:, 1:-1, w + 1])

    def active(self, xp: torch.Tensor, fire: torch.Tensor):
        """(pidx, pre): padded flat indices of the cells to update, and the pre-alive mask.

        A cell that fires while dead is zeroed at the end of the step, but its updated alpha
        still counts in its neighbours' post-alive max-pool, so the cells updated are those
        that fire within one cell of a pre-alive cell (the update of any other fired cell
        reaches nothing that survives the step).
        """
        act = self._active            # its halo stays False
        if self.thr is None:
            act[:, 1:-1, 1:-1] = fire
            return act.view(-1).nonzero().squeeze(1), None
        pre = self.alive(xp)
        near = self.scratch("pre_padded", (self.b, self.hp, self.wp), torch.bool)
        near[:, 1:-1, 1:-1] = pre
        if self.circular:
            self.fill_halo(near)
        else:
            near[:, 0] = False
            near[:, -1] = False
            near[:, :, 0] = False
            near[:, :, -1] = False
        v = self.scratch("pre_dilated_v", (self.b, self.h, self.wp), torch.bool)
        torch.logical_or(near[:, :-2], near[:, 2:], out=v)
        v |= near[:, 1:-1]
        d = act[:, 1:-1, 1:-1]
        torch.logical_or(v[:, :, :-2], v[:, :, 2:], out=d)
        d |= v[:, :, 1:-1]
        d &= fire
        return act.view(-1).nonzero().squeeze(1), pre


# --------------------------------------------------------------------------------- the MLP
def _mlp_rows(plan: _Plan, sources, pidx, w1b, b1, w2, b2, dx, gath=None, hid=None):
    """dx (n x C) for the cells ``pidx`` (flat indices into the sources' rows); with ``gath``
    (n x F x C) and ``hid`` (n x hidden), also keeps the gathered bands and the hidden
    activations that the backward needs.

    The bands are gathered into one n x F*C block so the first layer is a single K = F*C matmul
    (three K = C matmuls were slower); without ``gath`` the block and the hidden activations
    are per-chunk scratch that stays in cache.
    """
    n = pidx.numel()
    f, c = len(sources), plan.c
    hidden = w1b.shape[0]
    idx = [pidx + off if off else pidx for _, off in sources]
    if gath is not None:
        for k, (src, _) in enumerate(sources):
            torch.index_select(src, 0, idx[k], out=gath[:, k])
    else:
        step = min(plan.chunk, max(n, 1))
        gbuf = plan.scratch("gather", (step, f, c))
        hbuf = plan.scratch("hidden", (step, hidden))
    for s in range(0, n, plan.chunk):
        e = min(s + plan.chunk, n)
        if gath is not None:
            g, hc = gath[s:e], hid[s:e]
        else:
            g, hc = gbuf[:e - s], hbuf[:e - s]
            for k, (src, _) in enumerate(sources):
                torch.index_select(src, 0, idx[k][s:e], out=g[:, k])
        torch.addmm(b1, g.view(e - s, f * c), w1b.t(), out=hc)
        hc.clamp_min_(0)
        torch.addmm(b2, hc, w2.t(), out=dx[s:e])


# -------------------------------------------------------------------------------- one step
def _step(plan: _Plan, xp: torch.Tensor, fire, w1b, b1, w2, b2, save: bool):
    """One step on the padded state ``xp`` (b x (H+2) x (W+2) x C), updated in place.

    The MLP reads everything it needs from ``xp`` before the scatter, so in place is safe.
    (Perceiving and updating an image at a time, so that the bands are still in cache when
    gathered, measured 5-10% slower: more, smaller ops.) Returns None, or with ``save`` the
    step's record for the backward:
    (pidx, life or None, gathered bands n x F*C, hidden activations n x hidden).
    """
    pidx, pre = plan.active(xp, fire)
    n, f = pidx.numel(), len(plan.bands)
    dx = plan.scratch("dx", (n, plan.c))
    gath = torch.empty(n, f, plan.c, dtype=plan.dtype, device=plan.device) if save else None
    hid = torch.empty(n, w1b.shape[0], dtype=plan.dtype, device=plan.device) if save else None
    if n:
        _mlp_rows(plan, plan.perceive(xp), pidx, w1b, b1, w2, b2, dx, gath, hid)
    xp.view(plan.np, plan.c).index_put_((pidx,), dx, accumulate=True)
    life = _finish(plan, xp, pre)
    return (pidx, life, gath.view(n, f * plan.c), hid) if save else None


def _finish(plan: _Plan, xn: torch.Tensor, pre):
    """Halo refresh, post-alive mask and the alive multiply on the updated state; returns life."""
    if plan.circular:
        plan.fill_halo(xn)
    if pre is None:
        return None
    life = plan.alive(xn)
    life &= pre
    xn[:, 1:-1, 1:-1].mul_(life.unsqueeze(-1))
    if plan.circular:
        plan.fill_halo(xn)
    return life


def _step_backward(plan: _Plan, g: torch.Tensor, record, w1b, w2, acc, gx):
    """Backward of one step: ``g`` (grad of the step's output, padded; consumed) -> ``gx``
    (grad of its input, padded), or only the weight gradients when ``gx`` is None.

    Weight gradients are accumulated into ``acc`` = [gw1, gb1, gw2, gb2] in a fixed order
    (chunks in order), so every run, checkpointed or not, sums them identically.
    """
    pidx, life, gath, hid = record
    if plan.circular:
        plan.fold_halo(g)
    inner = g[:, 1:-1, 1:-1]
    if life is not None:
        inner.mul_(life.unsqueeze(-1))
    if gx is not None:          # the identity path x' = x + ..., halo zero for the adjoint
        gx[:, 0].zero_()
        gx[:, -1].zero_()
        gx[:, 1:-1, 0].zero_()
        gx[:, 1:-1, -1].zero_()
        gx[:, 1:-1, 1:-1].copy_(inner)
    gdx = g.view(plan.np, plan.c).index_select(0, pidx)
    gw1, gb1, gw2, gb2 = acc
    gbands = plan.scratch("gbands", gath.shape) if gx is not None else None
    ghb = plan.scratch("grad_hidden", (min(plan.chunk, max(pidx.numel(), 1)), hid.shape[1]))
    for s in range(0, pidx.numel(), plan.chunk):
        e = min(s + plan.chunk, pidx.numel())
        gd, hc, gh = gdx[s:e], hid[s:e], ghb[:e - s]
        gw2.addmm_(gd.t(), hc)
        torch.mm(gd, w2, out=gh)
        torch.ops.aten.threshold_backward.grad_input(gh, hc, 0, grad_input=gh)
        gb1.add_(gh.sum(0))
        gw1.addmm_(gh.t(), gath[s:e])
        if gbands is not None:
            torch.mm(gh, w1b, out=gbands[s:e])
    gb2.add_(gdx.sum(0))
    if gx is not None:
        plan.perceive_adjoint(gx, pidx, gbands.view(pidx.numel(), len(plan.bands), plan.c))


# -------------------------------------------------------------------- parts and the workers
class _PlanCache:
    """Plans (with their scratch buffers) kept between rollouts, keyed by shape and config.

    A plan is borrowed only while one forward or backward pass runs, so concurrent rollouts
    get separate plans; least recently used plans are dropped past ``max_bytes`` of scratch.
    Fresh multi-MB buffers cost their page faults again on each call (``frames=1`` calls the
    rollout once per step).
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.free = OrderedDict()

    @contextmanager
    def borrow(self, key, make):
        with self.lock:
            plans = self.free.get(key)
            plan = plans.pop() if plans else None
        if plan is None:
            plan = make()
        try:
            yield plan
        finally:
            with self.lock:
                self.free.setdefault(key, []).append(plan)
                self.free.move_to_end(key)
                total = sum(p.nbytes() for ps in self.free.values() for p in ps)
                while total > self.max_bytes and self.free:
                    _, dropped = self.free.popitem(last=False)
                    total -= sum(p.nbytes() for p in dropped)


_PLANS = _PlanCache()


class _Part:
    """The images b0 .. b1-1 of the batch, run start to end by one thread with its own plan.

    Images are independent, so parts need no synchronisation within a rollout: one join per
    forward and one per backward, instead of an OpenMP barrier per op (hundreds per step),
    which is what made 2-thread intra-op runs collapse when other processes share the cores.
    """

    def __init__(self, config, b0, b1, h, w, c, dtype, device, steps, seed, first_step,
                 segment):
        self.b0, self.b1 = b0, b1
        self.key = (config, b1 - b0, h, w, c, dtype, device)
        self.cells = (b1 - b0) * h * w
        self.cell0 = b0 * h * w
        self.steps, self.seed, self.first_step = steps, seed, first_step
        self.fire_rate = config.fire_rate
        self.segment = segment

    def plan(self):
        config, b, h, w, c, dtype, device = self.key
        return _PLANS.borrow(self.key, lambda: _Plan(config, (b, h, w, c), dtype, device))

    def _fire(self, t0: int, n: int, plan: _Plan) -> torch.Tensor:
        """Update masks of steps t0 .. t0+n-1 (relative to first_step): n x b x H x W bool."""
        out = torch.empty(n, self.cells, dtype=torch.bool, device=plan.device)
        _mask_block(out, self.cell0, self.fire_rate, self.seed, self.first_step + t0)
        return out.view(n, plan.b, plan.h, plan.w)

    def forward_nograd(self, xp, weights):
        with self.plan() as plan:
            block = max(1, (1 << 22) // max(self.cells, 1))     # bounds mask memory
            for t0 in range(0, self.steps, block):
                fire = self._fire(t0, min(block, self.steps - t0), plan)
                for t in range(fire.shape[0]):
                    _step(plan, xp, fire[t], *weights, save=False)

    def forward_train(self, xp, weights):
        """Runs the steps in place on ``xp``. Returns what the backward needs, flat: the masks,
        then every step's record (no checkpointing) or the states at segment starts."""
        with self.plan() as plan:
            masks = self._fire(0, self.steps, plan)
            saved = [masks]
            for t in range(self.steps):
                if self.segment is None:
                    pidx, life, gath, hid = _step(plan, xp, masks[t], *weights, save=True)
                    saved += [pidx, life if life is not None else pidx[:0], gath, hid]
                else:
                    if t % self.segment == 0:
                        saved.append(xp.clone())
                    # The same code path as the recompute in backward (records dropped), so
                    # both produce bitwise the same states whatever MKL does with alignment.
                    _step(plan, xp, masks[t], *weights, save=True)
        return saved

    def backward(self, gout, saved, weights, need_x):
        """Grad of the part's padded input (or None) and its weight-gradient sums, from what
        ``forward_train`` returned (as unpacked by autograd)."""
        w1b, b1, w2, b2 = weights
        masks, rest = saved[0], saved[1:]
        acc = [torch.zeros_like(w1b), torch.zeros_like(b1), torch.zeros_like(w2),
               torch.zeros_like(b2)]
        with self.plan() as plan:
            g = plan.scratch("grad_a", gout.shape)
            g.copy_(gout)
            other = plan.scratch("grad_b", gout.shape)
            has_life = plan.thr is not None
            seg = self.segment or self.steps
            for s0 in reversed(range(0, self.steps, seg)):
                s1 = min(self.steps, s0 + seg)
                if self.segment is None:
                    records = {t: (rest[4 * t], rest[4 * t + 1] if has_life else None,
                                   rest[4 * t + 2], rest[4 * t + 3]) for t in range(s0, s1)}
                else:       # recompute the segment from its first state, keeping its records
                    xp = rest[s0 // seg].clone()
                    records = {t: _step(plan, xp, masks[t], *weights, save=True)
                               for t in range(s0, s1)}
                    del xp
                for t in reversed(range(s0, s1)):
                    gx = other if (t > 0 or need_x) else None
                    _step_backward(plan, g, records.pop(t), w1b, w2, acc, gx)
                    if gx is None:
                        g = None
                        break
                    g, other = gx, g
            grad = g.clone() if g is not None else None
        return grad, acc


_POOL = {"size": 0, "executor": None, "pid": None}
_POOL_LOCK = threading.Lock()


def _executor(size: int) -> ThreadPoolExecutor:
    """A pool of ``size`` threads whose torch ops run single-threaded (their own OpenMP and MKL
    thread counts are 1; the caller's are left as they were). Rebuilt after a fork, whose
    child has none of the parent's threads."""
    with _POOL_LOCK:
        if _POOL["size"] != size or _POOL["pid"] != os.getpid():
            if _POOL["executor"] is not None and _POOL["pid"] == os.getpid():
                _POOL["executor"].shutdown(wait=True)
            caller = torch.get_num_threads()
            ready = threading.Barrier(size)

            def init():
                torch.get_num_threads()     # this thread's lazy init first, or it would redo it
                torch.set_num_threads(1)    # thread-local OpenMP and MKL counts, and a global
                ready.wait()

            ex = ThreadPoolExecutor(size, thread_name_prefix="nca_fast_cpu", initializer=init)
            for f in [ex.submit(lambda: None) for _ in range(size)]:
                f.result()
            torch.set_num_threads(caller)   # puts the global default back for later threads
            _POOL.update(size=size, executor=ex, pid=os.getpid())
        return _POOL["executor"]


def _parallel(fn, items):
    """fn(item) for every item, under no_grad: in this thread when there is one, else on the
    pool (grad mode is thread-local, so the workers set it themselves)."""
    def run(item):
        with torch.no_grad():
            return fn(item)

    if len(items) == 1:
        return [run(items[0])]
    return list(_executor(len(items)).map(run, items))


def _split(batch: int, device: torch.device) -> List[Tuple[int, int]]:
    """Image ranges, one per thread: as many as torch's thread count allows on a CPU."""
    k = min(batch, torch.get_num_threads()) if device.type == "cpu" else 1
    k = max(k, 1)
    bounds = [batch * i // k for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


class _Rollout(torch.autograd.Function):
    """The whole rollout as one autograd node; parts run in parallel, steps in sequence.

    Everything kept for backward goes through save_for_backward, so saved-tensor hooks (memory
    accounting, offloading) see it all.
    """

    @staticmethod
    def forward(ctx, xp, w1b, b1, w2, b2, parts):
        weights = (w1b, b1, w2, b2)
        out = xp.clone()
        saved = _parallel(lambda p: p.forward_train(out[p.b0:p.b1], weights), parts)
        ctx.parts = parts
        ctx.counts = [len(sv) for sv in saved]
        ctx.save_for_backward(w1b, b1, w2, b2, *[t for sv in saved for t in sv])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        tensors = ctx.saved_tensors
        weights = tensors[:4]
        per_part, i = [], 4
        for n in ctx.counts:
            per_part.append(tensors[i:i + n])
            i += n
        need_x = ctx.needs_input_grad[0]
        gout = gout.contiguous()
        res = _parallel(lambda item: item[0].backward(gout[item[0].b0:item[0].b1], item[1],
                                                      weights, need_x),
                        list(zip(ctx.parts, per_part)))
        gx = torch.cat([r[0] for r in res]) if need_x else None
        total = res[0][1]
        for r in res[1:]:                   # a fixed order: part 0, 1, ...
            total = [a + b for a, b in zip(total, r[1])]
        return (gx, *total, None)


# ------------------------------------------------------------------------------ the rollout
def _band_weights(config, w1: torch.Tensor) -> torch.Tensor:
    """w1 (hidden x F*C, interleaved) -> hidden x F*C band-major (``k*C + c``), each band times
    its scale (differentiable: computed once per rollout). docs/MODEL.md, "W1 layouts"."""
    hidden = w1.shape[0]
    _, bands = _perception_plan(config.filters)
    f = len(bands)
    scale = torch.tensor([b.scale for b in bands], dtype=w1.dtype, device=w1.device)
    w = w1_bands(w1, f) * scale.view(1, f, 1)
    return w.reshape(hidden, -1).contiguous()


def _pad(x: torch.Tensor, circular: bool) -> torch.Tensor:
    """B x C x H x W -> the padded channels-last state B x (H+2) x (W+2) x C (differentiable)."""
    xp = F.pad(x, (1, 1, 1, 1), mode="circular" if circular else "constant")
    return xp.permute(0, 2, 3, 1).contiguous()


def _unpad(xp: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The padded state's interior as B x C x H x W, in ``like``'s memory format."""
    out = xp[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


# Under torch.compile this runs eagerly, as one graph break: its worker threads, plan cache
# locks and data-dependent gathers are not traceable (Dynamo broke the graph 35 times inside).
@torch.compiler.disable
def rollout(x: torch.Tensor, params: Params, config, *, steps: int, seed: int,
            first_step: int = 0, checkpoint=None, frames=None):
    """The backend interface (``nca_fast.backends.interface``) on PyTorch ops, any device.

    Equal (to rounding) to ``nca_fast.reference.rollout`` with the same seed. With
    ``checkpoint``, only each segment's first state is kept and the segment is recomputed
    during backward; gradients are bitwise those without. Returns new tensors in ``x``'s memory
    format (channels-last for a channels-last ``x``, else contiguous; a copy of ``x`` for 0
    steps). The filter bank is read from ``config`` (its taps decide the perception plan).

    On a CPU the batch is split into up to ``torch.get_num_threads()`` parts run by
    single-threaded worker threads (a batch of 1 runs in the calling thread).
    """
    params, segment = check_rollout(x, params, config, steps, seed, first_step, checkpoint,
                                    frames)
    return run_in_frames(
        lambda x, n, first: _rollout(x, params, config, n, seed, first, segment),
        x, steps, first_step, frames)


def _rollout(x, params: Params, config, steps: int, seed: int, first_step: int, segment):
    """``steps`` steps from ``first_step``; segment: None or steps per checkpoint segment."""
    if steps == 0:
        return x.clone()            # a new tensor in x's memory format, differentiable
    w1, b1, w2, b2 = params.w1, params.b1, params.w2, params.b2
    b, c, h, w = x.shape
    ranges = _split(b, x.device)
    if segment is not None and segment >= steps:
        segment = steps
    parts = [_Part(config, b0, b1_, h, w, c, x.dtype, x.device, steps, seed, first_step,
                   segment)
             for b0, b1_ in ranges]
    weights = (w1, b1, w2, b2)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in weights))
    w1b = _band_weights(config, w1)
    xp = _pad(x, config.padding == "circular")
    if not grad:
        with torch.no_grad():
            banded = (w1b, b1, w2, b2)
            _parallel(lambda p: p.forward_nograd(xp[p.b0:p.b1], banded), parts)
            return _unpad(xp, x)
    xp = _Rollout.apply(xp, w1b, b1, w2, b2, parts)
    return _unpad(xp, x)
