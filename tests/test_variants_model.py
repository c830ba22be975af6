"""Learned perception and the other variants on the model's side: the NCA's learned filters and
filter bias (parameters, the bias fold, state_dicts), their model files, and the trainer's and
CLI's options for them (--learn-filters, --filter-bias, --padding, --no-last-bias).

The reference these are checked against is ``nca_fast.reference`` (``filters=``,
``filter_bias=``); the torch backend's learned path is checked in the backends' own tests.
"""
import json
import re

import pytest
import torch

import nca_fast
from nca_fast import NCA, NCAConfig, formats, reference
from nca_fast.config import filter_tensor, initial_filters
from nca_fast.model import load
from nca_fast.train import cli_main, train
from nca_fast.training.options import TrainOptions
from nca_fast.training.trainer import Trainer

from cases import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [dict(), dict(learn_filters="shared"), dict(learn_filters="depthwise"),
         dict(learn_filters="depthwise", filter_bias=True)]
MODE_IDS = ["fixed", "shared", "depthwise", "depthwise_bias"]


def _model(seed=0, **config):
    """A torch-backend model whose every parameter is drawn from ``seed`` (not the identity;
    learned filters and filter bias moved off their initial values)."""
    torch.manual_seed(seed)
    model = NCA(NCAConfig(channels=8, hidden=24, **config), backend="torch")
    with torch.no_grad():
        model.w2.weight.normal_(0, 0.05)
        model.w2.bias.normal_(0, 0.01)
        if model.config.learn_filters:
            model.filters.add_(0.05 * torch.randn_like(model.filters))
        if model.filter_bias is not None:
            model.filter_bias.normal_(0, 0.1)
    return model


def _state(model, b=2, h=9, w=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, model.config.channels, h, w, generator=g)
    x[:, 3] = (torch.rand(b, h, w, generator=g) > 0.4).float()     # a ragged live region
    return x


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("config", MODES, ids=MODE_IDS)
def test_parameters_and_shapes_per_mode(config):
    model = NCA(NCAConfig(**config))
    cfg = model.config
    f, c = cfg.num_filters, cfg.channels
    names = dict(model.named_parameters())
    base = ["w1.weight", "w1.bias", "w2.weight", "w2.bias"]
    if cfg.learn_filters is None:
        assert sorted(names) == sorted(base)
        assert "filters" not in model.state_dict()                 # the bank is the config's
        assert not isinstance(model.filters, torch.nn.Parameter)
        assert torch.equal(model.filters, filter_tensor(cfg))
    else:
        shape = (f, 3, 3) if cfg.learn_filters == "shared" else (f, c, 3, 3)
        assert isinstance(model.filters, torch.nn.Parameter)
        assert tuple(model.filters.shape) == shape
        assert torch.equal(model.filters, initial_filters(cfg))
        assert "filters" in model.state_dict()
    if cfg.filter_bias:
        assert tuple(model.filter_bias.shape) == (f, c)
        assert torch.equal(model.filter_bias, torch.zeros(f, c))
    else:
        assert model.filter_bias is None and "filter_bias" not in names
    extra = {"filters": (f * 9 if cfg.learn_filters == "shared" else f * c * 9
                         if cfg.learn_filters else 0),
             "filter_bias": f * c if cfg.filter_bias else 0}
    assert sum(p.numel() for p in model.parameters()) == 8336 + sum(extra.values())
    assert f"learn_filters={cfg.learn_filters!r}" in repr(model)


def test_depthwise_filters_start_as_the_bank_on_every_channel():
    cfg = NCAConfig(channels=5, filters="sobel_laplacian", learn_filters="depthwise")
    model = NCA(cfg)
    bank = filter_tensor(cfg)
    for c in range(5):
        assert torch.equal(model.filters[:, c], bank)


def test_learned_filters_follow_dtype_changes_and_are_not_rebuilt_from_the_config():
    model = _model(learn_filters="shared")
    trained = model.filters.detach().clone()
    assert not torch.equal(trained, filter_tensor(model.config))
    model.double()
    assert isinstance(model.filters, torch.nn.Parameter)
    assert model.filters.dtype == torch.float64
    assert torch.equal(model.filters, trained.double())
    model.float()
    assert torch.equal(model.filters, trained)
    assert model.params().filters is model.filters


def test_fixed_bank_is_still_rebuilt_on_dtype_changes():
    bank = (((0.0, 0.3, 0.0), (0.1, 1.0, 0.0), (0.0, 0.0, 0.7)),) * 3
    model = NCA(NCAConfig(filters=bank)).double()
    assert torch.equal(model.filters, filter_tensor(model.config, dtype=torch.float64))


# ----------------------------------------------------------------------------- the bias fold
def test_params_fold_the_filter_bias_into_b1_column_by_column():
    """Column c*F + k of w1 sees filter_bias[k, c]: b1_eff = b1 + w1 @ beta."""
    model = _model(learn_filters="depthwise", filter_bias=True)
    f, c = model.config.num_filters, model.config.channels
    w1 = model.w1.weight.flatten(1).double()
    bias = model.filter_bias.double()
    want = model.w1.bias.double().clone()
    for ch in range(c):
        for k in range(f):
            want += w1[:, ch * f + k] * bias[k, ch]
    p = model.params()
    torch.testing.assert_close(p.b1.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.weights()[1], p.b1)
    assert model.params().w1 is model.w1.weight
    without = _model(learn_filters="depthwise")
    assert without.params().b1 is without.w1.bias


def test_params_fold_equals_the_reference_with_filter_bias():
    """The folded b1 with the filters gives the reference's rollout with the bias added to
    perception, and the same gradients for every parameter (fp64: the fold is exact up to
    rounding)."""
    model = _model(learn_filters="depthwise", filter_bias=True).double()
    cfg = model.config
    x = _state(model).double()
    w1, b1, w2, b2 = model.weights()
    got = reference.rollout(x, w1, b1, w2, b2, cfg, 4, 7, filters=model.filters)
    want = reference.rollout(x, w1, model.w1.bias, w2, b2, cfg, 4, 7, filters=model.filters,
                             filter_bias=model.filter_bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [model.w1.weight, model.w1.bias, model.w2.weight, model.w2.bias, model.filters,
              model.filter_bias]
    g_got = torch.autograd.grad((got ** 2).sum(), params)
    g_want = torch.autograd.grad((want ** 2).sum(), params, allow_unused=True)
    for name, a, b in zip(["w1", "b1", "w2", "b2", "filters", "filter_bias"], g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("config", MODES[1:], ids=MODE_IDS[1:])
def test_forward_equals_the_reference(config):
    """The layer (torch backend) with learned filters against the reference."""
    model = _model(**config)
    x = _state(model)
    with torch.no_grad():
        got = model(x, 5, seed=3)
        want = reference.rollout(x, model.w1.weight, model.w1.bias, model.w2.weight,
                                 model.w2.bias, model.config, 5, 3, filters=model.filters,
                                 filter_bias=model.filter_bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_learned_filters_get_gradients():
    model = _model(learn_filters="depthwise", filter_bias=True)
    x = _state(model)
    model(x, 3, seed=2).square().sum().backward()
    assert model.filters.grad is not None and model.filters.grad.abs().sum() > 0
    assert model.filter_bias.grad is not None and model.filter_bias.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- state_dicts
@pytest.mark.parametrize("src, dst, needle", [
    (dict(learn_filters="shared"), dict(), "holds 'filters'.*learn_filters=None;"),
    (dict(), dict(learn_filters="shared"), "holds no 'filters'.*learn_filters='shared';"),
    (dict(learn_filters="shared"), dict(learn_filters="depthwise"),
     r"'shared'\), but this model has learn_filters='depthwise'"),
    (dict(learn_filters="depthwise"), dict(learn_filters="shared"),
     r"'depthwise'\), but this model has learn_filters='shared'"),
], ids=["learned_into_fixed", "fixed_into_learned", "shared_into_depthwise",
        "depthwise_into_shared"])
def test_state_dict_of_another_perception_is_refused(src, dst, needle):
    sd = NCA(NCAConfig(**src)).state_dict()
    model = NCA(NCAConfig(**dst))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^learn_filters: the state_dict .*" + needle) as e:
        model.load_state_dict(sd)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_filter_bias_mismatch_is_refused():
    with_bias = NCA(NCAConfig(learn_filters="depthwise", filter_bias=True))
    without = NCA(NCAConfig(learn_filters="depthwise"))
    with pytest.raises(ValueError, match="^filter_bias: the state_dict holds 'filter_bias'"):
        without.load_state_dict(with_bias.state_dict())
    with pytest.raises(ValueError, match="^filter_bias: the state_dict has no 'filter_bias'"):
        with_bias.load_state_dict(without.state_dict())


def test_non_strict_loads_refuse_learned_filters_of_another_form_only():
    """strict=False may leave learned filters at their initial taps, but never puts filters
    into a model of another form."""
    learned = NCA(NCAConfig(learn_filters="shared"))
    learned.load_state_dict(NCA().state_dict(), strict=False)
    assert torch.equal(learned.filters, initial_filters(learned.config))
    with pytest.raises(ValueError, match="^learn_filters:"):
        NCA().load_state_dict(learned.state_dict(), strict=False)


def test_state_dict_round_trip_and_nested_prefix():
    src = _model(learn_filters="depthwise", filter_bias=True)
    dst = NCA(src.config, backend="torch")
    dst.load_state_dict(src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values()))
    outer = torch.nn.Sequential(NCA(NCAConfig(channels=8, hidden=24)))
    with pytest.raises(ValueError, match="^learn_filters:"):
        outer.load_state_dict(torch.nn.Sequential(src).state_dict())


# ----------------------------------------------------------------------------- model files
@pytest.mark.parametrize("config", MODES[1:], ids=MODE_IDS[1:])
def test_file_round_trip_is_bitwise(tmp_path, config):
    model = _model(**config)
    path = model.save(tmp_path / "m.safetensors")
    loaded = load(path, backend="torch")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    meta = formats.read_metadata(path)
    stored = json.loads(meta[formats.CONFIG_KEY])
    assert stored["learn_filters"] == config["learn_filters"]
    assert stored["filter_bias"] == config.get("filter_bias", False)


def _write(path, config, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={formats.CONFIG_KEY: config.to_json(),
                        formats.VERSION_KEY: formats.FORMAT_VERSION})
    return path


def _tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_file_without_its_learned_filters_is_refused(tmp_path):
    model = _model(learn_filters="shared")
    tensors = _tensors(model)
    del tensors["filters"]
    path = _write(tmp_path / "m.safetensors", model.config, tensors)
    with pytest.raises(ValueError, match=r"missing tensors \['filters'\].*learn_filters "
                                         r"'shared': learned filters are stored") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_file_with_filters_its_config_does_not_learn_is_refused(tmp_path):
    model = _model(learn_filters="shared")
    fixed = model.config.replace(learn_filters=None)
    path = _write(tmp_path / "m.safetensors", fixed, _tensors(model))
    with pytest.raises(ValueError, match=r"unexpected tensors \['filters'\].*learn_filters "
                                         r"None: the fixed bank is in the config"):
        load(path)


@pytest.mark.parametrize("name, shape", [("filters", (3, 3, 3)), ("filters", (3, 7, 3, 3)),
                                         ("filter_bias", (3, 7))])
def test_file_shapes_that_disagree_with_the_config_are_refused(tmp_path, name, shape):
    model = _model(learn_filters="depthwise", filter_bias=True)
    tensors = _tensors(model)
    tensors[name] = torch.zeros(shape)
    path = _write(tmp_path / "m.safetensors", model.config, tensors)
    with pytest.raises(ValueError, match=re.escape(f"tensor '{name}' has shape {tuple(shape)}, "
                                                   f"but the stored config needs")):
        load(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_file_with_non_finite_taps_is_refused(tmp_path, value):
    model = _model(learn_filters="shared")
    tensors = _tensors(model)
    tensors["filters"][1, 0, 2] = value
    path = _write(tmp_path / "m.safetensors", model.config, tensors)
    with pytest.raises(ValueError, match=r"tensor 'filters' \(learned filter taps\) holds NaN"):
        load(path)


def test_distill_import_keeps_a_fixed_bank():
    from conftest import DISTILL

    files = sorted(DISTILL.glob("ex*.json")) if DISTILL.is_dir() else []
    if not files:
        pytest.skip(f"needs the Distill exports in {DISTILL}")
    model = nca_fast.load_distill(files[0])
    assert model.config.learn_filters is None and not model.config.filter_bias
    assert "filters" not in model.state_dict()


# ----------------------------------------------------------------------------- options and CLI
@pytest.mark.parametrize("field, value, needle", [
    ("learn_filters", "pointwise", "^learn_filters: expected one of"),
    ("learn_filters", "", "^learn_filters: expected one of"),
    ("filter_bias", True, "^filter_bias: expected False unless learn_filters is 'depthwise'"),
    ("filter_bias", 1, "^filter_bias: expected True or False"),
    ("padding", "mirror", "^padding: expected one of"),
    ("last_bias", 0, "^last_bias: expected True or False"),
])
def test_options_are_validated_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle) as e:
        TrainOptions(**{field: value})
    assert "\n" not in str(e.value)


def test_reflect_needs_two_cells():
    with pytest.raises(ValueError, match="^padding: 'reflect' needs a grid of at least 2 x 2"):
        TrainOptions(size=1, pad=0, padding="reflect")
    assert TrainOptions(size=2, pad=0, padding="reflect").grid == 2


def test_options_reach_the_model_config():
    o = TrainOptions(learn_filters="depthwise", filter_bias=True, padding="reflect",
                     last_bias=False, filters="sobel_laplacian")
    cfg = o.model_config()
    assert (cfg.learn_filters, cfg.filter_bias, cfg.padding, cfg.last_bias) == \
        ("depthwise", True, "reflect", False)
    assert cfg.filters == nca_fast.FILTER_BANKS["sobel_laplacian"]


@pytest.mark.parametrize("args, needle", [
    (["--learn-filters", "pointwise"], "--learn-filters: invalid choice"),
    (["--filter-bias"], "--filter-bias: expected False unless learn_filters is 'depthwise'"),
    (["--learn-filters", "shared", "--filter-bias"], "--filter-bias: expected False unless"),
    (["--padding", "mirror"], "--padding: invalid choice"),
    (["--padding", "reflect", "--size", "1", "--pad", "0"], "--padding: 'reflect' needs"),
])
def test_cli_errors_are_one_line_naming_the_flag(tmp_path, capsys, args, needle):
    rc = cli_main([*args, "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not (tmp_path / "run").exists()


def test_cli_flags_parse_into_options():
    from nca_fast import train as T

    ns = T.build_parser().parse_args(["--learn-filters", "depthwise", "--filter-bias",
                                      "--padding", "replicate", "--no-last-bias"])
    o = T.options_from_args(ns)
    assert (o.learn_filters, o.filter_bias, o.padding, o.last_bias) == \
        ("depthwise", True, "replicate", False)
    defaults = T.options_from_args(T.build_parser().parse_args([]))
    assert (defaults.learn_filters, defaults.filter_bias) == (None, False)


def test_help_explains_the_paddings(capsys):
    assert cli_main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("replicate (the nearest edge cell)", "reflect (the cell mirrored",
                  "--learn-filters {shared,depthwise}", "--filter-bias"):
        assert words in out, words


@pytest.mark.parametrize("saved, run, needle", [
    (dict(learn_filters="shared"), dict(), "learn_filters='shared' (run: None)"),
    (dict(), dict(learn_filters="shared"), "learn_filters=None (run: 'shared')"),
    (dict(learn_filters="depthwise", filter_bias=True), dict(learn_filters="depthwise"),
     "filter_bias=True (run: False)"),
])
def test_init_with_other_learned_filters_names_the_flag(tmp_path, saved, run, needle):
    opts = TrainOptions(**TINY, experiment="grow", steps=1, **run)
    path = NCA(opts.model_config().replace(**{"learn_filters": None, "filter_bias": False,
                                              **saved})).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="^init: ") as e:
        Trainer(TrainOptions(**TINY, experiment="grow", steps=1, init=str(path), **run),
                tmp_path / "b")
    assert needle in str(e.value) and "--learn-filters / --filter-bias" in str(e.value)


def test_resume_with_other_learned_filters_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainOptions(**TINY, experiment="grow", steps=1, save_every=1), run_dir=run)
    rc = cli_main(["--resume", str(run), "--learn-filters", "shared"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "learn_filters" in err and "differ" in err


# ----------------------------------------------------------------------------- training
def test_two_training_steps_change_the_learned_filters(tmp_path):
    run = tmp_path / "learned"
    rc = cli_main([*"--size 8 --pad 2 --hidden 32 --batch 2 --pool-size 4 --rollout 4 6".split(),
                   *"--steps 2 --save-every 2 --video-steps 2 --device cpu --backend torch".split(),
                   "--learn-filters", "shared", "--no-progress", "--threads", "1",
                   "--out", str(run)])
    assert rc == 0
    model = nca_fast.load(run / "model.safetensors")
    assert model.config.learn_filters == "shared"
    start = initial_filters(model.config)
    assert tuple(model.filters.shape) == tuple(start.shape)
    assert not torch.equal(model.filters.detach(), start)        # the optimizer moved them
    assert torch.isfinite(model.filters).all()
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["learn_filters"] == "shared"


def test_checkpoint_resume_with_learned_filters_is_bitwise(tmp_path):
    opts = TrainOptions(**TINY, experiment="persist", steps=2, save_every=1,
                        learn_filters="depthwise", filter_bias=True)
    whole = train(opts, run_dir=tmp_path / "whole")

    def stop_after_one(t):
        if t.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(opts, run_dir=tmp_path / "part", on_step=stop_after_one)
    resumed = train(opts, run_dir=tmp_path / "part", resume=True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses == resumed.losses


def test_filters_figure_draws_a_learned_model(tmp_path, capsys):
    import importlib.util
    import pathlib

    from PIL import Image

    script = pathlib.Path(__file__).resolve().parents[1] / "docs" / "filters_figure.py"
    spec = importlib.util.spec_from_file_location("filters_figure", script)
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    path = _model(learn_filters="depthwise").save(tmp_path / "m.safetensors")
    fig.main([str(path), "--channel", "2", "--out", str(tmp_path / "f.png")])
    out = capsys.readouterr().out
    assert "Sobel-x: largest change" in out and "wrote" in out
    assert Image.open(tmp_path / "f.png").size[0] > 300
    fixed = NCA(NCAConfig()).save(tmp_path / "fixed.safetensors")
    with pytest.raises(SystemExit):
        fig.main([str(fixed)])
    assert "fixed filter bank" in capsys.readouterr().err
