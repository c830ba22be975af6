"""The torch backend's rollout (any device). Placeholder: runs the reference step by step."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from . import reference


def rollout(model, x: torch.Tensor, steps: int, *, seed: int, first_step: int = 0,
            segment=None) -> torch.Tensor:
    w = model.weights()
    cfg = model.config

    def run(x, t0, n):
        return reference.rollout(x, *w, cfg, n, seed, first_step=t0)

    if segment is None or not torch.is_grad_enabled():
        return run(x, first_step, steps)
    end = first_step + steps
    for t0 in range(first_step, end, segment):
        x = _checkpoint(run, x, t0, min(segment, end - t0), use_reentrant=False)
    return x
