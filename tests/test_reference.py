"""The oracle (nca_fast.reference) against the spec written out cell by cell in float64.

``direct_step`` below restates docs/MODEL.md with explicit loops over cells,
neighbours, channels and filters: no convolutions, no pooling, no padding helpers. It shares
nothing with nca_fast but the config's filter taps.
"""
import itertools
import math
import zlib

import numpy as np
import pytest
import torch

from nca_fast import reference
from nca_fast.config import NCAConfig
from nca_fast.rng import philox, update_mask


def _neighbour(i, j, di, dj, h, w, padding):
    """Coordinates of the (di, dj) neighbour of (i, j), or None when outside a zero-padded grid."""
    ii, jj = i + di, j + dj
    if padding == "circular":
        return ii % h, jj % w
    if 0 <= ii < h and 0 <= jj < w:
        return ii, jj
    return None


def _alive(state, b, i, j, cfg):
    h, w = state.shape[2:]
    best = -math.inf
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            n = _neighbour(i, j, di, dj, h, w, cfg.padding)
            if n is not None:
                best = max(best, state[b, cfg.alpha_channel, n[0], n[1]])
    return best > cfg.alive_threshold


def direct_step(x, w1, b1, w2, b2, cfg, mask):
    """One step of the spec in float64 numpy, a cell at a time. x: B x C x H x W."""
    bsz, c, h, w = x.shape
    f = cfg.num_filters
    new = x.copy()
    for b, i, j in itertools.product(range(bsz), range(h), range(w)):
        p = np.zeros(c * f)
        for ch in range(c):
            for k, filt in enumerate(cfg.filters):
                s = 0.0
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        n = _neighbour(i, j, di, dj, h, w, cfg.padding)
                        if n is not None:
                            s += filt[di + 1][dj + 1] * x[b, ch, n[0], n[1]]
                p[ch * f + k] = s                    # interleaved: channel-major, filter-minor
        hid = np.maximum(w1 @ p + b1, 0.0)
        new[b, :, i, j] = x[b, :, i, j] + (w2 @ hid + b2) * mask[b, 0, i, j]
    if cfg.alive_threshold is not None:
        out = new.copy()
        for b, i, j in itertools.product(range(bsz), range(h), range(w)):
            if not (_alive(x, b, i, j, cfg) and _alive(new, b, i, j, cfg)):
                out[b, :, i, j] = 0.0
        new = out
    return new


def _problem(cfg, batch, h, w, seed):
    """Random weights and a sparse state where some cells are alive and some dead."""
    g = np.random.default_rng(seed)
    c, f, hid = cfg.channels, cfg.num_filters, cfg.hidden
    w1 = g.normal(0, 1 / math.sqrt(c * f), (hid, c * f))
    b1 = g.normal(0, 0.1, hid)
    w2 = g.normal(0, 0.5 / math.sqrt(hid), (c, hid))
    b2 = g.normal(0, 0.05, c)
    x = g.uniform(-1, 1, (batch, c, h, w)) * (g.uniform(size=(batch, 1, h, w)) < 0.6)
    # alpha: mostly empty, a few clearly alive cells, some just under and over the threshold.
    alpha = g.choice([0.0, 0.0, 0.0, 0.0, 0.05, 0.09, 0.12, 0.6], size=(batch, h, w))
    x[:, cfg.alpha_channel] = alpha
    mask = (g.uniform(size=(batch, 1, h, w)) < 0.5).astype(np.float64)
    return x, (w1, b1, w2, b2), mask


def _run_reference(x, weights, cfg, mask):
    t = [torch.from_numpy(a) for a in (x, *weights, mask)]
    return reference.step(t[0], *t[1:5], cfg, t[5]).numpy()


CASES = [
    # (padding, alive threshold, channels, hidden, filter bank)
    (padding, thr, c, hid, bank)
    for padding in ("zeros", "circular")
    for thr in (0.1, None)
    for c, hid in ((16, 128), (32, 32))
    for bank in ("sobel", "sobel_laplacian")
]


@pytest.mark.parametrize("padding,thr,channels,hidden,bank", CASES)
def test_step_matches_direct_computation(padding, thr, channels, hidden, bank):
    cfg = NCAConfig(channels=channels, hidden=hidden, alive_threshold=thr, filters=bank,
                    padding=padding)
    x, weights, mask = _problem(cfg, 2, 5, 7, seed=zlib.crc32(repr((padding, thr, channels, bank)).encode()))
    want = direct_step(x, *weights, cfg, mask)
    got = _run_reference(x, weights, cfg, mask)
    assert got.shape == want.shape == (2, channels, 5, 7)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if thr is not None:
        # The case is informative only if masking killed some cells and kept others.
        zeroed = np.all(want == 0, axis=1)
        assert zeroed.any() and not zeroed.all()


def test_direct_computation_catches_band_major_layout():
    """A check of the check: a wrong perception layout (band-major) is caught by the comparison."""
    cfg = NCAConfig(channels=16, hidden=32, alive_threshold=None)
    x, (w1, b1, w2, b2), mask = _problem(cfg, 1, 5, 7, seed=3)
    # Reorder w1's columns as if the reference read band-major perception (k*C + c).
    c, f = cfg.channels, cfg.num_filters
    band_major = w1.reshape(-1, c, f).transpose(0, 2, 1).reshape(w1.shape[0], -1)
    want = direct_step(x, w1, b1, w2, b2, cfg, mask)
    wrong = _run_reference(x, (band_major, b1, w2, b2), cfg, mask)
    assert np.abs(wrong - want).max() > 1e-3


def test_rollout_chains_steps_with_rng_masks():
    cfg = NCAConfig(channels=16, hidden=32, padding="zeros")
    x, weights, _ = _problem(cfg, 2, 5, 7, seed=11)
    seed, first, steps = 1234, 5, 3
    want = x
    for t in range(first, first + steps):
        m = update_mask(2, 5, 7, fire_rate=cfg.fire_rate, seed=seed, step=t).double().numpy()
        want = direct_step(want, *weights, cfg, m)
    t = [torch.from_numpy(a) for a in (x, *weights)]
    got = reference.rollout(t[0], *t[1:], cfg, steps, seed, first_step=first).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_seed_state():
    s = reference.seed_state(2, 5, 8, channels=16).numpy()
    assert s.shape == (2, 16, 5, 8)
    assert (s[:, 3:, 2, 4] == 1).all() and (s[:, :3, 2, 4] == 0).all()
    s[:, :, 2, 4] = 0
    assert (s == 0).all()


# --------------------------------------------------------------------------- the update mask
# Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors):
# (counter words, key as one 64-bit integer k0 + 2**32 k1) -> output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = [torch.tensor([v], dtype=torch.int64) for v in counter]
    got = tuple(int(w) for w in philox(key, *words))
    assert got == expected


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_update_mask_fraction(rate):
    m = update_mask(4, 64, 64, fire_rate=rate, seed=7, step=3)
    assert m.shape == (4, 1, 64, 64) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    n = m.numel()
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(m.mean().item() - rate) < 5 * sigma, m.mean().item()


def test_update_mask_extremes():
    assert update_mask(1, 16, 16, fire_rate=0.0, seed=1, step=0).sum() == 0
    assert update_mask(1, 16, 16, fire_rate=1.0, seed=1, step=0).min() == 1


def test_update_mask_deterministic_and_distinct():
    a = update_mask(2, 32, 32, fire_rate=0.5, seed=42, step=0)
    assert torch.equal(a, update_mask(2, 32, 32, fire_rate=0.5, seed=42, step=0))
    others = [update_mask(2, 32, 32, fire_rate=0.5, seed=42, step=1),
              update_mask(2, 32, 32, fire_rate=0.5, seed=43, step=0),
              update_mask(2, 32, 32, fire_rate=0.5, seed=42 + 2**32, step=0)]
    for o in others:
        # Independent masks at rate 0.5 disagree on about half the cells.
        assert 0.4 < (a != o).float().mean().item() < 0.6
    # The two batch items are different draws too.
    assert 0.4 < (a[0] != a[1]).float().mean().item() < 0.6


def test_update_mask_neighbours_uncorrelated():
    m = update_mask(1, 128, 128, fire_rate=0.5, seed=5, step=9)[0, 0] * 2 - 1
    n = m.numel()
    for shifted in (m.roll(1, 0), m.roll(1, 1)):
        corr = (m * shifted).mean().item()
        assert abs(corr) < 5 / math.sqrt(n), corr


def test_reference_computes_in_full_fp32_whatever_the_settings(monkeypatch):
    """On CUDA convolutions default to TF32 (cuDNN) and users may lower the matmul precision:
    the oracle convolves nothing, and its matmuls run at "highest" (settings restored after)."""
    import torch.nn.functional as F

    def no_conv(*args, **kwargs):
        raise AssertionError("the reference convolved: TF32 under cuDNN's default on CUDA")

    seen = []
    einsum = torch.einsum

    def recording(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return einsum(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", no_conv)
    monkeypatch.setattr(torch, "einsum", recording)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        cfg = NCAConfig(hidden=32, filters="sobel_laplacian")
        x, weights, mask = _problem(cfg, 1, 5, 6, seed=3)
        want = direct_step(x, *weights, cfg, mask)
        got = _run_reference(x, weights, cfg, mask)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        assert seen and all(s == ("highest", False) for s in seen), seen
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
