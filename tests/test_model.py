"""The NCA layer's contract: argument checking, frames, identity at init, checkpointing, layouts."""
import pytest
import torch

import nca_fast
from nca_fast import NCA, NCAConfig

from cases import random_model


def _state(model, b=2, h=12, w=15, seed=1):
    """A seed with some random live structure around it, so every mask path is exercised."""
    g = torch.Generator().manual_seed(seed)
    x = model.seed_state(b, h, w)
    blob = torch.rand(b, model.config.channels, 5, 5, generator=g)
    x[:, :, h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 3] += blob
    return x


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(16, 8, 8), (1, 1, 16, 8, 8), (16,)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"x: expected a 4-D"):
        NCA()(torch.zeros(shape), 1, seed=0)


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"x: expected 16 channels.*got 12"):
        NCA()(torch.zeros(1, 12, 8, 8), 1, seed=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match=r"x: expected a floating-point"):
        NCA()(torch.zeros(1, 16, 8, 8, dtype=dtype), 1, seed=0)


def test_dtype_other_than_parameters():
    with pytest.raises(TypeError, match=r"x: dtype torch.float64"):
        NCA()(torch.zeros(1, 16, 8, 8, dtype=torch.float64), 1, seed=0)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        NCA()([[0.0]], 1, seed=0)


def test_mismatched_devices():
    x = torch.zeros(1, 16, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"x: on meta but the parameters are on cpu"):
        NCA(backend="torch")(x, 1, seed=0)


def test_empty_grid():
    with pytest.raises(ValueError, match="x: expected non-empty"):
        NCA()(torch.zeros(0, 16, 8, 8), 1, seed=0)


@pytest.mark.parametrize("field,value", [
    ("channels", 0), ("channels", 2.5), ("channels", True),
    ("hidden", -1), ("hidden", "128"),
    ("fire_rate", 1.5), ("fire_rate", -0.1), ("fire_rate", "half"),
    ("alive_threshold", -0.1), ("alive_threshold", float("nan")),
    ("alpha_channel", 16), ("alpha_channel", -1),
    ("filters", "prewitt"), ("filters", [[[1, 2], [3, 4]]]), ("filters", []),
    ("filters", [[[0, 0, 0], [0, float("inf"), 0], [0, 0, 0]]]),
    ("padding", "mirror"),
    ("precision", "fp8"),
    ("last_bias", 0), ("last_bias", "no"),
])
def test_bad_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        NCAConfig(**{field: value})


def test_bad_config_and_backend_for_the_module():
    with pytest.raises(TypeError, match="config"):
        NCA({"channels": 16})
    with pytest.raises(ValueError, match="backend"):
        NCA(backend="cuda")
    with pytest.raises(ValueError, match=r"config: unknown fields \['chanels'\]"):
        NCAConfig.from_dict({"chanels": 16})


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": -1}, "steps"), ({"steps": 2.0}, "steps"), ({"steps": True}, "steps"),
    ({"steps": "3"}, "steps"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": 1.0}, "seed"),
    ({"seed": True}, "seed"),
    ({"checkpoint": "cbrt"}, "checkpoint"), ({"checkpoint": 0}, "checkpoint"),
    ({"checkpoint": -4}, "checkpoint"), ({"checkpoint": 2.5}, "checkpoint"),
    ({"frames": 0}, "frames"), ({"frames": -2}, "frames"), ({"frames": True}, "frames"),
    ({"frames": 1.5}, "frames"),
])
def test_bad_rollout_arguments(kwargs, match):
    model = NCA(backend="torch")
    args = {"steps": 2, "seed": 0, **kwargs}
    steps = args.pop("steps")
    with pytest.raises(ValueError, match=f"^{match}:"):
        model(model.seed_state(1, 8, 8), steps, **args)


@pytest.mark.parametrize("name,args", [
    ("batch", (0, 8, 8)), ("height", (1, -1, 8)), ("width", (1, 8, 2.0)),
])
def test_bad_seed_state_arguments(name, args):
    with pytest.raises(ValueError, match=f"^{name}:"):
        NCA().seed_state(*args)


# --------------------------------------------------------------------------- behaviour
def test_new_model_is_identity_on_the_seed():
    model = NCA(backend="torch")
    assert (model.w2.weight == 0).all() and (model.w2.bias == 0).all()
    assert model.w1.weight.abs().sum() > 0                 # w1 is initialised, only w2 is zero
    seed = model.seed_state(2, 9, 11)
    with torch.no_grad():
        assert torch.equal(model(seed, 30, seed=4), seed)


def test_parameter_count_and_layout():
    model = NCA()
    assert sum(p.numel() for p in model.parameters()) == 8336      # the spec's count
    assert tuple(model.w1.weight.shape) == (128, 48, 1, 1)
    assert tuple(model.w2.weight.shape) == (16, 128, 1, 1)
    assert sorted(model.state_dict()) == ["w1.bias", "w1.weight", "w2.bias", "w2.weight"]


def test_zero_steps_returns_a_copy_of_the_input():
    model = random_model()
    x = _state(model)
    y = model(x, 0, seed=0)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_same_seed_same_result_different_seed_different():
    model = random_model()
    x = _state(model)
    with torch.no_grad():
        a = model(x, 6, seed=11)
        assert torch.equal(a, model(x, 6, seed=11))
        assert not torch.equal(a, model(x, 6, seed=12))
    torch.manual_seed(5)
    with torch.no_grad():
        r1 = model(x, 6)                                   # seed drawn from torch's generator
    torch.manual_seed(5)
    with torch.no_grad():
        assert torch.equal(r1, model(x, 6))


def test_frames():
    model = random_model()
    x = _state(model)
    with torch.no_grad():
        out, frames = model(x, 10, seed=3, frames=4)
        assert len(frames) == 4                            # steps 0, 4, 8 and the final 10
        assert torch.equal(frames[0], x) and torch.equal(frames[-1], out)
        assert torch.equal(out, model(x, 10, seed=3))
        assert torch.equal(frames[1], model(x, 4, seed=3))
        assert torch.equal(frames[2], model(x, 8, seed=3))
        _, exact = model(x, 8, seed=3, frames=4)
        assert len(exact) == 3                             # no duplicate final frame
    x.requires_grad_(True)
    out, frames = model(x, 3, seed=0, frames=1)
    assert out.requires_grad and not any(f.requires_grad for f in frames)


@pytest.mark.parametrize("checkpoint", ["sqrt", 1, 3, 100])
def test_checkpoint_gives_the_same_gradients(checkpoint):
    model = random_model(seed=2)
    x0 = _state(model, h=10, w=13)

    def grads(ckpt):
        model.zero_grad()
        x = x0.clone().requires_grad_(True)
        out = model(x, 9, seed=21, checkpoint=ckpt)
        loss = (out[:, :4] ** 2).mean() + out[:, 4:].abs().mean()
        loss.backward()
        return [x.grad] + [p.grad.clone() for p in model.parameters()], loss.detach()

    ref, ref_loss = grads(None)
    got, loss = grads(checkpoint)
    assert torch.equal(loss, ref_loss)
    assert all(g.abs().sum() > 0 for g in ref)            # the check covers every gradient
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_channels_last_input():
    model = random_model(seed=4)
    x = _state(model, b=3, h=14, w=9)
    xl = x.to(memory_format=torch.channels_last)
    assert xl.is_contiguous(memory_format=torch.channels_last) and not xl.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(xl, 8, seed=1), model(x, 8, seed=1),
                                   rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    model = random_model(seed=4)
    wide = _state(model, b=2, h=12, w=30)
    x = wide[:, :, :, ::2]                                 # a strided view
    assert not x.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(x, 5, seed=1), model(x.contiguous(), 5, seed=1),
                                   rtol=1e-5, atol=1e-6)


def test_input_is_not_modified():
    model = random_model()
    x = _state(model)
    before = x.clone()
    with torch.no_grad():
        model(x, 5, seed=0)
    assert torch.equal(x, before)


def test_auto_backend_on_cpu_is_torch():
    assert NCA(backend="auto").resolve_backend(torch.device("cpu")) == "torch"


def test_filter_bank_keeps_its_taps_when_the_model_changes_dtype():
    """Taps are rebuilt from the config on .to(dtype): a float32 buffer cast to float64 would
    carry 0.3 as 0.30000001192..., and the triton backend reads the bank from that buffer."""
    from nca_fast.config import filter_tensor

    bank = (((0.0, 0.3, 0.0), (0.1, 1.0, 0.0), (0.0, 0.0, 0.7)),) * 3
    model = NCA(NCAConfig(filters=bank)).double()
    assert model.filters.dtype == torch.float64
    assert torch.equal(model.filters, filter_tensor(model.config, dtype=torch.float64))
    assert torch.equal(model.float().filters, filter_tensor(model.config))


def test_torch_backend_under_torch_compile_is_one_graph_break():
    """README: the torch backend runs eagerly in a compiled model, one graph break per rollout
    (its worker threads and data-dependent gathers are excluded from tracing)."""
    model = random_model(seed=3)
    x = _state(model, b=1, h=6, w=7)
    explained = torch._dynamo.explain(lambda x: model(x * 1.0, 3, seed=2) * 2.0)(x)
    assert explained.graph_break_count == 1, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [compiled(xs[0], 3, seed=2), model(xs[1], 3, seed=2)]
    assert torch.equal(ys[0], ys[1])
    for x_, y in zip(xs, ys):
        y.pow(2).sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


# ------------------------------------------------------------------------------ no last bias
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_last_bias_is_a_zero_bias_that_is_not_learned(backend, monkeypatch):
    """``last_bias=False``: no w2.bias parameter; the rollout and the other gradients equal those
    of the same model with a zero bias, bitwise, on each backend (triton in the interpreter)."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with_bias = random_model(4, channels=16, hidden=32, alive_threshold=None)
    without = NCA(with_bias.config.replace(last_bias=False), backend=backend)
    with_bias.backend = backend
    assert "w2.bias" not in dict(without.named_parameters())
    assert "w2.bias" not in without.state_dict()
    assert sum(p.numel() for p in without.parameters()) == \
        sum(p.numel() for p in with_bias.parameters()) - 16
    with torch.no_grad():
        with_bias.w2.bias.zero_()
        for name, p in without.named_parameters():
            p.copy_(dict(with_bias.named_parameters())[name])
    x = with_bias.seed_state(1, 9, 11)
    x[:, 3:] = torch.rand(1, 13, 9, 11, generator=torch.Generator().manual_seed(5))
    outs = []
    for model in (with_bias, without):
        y = model(x, 3, seed=8)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0])
    for name, grad in outs[1][1].items():
        assert torch.equal(grad, outs[0][1][name]), name
    assert outs[0][1]["w2.bias"].abs().sum() > 0      # a bias would have learned something


def test_no_last_bias_survives_save_and_load(tmp_path):
    model = random_model(6, channels=16, hidden=32, last_bias=False)
    path = model.save(tmp_path / "m.safetensors")
    back = nca_fast.load(path, backend="torch")
    assert back.config.last_bias is False and back.w2.bias is None
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(back.named_parameters())[name])


def test_a_file_whose_bias_disagrees_with_its_config_is_refused(tmp_path):
    """A w2.bias stored beside a config without one is refused, naming last_bias."""
    from nca_fast import formats

    model = random_model(7, channels=16, hidden=32)
    config = model.config.replace(last_bias=False)
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={formats.CONFIG_KEY: config.to_json(),
                        formats.VERSION_KEY: formats.FORMAT_VERSION})
    with pytest.raises(ValueError, match="unexpected tensors.*w2.bias.*last_bias"):
        nca_fast.load(path)


def test_named_configurations_in_one_line():
    assert NCAConfig.growing() == NCAConfig()
    assert NCAConfig.growing(hidden=64).hidden == 64
    t = NCAConfig.textures()
    assert (t.channels, t.hidden, t.num_filters, t.alive_masking, t.padding, t.last_bias) == \
        (12, 96, 4, False, "circular", False)
    assert t.filters == nca_fast.FILTER_BANKS["sobel_laplacian"]
    assert NCAConfig.textures(channels=16).channels == 16
    model = NCA(NCAConfig.textures(), backend="torch")
    assert model.w2.bias is None and tuple(model.w1.weight.shape[:2]) == (96, 48)
    y = model(model.seed_state(1, 8, 8), 2, seed=0)
    assert y.shape == (1, 12, 8, 8)
