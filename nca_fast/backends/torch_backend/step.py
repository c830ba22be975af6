"""One step of the torch backend on the padded state, forward and backward.

The MLP runs on the gathered cells alone, in row chunks small enough that the
``cells x hidden`` activations stay in cache; the backward accumulates weight gradients chunk
by chunk in a fixed order (deterministic) and replays perception transposed.
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


# -------------------------------------------------------------------------------- one step
def step_forward(plan: Plan, xp: torch.Tensor, fire, w1b, b1, w2, b2, save: bool):
    """One step on the padded state ``xp`` (b x (H+2) x (W+2) x C), updated in place.

    The MLP reads everything it needs from ``xp`` before the scatter, so in place is safe.
    (Perceiving and updating an image at a time, so that the bands are still in cache when
    gathered, is slower: more, smaller ops.) Returns None, or with ``save`` the step's record
    for the backward:
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


def _finish(plan: Plan, xn: torch.Tensor, pre):
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


def step_backward(plan: Plan, g: torch.Tensor, record, w1b, w2, acc, gx):
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
