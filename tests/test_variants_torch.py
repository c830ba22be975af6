"""Padding and perception variants on the torch backend, against the oracle (nca_fast.reference).

Paddings zeros, circular, replicate and reflect; the fixed bank, learned shared filters
(F x 3 x 3) and learned depthwise filters (F x C x 3 x 3); alive masking on and off. States and
gradients (of x, every weight and the filters) must agree with the reference to rounding,
checkpoint segments and repeated runs must be bitwise equal, finite differences must agree with
the handwritten backward, and ``check_rollout`` must reject bad filters with a one-line error.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from nca_fast import NCAConfig, reference
from nca_fast.backends.interface import check_rollout
from nca_fast.backends.torch_backend import rollout, update_masks
from nca_fast.backends.torch_backend.perception import Plan
from nca_fast.config import initial_filters
from nca_fast.params import Params

from cases import ragged_state
from tolerances import assert_close_verbose, tolerance

SEED = 77
PADDINGS = ["zeros", "circular", "replicate", "reflect"]
LEARN = [None, "shared", "depthwise"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(cfg, dtype, seed=0, requires_grad=True):
    """Random weights with a non-zero W2 (a new model is the identity) and, for learned
    filters, the initial bank perturbed (so depthwise filters differ between channels)."""
    g = torch.Generator().manual_seed(seed)
    hidden, c = cfg.hidden, cfg.channels
    w1 = torch.randn(hidden, cfg.perception_size, generator=g, dtype=dtype) / cfg.perception_size ** 0.5
    b1 = torch.randn(hidden, generator=g, dtype=dtype) * 0.1
    w2 = torch.randn(c, hidden, generator=g, dtype=dtype) * 0.3 / hidden ** 0.5
    b2 = torch.randn(c, generator=g, dtype=dtype) * 0.05
    f = initial_filters(cfg, dtype=dtype)
    if cfg.learn_filters is not None:
        f = f + 0.2 * torch.randn(f.shape, generator=g, dtype=dtype)
    return Params(*[t.requires_grad_(requires_grad) for t in (w1, b1, w2, b2, f)])


def _close(actual, expected, dtype, kind, name):
    atol, rtol = tolerance(dtype, "ieee", kind)
    scale = max(1.0, expected.detach().abs().max().item())
    assert_close_verbose(actual, expected, atol * scale, rtol, name=name)


def _inputs(params, cfg):
    """The tensors gradients are taken of: the weights, and the filters when learned."""
    return list(params) if cfg.learn_filters is not None else list(params[:4])


def _run(fn, x, params, cfg, target):
    """(state, gradients of x and of ``_inputs``) of a squared-error loss."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    grads = torch.autograd.grad(((y - target) ** 2).sum(), [x, *_inputs(params, cfg)])
    return y.detach(), grads


def _reference(params, cfg, steps, seed=SEED):
    filters = params.filters if cfg.learn_filters is not None else None
    return lambda x: reference.rollout(x, *params[:4], cfg, steps, seed, filters=filters)


def _torch(params, cfg, steps, seed=SEED, checkpoint=None):
    return lambda x: rollout(x, params, cfg, steps=steps, seed=seed, checkpoint=checkpoint)


NAMES = ["x", "w1", "b1", "w2", "b2", "filters"]


# ------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("depthwise", [False, True])
def test_reference_perceive_with_bias_equals_conv2d(padding, depthwise):
    """perceive(x, filters, padding, bias) is a grouped convolution whose output channel
    c*F + k holds filter k of channel c plus bias[k, c]."""
    g = torch.Generator().manual_seed(3)
    b, c, f, h, w = 2, 5, 4, 7, 6
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    filters = torch.randn((f, c, 3, 3) if depthwise else (f, 3, 3), generator=g,
                          dtype=torch.float64)
    bias = torch.randn(f, c, generator=g, dtype=torch.float64)
    per_channel = filters if depthwise else filters[:, None].expand(f, c, 3, 3)
    weight = per_channel.transpose(0, 1).reshape(c * f, 1, 3, 3)        # row c*F + k
    mode = "constant" if padding == "zeros" else padding
    want = F.conv2d(F.pad(x, (1, 1, 1, 1), mode=mode), weight, bias.t().reshape(-1), groups=c)
    got = reference.perceive(x, filters, padding, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Without the bias, the same values less the bias.
    torch.testing.assert_close(reference.perceive(x, filters, padding),
                               want - bias.t().reshape(1, -1, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_reference_alive_equals_maxpool_of_the_padded_alpha(padding):
    """For replicate and reflect the alive mask is a max-pool over the padded alpha (the copies
    lie inside each window already), which is the zero padding's mask."""
    cfg = NCAConfig(channels=4, alpha_channel=1)
    x = ragged_state(cfg, 2, 7, 5, torch.float64, seed=4)
    a = F.pad(x[:, 1:2], (1, 1, 1, 1), mode=padding)
    want = F.max_pool2d(a, 3, stride=1) > 0.1
    got = reference.alive(x, 0.1, padding, alpha_channel=1)
    assert want.any() and not want.all(), "degenerate case: every cell alive or none"
    assert torch.equal(got, want)
    assert torch.equal(got, reference.alive(x, 0.1, "zeros", alpha_channel=1))


def test_reference_pad1_rejects_unknown_padding():
    with pytest.raises(ValueError, match="^padding: "):
        reference.pad1(torch.zeros(1, 1, 3, 3), "mirror")


# ------------------------------------------------------------ torch backend vs reference
CASES = list(itertools.product(PADDINGS, LEARN, [0.1, None]))


@pytest.mark.parametrize("batch,steps", [(1, 1), (2, 5)])
@pytest.mark.parametrize("padding,learn,threshold", CASES)
def test_torch_equals_reference(padding, learn, threshold, batch, steps):
    """fp64 states and gradients on an odd 7 x 5 grid."""
    cfg = NCAConfig(channels=6, hidden=12, padding=padding, learn_filters=learn,
                    alive_threshold=threshold, alpha_channel=2)
    params = _params(cfg, torch.float64)
    x = ragged_state(cfg, batch, 7, 5, torch.float64)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    want_y, want_g = _run(_reference(params, cfg, steps), x, params, cfg, target)
    got_y, got_g = _run(_torch(params, cfg, steps), x, params, cfg, target)
    assert (want_y != x).any(), "degenerate case: nothing happened"
    _close(got_y, want_y, torch.float64, "state", "state")
    for name, got, want in zip(NAMES, got_g, want_g):
        assert want.abs().max() > 0, f"degenerate case: zero gradient for {name}"
        _close(got, want, torch.float64, "grad", f"grad {name}")


@pytest.mark.parametrize("padding,bank", [("replicate", "sobel_laplacian"),
                                          ("reflect", "sobel_laplacian16")])
def test_fixed_bank_of_four_with_halo_paddings(padding, bank):
    """The fixed bank's perception plan (patterns computed over the halo rows) under the
    paddings that copy edge cells into the halo."""
    cfg = NCAConfig(channels=5, hidden=9, padding=padding, filters=bank)
    params = _params(cfg, torch.float64, seed=6)
    x = ragged_state(cfg, 2, 6, 9, torch.float64, seed=7)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(8),
                        dtype=torch.float64)
    want_y, want_g = _run(_reference(params, cfg, 4), x, params, cfg, target)
    got_y, got_g = _run(_torch(params, cfg, 4), x, params, cfg, target)
    _close(got_y, want_y, torch.float64, "state", "state")
    for name, got, want in zip(NAMES, got_g, want_g):
        _close(got, want, torch.float64, "grad", f"grad {name}")


@pytest.mark.parametrize("learn,padding", [("shared", "reflect"), ("depthwise", "replicate")])
def test_learned_filters_over_several_chunks(learn, padding):
    """fp32 at the article's sizes on a grid with more updated cells than one MLP chunk, so
    the per-chunk gathers, the filters' gradient and the scatter run more than once."""
    cfg = NCAConfig(learn_filters=learn, padding=padding, alive_threshold=None)
    h = w = 72
    chunk = Plan(cfg, (1, h, w, cfg.channels), torch.float32, torch.device("cpu")).chunk
    fired = update_masks(1, h, w, fire_rate=cfg.fire_rate, seed=SEED, first_step=0, steps=2)
    assert int(fired.sum(dim=(1, 2, 3)).min()) > chunk, "one chunk holds every updated cell"
    params = _params(cfg, torch.float32, seed=9)
    x = ragged_state(cfg, 1, h, w, torch.float32, seed=10)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(11))
    want_y, want_g = _run(_reference(params, cfg, 2), x, params, cfg, target)
    got_y, got_g = _run(_torch(params, cfg, 2), x, params, cfg, target)
    _close(got_y, want_y, torch.float32, "state", "state")
    for name, got, want in zip(NAMES, got_g, want_g):
        _close(got, want, torch.float32, "grad", f"grad {name}")


def test_filter_bias_folds_into_b1():
    """A depthwise filter bias is the same for every cell, so the reference with the bias
    equals the backend with b1 + w1 @ bias (interleaved, c*F + k), gradients included."""
    cfg = NCAConfig(channels=4, hidden=10, learn_filters="depthwise", filter_bias=True,
                    padding="reflect")
    params = _params(cfg, torch.float64, seed=12)
    bias = (0.3 * torch.randn(cfg.num_filters, cfg.channels, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(13))).requires_grad_()
    x = ragged_state(cfg, 2, 5, 7, torch.float64, seed=14)
    w1, b1, w2, b2, f = params
    want = reference.rollout(x, w1, b1, w2, b2, cfg, 3, SEED, filters=f, filter_bias=bias)
    folded = Params(w1, b1 + w1 @ bias.t().reshape(-1), w2, b2, f)
    got = rollout(x, folded, cfg, steps=3, seed=SEED)
    _close(got, want, torch.float64, "state", "state")
    want_g = torch.autograd.grad(want.square().sum(), [bias, *params])
    got_g = torch.autograd.grad(got.square().sum(), [bias, *params])
    for name, a, b in zip(["bias"] + NAMES[1:], got_g, want_g):
        assert b.abs().max() > 0, f"degenerate case: zero gradient for {name}"
        _close(a, b, torch.float64, "grad", f"grad {name}")


# ------------------------------------------------------------------ determinism, no-grad
@pytest.mark.parametrize("learn,padding,threshold", [("shared", "replicate", 0.1),
                                                     ("depthwise", "reflect", None),
                                                     (None, "reflect", 0.1),
                                                     ("shared", "circular", None)])
def test_checkpoint_segments_and_repeats_bitwise(learn, padding, threshold):
    cfg = NCAConfig(channels=16, hidden=32, learn_filters=learn, padding=padding,
                    alive_threshold=threshold)
    params = _params(cfg, torch.float32, seed=15)
    x = ragged_state(cfg, 2, 9, 13, torch.float32, seed=16)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(17))
    steps = 7
    plain_y, plain_g = _run(_torch(params, cfg, steps), x, params, cfg, target)
    for segment in (None, 1, 3, 7, 20):
        y, g = _run(_torch(params, cfg, steps, checkpoint=segment), x, params, cfg, target)
        assert torch.equal(y, plain_y), f"checkpoint={segment}: state differs"
        for name, a, b in zip(NAMES, g, plain_g):
            assert torch.equal(a, b), f"checkpoint={segment}: grad {name} differs"


@pytest.mark.parametrize("learn,padding", [("shared", "reflect"), ("depthwise", "circular"),
                                           (None, "replicate")])
def test_no_grad_path_equals_grad_path(learn, padding):
    cfg = NCAConfig(channels=8, hidden=16, learn_filters=learn, padding=padding)
    params = _params(cfg, torch.float32, seed=18)
    x = ragged_state(cfg, 2, 9, 7, torch.float32, seed=19)
    x_before = x.clone()
    with torch.no_grad():
        y0 = rollout(x, params, cfg, steps=5, seed=SEED)
    y1 = rollout(x.clone().requires_grad_(True), params, cfg, steps=5, seed=SEED)
    assert torch.equal(x, x_before), "the no-grad path wrote into its input"
    assert not torch.equal(y0, x), "degenerate case: nothing happened"
    assert torch.equal(y0, y1.detach())


# ---------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("learn", ["shared", "depthwise"])
def test_gradcheck_fp64(padding, learn):
    """Finite differences of the handwritten backward w.r.t. x, the weights and the learned
    filters, on a tiny grid. Alive masking is off (its comparisons have no gradient and make
    the function discontinuous under perturbation); the update masks are fixed by the seed
    (fire rate 0.7: some cells fire, some do not)."""
    cfg = NCAConfig(channels=3, hidden=5, padding=padding, alive_threshold=None,
                    alpha_channel=0, learn_filters=learn, fire_rate=0.7)
    fired = update_masks(1, 3, 4, fire_rate=cfg.fire_rate, seed=SEED, first_step=0, steps=2)
    assert fired.any() and not fired.all(), "degenerate masks: all cells or none fire"
    params = _params(cfg, torch.float64, seed=20)
    x = torch.rand(1, 3, 3, 4, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(21)).requires_grad_()

    def fn(x, *tensors):
        return rollout(x, Params(*tensors), cfg, steps=2, seed=SEED)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradcheck_fp64_alive_on():
    """Alive masking on: alpha well away from the threshold, so the perturbation flips no
    mask."""
    cfg = NCAConfig(channels=3, hidden=5, padding="replicate", alpha_channel=0,
                    learn_filters="shared", fire_rate=0.7)
    params = _params(cfg, torch.float64, seed=22)
    x = torch.rand(1, 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    x[:, 0] = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.9]])
    x.requires_grad_()

    def fn(x, *tensors):
        return rollout(x, Params(*tensors), cfg, steps=1, seed=SEED)

    y = fn(x, *params)
    assert (y == 0).all(dim=1).any(), "degenerate case: no cell died"
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


# ------------------------------------------------------------------------- bad arguments
def _check(params, cfg, x=None):
    x = torch.zeros(1, cfg.channels, 4, 5, dtype=params.w1.dtype) if x is None else x
    check_rollout(x, params, cfg, 1, 0, 0, None, None)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value), f"error message spans lines: {excinfo.value}"


@pytest.mark.parametrize("learn,shape", [(None, (3, 3)), (None, (4, 3, 3)),
                                         ("shared", (3, 4, 3, 3)), ("shared", (3, 3, 2)),
                                         ("depthwise", (3, 3, 3)),
                                         ("depthwise", (3, 5, 3, 3))])   # C mismatch
def test_check_rollout_rejects_filter_shapes(learn, shape):
    cfg = NCAConfig(channels=4, hidden=6, learn_filters=learn)
    params = _params(cfg, torch.float32, requires_grad=False)
    _check(params, cfg)                     # the right shape passes
    with pytest.raises(ValueError, match=r"^filters: expected shape") as e:
        _check(params._replace(filters=torch.zeros(shape)), cfg)
    _one_line(e)


def test_check_rollout_rejects_filter_dtype_device_and_type():
    cfg = NCAConfig(channels=4, hidden=6, learn_filters="shared")
    params = _params(cfg, torch.float32, requires_grad=False)
    with pytest.raises(TypeError, match="^filters: dtype torch.float64") as e:
        _check(params._replace(filters=params.filters.double()), cfg)
    _one_line(e)
    with pytest.raises(ValueError, match="^filters: on meta") as e:
        _check(params._replace(filters=params.filters.to("meta")), cfg)
    _one_line(e)
    with pytest.raises(TypeError, match="^filters: expected a torch.Tensor") as e:
        _check(params._replace(filters=params.filters.tolist()), cfg)
    _one_line(e)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("learn", [None, "depthwise"])
def test_check_rollout_rejects_non_finite_taps(bad, learn):
    cfg = NCAConfig(channels=4, hidden=6, learn_filters=learn)
    params = _params(cfg, torch.float32, requires_grad=False)
    f = params.filters.clone()
    f.view(-1)[5] = bad
    with pytest.raises(ValueError, match="^filters: every tap must be finite") as e:
        _check(params._replace(filters=f), cfg)
    _one_line(e)


@pytest.mark.parametrize("h,w", [(1, 5), (5, 1), (1, 1)])
def test_check_rollout_rejects_reflect_below_two_cells(h, w):
    cfg = NCAConfig(channels=4, hidden=6, padding="reflect")
    params = _params(cfg, torch.float32, requires_grad=False)
    _check(params, cfg, torch.zeros(1, 4, 2, 2))        # 2 x 2 is enough
    with pytest.raises(ValueError, match="^x: padding 'reflect' needs H and W of at least 2") as e:
        _check(params, cfg, torch.zeros(1, 4, h, w))
    _one_line(e)
    # The other paddings run grids of one cell.
    for padding in ("zeros", "circular", "replicate"):
        _check(params, cfg.replace(padding=padding), torch.zeros(1, 4, h, w))
