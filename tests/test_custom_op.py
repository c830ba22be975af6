"""The custom ops ``nca_fast::rollout`` / ``nca_fast::rollout_backward`` against PyTorch's contract.

``torch.library.opcheck`` runs the op for real and checks its schema (no input mutated or
returned, no output aliasing another), that autograd is registered at an autograd key, that the
fake (meta) implementation gives the real outputs' shapes, strides and dtypes, and that
AOTAutograd with dynamic shapes (what ``torch.compile`` uses) gives the same outputs and
gradients. On a CPU the kernels run in Triton's interpreter (tests/conftest.py), so the grids
are tiny: 1 x 16 x 5 x 7, hidden 32.
"""
import os

import pytest
import torch

from nca_fast import NCA, NCAConfig, reference
from nca_fast.config import filter_tensor
from nca_fast.functional import rollout
from nca_fast.backends.interface import resolve_checkpoint
from tolerances import assert_close_verbose, tolerance

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest before importing kernels)",
                allow_module_level=True)

CFG = NCAConfig(hidden=32, precision="ieee")
SEED, FIRE_RATE, ALPHA = 7, 0.5, 3


def _case(seed=0):
    """x (sparse alpha, so both alive masks bite) and weights large enough to cross them."""
    g = torch.Generator().manual_seed(seed)
    c, f, hid = CFG.channels, CFG.num_filters, CFG.hidden
    x = torch.rand(1, c, 5, 7, generator=g)
    a = torch.rand(1, 5, 7, generator=g)
    x[:, ALPHA] = torch.where(a > 0.5, a, torch.zeros_like(a))
    w1 = torch.randn(hid, f * c, generator=g) / (f * c) ** 0.5
    b1 = torch.randn(hid, generator=g) * 0.1
    w2 = torch.randn(c, hid, generator=g) * (0.5 / hid ** 0.5)
    b2 = torch.randn(c, generator=g) * 0.05
    return [t.to(DEVICE) for t in (x, w1, b1, w2, b2)]


def _op_args(steps, segment, alive, padding="zeros", bank=-1, filter_grad=False):
    """The scalar arguments of both ops, after x, the weights and the filters."""
    return (SEED, 0, steps, segment, FIRE_RATE, 0.1 if alive else None, ALPHA, padding, "ieee",
            bank, filter_grad)


# The checkpoint options as the layer resolves them: each distinct (steps, segment) is checked
# once, and its id names every checkpoint option that leads to it.
def _distinct_cases():
    cases = {}
    for steps in (1, 2, 3):
        for checkpoint in (None, "sqrt", 2):
            segment = resolve_checkpoint(checkpoint, steps) or 1
            cases.setdefault((steps, segment), []).append(str(checkpoint))
    return [pytest.param(steps, segment, id=f"steps{steps}-seg{segment}({','.join(names)})")
            for (steps, segment), names in cases.items()]


CASES = _distinct_cases()


@pytest.mark.parametrize("alive", [True, False], ids=["alive", "no-alive"])
@pytest.mark.parametrize("steps,segment", CASES)
def test_opcheck_rollout(steps, segment, alive):
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in _case()]
    filters = filter_tensor(CFG, device=DEVICE)
    args = (x, w1, b1, w2, b2, filters) + _op_args(steps, segment, alive)
    # Every check of opcheck's default set; aot_dispatch_dynamic also runs the backward op.
    torch.library.opcheck(torch.ops.nca_fast.rollout.default, args)


@pytest.mark.parametrize("alive", [True, False], ids=["alive", "no-alive"])
@pytest.mark.parametrize("steps,segment", CASES)
def test_opcheck_rollout_backward(steps, segment, alive):
    x, w1, b1, w2, b2 = _case()
    filters = filter_tensor(CFG, device=DEVICE)
    scalars = _op_args(steps, segment, alive)
    out, states, qs, cws, keep = torch.ops.nca_fast.rollout(x, w1, b1, w2, b2, filters,
                                                            *scalars)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    op = torch.ops.nca_fast.rollout_backward.default

    def args(requires_grad):
        ts = [t.clone().requires_grad_(requires_grad) for t in (grad, x, w1, b1, w2, b2)]
        return tuple(ts) + (filters, states, qs, cws, keep) + scalars

    torch.library.opcheck(op, args(True), test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor"))
    # The rest of the default set, test_aot_dispatch_dynamic, with inputs that do not require
    # grad: with grad it would differentiate the backward itself (a double backward), which
    # the op does not support (the rollout is once-differentiable; no formula is registered).
    torch.library.opcheck(op, args(False), test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
@pytest.mark.parametrize("form", ["shared", "depthwise"])
def test_opcheck_learned_filters(form, padding):
    """Filters that need a gradient (a learned bank, read as data): the op's every default
    check, the backward's gradient of the filters included."""
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in _case()]
    filters = filter_tensor(CFG, device=DEVICE)
    if form == "depthwise":
        filters = filters[:, None].repeat(1, CFG.channels, 1, 1)
    filters = (filters + 0.1 * torch.randn(filters.shape, generator=torch.Generator()
                                           .manual_seed(3)).to(DEVICE)).requires_grad_()
    args = (x, w1, b1, w2, b2, filters) + _op_args(2, 1, True, padding, 0, True)
    torch.library.opcheck(torch.ops.nca_fast.rollout.default, args)


def _reference_grads(tensors, steps, probe):
    ts = [t.clone().requires_grad_() for t in tensors]
    ref = reference.rollout(*ts, CFG, steps, SEED)
    (ref * probe).sum().backward()
    return ref.detach(), [t.grad for t in ts]


def test_one_step_rollout_is_differentiable():
    """A one-step rollout's backward returns four gradients that are not views of one
    buffer."""
    tensors = _case(seed=2)
    ts = [t.clone().requires_grad_() for t in tensors]
    filters = filter_tensor(CFG, device=DEVICE)
    out = rollout(*ts, filters, seed=SEED, steps=1, precision="ieee")
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out * probe).sum().backward()
    ref, ref_grads = _reference_grads(tensors, 1, probe)
    assert_close_verbose(out, ref, *tolerance(torch.float32, "ieee", "state"), name="state")
    atol, rtol = tolerance(torch.float32, "ieee", "grad")
    for name, t, g in zip(("x", "w1", "b1", "w2", "b2"), ts, ref_grads):
        assert g.abs().max() > 0, f"{name}: the reference gradient is zero; the check is void"
        assert_close_verbose(t.grad, g, atol * g.abs().max().item(), rtol, f"grad {name}")


@pytest.mark.parametrize("alive", [True, False], ids=["alive", "no-alive"])
def test_backward_leaves_a_channels_last_incoming_gradient_untouched(alive):
    """The backward's gradient buffers are its own: with three steps both are written, and a
    channels-last incoming gradient (contiguous once permuted) must not be one of them."""
    tensors = _case(seed=8)
    ts = [t.clone().requires_grad_() for t in tensors]
    filters = filter_tensor(CFG, device=DEVICE)
    out = rollout(*ts, filters, seed=SEED, steps=3, precision="ieee",
                  alive_threshold=0.1 if alive else None)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    probe = probe.contiguous(memory_format=torch.channels_last)
    kept = probe.clone()
    out.backward(probe)
    assert torch.equal(probe, kept), "the backward wrote into the incoming gradient"
    assert ts[0].grad.abs().max() > 0


def test_hand_written_loop_of_one_step_calls_trains():
    """The drop-in use: ``for t in range(T): x = model(x)``, then backward, on the kernels."""
    model = NCA(CFG, backend="triton").to(DEVICE)
    torch.nn.init.normal_(model.w2.weight, std=0.05)
    x0 = _case(seed=4)[0]
    x = x0
    for t in range(3):
        x = model(x, seed=SEED, first_step=t)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (x * probe).sum().backward()
    loop = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(x0, 3, seed=SEED) * probe).sum().backward()
    atol, rtol = tolerance(torch.float32, "ieee", "grad")
    for (name, p), g in zip(model.named_parameters(), loop):
        assert p.grad.abs().max() > 0, name
        assert_close_verbose(g, p.grad, atol * p.grad.abs().max().item(), rtol, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_steps_returns_a_new_tensor(backend):
    """``steps=0`` returns a copy of the input, never the input object itself."""
    model = NCA(CFG, backend=backend).to(DEVICE)
    x = _case()[0].requires_grad_()
    y = model(x, 0, seed=0)
    assert y is not x and y.data_ptr() != x.data_ptr()
    assert torch.equal(y, x)
    if backend == "triton":
        assert y.is_contiguous(memory_format=torch.channels_last)    # like every other result
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    with torch.no_grad():
        y.add_(1)
    assert torch.equal(x.detach() + 1, y.detach()), "changing the result changed the input"


@pytest.mark.parametrize("learn", [None, "depthwise"], ids=["fixed", "learned"])
def test_compiled_fullgraph_one_step_forward_and_backward(learn):
    """torch.compile(fullgraph=True) through AOTAutograd: one step (learned filters with a
    bias too: their checks and the bias fold stay inside the graph)."""
    cfg = CFG.replace(learn_filters=learn, filter_bias=learn is not None)
    model = NCA(cfg, backend="triton").to(DEVICE)
    torch.nn.init.normal_(model.w2.weight, std=0.05)
    x0 = _case(seed=6)[0]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = []
    for run in (compiled, model):
        model.zero_grad()
        x = x0.clone().requires_grad_()
        run(x, 1, seed=SEED).pow(2).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
