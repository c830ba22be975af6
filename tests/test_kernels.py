"""The fused Triton step against the PyTorch reference.

On a CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a CUDA machine
the same tests run on the GPU, with the precision-specific tolerances of tests/tolerances.py.
"""
import os

import pytest
import torch

import nca_fast
from nca_fast import NCA, NCAConfig, reference, rng
from nca_fast.config import filter_tensor
from nca_fast.functional import rollout
from nca_fast.kernels import configs
from nca_fast.kernels.step_bwd import nca_step_bwd
from nca_fast.kernels.step_fwd import hq_plane, nca_step_fwd
from tolerances import FP64_KERNELS, assert_close_verbose, tolerance

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest before importing kernels)",
                allow_module_level=True)


def random_case(cfg, batch, height, width, dtype=torch.float32, seed=0):
    """A state with sparse alpha (so both alive masks bite) and weights large enough that
    updates cross the threshold."""
    g = torch.Generator().manual_seed(seed)
    c, f, hid = cfg.channels, cfg.num_filters, cfg.hidden
    x = torch.rand(batch, c, height, width, generator=g, dtype=dtype)
    a = torch.rand(batch, height, width, generator=g, dtype=dtype)
    x[:, cfg.alpha_channel] = torch.where(a > 0.55, a, torch.zeros_like(a))
    w1 = torch.randn(hid, f * c, generator=g, dtype=dtype) * (1.0 / (f * c) ** 0.5)
    b1 = torch.randn(hid, generator=g, dtype=dtype) * 0.1
    w2 = torch.randn(c, hid, generator=g, dtype=dtype) * (0.5 / hid ** 0.5)
    b2 = torch.randn(c, generator=g, dtype=dtype) * 0.05
    return [t.to(DEVICE) for t in (x, w1, b1, w2, b2)]


def run_both(cfg, x, w1, b1, w2, b2, steps, seed=7, first_step=0, segment=None):
    filt = filter_tensor(cfg, dtype=x.dtype, device=x.device)
    kw = dict(fire_rate=cfg.fire_rate, alive_threshold=cfg.alive_threshold,
              alpha_channel=cfg.alpha_channel, padding=cfg.padding,
              precision=cfg.precision)
    out = rollout(x, w1, b1, w2, b2, filt, seed=seed, steps=steps, first_step=first_step,
                  segment=segment, **kw)
    ref = reference.rollout(x, w1, b1, w2, b2, cfg, steps, seed, first_step=first_step)
    return out, ref


FORWARD_CASES = [
    dict(padding=p, alive_threshold=a, channels=c, hidden=32, filters=f)
    for p in ("zeros", "circular") for a in (0.1, None) for c in (16, 32)
    for f in ("sobel", "sobel_laplacian")
] + [dict(hidden=h) for h in (64, 128, 256)]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda d: "-".join(f"{v}" for v in d.values()))
def test_forward_matches_reference(case):
    cfg = NCAConfig(precision="ieee", **case)
    x, *w = random_case(cfg, 2, 5, 7)
    out, ref = run_both(cfg, x, *w, steps=3)
    atol, rtol = tolerance(torch.float32, "ieee", "state")
    assert_close_verbose(out, ref, atol, rtol, "state after 3 steps")
    if cfg.alive_masking:
        # the masks must actually have killed and kept cells for this test to mean anything
        alive_cells = (ref[:, cfg.alpha_channel] != 0).float().mean().item()
        assert 0.05 < alive_cells < 0.95, alive_cells


@pytest.mark.parametrize("size", [(1, 1, 1), (1, 3, 17), (3, 11, 2), (1, 13, 13)])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_odd_sizes(size, padding):
    cfg = NCAConfig(precision="ieee", hidden=32, padding=padding)
    x, *w = random_case(cfg, *size, seed=3)
    out, ref = run_both(cfg, x, *w, steps=2)
    assert_close_verbose(out, ref, *tolerance(torch.float32, "ieee", "state"), name=str(size))


GRAD_CASES = [
    dict(padding="zeros", alive_threshold=0.1, channels=16, hidden=32, filters="sobel"),
    dict(padding="circular", alive_threshold=None, channels=16, hidden=64, filters="sobel_laplacian"),
    dict(padding="circular", alive_threshold=0.1, channels=32, hidden=32, filters="sobel"),
    dict(padding="zeros", alive_threshold=None, channels=32, hidden=128, filters="sobel_laplacian"),
    dict(padding="zeros", alive_threshold=0.1, channels=16, hidden=256, filters="sobel_laplacian"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda d: "-".join(f"{v}" for v in d.values()))
def test_gradients_match_reference(case):
    cfg = NCAConfig(precision="ieee", **case)
    tensors = random_case(cfg, 2, 6, 5, seed=1)
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.clone().requires_grad_() for t in tensors]
    out, _ = run_both(cfg, *ours, steps=3)
    _, ref = run_both(cfg, *theirs, steps=3)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    atol, rtol = tolerance(torch.float32, cfg.precision, "grad")
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), ours, theirs):
        scale = b.grad.abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero, the test would prove nothing"
        assert_close_verbose(a.grad, b.grad, atol * scale, rtol, f"grad {name}")


@FP64_KERNELS
@pytest.mark.parametrize("alive,padding", [(0.1, "zeros"), (None, "circular")])
def test_gradcheck_fp64(alive, padding):
    cfg = NCAConfig(precision="ieee", hidden=32, padding=padding, alive_threshold=alive)
    x, w1, b1, w2, b2 = random_case(cfg, 1, 3, 4, dtype=torch.float64, seed=2)
    if alive is not None:
        # keep alpha away from the threshold so finite differences never flip a mask
        a = x[:, cfg.alpha_channel]
        x[:, cfg.alpha_channel] = torch.where(a > 0, 0.5 + a, a)
    filt = filter_tensor(cfg, dtype=torch.float64, device=DEVICE)

    def f(x, w1, b1, w2, b2):
        return rollout(x, w1, b1, w2, b2, filt, seed=4, steps=2, alive_threshold=alive,
                       padding=padding, precision="ieee")

    inputs = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    # fast mode: checks random projections of the Jacobian, a handful of evaluations instead of
    # one per input element (thousands of interpreted kernel launches)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def _launch_args(cfg, w1, b1, w2, b2):
    from nca_fast.functional import _kernel_weights

    w1k, w2t = _kernel_weights(w1, w2, cfg.num_filters)
    filt = filter_tensor(cfg, dtype=w1.dtype, device=w1.device).reshape(-1, 9)
    kw = dict(fire_threshold=rng.fire_threshold(cfg.fire_rate),
              alive_threshold=cfg.alive_threshold, alpha_channel=cfg.alpha_channel,
              padding=cfg.padding, precision=cfg.precision)
    return (w1k, b1, w2t, b2, filt), kw


def test_update_mask_forward_and_backward_agree_with_rng():
    """The forward's mask (read off with an update of exactly 1) and the mask the backward
    regenerates (read off dW2 with a one-hot incoming gradient) both equal nca_fast.rng's."""
    cfg = NCAConfig(precision="ieee", hidden=32, alive_threshold=None, fire_rate=0.5)
    B, H, W, C = 2, 2, 4, 16                        # 16 cells: one channel each
    x = torch.rand(B, H, W, C, device=DEVICE)
    w1 = torch.zeros(32, 3 * C, device=DEVICE)
    b1 = torch.ones(32, device=DEVICE)
    w2 = torch.zeros(C, 32, device=DEVICE)
    b2 = torch.ones(C, device=DEVICE)
    params, kw = _launch_args(cfg, w1, b1, w2, b2)
    for step in (0, 1, 1000):
        expected = rng.update_mask(B, H, W, fire_rate=0.5, seed=99, step=step).flatten()
        out, _ = nca_step_fwd(x, None, *params, seed=99, step=step, **kw)
        fwd_mask = (out - x)[..., 0].round().flatten().cpu()
        g = torch.eye(C, device=DEVICE).reshape(B, H, W, C)   # cell i -> channel i
        _, _, _, dw2t, _ = nca_step_bwd(x, None, g, *params, seed=99, step=step, **kw)
        bwd_mask = dw2t[0].cpu()                    # h = relu(b1) = 1: dW2[j, c] = fire[c]
        assert torch.equal(fwd_mask, expected), step
        assert torch.equal(bwd_mask, expected), step
        assert 0 < expected.sum() < 16, "a mask of all or nothing would prove little"


def test_every_element_written():
    cfg = NCAConfig(precision="ieee", hidden=32)
    x, *w = random_case(cfg, 2, 7, 9, seed=4)
    r = x.permute(0, 2, 3, 1).contiguous()
    params, kw = _launch_args(cfg, *w)
    B, H, W, _ = r.shape

    def poisoned():
        q = hq_plane(B, H, W, DEVICE)          # the border must be zero; the interior is not
        q[:, 2:-2, 2:-2] = 7
        return (torch.full_like(r, float("nan")), q,
                torch.full((B, H, W), -1, dtype=torch.int16, device=DEVICE))

    out, q_out, cw = poisoned()
    out, q = nca_step_fwd(r, None, *params, seed=1, step=0, out=out, q_out=q_out, cw_out=cw, **kw)
    out2, q_out2, cw2 = poisoned()
    out2, q2 = nca_step_fwd(out, q, *params, seed=1, step=1, out=out2, q_out=q_out2, cw_out=cw2,
                            **kw)
    for o, hq, words in ((out, q, cw), (out2, q2, cw2)):
        assert not o.isnan().any()
        assert set(hq[:, 2:-2, 2:-2].unique().tolist()) <= {0, 1, 2, 3}
        border = hq.clone()
        border[:, 2:-2, 2:-2] = 0
        assert not border.any(), "a kernel wrote into the hq plane's border"
        assert ((words >= 0) & (words < 1024)).all()
    grad_r = torch.full_like(r, float("nan"))
    g = torch.randn_like(r)
    grad_r, *dw = nca_step_bwd(out, q, g, *params, seed=1, step=1, grad_r=grad_r, cw=cw2, **kw)
    assert not grad_r.isnan().any()
    assert all(not t.isnan().any() for t in dw)


@pytest.mark.parametrize("capability,precision,channels,filters,split", [
    ((9, 0), "tf32", 16, 3, True),
    ((10, 0), "bf16", 16, 4, True),
    ((8, 0), "tf32", 16, 3, False),   # sm_80: the whole tile at once, weights per tile
    ((8, 0), "bf16", 16, 3, False),   # sm_80: the whole tile at once, 8 warps
    ((9, 0), "ieee", 16, 3, False),   # FMA dots
    ((9, 0), "tf32", 32, 4, False),   # weights per tile
])
def test_forward_splits_rows_on_sm90_tensor_cores(monkeypatch, capability, precision, channels,
                                                  filters, split):
    """The GPU forward runs its dense layers on the tile's two halves of rows (in chunks of 128
    hidden units) for tensor cores with resident weights on sm_90 and later only; the
    interpreter never does."""
    monkeypatch.setattr(configs, "TARGET_CAPABILITY", capability)
    assert not configs.select_forward(1024, channels, 256, filters, None, precision).split_rows
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = configs.select_forward(1024, channels, 256, filters, None, precision)
    assert cfg.split_rows == split
    wide = channels * filters >= 96
    # chunks of 128 split (or at 8 warps on sm_80 in bf16), of 32 for the wide inputs' weights
    # per tile, else of 64
    big = split or (precision == "bf16" and capability < (9, 0))
    assert cfg.hidden_chunk == (128 if big else 32 if wide and precision != "ieee" else 64)
    assert cfg.resident == (split or precision in ("ieee", "bf16"))


def test_int64_offsets_give_the_same_result(monkeypatch):
    assert not configs.needs_int64(2**31 // 16 - 1, 16, 128, 1)
    assert configs.needs_int64(2**31 // 16, 16, 128, 1)
    # the backward's perception-gradient scratch is F*C per cell: it decides first
    assert configs.needs_int64(-(-2**31 // 48), 16, 128, 3)
    assert not configs.needs_int64(2**31 // 48, 16, 128, 3)
    assert configs.select_forward(16384 * 16384 * 8, 16, 128, 3).int64
    assert not configs.select_forward(1024 * 1024 * 8, 16, 128, 3).int64
    cfg = NCAConfig(precision="ieee", hidden=32)
    x, *w = random_case(cfg, 2, 5, 6, seed=6)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for i, force in enumerate((False, True)):
        if force:
            monkeypatch.setattr(configs, "needs_int64", lambda *a: True)
        out, _ = run_both(cfg, xs[i], *w, steps=2)
        out.sum().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(xs[0].grad, xs[1].grad)


def test_backward_is_bitwise_deterministic():
    cfg = NCAConfig(precision="ieee", hidden=64)
    tensors = random_case(cfg, 2, 9, 8, seed=8)
    grads = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in tensors]
        out, _ = run_both(cfg, *ts, steps=2)
        (out ** 2).sum().backward()
        grads.append([t.grad for t in ts])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_noncontiguous_input():
    cfg = NCAConfig(precision="ieee", hidden=32)
    x, *w = random_case(cfg, 2, 6, 14, seed=9)
    view = x[:, :, :, ::2]                       # strided along W
    assert not view.is_contiguous()
    out, ref = run_both(cfg, view, *w, steps=2)
    assert_close_verbose(out, ref, *tolerance(torch.float32, "ieee", "state"), name="strided")
    cl = x.contiguous(memory_format=torch.channels_last)
    out2, ref2 = run_both(cfg, cl, *w, steps=2)
    assert_close_verbose(out2, ref2, *tolerance(torch.float32, "ieee", "state"), name="chlast")


def test_module_triton_backend_matches_torch_backend():
    cfg = NCAConfig(precision="ieee", hidden=64)
    a = NCA(cfg, backend="triton").to(DEVICE)
    torch.nn.init.normal_(a.w2.weight, std=0.05)
    b = NCA(cfg, backend="torch").to(DEVICE)
    b.load_state_dict(a.state_dict())
    x = a.seed_state(2, 9, 10)
    ya, fa = a(x, 6, seed=3, frames=2)
    yb, fb = b(x, 6, seed=3, frames=2)
    assert len(fa) == len(fb) == 4
    assert_close_verbose(ya, yb, *tolerance(torch.float32, "ieee", "state"), name="module")
    assert ya.is_contiguous(memory_format=torch.channels_last)


def _precision_run(prec, monkeypatch=None):
    """A 2-step rollout and its backward at ``prec``: (output, reference, precisions the
    forward and backward launches were given)."""
    from nca_fast.kernels import step_bwd, step_fwd

    seen = []
    if monkeypatch is not None:
        for module, name in ((step_fwd, "launch_fwd"), (step_bwd, "bwd_gp"),
                             (step_bwd, "bwd_weights")):
            def wrapper(*args, _real=getattr(module, name), _name=name, **kwargs):
                seen.append((_name, kwargs["spec"].precision))
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, name, wrapper)
    model = NCA(NCAConfig(precision=prec, hidden=32), backend="triton").to(DEVICE)
    x, *w = random_case(model.config, 1, 5, 5, seed=10)
    with torch.no_grad():
        for p, t in zip(model.weights(), w):
            p.copy_(t.reshape(p.shape))
    out = model(x.requires_grad_(True), 2, seed=7)
    out.pow(2).sum().backward()
    ref = reference.rollout(x.detach(), *w, model.config, 2, 7)
    return out.detach(), ref, seen


def test_precision_reaches_every_launch(monkeypatch):
    """The model's precision is what every forward and backward launch gets, and it changes
    the dots: a precision dropped on the way would give ieee's result."""
    outs = {}
    for prec in ("ieee", "tf32", "bf16"):
        outs[prec], ref, seen = _precision_run(prec, monkeypatch)
        assert {n for n, _ in seen} == {"launch_fwd", "bwd_gp", "bwd_weights"}
        assert {p for _, p in seen} == {prec}, seen
        monkeypatch.undo()
    assert not torch.equal(outs["bf16"], outs["ieee"])


@pytest.mark.parametrize("prec", ["tf32", "bf16"])
def test_reduced_precision_accuracy(prec):
    """Within the precision's tolerance of the fp32 reference (the interpreter computes bf16
    dots wrongly: that one is a GPU check)."""
    if prec == "bf16" and not CUDA:
        pytest.skip("needs CUDA: Triton 3.6's interpreter computes bf16 dots wrongly (a 16 x 16 "
                    "bf16 tl.dot is off by ~4e9), so bf16 accuracy is a GPU check")
    out, ref, _ = _precision_run(prec)
    assert_close_verbose(out, ref, *tolerance(torch.float32, prec, "state"), name=prec)


def test_errors_name_the_problem(monkeypatch):
    cfg = NCAConfig(hidden=32)
    x, w1, b1, w2, b2 = random_case(cfg, 1, 4, 4)
    filt = filter_tensor(cfg, device=DEVICE)
    with pytest.raises(TypeError, match="w1"):
        rollout(x, w1.double(), b1, w2, b2, filt, seed=0, steps=1)
    with pytest.raises(ValueError, match="w2"):
        rollout(x, w1, b1, w2.to("meta"), b2, filt, seed=0, steps=1)
    with pytest.raises(ValueError, match="bank: expected -1, 0 or a named bank's code"):
        rollout(x, w1, b1, w2, b2, filt, seed=0, steps=1, bank=2)     # 2: four filters
    for field, big in (("channels", dict(channels=48)), ("hidden", dict(hidden=300))):
        bad = NCA(NCAConfig(**big), backend="triton").to(DEVICE)
        with pytest.raises(ValueError, match=f"^{field}: .*at most .*backend='torch'"):
            bad(bad.seed_state(1, 4, 4), 1, seed=0)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        m = NCA(cfg, backend="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            m(m.seed_state(1, 4, 4), 1, seed=0)


def test_a_perception_gradient_buffer_without_its_border_is_refused():
    """The backward's gp buffer has a zero border ([B, H + 2, W + 2, F, C]); one shaped as the
    grid's cells is refused, naming gp, before any launch: read as bordered it would be
    silently wrong."""
    from nca_fast.kernels import step_bwd, step_bwd_filters
    from nca_fast.kernels.spec import StepSpec

    B, H, W, C, F_ = 1, 4, 5, 16, 3
    flat = torch.zeros(B * H * W, F_, C, device=DEVICE)
    cw = torch.zeros(B, H, W, dtype=torch.int16, device=DEVICE)
    g = torch.zeros(B, H, W, C, device=DEVICE)
    taps = filter_tensor(NCAConfig(), device=DEVICE).reshape(F_, 9)
    with pytest.raises(ValueError, match=r"^gp: expected a contiguous \[B, H \+ 2, W \+ 2"):
        step_bwd.bwd_input(flat, cw, g, taps, (B, H, W, C), padding="zeros")
    parts = step_bwd_filters.new_filter_parts(B, H, W, C, F_, DEVICE)
    with pytest.raises(ValueError, match="^gp: expected"):
        step_bwd_filters.bwd_filters(g, cw, flat, parts, spec=StepSpec(padding="zeros"))
    good = step_bwd.gp_buffer(B, H, W, F_, C, torch.float32, DEVICE)
    assert tuple(good.shape) == (B, H + 2, W + 2, F_, C) and not good.any()


def test_float64_is_refused_before_any_launch_when_compiled(monkeypatch):
    """Compiled kernels have no float64 dots: refused with the reason, nothing launched."""
    from nca_fast.kernels import step_fwd

    launched = []
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(step_fwd, "launch_fwd", lambda *a, **k: launched.append(1))
    cfg = NCAConfig(hidden=32, precision="ieee")
    x, w1, b1, w2, b2 = random_case(cfg, 1, 4, 4, dtype=torch.float64)
    filt = filter_tensor(cfg, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match=r"^r: float64 runs only in Triton's interpreter"):
        rollout(x, w1, b1, w2, b2, filt, seed=0, steps=2, precision="ieee")
    model = NCA(cfg, backend="triton").to(device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        model(x, 1, seed=0)
    assert not launched


@pytest.mark.parametrize("learn", [None, "shared"], ids=["fixed", "learned"])
def test_torch_compile_sees_one_op_and_no_graph_break(learn):
    cfg = NCAConfig(precision="ieee", hidden=32, learn_filters=learn)
    m = NCA(cfg, backend="triton").to(DEVICE)
    torch.nn.init.normal_(m.w2.weight, std=0.05)
    x = m.seed_state(1, 6, 6)
    ops = []

    def counting_backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(m, backend=counting_backend, fullgraph=True)
    y = compiled(x, 3, seed=5)
    assert sum("nca_fast.rollout" in o for o in ops) == 1, ops
    assert torch.equal(y, m(x, 3, seed=5))


GROW_DEFAULT = ["ex1_lizard"]
GROW_ALL = [f"ex{e}_{n}" for e in (1, 2, 3) for n in (
    "lizard", "smiley", "boom", "eye", "fish", "butterfly", "ladybug", "web", "pretzel", "tree")]


def _grow(distill_dir, name, backend):
    model = nca_fast.load_distill(distill_dir / f"{name}.json")
    model.backend = backend
    model.config = model.config.replace(precision="ieee" if not CUDA else "tf32")
    model.to(DEVICE)
    x = model.seed_state(1, 72, 72)
    with torch.no_grad():
        return model(x, 96, seed=0)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[] if n in GROW_DEFAULT else [pytest.mark.slow]) for n in GROW_ALL])
def test_distill_model_grows_with_triton(distill_dir, name):
    from nca_fast.media import load_distill_target

    target = load_distill_target(name.split("_", 1)[1], distill_dir / "emoji_targets.png",
                                 pad=16).to(DEVICE)
    out = _grow(distill_dir, name, "triton")
    mse = ((out[0, :4] - target) ** 2).mean().item()
    assert mse < 0.01, f"{name}: MSE {mse:.4f}"


@pytest.mark.parametrize("hidden,chunk,rows,resident,precision,split", [
    (64, 16, 32, True, "ieee", False),   # 4 chunks resident; the weight kernel in two row blocks
    (64, 32, 64, False, "ieee", False),  # weights staged per tile
    (32, 32, 64, True, "ieee", False),   # a hidden layer smaller than the weight kernel's 64 rows
    (64, 16, 64, False, "tf32", False),  # tensor-core dots: weights per tile, a loop of 4 chunks
    (64, 32, 64, True, "tf32", True),    # sm_90's forward: the dense layers on two halves of rows
])
def test_hidden_chunks_and_row_blocks(monkeypatch, hidden, chunk, rows, resident, precision,
                                      split):
    """The launch configurations a GPU picks for wider models (hidden in chunks, weights staged
    per tile, the weight kernel's rows split or padded) give the reference's results: forced
    here on the interpreter's large tiles."""
    import dataclasses

    def forced(select, hc):
        def pick(*args, **kwargs):
            cfg = dataclasses.replace(select(*args, **kwargs), hidden_chunk=hc,
                                      resident=resident)
            return dataclasses.replace(cfg, split_rows=split) if select is fwd else cfg
        return pick

    fwd = configs.select_forward
    monkeypatch.setattr(configs, "select_forward", forced(fwd, chunk))
    monkeypatch.setattr(configs, "select_backward", forced(configs.select_backward, chunk))
    monkeypatch.setattr(configs, "select_weights", forced(configs.select_weights, rows))
    cfg = NCAConfig(precision=precision, hidden=hidden, filters="sobel_laplacian")
    tensors = random_case(cfg, 2, 6, 5, seed=11)
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.clone().requires_grad_() for t in tensors]
    out, _ = run_both(cfg, *ours, steps=2)
    _, ref = run_both(cfg, *theirs, steps=2)
    assert_close_verbose(out, ref, *tolerance(torch.float32, precision, "state"), name="state")
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    atol, rtol = tolerance(torch.float32, precision, "grad")
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), ours, theirs):
        scale = b.grad.abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero"
        assert_close_verbose(a.grad, b.grad, atol * scale, rtol, f"grad {name}")


@pytest.mark.parametrize("filters", ["sobel", "sobel_laplacian16"])
def test_layer_reads_no_taps_back_from_the_device(monkeypatch, filters):
    """The layer knows its bank from the config: no op copies the filters to the host (a sync
    per rollout on a GPU); the code it passes is the one the taps give."""
    cfg = NCAConfig(hidden=32, precision="ieee", filters=filters)
    model = NCA(cfg, backend="triton").to(DEVICE)
    want = configs.bank_code(model.filters)
    assert want in (1, 3) and configs.named_bank(cfg.filters) == want
    calls = []
    real = configs.bank_code
    monkeypatch.setattr(configs, "bank_code", lambda f: calls.append(f.dtype) or real(f))
    x = random_case(cfg, 1, 4, 5)[0].requires_grad_()
    model(x, 2, seed=1).sum().backward()
    assert x.grad.abs().max() > 0
    assert calls == [], "an op read the filters back from the device"


def test_named_banks_are_the_configs_banks():
    """The banks the kernels hold as constants are the taps nca_fast.config names, exactly:
    defined once, in kernels/spec.py."""
    from nca_fast.config import FILTER_BANKS
    from nca_fast.kernels import spec

    assert FILTER_BANKS is spec.FILTER_BANKS
    assert configs.NAMED_BANKS == {code: FILTER_BANKS[name]
                                   for name, code in spec.BANK_CODES.items()}

    names = {1: "sobel", 2: "sobel_laplacian", 3: "sobel_laplacian16"}
    for code, name in names.items():
        taps = torch.tensor(FILTER_BANKS[name])
        assert configs.bank_code(taps) == code
        assert configs.bank_code(taps.reshape(-1, 9)) == code
    nearly = torch.tensor(FILTER_BANKS["sobel"]).clone()
    nearly[1, 0, 0] += 1e-6
    assert configs.bank_code(nearly) == 0
    for code, name in names.items():                        # the same from plain numbers
        assert configs.named_bank(FILTER_BANKS[name]) == code
        assert configs.named_bank(torch.tensor(FILTER_BANKS[name]).reshape(-1, 9).tolist()) == code
    assert configs.named_bank(nearly.tolist()) == 0


@pytest.mark.parametrize("config", [
    # Self-Organising Textures' model: 12 channels, 96 hidden units, no alive mask, circular
    dict(channels=12, hidden=96, filters="sobel_laplacian", alive_threshold=None,
         padding="circular", last_bias=False),
    dict(channels=3, hidden=8, alpha_channel=2),
    dict(channels=20, hidden=40, fire_rate=1.0),
], ids=["textures", "c3-h8", "c20-h40"])
def test_sizes_between_the_kernels_own_run_zero_padded(config):
    """Channels and hidden units other than the kernels' compiled sizes run zero-padded (exact:
    a padded channel stays zero, a padded unit is zero): state and every gradient match the
    torch backend, and the result keeps the user's channel count, channels-last."""
    cfg = NCAConfig(precision="ieee", **config)
    torch.manual_seed(3)
    fast = NCA(cfg, backend="triton").to(DEVICE)
    with torch.no_grad():
        fast.w2.weight.normal_(0, 0.1)
        if fast.w2.bias is not None:
            fast.w2.bias.normal_(0, 0.02)
    slow = NCA(cfg, backend="torch").to(DEVICE)
    slow.load_state_dict(fast.state_dict())
    x = fast.seed_state(2, 11, 9)
    x[:, :] += 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for model in (fast, slow):
        xi = x.clone().requires_grad_()
        y = model(xi, 3, seed=11)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
        results.append((y, xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = results
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    atol, rtol = tolerance(torch.float32, "ieee", "state")
    assert_close_verbose(y, y_ref, atol, rtol, "state")
    atol, rtol = tolerance(torch.float32, "ieee", "grad")
    assert_close_verbose(gx, gx_ref, atol, rtol, "grad x")
    for name, g in grads.items():
        assert_close_verbose(g, grads_ref[name], atol, rtol, f"grad {name}")
