"""Perception without a convolution, and the per-rollout plan of the torch backend.

``perception_plan`` splits each 3x3 filter into row patterns shared between filters (a
horizontal pass) and a vertical combination of them; a filter that is a pure shift costs
nothing (its band is gathered straight from the state). ``Plan`` holds what the steps of one
rollout share on the padded channels-last grid ``b x (H+2) x (W+2) x C``: shapes, the
perception plan, scratch buffers, the perception passes and their adjoint, learned filters'
perception on gathered cells and its adjoints, the alive masks, the halo (wrapped, replicated
or reflected) and the choice of the cells a step updates.

Learned filters (``config.learn_filters``) change every rollout, so they get no plan: a cell's
9 neighbours are gathered tap-major (``9 x n x C``, tap ``t = 3*(dy+1) + (dx+1)``) and
perception is one small matmul against the taps (shared ``F x 3 x 3``) or a broadcast multiply
over the channels (depthwise ``F x C x 3 x 3``), laid out band-major like the fixed bank's
(``k*C + c``; w1 unscaled). The filters' gradient is the sum over cells of the perception
gradient times the tap values, and the taps' gradient is scattered back onto the state by the
same offsets.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ...params import bands as w1_bands

# Bytes of hidden activations per MLP chunk on a CPU (the 2 cores' L2 together).
_CHUNK_BYTES = 1 << 20


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
def perception_plan(filters) -> Tuple[Tuple[_Pattern, ...], Tuple[_Band, ...]]:
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


def band_weights(config, w1: torch.Tensor) -> torch.Tensor:
    """w1 (hidden x F*C, interleaved) -> hidden x F*C band-major (``k*C + c``), each band times
    its scale (differentiable: computed once per rollout). docs/MODEL.md, "W1 layouts"."""
    hidden = w1.shape[0]
    _, bands = perception_plan(config.filters)
    f = len(bands)
    scale = torch.tensor([b.scale for b in bands], dtype=w1.dtype, device=w1.device)
    w = w1_bands(w1, f) * scale.view(1, f, 1)
    return w.reshape(hidden, -1).contiguous()


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


class Plan:
    """Everything a rollout's steps share: shapes, the perception plan, scratch buffers."""

    def __init__(self, config, shape, dtype, device):
        b, h, w, c = shape
        self.b, self.h, self.w, self.c = b, h, w, c
        self.hp, self.wp = h + 2, w + 2
        self.np = b * self.hp * self.wp
        self.dtype, self.device = dtype, device
        self.circular = config.padding == "circular"
        # A halo that copies cells of the grid (rows top, bottom; columns left, right of the
        # padded grid); None for zeros, whose halo stays 0.
        self.halo_src = {"circular": (h, 1, w, 1), "replicate": (1, h, 1, w),
                         "reflect": (2, h - 1, 2, w - 1)}.get(config.padding)
        self.learned = config.learn_filters
        self.tap_offsets = [dy * self.wp + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        self._tap_offsets = {}
        self.thr = config.alive_threshold
        self.alpha = config.alpha_channel
        self.patterns, self.bands = perception_plan(config.filters)
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
        their page faults again on every step (bench/NOTES_cpu.md)."""
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

    # -------------------------------------------------------------- learned filters
    def tap_index(self, idx: torch.Tensor) -> torch.Tensor:
        """9 x n flat padded indices of the neighbours of the cells ``idx``, tap-major."""
        offs = self._tap_offsets.get(idx.device)
        if offs is None:
            offs = torch.tensor(self.tap_offsets, dtype=idx.dtype, device=idx.device)
            self._tap_offsets[idx.device] = offs
        return idx[None] + offs[:, None]

    def gather_taps(self, xflat: torch.Tensor, idx9: torch.Tensor, out: torch.Tensor) -> None:
        """out (9 x n x C) = the rows ``idx9`` (9 x n, from ``tap_index``) of ``xflat``."""
        torch.index_select(xflat, 0, idx9.view(-1), out=out.view(-1, self.c))

    def perceive_taps(self, taps: torch.Tensor, filters: torch.Tensor, out: torch.Tensor):
        """out (n x F*C, band-major ``k*C + c``) = the filters (F x 3 x 3 or F x C x 3 x 3)
        applied to the gathered taps (9 x n x C).

        Computed filter-major (F x n x C: shared filters are one (F x 9) @ (9 x n*C) matmul,
        depthwise ones 9 broadcast multiply-adds per filter), then transposed into ``out``."""
        n, c = taps.shape[1], self.c
        f = filters.shape[0]
        band = self.scratch("taps_band", (f, n, c))
        if filters.dim() == 3:
            torch.mm(filters.view(f, 9), taps.view(9, n * c), out=band.view(f, n * c))
        else:
            fd = filters.view(f, c, 9)
            for k in range(f):
                torch.mul(taps[0], fd[k, :, 0], out=band[k])
                for t in range(1, 9):
                    band[k].addcmul_(taps[t], fd[k, :, t])
        out.view(n, f, c).copy_(band.transpose(0, 1))

    def filter_grad(self, taps: torch.Tensor, gband: torch.Tensor, acc: torch.Tensor) -> None:
        """acc += the filters' gradient from gathered taps (9 x n x C) and the perception's
        gradient filter-major ``gband`` (F x n x C): shared, acc is 9 x F; depthwise,
        F x C x 9."""
        f, n, c = gband.shape
        if acc.dim() == 2:
            acc.addmm_(taps.view(9, n * c), gband.view(f, n * c).t())
            return
        prod = self.scratch("taps_prod", taps.shape)
        for k in range(f):
            torch.mul(taps, gband[k], out=prod)
            acc[k].add_(prod.sum(1).t())

    def taps_adjoint(self, gband: torch.Tensor, filters: torch.Tensor,
                     out: torch.Tensor) -> None:
        """out (9 x n x C) = the gradient of the gathered taps from the perception's gradient,
        filter-major ``gband`` (F x n x C)."""
        f, n, c = gband.shape
        if filters.dim() == 3:              # (9 x F) @ (F x n*C)
            torch.mm(filters.view(f, 9).t(), gband.view(f, n * c), out=out.view(9, n * c))
            return
        fd = filters.view(f, c, 9)
        for t in range(9):
            torch.mul(gband[0], fd[0, :, t], out=out[t])
            for k in range(1, f):
                out[t].addcmul_(gband[k], fd[k, :, t])

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
        """Circular, replicate or reflect padding: copy the cells the halo stands for into it
        (columns of the interior rows, then whole rows, so the corners copy a copy)."""
        h, w = self.h, self.w
        top, bottom, left, right = self.halo_src
        xp[:, 1:-1, 0].copy_(xp[:, 1:-1, left])
        xp[:, 1:-1, w + 1].copy_(xp[:, 1:-1, right])
        xp[:, 0].copy_(xp[:, top])
        xp[:, h + 1].copy_(xp[:, bottom])

    def fold_halo(self, g: torch.Tensor) -> None:
        """Adjoint of ``fill_halo``: add the halo's gradient onto the cells it copies (rows,
        then columns: the reverse order)."""
        h, w = self.h, self.w
        top, bottom, left, right = self.halo_src
        g[:, top].add_(g[:, 0])
        g[:, bottom].add_(g[:, h + 1])
        g[:, 1:-1, left].add_(g[:, 1:-1, 0])
        g[:, 1:-1, right].add_(g[:, 1:-1, w + 1])

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
