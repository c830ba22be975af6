"""One step of the torch backend on the padded state, forward and backward.

The MLP runs on the gathered cells alone, in row chunks small enough that the
``cells x hidden`` activations stay in cache; the backward accumulates weight gradients chunk
by chunk in a fixed order (deterministic) and replays perception transposed.

With learned filters (``filters`` not None) the MLP's input is computed per chunk from the
gathered neighbours (``Plan.perceive_taps``), band-major; a step's record keeps its
input state instead of the perception values, and the backward gathers the neighbours again
for the filters' gradient and the perception's adjoint.
"""
from __future__ import annotations

import torch

from .perception import Plan


# --------------------------------------------------------------------------------- the MLP
def _mlp_rows(plan: Plan, sources, pidx, w1b, b1, w2, b2, dx, gath=None, hid=None):
    """dx (n x C) for the cells ``pidx`` (flat indices into the sources' rows); with ``gath``
    (n x F x C) and ``hid`` (n x hidden), also keeps the gathered bands and the hidden
    activations that the backward needs.

    The bands are gathered into one n x F*C block so the first layer is a single K = F*C matmul
    (faster than three K = C matmuls, bench/NOTES_cpu.md); without ``gath`` the block and the
    hidden activations are per-chunk scratch that stays in cache.
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


def _mlp_rows_learned(plan: Plan, xflat, pidx, w1, b1, w2, b2, filters, dx, hid=None):
    """dx (n x C) for the cells ``pidx`` (flat padded indices into ``xflat``) with learned
    filters (w1 band-major, unscaled); with ``hid`` (n x hidden) also keeps the hidden
    activations."""
    n, c = pidx.numel(), plan.c
    f = filters.shape[0]
    step = min(plan.chunk, max(n, 1))
    per = plan.scratch("perception", (step, c * f))
    hbuf = plan.scratch("hidden", (step, w1.shape[0])) if hid is None else None
    for s in range(0, n, plan.chunk):
        e = min(s + plan.chunk, n)
        tc, pc = plan.scratch("taps", (9, e - s, c)), per[:e - s]
        hc = hid[s:e] if hid is not None else hbuf[:e - s]
        plan.gather_taps(xflat, plan.tap_index(pidx[s:e]), tc)
        plan.perceive_taps(tc, filters, pc)
        torch.addmm(b1, pc, w1.t(), out=hc)
        hc.clamp_min_(0)
        torch.addmm(b2, hc, w2.t(), out=dx[s:e])


# -------------------------------------------------------------------------------- one step
def step_forward(plan: Plan, xp: torch.Tensor, fire, w1b, b1, w2, b2, filters, save: bool):
    """One step on the padded state ``xp`` (b x (H+2) x (W+2) x C), updated in place.

    ``w1b``: band-major first-layer weights (each band times its scale for the config's fixed
    bank, ``filters`` None; unscaled with learned ``filters``, F x 3 x 3 or F x C x 3 x 3).
    The MLP reads everything it needs from ``xp`` before the scatter, so in place is safe.
    (Perceiving and updating an image at a time, so that the bands are still in cache when
    gathered, is slower: more, smaller ops.) Returns None, or with ``save`` the step's record
    for the backward: (pidx, life or None, gathered bands n x F*C, hidden activations
    n x hidden); with learned filters the third entry is the step's input state instead.
    """
    pidx, pre = plan.active(xp, fire)
    if filters is not None:
        return _step_forward_learned(plan, xp, pidx, pre, w1b, b1, w2, b2, filters, save)
    n, f = pidx.numel(), len(plan.bands)
    dx = plan.scratch("dx", (n, plan.c))
    gath = torch.empty(n, f, plan.c, dtype=plan.dtype, device=plan.device) if save else None
    hid = torch.empty(n, w1b.shape[0], dtype=plan.dtype, device=plan.device) if save else None
    if n:
        _mlp_rows(plan, plan.perceive(xp), pidx, w1b, b1, w2, b2, dx, gath, hid)
    xp.view(plan.np, plan.c).index_put_((pidx,), dx, accumulate=True)
    life = _finish(plan, xp, pre)
    return (pidx, life, gath.view(n, f * plan.c), hid) if save else None


def _step_forward_learned(plan: Plan, xp, pidx, pre, w1, b1, w2, b2, filters, save: bool):
    """``step_forward`` with learned filters, from the cells to update on."""
    n = pidx.numel()
    dx = plan.scratch("dx", (n, plan.c))
    xin = xp.clone() if save else None
    hid = torch.empty(n, w1.shape[0], dtype=plan.dtype, device=plan.device) if save else None
    if n:
        _mlp_rows_learned(plan, xp.view(plan.np, plan.c), pidx, w1, b1, w2, b2, filters, dx,
                          hid)
    xp.view(plan.np, plan.c).index_put_((pidx,), dx, accumulate=True)
    life = _finish(plan, xp, pre)
    return (pidx, life, xin, hid) if save else None


def _finish(plan: Plan, xn: torch.Tensor, pre):
    """Halo refresh, post-alive mask and the alive multiply on the updated state; returns life.

    The halo is filled before the post-alive max (it reads the halo: stale copies of the
    step's input would count) and again after the multiply."""
    if plan.halo_src is not None:
        plan.fill_halo(xn)
    if pre is None:
        return None
    life = plan.alive(xn)
    life &= pre
    xn[:, 1:-1, 1:-1].mul_(life.unsqueeze(-1))
    if plan.halo_src is not None:
        plan.fill_halo(xn)
    return life


def step_backward(plan: Plan, g: torch.Tensor, record, w1b, w2, filters, acc, gx):
    """Backward of one step: ``g`` (grad of the step's output, padded; consumed) -> ``gx``
    (grad of its input, padded), or only the weight gradients when ``gx`` is None.

    Weight gradients are accumulated into ``acc`` = [gw1, gb1, gw2, gb2] (and the filters'
    gradient with learned ``filters``: 9 x F shared, F x C x 9 depthwise) in a fixed order
    (chunks in order), so every run, checkpointed or not, sums them identically.
    """
    pidx, life, gath, hid = record
    if plan.halo_src is not None:
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
    if filters is not None:
        _mlp_backward_learned(plan, gdx, pidx, gath, hid, w1b, w2, filters, acc, gx)
        return
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


def _mlp_backward_learned(plan: Plan, gdx, pidx, xin, hid, w1, w2, filters, acc, gx):
    """The MLP's and perception's backward with learned filters, chunk by chunk: the taps are
    gathered again from the step's input ``xin`` and perceived again (the forward's code), the
    filters' gradient taken from them, then their buffer reused for the taps' gradient, which
    is scattered onto ``gx``."""
    gw1, gb1, gw2, gb2, gf = acc
    n, c = pidx.numel(), plan.c
    f = filters.shape[0]
    step = min(plan.chunk, max(n, 1))
    per = plan.scratch("perception", (step, c * f))
    gper = plan.scratch("grad_perception", (step, c * f))
    ghb = plan.scratch("grad_hidden", (step, hid.shape[1]))
    xflat = xin.view(plan.np, c)
    gxflat = gx.view(plan.np, c) if gx is not None else None
    for s in range(0, n, plan.chunk):
        e = min(s + plan.chunk, n)
        m = e - s
        # Tap-major and filter-major chunks: whole (contiguous) scratch views of their size.
        tc, gb = plan.scratch("taps", (9, m, c)), plan.scratch("grad_band", (f, m, c))
        pc, gp, gh = per[:m], gper[:m], ghb[:m]
        gd, hc, idx9 = gdx[s:e], hid[s:e], plan.tap_index(pidx[s:e])
        plan.gather_taps(xflat, idx9, tc)
        plan.perceive_taps(tc, filters, pc)
        gw2.addmm_(gd.t(), hc)
        torch.mm(gd, w2, out=gh)
        torch.ops.aten.threshold_backward.grad_input(gh, hc, 0, grad_input=gh)
        gb1.add_(gh.sum(0))
        gw1.addmm_(gh.t(), pc)
        torch.mm(gh, w1, out=gp)
        gb.copy_(gp.view(m, f, c).transpose(0, 1))
        plan.filter_grad(tc, gb, gf)
        if gxflat is not None:
            plan.taps_adjoint(gb, filters, tc)
            gxflat.index_add_(0, idx9.view(-1), tc.reshape(9 * m, c))
    gb2.add_(gdx.sum(0))
