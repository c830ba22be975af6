"""The torch backend's rollout: batch parts on worker threads, the plan cache, the autograd
Function over a whole rollout, and the backend interface ``rollout``.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ...params import Params, bands
from ..interface import check_rollout, run_in_frames
from .masks import mask_block
from .perception import Plan, band_weights
from .step import step_backward, step_forward


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
        return _PLANS.borrow(self.key, lambda: Plan(config, (b, h, w, c), dtype, device))

    def _fire(self, t0: int, n: int, plan: Plan) -> torch.Tensor:
        """Update masks of steps t0 .. t0+n-1 (relative to first_step): n x b x H x W bool."""
        out = torch.empty(n, self.cells, dtype=torch.bool, device=plan.device)
        mask_block(out, self.cell0, self.fire_rate, self.seed, self.first_step + t0)
        return out.view(n, plan.b, plan.h, plan.w)

    def forward_nograd(self, xp, weights):
        with self.plan() as plan:
            block = max(1, (1 << 22) // max(self.cells, 1))     # bounds mask memory
            for t0 in range(0, self.steps, block):
                fire = self._fire(t0, min(block, self.steps - t0), plan)
                for t in range(fire.shape[0]):
                    step_forward(plan, xp, fire[t], *weights, save=False)

    def forward_train(self, xp, weights):
        """Runs the steps in place on ``xp``. Returns what the backward needs, flat: the masks,
        then every step's record (no checkpointing) or the states at segment starts."""
        with self.plan() as plan:
            masks = self._fire(0, self.steps, plan)
            saved = [masks]
            for t in range(self.steps):
                if self.segment is None:
                    pidx, life, gath, hid = step_forward(plan, xp, masks[t], *weights, save=True)
                    saved += [pidx, life if life is not None else pidx[:0], gath, hid]
                else:
                    if t % self.segment == 0:
                        saved.append(xp.clone())
                    # The same code path as the recompute in backward (records dropped), so
                    # both produce bitwise the same states whatever MKL does with alignment.
                    step_forward(plan, xp, masks[t], *weights, save=True)
        return saved

    def backward(self, gout, saved, weights, need_x):
        """Grad of the part's padded input (or None) and its weight-gradient sums (and the
        learned filters', 9 x F or F x C x 9), from what ``forward_train`` returned (as
        unpacked by autograd)."""
        w1b, b1, w2, b2, filters = weights
        masks, rest = saved[0], saved[1:]
        acc = [torch.zeros_like(w1b), torch.zeros_like(b1), torch.zeros_like(w2),
               torch.zeros_like(b2)]
        if filters is not None:
            f = filters.shape[0]
            acc.append(filters.new_zeros((9, f) if filters.dim() == 3 else
                                         (f, filters.shape[1], 9)))
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
                    records = {t: step_forward(plan, xp, masks[t], *weights, save=True)
                               for t in range(s0, s1)}
                    del xp
                for t in reversed(range(s0, s1)):
                    gx = other if (t > 0 or need_x) else None
                    step_backward(plan, g, records.pop(t), w1b, w2, filters, acc, gx)
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
    def forward(ctx, xp, w1b, b1, w2, b2, filters, parts):
        weights = (w1b, b1, w2, b2, filters)
        out = xp.clone()
        saved = _parallel(lambda p: p.forward_train(out[p.b0:p.b1], weights), parts)
        ctx.parts = parts
        ctx.counts = [len(sv) for sv in saved]
        ctx.save_for_backward(w1b, b1, w2, b2, filters, *[t for sv in saved for t in sv])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        tensors = ctx.saved_tensors
        weights = tensors[:5]
        per_part, i = [], 5
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
        filters = weights[4]
        gf = None
        if filters is not None:             # 9 x F -> F x 3 x 3; F x C x 9 -> F x C x 3 x 3
            gf = total.pop()
            gf = gf.t().reshape(filters.shape) if filters.dim() == 3 else gf.view(filters.shape)
        return (gx, *total, gf, None)


# ------------------------------------------------------------------------------ the rollout
def _pad(x: torch.Tensor, padding: str) -> torch.Tensor:
    """B x C x H x W -> the padded channels-last state B x (H+2) x (W+2) x C (differentiable)."""
    xp = F.pad(x, (1, 1, 1, 1), mode="constant" if padding == "zeros" else padding)
    return xp.permute(0, 2, 3, 1).contiguous()


def _unpad(xp: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The padded state's interior as B x C x H x W, in ``like``'s memory format."""
    out = xp[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


# Under torch.compile this runs eagerly, as one graph break: its worker threads, plan cache
# locks and data-dependent gathers are not traceable.
@torch.compiler.disable
def rollout(x: torch.Tensor, params: Params, config, *, steps: int, seed: int,
            first_step: int = 0, checkpoint=None, frames=None):
    """The backend interface (``nca_fast.backends.interface``) on PyTorch ops, any device.

    Equal (to rounding) to ``nca_fast.reference.rollout`` with the same seed. With
    ``checkpoint``, only each segment's first state is kept and the segment is recomputed
    during backward; gradients are bitwise those without. Returns new tensors in ``x``'s memory
    format (channels-last for a channels-last ``x``, else contiguous; a copy of ``x`` for 0
    steps). A fixed filter bank is read from ``config`` (its taps decide the perception plan);
    with ``config.learn_filters``, perception uses ``params.filters`` (F x 3 x 3, or
    F x C x 3 x 3 for "depthwise") and the rollout is differentiable in them too.

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
    filters = params.filters.contiguous() if config.learn_filters is not None else None
    b, c, h, w = x.shape
    ranges = _split(b, x.device)
    if segment is not None and segment >= steps:
        segment = steps
    parts = [_Part(config, b0, b1_, h, w, c, x.dtype, x.device, steps, seed, first_step,
                   segment)
             for b0, b1_ in ranges]
    weights = (w1, b1, w2, b2) if filters is None else (w1, b1, w2, b2, filters)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in weights))
    # Band-major w1: each band times its scale for a fixed bank, unscaled for learned filters.
    w1b = band_weights(config, w1) if filters is None else bands(w1, config.num_filters).reshape(
        w1.shape[0], -1).contiguous()
    xp = _pad(x, config.padding)
    if not grad:
        with torch.no_grad():
            banded = (w1b, b1, w2, b2, filters)
            _parallel(lambda p: p.forward_nograd(xp[p.b0:p.b1], banded), parts)
            return _unpad(xp, x)
    xp = _Rollout.apply(xp, w1b, b1, w2, b2, filters, parts)
    return _unpad(xp, x)
