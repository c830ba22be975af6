"""Autograd over the fused Triton kernels: a whole rollout as one differentiable op.

``nca_rollout`` runs T steps of ``nca_fast.kernels`` and registers them with autograd as the
custom op ``nca_fast::rollout`` (backward: ``nca_fast::rollout_backward``), each with a fake
implementation, so ``torch.compile`` sees one op per rollout and no graph break.

Memory for backward, per cell of the grid (C channels, fp32):
- segment length S (``checkpoint``: None -> S = 1, "sqrt" -> ceil(sqrt T), or an int):
  the input x (4C bytes), the stored state at every step t with 0 < t < T and t % S == 0
  (4C bytes + 1 byte of pending pre-mask bits each), and the final alive mask (1 byte);
  with alive masking off there are no mask bytes. S = 1 is 4C + 1 bytes per cell-step.
- backward recomputes each segment from its first state with the same kernels, so the
  gradients are bitwise the same whatever S.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .rng import fire_threshold

_NO_ALIVE = -1.0


def _kernel_weights(w1: Tensor, w2: Tensor, num_filters: int):
    """Module layouts -> kernel layouts: w1 [HID, C*F] (c*F+k) -> [F, C, HID]; w2 -> w2^T."""
    hid = w1.shape[0]
    c = w1.shape[1] // num_filters
    return w1.reshape(hid, c, num_filters).permute(2, 1, 0).contiguous(), w2.t().contiguous()


def _final_keep(r: Tensor, q: Tensor, thr: float, alpha: int, circular: bool) -> Tensor:
    """[B, H, W] uint8: the last step's deferred mask, q and any(alpha > thr on the 3x3)."""
    a = r[..., alpha].unsqueeze(1)
    a = F.pad(a, (1, 1, 1, 1), mode="circular") if circular else F.pad(
        a, (1, 1, 1, 1), value=float("-inf"))
    post = F.max_pool2d(a, 3, stride=1).squeeze(1) > thr
    return (post & (q != 0)).to(torch.uint8)


class _Steps:
    """The kernels of one rollout with its fixed arguments."""

    def __init__(self, w1, b1, w2, b2, filters, seed, first_step, fire_rate, thr, alpha,
                 circular, precision):
        from nca_fast.kernels.step_bwd import nca_step_bwd
        from nca_fast.kernels.step_fwd import nca_step_fwd

        self._fwd, self._bwd = nca_step_fwd, nca_step_bwd
        nf = filters.shape[0]
        self.w1k, self.w2t = _kernel_weights(w1, w2, nf)
        self.b1, self.b2 = b1.contiguous(), b2.contiguous()
        self.filters = filters.reshape(nf, 9).contiguous()
        self.kw = dict(seed=seed, fire_threshold=fire_threshold(fire_rate),
                       alive_threshold=None if thr == _NO_ALIVE else thr,
                       alpha_channel=alpha, circular=circular, precision=precision)
        self.first_step = first_step

    def fwd(self, r, q, t, out=None, q_out=None):
        return self._fwd(r, q, self.w1k, self.b1, self.w2t, self.b2, self.filters,
                         step=self.first_step + t, out=out, q_out=q_out, **self.kw)

    def bwd(self, r, q, g, t):
        return self._bwd(r, q, g, self.w1k, self.b1, self.w2t, self.b2, self.filters,
                         step=self.first_step + t, **self.kw)


@torch.library.custom_op("nca_fast::rollout", mutates_args=())
def _rollout(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, filters: Tensor,
             seed: int, first_step: int, steps: int, segment: int, fire_rate: float,
             alive_threshold: float, alpha_channel: int, circular: bool, precision: str,
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    ks = _Steps(w1, b1, w2, b2, filters, seed, first_step, fire_rate, alive_threshold,
                alpha_channel, circular, precision)
    alive = alive_threshold != _NO_ALIVE
    B, C, H, W = x.shape
    n_saved = (steps - 1) // segment
    states = x.new_empty((n_saved, B, H, W, C))
    qs = torch.empty((n_saved if alive else 0, B, H, W), dtype=torch.uint8, device=x.device)
    r, q = x.permute(0, 2, 3, 1).contiguous(), None
    for t in range(steps):
        saved = (t + 1) % segment == 0 and t + 1 < steps
        slot = (t + 1) // segment - 1
        r, q = ks.fwd(r, q, t, out=states[slot] if saved else None,
                      q_out=qs[slot] if saved and alive else None)
    if alive:
        keep = _final_keep(r, q, alive_threshold, alpha_channel, circular)
        out = r * keep.unsqueeze(-1).to(r.dtype)
    else:
        keep = torch.empty((0,), dtype=torch.uint8, device=x.device)
        out = r.clone() if steps == 0 else r
    return out.permute(0, 3, 1, 2), states, qs, keep


@_rollout.register_fake
def _(x, w1, b1, w2, b2, filters, seed, first_step, steps, segment, fire_rate,
      alive_threshold, alpha_channel, circular, precision):
    B, C, H, W = x.shape
    alive = alive_threshold != _NO_ALIVE
    n_saved = (steps - 1) // segment
    out = x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    return (out, x.new_empty((n_saved, B, H, W, C)),
            x.new_empty((n_saved if alive else 0, B, H, W), dtype=torch.uint8),
            x.new_empty((B, H, W) if alive else (0,), dtype=torch.uint8))


@torch.library.custom_op("nca_fast::rollout_backward", mutates_args=())
def _rollout_backward(grad: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                      filters: Tensor, states: Tensor, qs: Tensor, keep: Tensor, seed: int,
                      first_step: int, steps: int, segment: int, fire_rate: float,
                      alive_threshold: float, alpha_channel: int, circular: bool,
                      precision: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ks = _Steps(w1, b1, w2, b2, filters, seed, first_step, fire_rate, alive_threshold,
                alpha_channel, circular, precision)
    alive = alive_threshold != _NO_ALIVE
    g = grad.permute(0, 2, 3, 1)
    g = (g * keep.unsqueeze(-1).to(g.dtype)) if alive else g.contiguous()
    totals: Optional[List[Tensor]] = None
    x_r = x.permute(0, 2, 3, 1).contiguous()
    for s in reversed(range((steps + segment - 1) // segment)):
        t0, t1 = s * segment, min(steps, (s + 1) * segment)
        r, q = (x_r, None) if s == 0 else (states[s - 1], qs[s - 1] if alive else None)
        inputs = [(r, q)]
        for t in range(t0, t1 - 1):          # recompute the segment (nothing when segment = 1)
            r, q = ks.fwd(r, q, t)
            inputs.append((r, q))
        for t in reversed(range(t0, t1)):
            r, q = inputs[t - t0]
            g, *dw = ks.bwd(r, q, g, t)
            totals = dw if totals is None else [a + b for a, b in zip(totals, dw)]
    if totals is None:
        return (grad.clone(), torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2),
                torch.zeros_like(b2))
    dw1k, db1, dw2t, db2 = totals
    # The kernels return the four weight gradients as views of one buffer (and a one-step
    # rollout passes them through unsummed); outputs of a custom op may not alias each other,
    # so each is returned as its own tensor.
    contig = dict(memory_format=torch.contiguous_format)     # clone always copies
    gw1 = dw1k.permute(2, 1, 0).clone(**contig).view(w1.shape[0], -1)
    return (g.permute(0, 3, 1, 2), gw1, db1.clone(), dw2t.t().clone(**contig), db2.clone())


@_rollout_backward.register_fake
def _(grad, x, w1, b1, w2, b2, filters, states, qs, keep, seed, first_step, steps, segment,
      fire_rate, alive_threshold, alpha_channel, circular, precision):
    B, C, H, W = x.shape
    gx = x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    # Contiguous, as the real implementation returns them (whatever the inputs' strides).
    return (gx, x.new_empty(w1.shape), x.new_empty(b1.shape), x.new_empty(w2.shape),
            x.new_empty(b2.shape))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, filters, *args = inputs
    _, states, qs, keep = output
    ctx.save_for_backward(x, w1, b1, w2, b2, filters, states, qs, keep)
    ctx.args = args
    ctx.mark_non_differentiable(states, qs, keep)


def _backward(ctx, grad, _g_states, _g_qs, _g_keep):
    x, w1, b1, w2, b2, filters, states, qs, keep = ctx.saved_tensors
    gx, gw1, gb1, gw2, gb2 = torch.ops.nca_fast.rollout_backward(
        grad, x, w1, b1, w2, b2, filters, states, qs, keep, *ctx.args)
    return (gx, gw1, gb1, gw2, gb2) + (None,) * (len(ctx.args) + 1)


_rollout.register_autograd(_backward, setup_context=_setup_context)


def rollout(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, filters: Tensor, *,
            seed: int, steps: int, first_step: int = 0, segment: Optional[int] = None,
            fire_rate: float = 0.5, alive_threshold: Optional[float] = 0.1,
            alpha_channel: int = 3, circular: bool = False, precision: str = "tf32") -> Tensor:
    """``steps`` fused NCA steps on x (B x C x H x W), differentiable in x and every weight.

    w1: [hidden, F*C] (perception interleaved c*F + k), b1: [hidden], w2: [C, hidden], b2: [C],
    filters: [F, 3, 3]. Returns the final state, B x C x H x W with channels-last strides.
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
    seg = 1 if segment is None else int(segment)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x, w1, b1, w2, b2)):
        seg = steps                  # nothing will call backward: keep no intermediate state
    check_fits(x, steps, seg, filters.shape[0], alive_threshold is not None)
    out, _, _, _ = torch.ops.nca_fast.rollout(
        x, w1, b1, w2, b2, filters, seed, first_step, steps, seg, float(fire_rate),
        _NO_ALIVE if alive_threshold is None else float(alive_threshold), alpha_channel,
        circular, precision)
    return out


def rollout_bytes(shape, steps: int, segment: int, num_filters: int, alive: bool,
                  element_size: int = 4) -> int:
    """Device bytes a rollout of a B x C x H x W state allocates at its peak (backward included):
    the states kept for backward, two working states, the output, the mask bytes, and the
    backward's perception-gradient scratch (F*C per cell) with its incoming and outgoing
    gradients."""
    b, c, h, w = shape
    cells = b * h * w
    state = cells * c * element_size
    saved = (steps - 1) // segment
    recompute = min(segment, steps) if segment > 1 else 0
    mask = cells if alive else 0
    forward = (saved + 3) * (state + mask)
    backward = cells * num_filters * c * element_size + 3 * state + recompute * (state + mask)
    return forward + backward


def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None                 # host memory: the allocator reports its own errors
    free, _total = torch.cuda.mem_get_info(device)
    return free


def check_fits(x: Tensor, steps: int, segment: int, num_filters: int, alive: bool) -> None:
    """Fail before launching anything when the rollout cannot fit the device's free memory."""
    free = _free_bytes(x.device)
    if free is None:
        return
    need = rollout_bytes(tuple(x.shape), steps, segment, num_filters, alive, x.element_size())
    if need > free:
        gib = 2.0 ** 30
        raise torch.cuda.OutOfMemoryError(
            f"x: a rollout of {steps} steps on a {'x'.join(map(str, x.shape))} state needs about "
            f"{need / gib:.1f} GiB on {x.device}, but {free / gib:.1f} GiB are free; use "
            f"checkpoint='sqrt' (or a longer segment), fewer steps or a smaller grid")


def nca_rollout(model, x: Tensor, steps: int, *, seed: int, first_step: int = 0,
                segment: Optional[int] = None) -> Tensor:
    """The triton backend of ``NCA.forward``."""
    cfg = model.config
    w1, b1, w2, b2 = model.weights()
    return rollout(x, w1, b1, w2, b2, model.filters.to(x.dtype), seed=seed, steps=steps,
                   first_step=first_step, segment=segment, fire_rate=cfg.fire_rate,
                   alive_threshold=cfg.alive_threshold, alpha_channel=cfg.alpha_channel,
                   circular=cfg.padding == "circular", precision=cfg.precision)
