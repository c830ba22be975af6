"""The stochastic update mask: Philox4x32-10, keyed by the seed, counted by (cell, step)
(docs/MODEL.md, "Update masks").

The Triton kernels call ``tl.philox(seed, cell_lo, cell_hi, step, 0)``; this module computes the
same bits with torch integer ops, so every backend draws the same mask for the same seed and a
backward pass can regenerate the forward's mask instead of storing it.

A cell fires when the top 24 bits of the first Philox word are below ``fire_threshold(rate)``:
an exact integer comparison, identical on every device.
"""
from __future__ import annotations

import torch

# Philox4x32-10's constants (Salmon et al., 2011), as triton.language.philox uses them: the two
# round multipliers and the two key increments (Weyl sequence).
MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
SEED_MAX = 2**63 - 1


def _mulhilo(a: int, b: torch.Tensor):
    """High and low 32 bits of a * b for a uint32 constant and a tensor of uint32 in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b
    t = a_hi * b + (lo_part >> 16)          # (a*b) >> 16, exact: both terms stay below 2**49
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi, lo


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32-10 as triton.language.philox computes it, on int64 tensors holding uint32."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def fire_threshold(fire_rate: float) -> int:
    """Integer threshold on 24 random bits: P(bits < threshold) = fire_rate (to 2**-24)."""
    return int(round(float(fire_rate) * (1 << 24)))


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
    return seed


def update_mask(batch: int, height: int, width: int, *, fire_rate: float, seed: int, step: int,
                device=None) -> torch.Tensor:
    """The B x 1 x H x W float mask (1 = the cell updates) of step ``step`` under ``seed``."""
    check_seed(seed)
    n = batch * height * width
    cell = torch.arange(n, dtype=torch.int64, device=device)
    step_t = torch.full_like(cell, int(step) & MASK32)
    zero = torch.zeros_like(cell)
    word, _, _, _ = philox(seed, cell & MASK32, cell >> 32, step_t, zero)
    fire = (word >> 8) < fire_threshold(fire_rate)
    return fire.to(torch.float32).view(batch, 1, height, width)


def random_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from torch's generator (so torch.manual_seed makes rollouts repeatable)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())
