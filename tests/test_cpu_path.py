"""The torch backend (nca_fast.backends.torch_backend) against the oracle, nca_fast.reference.

Same seed -> same masks, so states and gradients must agree to rounding: forward, gradients of
the input and of every weight, across paddings, alive masking, filter banks (F = 3, 4), channel
and hidden sizes, odd H != W, batch 2, fp32 and fp64, channels-last input. Checkpointed segments
must give bitwise the gradients of the plain run, and the no-grad path the grad path's states.
"""
import itertools

import pytest
import torch

from nca_fast import NCA, NCAConfig, reference
from nca_fast.backends.torch_backend import perception_plan, rollout, update_masks
from nca_fast.config import filter_tensor
from nca_fast.params import Params
from nca_fast.rng import philox, update_mask

from cases import ragged_state
from tolerances import assert_close_verbose, tolerance

STEPS, SEED = 5, 1234


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cfg, dtype, seed=0):
    """An NCA with a non-zero W2 (a fresh one is the identity map, which would test nothing)."""
    torch.manual_seed(seed)
    model = NCA(cfg, backend="torch").to(dtype)
    with torch.no_grad():
        model.w2.weight.normal_(0.0, 0.3 / cfg.hidden ** 0.5)
        model.w2.bias.normal_(0.0, 0.05)
    return model


def _close(actual, expected, dtype, kind, name):
    """The project's tolerance table, with atol scaled by the tensor's magnitude: an unscaled
    Laplacian bank makes states grow, and gradients are large in some tensors, small in others."""
    atol, rtol = tolerance(dtype, "ieee", kind)
    scale = max(1.0, expected.detach().abs().max().item())
    assert_close_verbose(actual, expected, atol * scale, rtol, name=name)


def _loss(y, target):
    return ((y - target) ** 2).sum()


def _grads(fn, model, x, target):
    """Gradients of a squared-error loss w.r.t. x and every parameter, in a fixed order."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    g = torch.autograd.grad(_loss(y, target), [x, *model.parameters()])
    names = ["x"] + [n for n, _ in model.named_parameters()]
    return y.detach(), dict(zip(names, g))


def _reference(model, cfg, steps=STEPS, seed=SEED):
    return lambda x: reference.rollout(x, *model.weights(), cfg, steps, seed)


def _fast(model, steps=STEPS, seed=SEED, segment=None):
    return lambda x: rollout(x, model.params(), model.config, steps=steps, seed=seed,
                             checkpoint=segment)


# ------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("b,h,w,rate,seed,first", [
    (2, 5, 7, 0.5, 0, 0),
    (1, 33, 9, 0.3, 2**40 + 3, 17),
    (3, 4, 4, 0.77, 2**63 - 1, 2**32 - 2),      # the step counter wraps at 2**32, as in rng.py
    (2, 3, 5, 0.0, 5, 0),
    (2, 3, 5, 1.0, 5, 0),
])
def test_update_masks_equal_rng(b, h, w, rate, seed, first):
    steps = 6
    got = update_masks(b, h, w, fire_rate=rate, seed=seed, first_step=first, steps=steps)
    assert got.shape == (steps, b, h, w) and got.dtype == torch.bool
    for t in range(steps):
        want = update_mask(b, h, w, fire_rate=rate, seed=seed, step=first + t)[:, 0] > 0
        assert torch.equal(got[t], want), f"step {first + t}: {(got[t] != want).sum()} cells differ"


def test_update_masks_long_grid_chunks():
    """More (step, cell) pairs than one hashing chunk holds, so several chunks are stitched."""
    got = update_masks(2, 64, 48, fire_rate=0.5, seed=99, first_step=3, steps=25)
    for t in (0, 20, 21, 24):
        want = update_mask(2, 64, 48, fire_rate=0.5, seed=99, step=3 + t)[:, 0] > 0
        assert torch.equal(got[t], want)


def test_wrapping_int64_product_is_philox_mulhilo():
    """update_masks relies on int64 multiplication wrapping mod 2**64; check the words it
    yields against rng.philox on random full-range counters, not just on the mask bits."""
    g = torch.Generator().manual_seed(3)
    c = [torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64) for _ in range(4)]
    p = c[0] * 0xD2511F53
    hi, lo = p.view(torch.int32).view(-1, 2)[:, 1], p.view(torch.int32).view(-1, 2)[:, 0]
    exact = [(int(v) * 0xD2511F53) for v in c[0].tolist()]
    assert [int(v) & 0xFFFFFFFF for v in lo.tolist()] == [e & 0xFFFFFFFF for e in exact]
    assert [int(v) & 0xFFFFFFFF for v in hi.tolist()] == [e >> 32 for e in exact]
    assert philox(5, *c)[0].shape == (4096,)


# ------------------------------------------------------------------------------- perception
@pytest.mark.parametrize("bank", ["sobel", "sobel_laplacian", "sobel_laplacian16"])
def test_perception_plan_rebuilds_filters(bank):
    """scale * sum(coef * row pattern shifted by dy) must give back every 3x3 filter."""
    cfg = NCAConfig(filters=bank)
    patterns, bands = perception_plan(cfg.filters)
    for f, band in zip(cfg.filters, bands):
        rebuilt = [[0.0] * 3 for _ in range(3)]
        for t in band.terms:
            pat = patterns[t.src]
            taps = {pat.view_dx: 1.0} if pat.view_dx is not None else \
                {u.shift: u.coef for u in pat.terms}
            for dx, v in taps.items():
                rebuilt[t.shift + 1][dx + 1] += band.scale * t.coef * v
        assert sum(rebuilt, []) == pytest.approx(sum([list(r) for r in f], []), abs=1e-12)


# ---------------------------------------------------------------------- forward and gradients
CASES = list(itertools.product(["zeros", "circular"], [0.1, None], ["sobel", "sobel_laplacian"]))


@pytest.mark.parametrize("padding,threshold,bank", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_equal_reference(padding, threshold, bank, dtype):
    cfg = NCAConfig(channels=16, hidden=32, padding=padding, alive_threshold=threshold,
                    filters=bank)
    model = _model(cfg, dtype)
    x = ragged_state(cfg, 2, 9, 13, dtype)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    want_y, want_g = _grads(_reference(model, cfg), model, x, target)
    got_y, got_g = _grads(_fast(model), model, x, target)
    assert want_y.abs().sum() > 0 and (want_y != x).any(), "degenerate case: nothing happened"
    _close(got_y, want_y, dtype, "state", "state")
    for name in want_g:
        assert want_g[name].abs().max() > 0, f"degenerate case: zero gradient for {name}"
        _close(got_g[name], want_g[name], dtype, "grad", f"grad {name}")


@pytest.mark.parametrize("channels,hidden,alpha", [(32, 128, 3), (16, 128, 0), (5, 7, 4)])
def test_sizes_equal_reference(channels, hidden, alpha):
    """Wider state and hidden layer, alpha elsewhere than channel 3, a C that is no multiple
    of the SIMD width; fp32 forward and gradients."""
    cfg = NCAConfig(channels=channels, hidden=hidden, alpha_channel=alpha,
                    filters="sobel_laplacian16")
    model = _model(cfg, torch.float32, seed=2)
    x = ragged_state(cfg, 2, 11, 7, torch.float32, seed=4)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(6))
    want_y, want_g = _grads(_reference(model, cfg), model, x, target)
    got_y, got_g = _grads(_fast(model), model, x, target)
    _close(got_y, want_y, torch.float32, "state", "state")
    for name in want_g:
        _close(got_g[name], want_g[name], torch.float32, "grad", f"grad {name}")


def test_odd_filter_bank_equal_reference():
    """Filters with pure shifts (gathered straight from the state at an offset), a lone row
    (a pattern gathered at a row offset), an all-zero filter and asymmetric taps."""
    bank = (((0, 0, 0), (0, 0, 1.0), (0, 0, 0)),          # shift right: state view, offset
            ((0, 0, 0), (0, 0, 0), (0.5, 1.0, -0.25)),      # one row: a pattern, row offset
            ((0, 0, 0), (0, 0, 0), (0, 0, 0)),              # zeros
            ((0.3, 0, -1.0), (2.0, 0.1, 0), (0, -0.7, 0.2)))
    for padding in ("zeros", "circular"):
        cfg = NCAConfig(channels=6, hidden=16, filters=bank, padding=padding)
        model = _model(cfg, torch.float64, seed=3)
        x = ragged_state(cfg, 2, 6, 9, torch.float64, seed=7)
        target = torch.rand(x.shape, generator=torch.Generator().manual_seed(8),
                            dtype=torch.float64)
        want_y, want_g = _grads(_reference(model, cfg), model, x, target)
        got_y, got_g = _grads(_fast(model), model, x, target)
        _close(got_y, want_y, torch.float64, "state", "state")
        for name in want_g:
            _close(got_g[name], want_g[name], torch.float64, "grad", f"grad {name}")


@pytest.mark.parametrize("h,w", [(1, 5), (4, 1), (2, 2)])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_tiny_grids_equal_reference(h, w, padding):
    """Grids thinner than the stencil: the halo wraps onto the same cells under circular."""
    cfg = NCAConfig(channels=4, hidden=8, padding=padding, alive_threshold=None)
    model = _model(cfg, torch.float64, seed=9)
    x = ragged_state(cfg, 2, h, w, torch.float64, seed=10)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(11),
                        dtype=torch.float64)
    want_y, want_g = _grads(_reference(model, cfg), model, x, target)
    got_y, got_g = _grads(_fast(model), model, x, target)
    _close(got_y, want_y, torch.float64, "state", "state")
    for name in want_g:
        _close(got_g[name], want_g[name], torch.float64, "grad", f"grad {name}")


def test_gradcheck_fp64():
    """Finite differences on a tiny grid (alive masking off: its comparisons have no gradient
    and would make the function discontinuous under perturbation)."""
    for padding in ("zeros", "circular"):
        cfg = NCAConfig(channels=3, hidden=5, padding=padding, alive_threshold=None,
                        alpha_channel=0, filters="sobel_laplacian16", fire_rate=0.7)
        model = _model(cfg, torch.float64, seed=12)
        x = torch.rand(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        weights = [w.detach().clone().requires_grad_(True) for w in model.weights()]

        def fn(x, *weights):
            bank = filter_tensor(cfg, dtype=torch.float64)
            return rollout(x, Params(*weights, bank), cfg, steps=2, seed=SEED)

        assert torch.autograd.gradcheck(fn, (x, *weights), eps=1e-6, atol=1e-7,
                                         fast_mode=True)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_dead_cells_that_fire_count_in_the_post_mask(padding):
    """A dead cell (pre-alive false) that fires is zeroed at the end of the step, but its
    updated alpha enters its neighbours' post-alive max-pool: skipping its update changes
    which neighbours survive. Strong weights and sparse alpha make that happen here (checked),
    and the fast path must still equal the reference."""
    import torch.nn.functional as F
    cfg = NCAConfig(channels=4, hidden=8, alpha_channel=0, padding=padding)
    hits = 0
    for seed in range(12):
        torch.manual_seed(seed)
        model = NCA(cfg)
        with torch.no_grad():
            model.w1.weight.normal_(0, 2.0)
            model.w1.bias.normal_(0, 1.0)
            model.w2.weight.normal_(0, 1.0)
            model.w2.bias.normal_(0, 0.3)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(2, 4, 6, 7, generator=g) - 0.5
        x[:, 0] = (torch.rand(2, 6, 7, generator=g) < 0.15).float() * 0.5
        w = model.weights()
        with torch.no_grad():
            want = reference.rollout(x, *w, cfg, 1, seed)
            got = rollout(x, model.params(), model.config, steps=1, seed=seed)
            pre = reference.alive(x, cfg.alive_threshold, padding, 0)
            mask = update_mask(2, 6, 7, fire_rate=cfg.fire_rate, seed=seed, step=0) > 0
            filters = torch.tensor(cfg.filters)
            upd = x + reference.dense(reference.perceive(x, filters, padding), *w) * mask
            near = F.max_pool2d(reference.pad1(pre.float(), padding), 3, stride=1) > 0
        hits += int((mask & ~pre & near & (upd[:, :1] > cfg.alive_threshold)).sum())
        _close(got, want, torch.float32, "state", f"state, seed {seed}")
    assert hits > 0, "no dead cell fired next to a live one: the case is not exercised"


# --------------------------------------------------------------- checkpointing, no-grad path
@pytest.mark.parametrize("padding,threshold", [("zeros", 0.1), ("circular", None)])
def test_checkpoint_segments_bitwise(padding, threshold):
    cfg = NCAConfig(channels=16, hidden=32, padding=padding, alive_threshold=threshold)
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, 2, 9, 13, torch.float32)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    steps = 7
    plain_y, plain_g = _grads(_fast(model, steps), model, x, target)
    for segment in (1, 3, 7, 20):
        y, g = _grads(_fast(model, steps, segment=segment), model, x, target)
        assert torch.equal(y, plain_y), f"segment={segment}: state differs"
        for name in plain_g:
            assert torch.equal(g[name], plain_g[name]), f"segment={segment}: grad {name} differs"


def test_checkpoint_through_the_module():
    cfg = NCAConfig(channels=8, hidden=16)
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, 2, 7, 10, torch.float32)
    grads = []
    for ckpt in (None, "sqrt", 2):
        model.zero_grad(set_to_none=True)
        y = model(x, 9, seed=4, checkpoint=ckpt)
        y[:, :4].square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@pytest.mark.parametrize("padding,threshold", [("zeros", 0.1), ("circular", 0.1),
                                               ("zeros", None)])
def test_no_grad_path_equals_grad_path(padding, threshold):
    cfg = NCAConfig(channels=16, hidden=32, padding=padding, alive_threshold=threshold)
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, 2, 9, 13, torch.float32)
    x_before = x.clone()
    with torch.no_grad():
        y0 = rollout(x, model.params(), model.config, steps=STEPS, seed=SEED)
    y1 = rollout(x.clone().requires_grad_(True), model.params(), model.config, steps=STEPS,
                 seed=SEED)
    assert y1.requires_grad and not y0.requires_grad
    assert torch.equal(x, x_before), "the no-grad path wrote into its input"
    # Same arithmetic, but from per-chunk scratch instead of the saved buffers: equal to
    # rounding (bitwise here; MKL does not promise alignment-independent results).
    _close(y0, y1.detach(), torch.float32, "state", "no-grad vs grad state")
    _close(y0, reference.rollout(x, *model.weights(), cfg, STEPS, SEED).detach(),
           torch.float32, "state", "state")


def test_channels_last_input_and_memory_format():
    cfg = NCAConfig(channels=16, hidden=32)
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, 2, 9, 13, torch.float32)
    xcl = x.contiguous(memory_format=torch.channels_last)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    want_y, want_g = _grads(_reference(model, cfg), model, x, target)
    got_y, got_g = _grads(_fast(model), model, xcl, target)
    _close(got_y, want_y, torch.float32, "state", "state")
    for name in want_g:
        _close(got_g[name], want_g[name], torch.float32, "grad", f"grad {name}")
    with torch.no_grad():
        y = rollout(xcl, model.params(), model.config, steps=2, seed=1)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert rollout(x, model.params(), model.config, steps=2, seed=1).is_contiguous()


def test_module_forward_with_frames_and_first_step():
    """NCA.forward(backend='torch') goes through this path; frames restart at first_step > 0,
    which must draw the masks of the later steps."""
    cfg = NCAConfig(channels=16, hidden=32)
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, 2, 9, 13, torch.float32)
    with torch.no_grad():
        y, frames = model(x, 7, seed=SEED, frames=3)
        want = reference.rollout(x, *model.weights(), cfg, 7, SEED)
        mid = reference.rollout(x, *model.weights(), cfg, 3, SEED)
    assert len(frames) == 4
    _close(y, want, torch.float32, "state", "final state")
    _close(frames[1], mid, torch.float32, "state", "frame at step 3")


@pytest.mark.parametrize("batch,segment", [(2, None), (3, 2), (5, None)])
def test_worker_threads_equal_reference(batch, segment):
    """With 2 threads the batch is split into parts run by worker threads (uneven splits for
    odd batches); states, gradients, checkpoint bitwise equality and no-grad must hold."""
    cfg = NCAConfig(channels=16, hidden=32, padding="circular" if batch == 3 else "zeros")
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, batch, 9, 13, torch.float32)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    want_y, want_g = _grads(_reference(model, cfg), model, x, target)
    torch.set_num_threads(2)
    try:
        got_y, got_g = _grads(_fast(model, segment=segment), model, x, target)
        plain_y, plain_g = _grads(_fast(model), model, x, target)
        with torch.no_grad():
            nograd_y = rollout(x, model.params(), model.config, steps=STEPS, seed=SEED)
    finally:
        torch.set_num_threads(1)
    _close(got_y, want_y, torch.float32, "state", "state")
    for name in want_g:
        _close(got_g[name], want_g[name], torch.float32, "grad", f"grad {name}")
        assert torch.equal(got_g[name], plain_g[name])
    _close(nograd_y, got_y, torch.float32, "state", "no-grad vs grad state")
    assert torch.get_num_threads() == 1, "the worker pool changed the caller's thread count"


def test_zero_steps_and_no_active_cells():
    cfg = NCAConfig(channels=8, hidden=16)
    model = _model(cfg, torch.float32)
    x = ragged_state(cfg, 1, 5, 6, torch.float32)
    y0 = rollout(x, model.params(), model.config, steps=0, seed=1)
    assert torch.equal(y0, x) and y0.data_ptr() != x.data_ptr()     # a copy, never x itself
    dead = torch.zeros_like(x)          # nothing alive: every step leaves all zeros
    y = rollout(dead.requires_grad_(True), model.params(), model.config, steps=3, seed=1)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(dead.grad, torch.zeros_like(x))
