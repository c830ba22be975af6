"""The article's damage: a random circle of the grid set to zero (its third experiment).

In coordinates running from -1 to 1 across the grid (x along W, y along H), the centre is
uniform in [-0.5, 0.5]^2 and the radius uniform in [0.1, 0.4], a fraction of the half-width.
Circles are drawn from a ``torch.Generator``, so training and ``nca-fast grow --damage`` damage
the same cells for the same generator state.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

Circle = Tuple[Tuple[float, float], float]


def draw_circles(n: int, generator: torch.Generator) -> List[Circle]:
    """``n`` circles ((cx, cy), radius): all centres are drawn first, then all radii."""
    centres = (torch.rand(n, 2, generator=generator) - 0.5).tolist()
    radii = (0.1 + 0.3 * torch.rand(n, generator=generator)).tolist()
    return [((c[0], c[1]), r) for c, r in zip(centres, radii)]


def keep_mask(height: int, width: int, centre: Sequence[float], radius: float,
              device=None) -> torch.Tensor:
    """H x W float32 mask, 0 inside the circle and 1 outside (multiply a state by it)."""
    ys = torch.linspace(-1.0, 1.0, height, device=device).view(-1, 1)
    xs = torch.linspace(-1.0, 1.0, width, device=device).view(1, -1)
    inside = (xs - float(centre[0])) ** 2 + (ys - float(centre[1])) ** 2 < float(radius) ** 2
    return (~inside).to(torch.float32)


def seeded_circle(seed: int) -> Circle:
    """The first circle of a generator seeded with ``seed`` (``nca-fast grow --damage``)."""
    return draw_circles(1, torch.Generator().manual_seed(seed))[0]
