"""The launch configurations a GPU selects, executed by Triton's interpreter on the CPU.

Under the interpreter ``configs`` picks a few large tiles (fast to interpret), so without these
tests the GPU's geometry (8 x 16, 4 x 16, 2 x 16, 4 x 8 and 2 x 8 tiles, weights staged per tile,
persistent programs walking several tiles each, the carries of ``_tile_next``) would only ever
run on a GPU. Here ``configs`` selects as for a CUDA device with 2 SMs (4-8 programs, so every
program walks several tiles), on grids small enough to interpret in seconds. The layout anchor
(inline PTX) is the one part the interpreter cannot run: it is an identity, switched off here.
"""
import dataclasses
import os

import pytest
import torch

from nca_fast import NCAConfig
from nca_fast.kernels import configs, step_bwd, step_fwd
from tolerances import assert_close_verbose, tolerance

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter only: on a GPU the kernel tests run these configurations natively",
                allow_module_level=True)

from test_kernels import random_case, run_both  # noqa: E402  (after the skip: needs the kernels)

SMS = 2


@pytest.fixture
def gpu_selection(monkeypatch):
    """configs selects as on a CUDA device with SMS SMs; the anchor (PTX) off."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_sm_count", lambda device: SMS)
    for name in ("select_forward", "select_backward", "select_weights", "select_transpose"):
        def pick(*args, _real=getattr(configs, name), **kwargs):
            return dataclasses.replace(_real(*args, **kwargs), anchor=False)
        monkeypatch.setattr(configs, name, pick)


# Each case names the GPU geometry it reaches (forward / gp / weights / transpose tiles).
CASES = [
    # C16 sobel: 8x16 / 4x16 / 4x16 (2 x 16 tiles per grid) / 8x16; weights resident
    pytest.param(dict(padding="zeros", alive_threshold=0.1, hidden=32, precision="ieee"),
                 (2, 13, 21), id="c16-sobel-h32-ieee"),
    # C32 Laplacian bank on tensor cores: forward 8 warps with weights per tile; weights 4x8
    # (the bank decides it: 2x8 without it)
    pytest.param(dict(padding="circular", alive_threshold=None, channels=32, hidden=32,
                      filters="sobel_laplacian", precision="tf32"),
                 (1, 12, 21), id="c32-lap-h32-tf32"),
    # C32 sobel, hidden 128, tensor cores: gp 2x16 with weights per tile in 32-unit chunks
    pytest.param(dict(padding="zeros", alive_threshold=0.1, channels=32, hidden=128,
                      precision="tf32"),
                 (1, 9, 19), id="c32-sobel-h128-tf32"),
]


@pytest.mark.parametrize("case,shape", CASES)
def test_gpu_tiles_match_reference(gpu_selection, case, shape):
    cfg = NCAConfig(**case)
    tensors = random_case(cfg, *shape, seed=21)
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.clone().requires_grad_() for t in tensors]
    out, _ = run_both(cfg, *ours, steps=2)
    _, ref = run_both(cfg, *theirs, steps=2)
    # The interpreter computes tf32 dots in fp32: "ieee"'s tolerances hold for every case.
    assert_close_verbose(out, ref, *tolerance(torch.float32, "ieee", "state"), name="state")
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    atol, rtol = tolerance(torch.float32, "ieee", "grad")
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), ours, theirs):
        scale = b.grad.abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero, the test would prove nothing"
        assert_close_verbose(a.grad, b.grad, atol * scale, rtol, f"grad {name}")


def test_gpu_tiles_walk_several_tiles_per_program(gpu_selection):
    """The cases above are meaningful only if the persistent programs walk several tiles."""
    for case, shape in (p.values for p in CASES):
        cfg = NCAConfig(**case)
        B, H, W = shape
        n = B * H * W
        bank = configs.bank_code(torch.tensor(cfg.filters).reshape(-1, 9))
        for cfg_k in (configs.select_forward(n, cfg.channels, cfg.hidden, cfg.num_filters,
                                             None, cfg.precision, bank),
                      configs.select_weights(n, cfg.channels, cfg.hidden, cfg.num_filters,
                                             None, cfg.precision, bank)):
            programs, _, _, n_tiles, *_ = step_fwd.persistent_grid(B, H, W, cfg_k)
            assert cfg_k.block_m <= 128 and n_tiles > programs, (case, cfg_k)


def test_step_backward_sizes_its_buffer_with_the_bank(gpu_selection, monkeypatch):
    """C = 32, Laplacian bank, hidden 32, tf32 on a 1 x 24 x 37 grid of an H200 (132 SMs): the
    weight kernel runs 30 programs of 4 x 8 tiles (60 of 2 x 8 for a bank read as data); the
    buffer must have one row per program of the launch (the step's backward raised a
    ValueError when it was sized without the bank)."""
    monkeypatch.setattr(configs, "_sm_count", lambda device: 132)
    cfg = NCAConfig(channels=32, hidden=32, filters="sobel_laplacian", precision="tf32",
                    alive_threshold=None)
    x, w1, b1, w2, b2 = random_case(cfg, 1, 24, 37, seed=3)
    from nca_fast.config import filter_tensor
    from nca_fast.functional import _kernel_weights
    from nca_fast.rng import fire_threshold

    w1k, w2t = _kernel_weights(w1, w2, cfg.num_filters)
    filt = filter_tensor(cfg, dtype=x.dtype).reshape(-1, 9)
    bank = configs.bank_code(filt)
    n = 24 * 37
    with_bank = configs.select_weights(n, 32, 32, 4, None, "tf32", bank)
    as_data = configs.select_weights(n, 32, 32, 4, None, "tf32", 0)
    assert (step_fwd.persistent_grid(1, 24, 37, with_bank)[0],
            step_fwd.persistent_grid(1, 24, 37, as_data)[0]) == (30, 60)
    r = x.permute(0, 2, 3, 1).contiguous()
    g = torch.randn(r.shape, generator=torch.Generator().manual_seed(1))
    grad_r, *_ = step_bwd.nca_step_bwd(
        r, None, g, w1k, b1, w2t, b2, filt, seed=1, step=0,
        fire_threshold=fire_threshold(0.5), alive_threshold=None, alpha_channel=3,
        padding="zeros", precision="tf32")
    assert torch.isfinite(grad_r).all()
    parts = step_bwd.new_parts(1, 24, 37, 32, 32, 4, x.device, "tf32", bank=bank)
    assert parts.shape[0] == 30
