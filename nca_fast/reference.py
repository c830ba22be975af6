"""The Growing-NCA step in plain PyTorch, exactly as docs/MODEL.md states it.

This is the oracle: written to be read and checked, not to be fast (the backends in
``nca_fast.backends`` are). Tensors are B x C x H x W; perception is interleaved, index ``c * F + k``, as in the
common PyTorch ports (``Conv2d(F*C, hidden, 1)``). It computes in full fp32 on every device:
perception as sums of shifted states and the dense layers as matmuls under ``full_fp32``, not
as convolutions, which on CUDA run in TF32 (10 mantissa bits) by default, backward included.
The backward's matmuls follow ``torch.get_float32_matmul_precision()`` ("highest", full fp32,
unless the caller lowered it).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .config import NCAConfig, filter_tensor
from .rng import update_mask


def pad1(x: torch.Tensor, padding: str, value: float = 0.0) -> torch.Tensor:
    """Pad H and W by one cell: constant ``value`` for "zeros", wrap-around for "circular",
    the edge cell for "replicate", the cell mirrored about the edge cell for "reflect"
    (H and W at least 2)."""
    if padding == "zeros":
        return F.pad(x, (1, 1, 1, 1), mode="constant", value=value)
    if padding in ("circular", "replicate", "reflect"):
        return F.pad(x, (1, 1, 1, 1), mode=padding)
    raise ValueError(f"padding: expected 'zeros', 'circular', 'replicate' or 'reflect', got "
                     f"{padding!r}")


@contextlib.contextmanager
def full_fp32():
    """Matmuls in full fp32 inside (``torch.set_float32_matmul_precision("highest")``, and
    cuDNN's TF32 off), the settings before restored after."""
    tf32, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision(matmul)


def perceive(x: torch.Tensor, filters: torch.Tensor, padding: str,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """B x C x H x W -> B x (C*F) x H x W, value ``c*F + k`` filter k on channel c, as a
    cross-correlation (``p[c, k][i, j] = sum f[dy, dx] * x[c][i + dy - 1, j + dx - 1]``).

    filters: F x 3 x 3 (the same filter k on every channel) or F x C x 3 x 3 (depthwise:
    ``filters[k, c]`` on channel c). bias: None or F x C, ``bias[k, c]`` added to value
    ``c*F + k``. Differentiable in x, filters and bias.
    """
    h, w = x.shape[-2:]
    xp = pad1(x, padding)
    f = filters.to(x.dtype)
    if f.dim() == 3:                                # shared: F x 1 x 3 x 3, broadcast over C
        f = f[:, None]
    bands = []
    for k in range(f.shape[0]):
        p = torch.zeros_like(x)
        for dy in range(3):
            for dx in range(3):
                p = p + f[k, :, dy, dx, None, None] * xp[:, :, dy:dy + h, dx:dx + w]
        if bias is not None:
            p = p + bias[k].to(x.dtype)[:, None, None]
        bands.append(p)
    return torch.stack(bands, dim=2).flatten(1, 2)                 # B x C x F x H x W: c*F + k


def alive(x: torch.Tensor, threshold: float, padding: str, alpha_channel: int = 3) -> torch.Tensor:
    """B x 1 x H x W bool: the 3x3 max-pool of alpha is above ``threshold`` (docs/MODEL.md,
    "Alive masks").

    Outside the grid is dead under zero padding (padded with -inf, whatever the threshold) and
    wraps under circular padding. Replicate and reflect padding give the zero padding's mask:
    the cells they copy into the halo lie inside the same 3x3 window already, so the outside
    adds nothing to the maximum (padded with -inf here, as for zeros).
    """
    a = x[:, alpha_channel:alpha_channel + 1]
    wrap = "circular" if padding == "circular" else "zeros"
    return F.max_pool2d(pad1(a, wrap, value=float("-inf")), 3, stride=1) > threshold


def dense(p: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """The per-cell MLP (the ports' 1x1 convolutions): relu(W1 p + b1), then W2 h + b2.
    w1, w2: [out, in] or [out, in, 1, 1]."""
    w1, w2 = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
    with full_fp32():
        h = F.relu(torch.einsum("jc,bchw->bjhw", w1, p) + b1[:, None, None])
        return torch.einsum("cj,bjhw->bchw", w2, h) + b2[:, None, None]


def step(x: torch.Tensor, w1, b1, w2, b2, config: NCAConfig, mask: torch.Tensor, *,
         filters: Optional[torch.Tensor] = None,
         filter_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One NCA step. ``mask``: B x 1 x H x W, 1 where the cell updates. ``filters``: None (the
    config's fixed bank) or the learned filters, F x 3 x 3 or F x C x 3 x 3; ``filter_bias``:
    None or F x C (see ``perceive``). Differentiable in x, the weights, filters and
    filter_bias."""
    if filters is None:
        filters = filter_tensor(config, dtype=x.dtype, device=x.device)
    thr = config.alive_threshold
    if thr is not None:
        pre = alive(x, thr, config.padding, config.alpha_channel)
    dx = dense(perceive(x, filters, config.padding, filter_bias), w1, b1, w2, b2)
    x = x + dx * mask.to(x.dtype)
    if thr is not None:
        post = alive(x, thr, config.padding, config.alpha_channel)
        x = x * (pre & post).to(x.dtype)
    return x


def rollout(x: torch.Tensor, w1, b1, w2, b2, config: NCAConfig, steps: int, seed: int,
            first_step: int = 0, *, filters: Optional[torch.Tensor] = None,
            filter_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``steps`` steps with the masks of ``nca_fast.rng`` (the same masks as every backend);
    ``filters`` and ``filter_bias`` as in ``step``."""
    b, _, h, w = x.shape
    for t in range(steps):
        m = update_mask(b, h, w, fire_rate=config.fire_rate, seed=seed, step=first_step + t,
                        device=x.device)
        x = step(x, w1, b1, w2, b2, config, m, filters=filters, filter_bias=filter_bias)
    return x


def seed_state(batch: int, height: int, width: int, channels: int = 16, alpha_channel: int = 3,
               *, device=None, dtype=torch.float32, position=None) -> torch.Tensor:
    """The spec's seed: zeros but one cell (centre by default) with channels alpha..C-1 at 1."""
    x = torch.zeros(batch, channels, height, width, device=device, dtype=dtype)
    y0, x0 = position if position is not None else (height // 2, width // 2)
    x[:, alpha_channel:, y0, x0] = 1.0
    return x
