"""The fused kernels on the variants: learned filters (a bank for every channel, or per channel)
with their gradient, and every padding, against an oracle in plain PyTorch autograd.

On a CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float64 with
"ieee" dense layers, so kernels and oracle agree to rounding.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from nca_fast import NCAConfig, reference
from nca_fast.config import filter_tensor
from nca_fast.functional import rollout
from nca_fast.rng import update_mask

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float32 if CUDA else torch.float64     # fp64 kernels: the interpreter only
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest before importing kernels)",
                allow_module_level=True)
TOL = dict(atol=2e-4, rtol=2e-4) if CUDA else dict(atol=1e-10, rtol=1e-9)
MODES = {"zeros": "constant", "circular": "circular", "replicate": "replicate",
         "reflect": "reflect"}


def _perceive(x, filters, padding):
    """B x C x H x W -> B x (C*F) x H x W, interleaved c*F + k; filters [F, 3, 3] or
    [F, C, 3, 3] (cross-correlation), each padding as torch.nn.functional.pad computes it."""
    b, c, h, w = x.shape
    f = filters.shape[0]
    taps = filters if filters.dim() == 4 else filters[:, None].expand(f, c, 3, 3)
    weight = taps.permute(1, 0, 2, 3).reshape(c * f, 1, 3, 3)       # channel c, filter k: c*F+k
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode=MODES[padding]), weight, groups=c)


def _oracle(x, w1, b1, w2, b2, filters, cfg, steps, seed):
    """The rollout in autograd: perception with ``filters``, the reference's dense layers and
    alive masks (which treat outside as dead under every padding but circular)."""
    alive_pad = "circular" if cfg.padding == "circular" else "zeros"
    b, _, h, w = x.shape
    for t in range(steps):
        m = update_mask(b, h, w, fire_rate=cfg.fire_rate, seed=seed, step=t, device=x.device)
        if cfg.alive_masking:
            pre = reference.alive(x, cfg.alive_threshold, alive_pad, cfg.alpha_channel)
        dx = reference.dense(_perceive(x, filters, cfg.padding), w1, b1, w2, b2)
        x = x + dx * m.to(x.dtype)
        if cfg.alive_masking:
            post = reference.alive(x, cfg.alive_threshold, alive_pad, cfg.alpha_channel)
            x = x * (pre & post).to(x.dtype)
    return x


def _case(cfg, batch, height, width, learn, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, f, hid = cfg.channels, cfg.num_filters, cfg.hidden
    x = torch.rand(batch, c, height, width, generator=g, dtype=DTYPE)
    a = torch.rand(batch, height, width, generator=g, dtype=DTYPE)
    x[:, cfg.alpha_channel] = torch.where(a > 0.5, a, torch.zeros_like(a))
    w1 = torch.randn(hid, f * c, generator=g, dtype=DTYPE) / (f * c) ** 0.5
    b1 = torch.randn(hid, generator=g, dtype=DTYPE) * 0.1
    w2 = torch.randn(c, hid, generator=g, dtype=DTYPE) * (0.5 / hid ** 0.5)
    b2 = torch.randn(c, generator=g, dtype=DTYPE) * 0.05
    bank = filter_tensor(cfg, dtype=DTYPE)
    if learn == "depthwise":
        filters = bank[:, None].repeat(1, c, 1, 1)
        filters = filters + 0.1 * torch.randn(filters.shape, generator=g, dtype=DTYPE)
    elif learn == "shared":
        filters = bank + 0.1 * torch.randn(bank.shape, generator=g, dtype=DTYPE)
    else:
        filters = bank
    return [t.to(DEVICE) for t in (x, w1, b1, w2, b2, filters)]


def _both(cfg, learn, size=(2, 7, 9), steps=3, segment=None, seed=5):
    x, w1, b1, w2, b2, filters = _case(cfg, *size, learn)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, filters)]
    if learn is None:
        leaves[5] = filters                      # a fixed bank: no gradient, named if it is one
    kw = dict(fire_rate=cfg.fire_rate, alive_threshold=cfg.alive_threshold,
              alpha_channel=cfg.alpha_channel, padding=cfg.padding, precision=cfg.precision)
    out = rollout(*leaves, seed=seed, steps=steps, segment=segment, **kw)
    refs = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, filters)]
    if learn is None:
        refs[5] = filters
    ref = _oracle(*refs, cfg, steps, seed)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    g = g.to(DEVICE)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    return out, ref, leaves, refs


def _check(out, ref, leaves, refs):
    torch.testing.assert_close(out, ref, **TOL, msg=lambda m: f"state: {m}")
    names = ("x", "w1", "b1", "w2", "b2", "filters")
    for name, a, b in zip(names, leaves, refs):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **TOL,
                                       msg=lambda m: f"gradient of {name}: {m}")
    if leaves[5].requires_grad:
        assert leaves[5].grad.abs().sum() > 0, "the filters' gradient is zero: it tests nothing"


LEARN = ["shared", "depthwise"]
PADDINGS = ["zeros", "circular", "replicate", "reflect"]


@pytest.mark.parametrize("alive", [0.1, None])
@pytest.mark.parametrize("filters", ["sobel", "sobel_laplacian"])
@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_edge_paddings_match_autograd(padding, filters, alive):
    cfg = NCAConfig(precision="ieee", hidden=32, alive_threshold=alive, padding=padding,
                    filters=filters)
    _check(*_both(cfg, None))


@pytest.mark.parametrize("size", [(1, 1, 1), (1, 2, 2), (1, 3, 17), (2, 11, 2), (1, 2, 5)])
@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_edge_paddings_odd_sizes(padding, size):
    if padding == "reflect" and min(size[1:]) < 2:
        with pytest.raises(ValueError, match="^x: reflect padding"):
            _both(NCAConfig(precision="ieee", hidden=32, padding=padding), None, size=size)
        return
    # every cell fires and none dies: a 1 x 1 grid's gradients are not zero
    cfg = NCAConfig(precision="ieee", hidden=32, padding=padding, learn_filters="depthwise",
                    fire_rate=1.0, alive_threshold=None)
    _check(*_both(cfg, "depthwise", size=size, steps=2))


@pytest.mark.parametrize("learn", LEARN)
@pytest.mark.parametrize("alive", [0.1, None])
@pytest.mark.parametrize("padding", PADDINGS)
def test_learned_filters_match_autograd(learn, alive, padding):
    cfg = NCAConfig(precision="ieee", hidden=32, alive_threshold=alive, padding=padding,
                    learn_filters=learn)
    _check(*_both(cfg, learn))


@pytest.mark.parametrize("learn", LEARN)
def test_learned_laplacian_bank_odd_grid_batch_one(learn):
    cfg = NCAConfig(precision="ieee", hidden=32, filters="sobel_laplacian", learn_filters=learn)
    _check(*_both(cfg, learn, size=(1, 5, 3), steps=2))


@pytest.mark.parametrize("steps", [1, 4])
def test_learned_filters_one_step_and_many(steps):
    cfg = NCAConfig(precision="ieee", hidden=32, learn_filters="depthwise")
    _check(*_both(cfg, "depthwise", steps=steps))


def test_learned_filters_segments_are_bitwise_the_same():
    cfg = NCAConfig(precision="ieee", hidden=32, learn_filters="depthwise")
    *_, whole, _ = _both(cfg, "depthwise", steps=5)
    *_, segmented, _ = _both(cfg, "depthwise", steps=5, segment=2)
    *_, again, _ = _both(cfg, "depthwise", steps=5)
    for a, b, c in zip(whole, segmented, again):
        assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, c.grad)


@pytest.mark.skipif(CUDA, reason="float64 kernels run in Triton's interpreter only")
@pytest.mark.parametrize("learn", LEARN)
def test_filter_gradient_passes_gradcheck(learn):
    """fp64 finite differences of the kernels' rollout in the filters alone (reflect padding,
    alive masking on, an odd grid)."""
    cfg = NCAConfig(precision="ieee", hidden=32, padding="reflect", learn_filters=learn)
    x, w1, b1, w2, b2, filters = _case(cfg, 1, 5, 3, learn)

    def f(taps):
        return rollout(x, w1, b1, w2, b2, taps, seed=3, steps=2, padding="reflect",
                       alive_threshold=cfg.alive_threshold, precision="ieee")

    assert torch.autograd.gradcheck(f, (filters.clone().requires_grad_(),), eps=1e-6,
                                    atol=1e-7, rtol=1e-5, fast_mode=True)


def test_fixed_bank_as_data_has_no_filter_gradient():
    cfg = NCAConfig(precision="ieee", hidden=32)
    x, w1, b1, w2, b2, filters = _case(cfg, 1, 6, 6, None)
    w1.requires_grad_()
    out = rollout(x, w1, b1, w2, b2, filters, seed=1, steps=2, precision="ieee")
    out.sum().backward()
    assert filters.grad is None and w1.grad is not None


MODEL_CASES = {
    "shared": dict(learn_filters="shared"),
    "depthwise_bias": dict(learn_filters="depthwise", filter_bias=True),
    "replicate_no_last_bias": dict(padding="replicate", last_bias=False),
    "reflect_depthwise": dict(padding="reflect", learn_filters="depthwise"),
    "textures_depthwise_bias": dict(preset="textures", learn_filters="depthwise",
                                    filter_bias=True),
}


@pytest.mark.parametrize("case", list(MODEL_CASES), ids=list(MODEL_CASES))
def test_module_learned_variants_triton_matches_torch(case):
    """The drop-in module on both backends, learned parameters moved off their initial values:
    the same state and the same gradient for every parameter (the filters and the filter bias,
    folded into b1 by ``params()``, included)."""
    from nca_fast import NCA

    changes = dict(MODEL_CASES[case])
    make = NCAConfig.textures if changes.pop("preset", None) == "textures" else NCAConfig
    cfg = make(precision="ieee", hidden=32, **changes)
    torch.manual_seed(4)
    a = NCA(cfg, backend="triton").to(DEVICE)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = NCA(cfg, backend="torch").to(DEVICE)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, cfg.channels, 7, 9, generator=g).to(DEVICE)
    outs = []
    for m in (a, b):
        y = m(x, 3, seed=5)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
    names = [n for n, _ in a.named_parameters()]
    assert ("filters" in names) == bool(cfg.learn_filters)
    assert ("filter_bias" in names) == bool(cfg.filter_bias)
    assert ("w2.bias" in names) == cfg.last_bias
    state_tol = (1e-5, 1e-5) if not CUDA else (2e-4, 2e-4)
    grad_tol = (1e-5, 1e-4) if not CUDA else (2e-3, 2e-3)
    torch.testing.assert_close(outs[0], outs[1], atol=state_tol[0], rtol=state_tol[1])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None and pa.grad.abs().sum() > 0, name
        torch.testing.assert_close(pa.grad, pb.grad, atol=grad_tol[0], rtol=grad_tol[1],
                                   msg=lambda m, name=name: f"{name}: {m}")
