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
    w1, b1, w2, b2, filters = params
    filters = filters.to(x.dtype)
    from ..kernels import configs

    # the bank's code from the config's taps, on the host: no copy of the filters per rollout
    bank = configs.named_bank(config.filters)

    def run(x, n, first):
        return functional.rollout(
            x, w1, b1, w2, b2, filters, seed=seed, steps=n, first_step=first, segment=segment,
            fire_rate=config.fire_rate, alive_threshold=config.alive_threshold,
            alpha_channel=config.alpha_channel, circular=config.padding == "circular",
            precision=config.precision, bank=bank)

    return run_in_frames(run, x, steps, first_step, frames)
