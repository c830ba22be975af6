"""The triton backend: the fused kernels (``nca_fast.kernels``), one custom op per rollout.

The op and its autograd are ``nca_fast.functional`` (tensors and numbers only); this module maps
the backend interface (``nca_fast.backends.interface``) onto it. Runs on CUDA, or on the CPU in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported.
"""
from __future__ import annotations

import warnings

import torch

from .. import functional
from ..params import Params
from .interface import check_rollout, has_triton, run_in_frames, triton_problem, triton_usable


def rollout(x: torch.Tensor, params: Params, config, *, steps: int, seed: int,
            first_step: int = 0, checkpoint=None, frames=None):
    """The backend interface on the kernels. Results are channels-last (a channels-last copy
    of ``x`` for 0 steps)."""
    params, segment = check_rollout(x, params, config, steps, seed, first_step, checkpoint,
                                    frames)
    problem = triton_problem()
    if not has_triton():
        raise RuntimeError(f"backend='triton': {problem}; use backend='torch' or install "
                           f"triton")
    if not triton_usable(x.device):
        raise RuntimeError(
            f"backend='triton' cannot run on a {x.device.type} tensor here: use "
            "backend='torch', move the input to CUDA, or set TRITON_INTERPRET=1 before "
            "importing nca_fast to run the kernels in Triton's CPU interpreter")
    if problem is not None:
        warnings.warn(f"backend='triton': {problem}", RuntimeWarning, stacklevel=3)
    from ..kernels import configs

    w1, b1, w2, b2, filters = _padded(params, config, configs)
    filters = filters.to(x.dtype)
    channels = config.channels
    padded = w2.shape[0] != channels
    # the bank's code from the config's taps, on the host: no copy of the filters per rollout;
    # learned filters are read as data
    bank = configs.BANK_DATA if config.learn_filters else configs.named_bank(config.filters)

    def run(x, n, first):
        if padded:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, w2.shape[0] - channels))
        y = functional.rollout(
            x, w1, b1, w2, b2, filters, seed=seed, steps=n, first_step=first, segment=segment,
            fire_rate=config.fire_rate, alive_threshold=config.alive_threshold,
            alpha_channel=config.alpha_channel, padding=config.padding,
            precision=config.precision, bank=bank)
        return y[:, :channels].contiguous(memory_format=torch.channels_last) if padded else y

    return run_in_frames(run, x, steps, first_step, frames)


def _next_size(n: int, sizes, name: str) -> int:
    """The smallest of ``sizes`` (the kernels' compiled sizes) that holds ``n``."""
    for s in sizes:
        if s >= n:
            return s
    raise ValueError(f"{name}: the Triton kernels support at most {sizes[-1]}, got {n}; use "
                     f"backend='torch'")


def _padded(params: Params, config, configs) -> Params:
    """The weights zero-padded to the kernels' sizes: channels to 16 or 32, hidden units to 32,
    64, 128 or 256. Exact: a padded channel starts at zero and its update is zero (zero rows of
    w2 and b2), so it stays zero and is never perceived (zero columns of w1); a padded hidden
    unit is relu(0) = 0 with a zero column of w2. The gradients of the padding are dropped by
    autograd (``F.pad``'s backward)."""
    w1, b1, w2, b2, filters = params
    c, f, h = config.channels, config.num_filters, config.hidden
    cp = _next_size(c, configs.SUPPORTED_CHANNELS, "channels")
    hp = _next_size(h, configs.SUPPORTED_HIDDEN, "hidden")
    if (cp, hp) == (c, h):
        return params
    pad = torch.nn.functional.pad
    # w1's columns interleaved c*F + k: pad the channel axis of [hidden, C, F]
    w1 = pad(w1.reshape(h, c, f), (0, 0, 0, cp - c, 0, hp - h)).reshape(hp, cp * f)
    if filters.dim() == 4:              # per-channel taps [F, C, 3, 3]: zero taps for padding
        filters = pad(filters, (0, 0, 0, 0, 0, cp - c))
    return Params(w1, pad(b1, (0, hp - h)), pad(w2, (0, hp - h, 0, cp - c)), pad(b2, (0, cp - c)),
                  filters)
