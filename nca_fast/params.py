"""The tensors of one NCA, as the backends take them, and the layouts of the first layer.

The first layer's weight ``w1`` (hidden x F*C) has one column per perception value. The module,
the reference and the common PyTorch ports order them interleaved, ``c*F + k`` (filter k of
channel c); the Distill export and the torch backend group them by filter, ``k*C + c``
(band-major); the kernels want ``[F, C, hidden]``. docs/MODEL.md ("W1 layouts") explains the
three; ``bands`` and ``from_bands`` are the only conversions between them.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Params(NamedTuple):
    """An NCA's tensors, in the module's layouts, all of one dtype and device.

    w1: hidden x F*C (interleaved ``c*F + k``); b1: hidden; w2: C x hidden; b2: C (w1 and w2
    may also be given as ``nn.Conv2d`` holds them, with two trailing 1 x 1 dimensions);
    filters: F x 3 x 3, the perception bank as cross-correlation taps (``filters[k, dy+1, dx+1]``
    multiplies the neighbour at row offset dy, column offset dx).
    """

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    filters: Tensor


def bands(w1: Tensor, num_filters: int) -> Tensor:
    """Interleaved w1 (hidden x F*C) viewed as hidden x F x C: ``[:, k, c]`` is the weight of
    filter k on channel c (a view when w1 is contiguous; differentiable)."""
    hidden = w1.shape[0]
    return w1.reshape(hidden, -1, num_filters).permute(0, 2, 1)


def from_bands(w1_bands: Tensor) -> Tensor:
    """hidden x F x C (``[:, k, c]``) -> interleaved hidden x F*C, contiguous."""
    hidden = w1_bands.shape[0]
    return w1_bands.permute(0, 2, 1).reshape(hidden, -1).contiguous()
