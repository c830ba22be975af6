"""Autograd over the fused Triton kernels: a whole rollout as one differentiable op.

``rollout`` (tensors and numbers, no module) runs T steps of ``nca_fast.kernels`` as the custom
op ``nca_fast::rollout``, whose backward is the custom op ``nca_fast::rollout_backward``; both
have fake implementations, so ``torch.compile`` sees one op per rollout and no graph break. The
ops' numbers (seed, steps, masks, precision) are ``Static``'s fields, written once for both
schemas and both fakes; the operands are checked and the launch configurations chosen once per
rollout (``_Steps``), not per step.

Memory for backward, per cell of the grid (C channels, fp32):
- segment length S (``checkpoint``: None -> S = 1, "sqrt" -> ceil(sqrt T), or an int):
  the input x (4C bytes), the stored state at every step t with 0 < t < T and t % S == 0
  (4C bytes + 1 byte of pending pre-mask bits each), and the final alive mask (1 byte);
  with alive masking off there are no mask bytes. S = 1 is 4C + 1 bytes per cell-step.
- backward recomputes each segment from its first state with the same kernels, so the
  gradients are bitwise the same whatever S.

The kernels' own formats (hq planes of pending mask bits, 16-bit cell words, the deferred post
mask) are documented in ``kernels/step_fwd.py`` and ``kernels/step_bwd.py``.
"""
from __future__ import annotations

import typing
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .kernels.spec import BANK_DATA, HALO, HQ_Q, NAMED_BANKS, StepSpec, StepWeights
from .params import bands as w1_bands
from .reference import alive as alive_mask
from .resources import check_fits, triton_rollout_bytes as rollout_bytes  # noqa: F401 (public)
from .rng import fire_threshold


class Static(NamedTuple):
    """The numbers of a rollout, in the order both ops take them after their tensors."""

    seed: int
    first_step: int
    steps: int
    segment: int                       # steps per checkpoint segment (1: every input kept)
    fire_rate: float
    alive_threshold: Optional[float]   # None: alive masking off
    alpha_channel: int
    padding: str                       # "zeros", "circular", "replicate" or "reflect"
    precision: str
    bank: int                          # the named filter bank's code, 0: taps as data, -1: find
    filter_grad: bool                  # the filters' gradient too (a learned bank)

    @property
    def alive(self) -> bool:
        return self.alive_threshold is not None


_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str", Optional[float]: "float?"}
STATIC_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[t]} {name}"
                          for name, t in typing.get_type_hints(Static).items())
_FIVE = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_SIX = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
_WEIGHTS = "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor filters"


def _kernel_weights(w1: Tensor, w2: Tensor, num_filters: int):
    """Module layouts -> kernel layouts: w1 [HID, F*C] (interleaved) -> [F, C, HID]; w2 -> w2^T
    (docs/MODEL.md, "W1 layouts")."""
    return w1_bands(w1, num_filters).permute(1, 2, 0).contiguous(), w2.t().contiguous()


def _final_keep(r: Tensor, q: Tensor, s: Static) -> Tensor:
    """[B, H, W] uint8: the last step's deferred mask, q and the post-alive mask of ``r``;
    q: the hq plane [B, H + 4, W + 4] (bit 0)."""
    q = q[:, HALO:-HALO, HALO:-HALO]
    post = alive_mask(r.permute(0, 3, 1, 2), s.alive_threshold, s.padding,
                      s.alpha_channel).squeeze(1)
    return (post & ((q & HQ_Q) != 0)).to(torch.uint8)


class _Steps:
    """The kernels of one rollout with its fixed arguments: the operands validated, the step's
    spec and weights built and the launch configurations chosen once, here, for every step's
    launches (the ops' flat numbers become a ``StepSpec`` right after the op boundary)."""

    def __init__(self, x, w1, b1, w2, b2, filters, s: Static):
        from nca_fast.kernels import configs, step_bwd, step_bwd_filters, step_fwd

        self._f, self._k, self._kf = step_fwd, step_bwd, step_bwd_filters
        nf = filters.shape[0]
        w1k, w2t = _kernel_weights(w1, w2, nf)
        self.weights = StepWeights(w1k, b1.contiguous(), w2t, b2.contiguous(),
                                   step_fwd.kernel_taps(filters, x.shape[1]))
        if not (s.bank == -1 or s.bank == BANK_DATA
                or (s.bank in NAMED_BANKS and len(NAMED_BANKS[s.bank]) == nf)):
            raise ValueError(f"bank: expected -1, 0 or a named bank's code "
                             f"{tuple(NAMED_BANKS)} for {nf} filters, got {s.bank}")
        # taps per channel have their own code; a learned bank is read as data; -1: the named
        # bank the taps are, found on the host (a copy)
        asked = BANK_DATA if s.filter_grad else (None if s.bank == -1 else s.bank)
        bank = configs.launch_bank(self.weights.filters, asked)
        self.spec = StepSpec(padding=s.padding, precision=s.precision, bank=bank,
                             alive_threshold=s.alive_threshold, alpha_channel=s.alpha_channel,
                             fire_threshold=fire_threshold(s.fire_rate), seed=s.seed)
        B, C, H, W = x.shape
        # the kernels' own checks, once per rollout (the launchers below check nothing)
        step_fwd.check_shapes(x.permute(0, 2, 3, 1), *self.weights)
        HID = w1k.shape[2]
        n = B * H * W
        self.cfg_fwd = configs.select_forward(n, C, HID, nf, x.device, s.precision, bank)
        self.cfg_gp = configs.select_backward(n, C, HID, nf, x.device, s.precision, bank)
        self.cfg_w = configs.select_weights(n, C, HID, nf, x.device, s.precision, bank)
        self.cfg_in = configs.select_transpose(n, C, nf, x.device, bank)
        self.cfg_f = configs.select_filters(n, C, nf, x.device) if s.filter_grad else None
        self.first_step = s.first_step

    def fwd(self, r, q, t, out=None, q_out=None, cw_out=None):
        return self._f.launch_fwd(self.cfg_fwd, r, q, self.weights, spec=self.spec,
                                  step=self.first_step + t, out=out, q_out=q_out, cw_out=cw_out)

    def new_parts(self, r):
        B, H, W, C = r.shape
        F_, _, HID = self.weights.w1k.shape
        return self._k.new_parts(B, H, W, C, HID, F_, r.device, self.spec.precision, r.dtype,
                                 cfg=self.cfg_w)

    def gp(self, r, cw, g, out=None):
        w = self.weights
        return self._k.bwd_gp(r, cw, g, w.w1k, w.b1, w.w2t, w.filters, spec=self.spec, gp=out,
                              cfg=self.cfg_gp)

    def weights_grad(self, r, cw, g, parts, next_step=None):
        w = self.weights
        self._k.bwd_weights(r, cw, g, parts, w.w1k, w.b1, w.w2t, w.filters, spec=self.spec,
                            next_step=next_step, cfg=self.cfg_w)

    def input_grad(self, gp, cw, g):
        return self._k.bwd_input(gp, cw, g, self.weights.filters, tuple(g.shape), spec=self.spec,
                                 cfg=self.cfg_in)

    def weight_grads(self, parts):
        F_, C, HID = self.weights.w1k.shape
        return self._k.weight_grads(parts, C, HID, F_, self.spec)

    def new_filter_parts(self, r):
        B, H, W, C = r.shape
        return self._kf.new_filter_parts(B, H, W, C, self.weights.w1k.shape[0], r.device,
                                         r.dtype, cfg=self.cfg_f)

    def filters_grad(self, r, cw, gp, fparts):
        self._kf.bwd_filters(r, cw, gp, fparts, spec=self.spec, cfg=self.cfg_f)

    def filter_grads(self, fparts, filters):
        """The filters' gradient in the shape of ``filters`` ([F, 3, 3]: the channels' sum;
        [F, C, 3, 3]: per channel)."""
        g = self._kf.filter_grads(fparts, filters.shape[0])          # [F, 9, C]
        if filters.dim() == 4:
            return g.transpose(1, 2).reshape(filters.shape)
        return g.sum(2).reshape(filters.shape)


def _saved_shapes(x: Tensor, s: Static):
    """Shapes and dtypes of what the forward keeps for the backward: (states, qs, cws, keep).

    states: the state entering every segment but the first, channels-last; qs: their hq planes
    (pending mask bits, with alive masking and segments longer than 1); cws: every step's cell
    words when nothing is recomputed (segment 1); keep: the last step's deferred mask."""
    B, C, H, W = x.shape
    n_saved = (s.steps - 1) // s.segment
    return (((n_saved, B, H, W, C), x.dtype),
            ((n_saved if s.alive and s.segment > 1 else 0, B, H + 2 * HALO, W + 2 * HALO),
             torch.uint8),
            ((s.steps if s.segment == 1 else 0, B, H, W), torch.int16),
            ((B, H, W) if s.alive else (0,), torch.uint8))


@torch.library.custom_op(
    "nca_fast::rollout", mutates_args=(),
    schema=f"(Tensor x, {_WEIGHTS}, {STATIC_SCHEMA}) -> {_FIVE}")
def _rollout(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, filters: Tensor,
             *static) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    s = Static(*static)
    ks = _Steps(x, w1, b1, w2, b2, filters, s)
    (states_shape, _), (qs_shape, _), (cws_shape, _), _ = _saved_shapes(x, s)
    states = x.new_empty(states_shape)
    qs = torch.zeros(qs_shape, dtype=torch.uint8, device=x.device)
    cws = torch.empty(cws_shape, dtype=torch.int16, device=x.device)
    segment = s.segment
    r, q = x.permute(0, 2, 3, 1).contiguous(), None
    for t in range(s.steps):
        saved = (t + 1) % segment == 0 and t + 1 < s.steps
        slot = (t + 1) // segment - 1
        r, q = ks.fwd(r, q, t, out=states[slot] if saved else None,
                      q_out=qs[slot] if saved and s.alive and segment > 1 else None,
                      cw_out=cws[t] if segment == 1 else None)
    if s.alive:
        keep = _final_keep(r, q, s)
        out = r * keep.unsqueeze(-1).to(r.dtype)
    else:
        keep = torch.empty((0,), dtype=torch.uint8, device=x.device)
        out = r.clone() if s.steps == 0 else r
    return out.permute(0, 3, 1, 2), states, qs, cws, keep


@_rollout.register_fake
def _(x, w1, b1, w2, b2, filters, *static):
    B, C, H, W = x.shape
    out = x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    return (out,) + tuple(x.new_empty(shape, dtype=dtype)
                          for shape, dtype in _saved_shapes(x, Static(*static)))


@torch.library.custom_op(
    "nca_fast::rollout_backward", mutates_args=(),
    schema=f"(Tensor grad, Tensor x, {_WEIGHTS}, Tensor states, Tensor qs, Tensor cws, "
           f"Tensor keep, {STATIC_SCHEMA}) -> {_SIX}")
def _rollout_backward(grad: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                      filters: Tensor, states: Tensor, qs: Tensor, cws: Tensor, keep: Tensor,
                      *static) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    s = Static(*static)
    ks = _Steps(x, w1, b1, w2, b2, filters, s)
    steps, segment = s.steps, s.segment
    if steps == 0:
        return (grad.clone(), torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2),
                torch.zeros_like(b2), torch.zeros_like(filters))
    g = grad.permute(0, 2, 3, 1)
    # g is the first of the two buffers the steps below write into: never the incoming gradient
    # itself (a channels-last grad is contiguous here; the op mutates none of its inputs)
    g = ((g * keep.unsqueeze(-1).to(g.dtype)).contiguous() if s.alive
         else g.clone(memory_format=torch.contiguous_format))
    x_r = x.permute(0, 2, 3, 1).contiguous()
    parts = ks.new_parts(x_r)
    fparts = ks.new_filter_parts(x_r) if s.filter_grad else None
    B, H, W, _ = x_r.shape
    # Per step t, last to first: the weight kernel first computes g_t = dL/d out_t from step
    # t + 1's perception gradient (fused transposed stencil) and adds step t's weight
    # gradients; then the gp kernel writes step t's perception gradient. The input kernel
    # turns step 0's into dL/d x.
    later = None                         # (gp, cw, g) of step t + 1
    g_bufs = [g, torch.empty_like(g)]    # g of step t, g of step t + 1 (ping-pong)
    gp_bufs = [None, None]
    for seg in reversed(range((steps + segment - 1) // segment)):
        t0, t1 = seg * segment, min(steps, (seg + 1) * segment)
        if segment == 1:
            inputs = [x_r if seg == 0 else states[seg - 1]]
            words = cws[t0:t1]
        else:
            # recompute the segment from its first state: inputs and cell words of its steps
            r, q = (x_r, None) if seg == 0 else (states[seg - 1],
                                                 qs[seg - 1] if s.alive else None)
            inputs = []
            words = torch.empty((t1 - t0, B, H, W), dtype=torch.int16, device=x.device)
            for t in range(t0, t1):
                inputs.append(r)
                r, q = ks.fwd(r, q, t, cw_out=words[t - t0])
        for t in reversed(range(t0, t1)):
            r, cw = inputs[t - t0], words[t - t0]
            if later is not None:
                g = g_bufs[1] if later[2] is g_bufs[0] else g_bufs[0]
            ks.weights_grad(r, cw, g, parts, next_step=later)
            k = t % 2
            gp_bufs[k] = ks.gp(r, cw, g, gp_bufs[k])
            if fparts is not None:
                ks.filters_grad(r, cw, gp_bufs[k], fparts)
            later = (gp_bufs[k], cw, g)
    gp, cw, g_last = later
    g = ks.input_grad(gp, cw, g_last)
    dw1k, db1, dw2t, db2 = ks.weight_grads(parts)
    # Outputs of a custom op may not alias each other: each gradient is a tensor of its own
    # (weight_grads copies them out of the summed buffer; these copies change the layouts).
    contig = dict(memory_format=torch.contiguous_format)     # clone always copies
    gw1 = dw1k.permute(2, 1, 0).clone(**contig).view(w1.shape[0], -1)
    gfilters = (ks.filter_grads(fparts, filters) if fparts is not None
                else torch.zeros_like(filters, **contig))
    return (g.permute(0, 3, 1, 2), gw1, db1, dw2t.t().clone(**contig), db2, gfilters)


@_rollout_backward.register_fake
def _(grad, x, w1, b1, w2, b2, filters, states, qs, cws, keep, *static):
    B, C, H, W = x.shape
    gx = x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    # Contiguous, as the real implementation returns them (whatever the inputs' strides).
    return (gx, x.new_empty(w1.shape), x.new_empty(b1.shape), x.new_empty(w2.shape),
            x.new_empty(b2.shape), x.new_empty(filters.shape))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, filters, *static = inputs
    _, states, qs, cws, keep = output
    ctx.save_for_backward(x, w1, b1, w2, b2, filters, states, qs, cws, keep)
    ctx.static = static
    ctx.mark_non_differentiable(states, qs, cws, keep)


def _backward(ctx, grad, _g_states, _g_qs, _g_cws, _g_keep):
    x, w1, b1, w2, b2, filters, states, qs, cws, keep = ctx.saved_tensors
    gx, gw1, gb1, gw2, gb2, gfilters = torch.ops.nca_fast.rollout_backward(
        grad, x, w1, b1, w2, b2, filters, states, qs, cws, keep, *ctx.static)
    gfilters = gfilters if Static(*ctx.static).filter_grad else None
    return (gx, gw1, gb1, gw2, gb2, gfilters) + (None,) * len(ctx.static)


_rollout.register_autograd(_backward, setup_context=_setup_context)


def rollout(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, filters: Tensor, *,
            seed: int, steps: int, first_step: int = 0, segment: Optional[int] = None,
            fire_rate: float = 0.5, alive_threshold: Optional[float] = 0.1,
            alpha_channel: int = 3, padding: str = "zeros", precision: str = "tf32",
            bank: Optional[int] = None) -> Tensor:
    """``steps`` fused NCA steps on x (B x C x H x W), differentiable in x and every weight.

    w1: [hidden, F*C] (perception interleaved c*F + k), b1: [hidden], w2: [C, hidden], b2: [C],
    filters: [F, 3, 3] (every channel) or [F, C, 3, 3] (per channel); differentiable in them
    too when they require a gradient (a learned bank, read as data). padding: "zeros",
    "circular", "replicate" or "reflect".
    alive_threshold: None switches alive masking off. bank: the code of the
    named bank ``filters`` holds (``configs.bank_code``; 0: none, the taps read as data), when
    the caller knows it; None: found from ``filters``, which copies them to the host (a device
    sync) in the forward and again in the backward. Returns the final state, B x C x H x W
    with channels-last strides.
    """
    tensors = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "filters": filters}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    if steps == 0:
        # A new tensor (never x itself), channels-last like every other result; clone is
        # differentiable, so x's gradient flows through.
        return x.clone(memory_format=torch.channels_last)
    if padding == "reflect" and min(x.shape[2:]) < 2:
        raise ValueError(f"x: reflect padding needs a grid of at least 2 x 2 cells, got "
                         f"{x.shape[2]} x {x.shape[3]}")
    seg = 1 if segment is None else int(segment)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())
    filter_grad = grad and filters.requires_grad
    if not grad:
        seg = steps                  # nothing will call backward: keep no intermediate state
    check_fits(x, steps, seg, filters.shape[0], alive_threshold is not None, grad=grad)
    static = Static(seed, first_step, steps, seg, float(fire_rate),
                    None if alive_threshold is None else float(alive_threshold), alpha_channel,
                    padding, precision, -1 if bank is None else int(bank), filter_grad)
    out, _, _, _, _ = torch.ops.nca_fast.rollout(x, w1, b1, w2, b2, filters, *static)
    return out
