"""The exported web page: self-contained, and in a real headless Chromium (WebGL2 on the CPU) it
computes the torch backend's states: every shipped and published model, and the other configs;
the reference's states for every padding and for learned (depthwise) filter taps."""
import base64
import inspect
import json
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

import torch.nn.functional as F

from nca_fast import NCA, NCAConfig, cli, reference
from nca_fast.export import export_html, filter_taps, pack_weights, render_page
from nca_fast.export.headless import (BrowserError, find_chromium, page_url, run_page, run_pages,
                                      run_urls, screenshot)
from nca_fast.model import load_any, shipped_models
from nca_fast.rng import update_mask

from cases import random_model

DISTILL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "distill"

ARTICLE = sorted(DISTILL.glob("ex*.json")) if DISTILL.is_dir() else []
pytestmark = pytest.mark.usefixtures("one_thread")
needs_browser = pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium on this machine (Debian's chromium package; "
                                    ".ci/run installs it): the page cannot be run")
needs_article = pytest.mark.skipif(
    not ARTICLE, reason=f"the published Distill models are absent ({DISTILL})")


def _random_model(seed=0, **config):
    """A model whose page differs visibly from the identity's in a few steps."""
    return random_model(seed, w2_bias_std=0.05, w1_scale=0.5, **config)


def _engine(model, size, steps, seed):
    with torch.no_grad():
        return model(model.seed_state(1, size, size), steps, seed=seed)[0].numpy()


class _WithTaps:
    """What the exporter reads of a model (``config``, ``params()``), with ``model``'s weights
    but the given filter taps ([F, 3, 3] or [F, C, 3, 3]) and first-layer bias."""

    def __init__(self, model, filters, b1=None):
        self.config = model.config
        p = model.params()
        self._params = p._replace(filters=filters, b1=p.b1 if b1 is None else b1)

    def params(self):
        return self._params


def _random_taps(config, seed, depthwise=True):
    g = torch.Generator().manual_seed(seed)
    shape = (config.num_filters,) + ((config.channels,) if depthwise else ()) + (3, 3)
    return torch.randn(shape, generator=g) * 0.5


PAD_MODES = {"zeros": "constant", "circular": "circular", "replicate": "replicate",
             "reflect": "reflect"}


def _rollout_with_taps(x, w1, b1, w2, b2, config, steps, seed, filters):
    """docs/MODEL.md's rollout with per-channel taps: perception is a grouped convolution
    (output c*F + k: filters[k, c] on channel c) of the input padded by ``config.padding``; the
    alive masks' max-pool wraps under circular padding and sees the outside as dead otherwise."""
    c, f = config.channels, config.num_filters
    taps = filters if filters.dim() == 4 else filters[:, None].expand(f, c, 3, 3)
    conv = taps.permute(1, 0, 2, 3).reshape(c * f, 1, 3, 3).to(x.dtype)
    b, _, h, w = x.shape

    def alive(s):
        a = s[:, config.alpha_channel:config.alpha_channel + 1]
        if config.padding == "circular":
            a = F.pad(a, (1, 1, 1, 1), mode="circular")
        else:
            a = F.pad(a, (1, 1, 1, 1), value=float("-inf"))
        return F.max_pool2d(a, 3, stride=1) > config.alive_threshold

    for t in range(steps):
        mode = PAD_MODES[config.padding]
        p = F.conv2d(F.pad(x, (1, 1, 1, 1), mode=mode), conv, groups=c)
        dx = reference.dense(p, w1, b1, w2, b2)
        m = update_mask(b, h, w, fire_rate=config.fire_rate, seed=seed, step=t)
        if config.alive_threshold is None:
            x = x + dx * m
        else:
            pre = alive(x)
            x = x + dx * m
            x = x * (pre & alive(x)).to(x.dtype)
    return x


def _oracle(model, size, steps, seed, **changes):
    """The state after ``steps`` steps from the seed for the exporter's view of ``model``
    (``config`` with ``changes``, ``params()``): ``nca_fast.reference.rollout`` given the
    filter taps where it takes them, else ``_rollout_with_taps``."""
    cfg = model.config.replace(**changes)
    p = model.params()
    x = reference.seed_state(1, size, size, cfg.channels, cfg.alpha_channel)
    args = (x, p.w1.detach(), p.b1.detach(), p.w2.detach(), p.b2.detach(), cfg, steps, seed)
    with torch.no_grad():
        if "filters" in inspect.signature(reference.rollout).parameters:
            return reference.rollout(*args, filters=p.filters.detach())[0].numpy()
        return _rollout_with_taps(*args, filters=p.filters.detach())[0].numpy()


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------ the file (no browser)
def test_weights_texture_layout():
    model = _random_model(channels=6, hidden=5, filters="sobel_laplacian")
    tex = pack_weights(model)
    w1, b1, w2, b2 = (t.detach().numpy() for t in model.weights())
    f, g = 4, 2
    assert tex.shape == (6, f * g + g + 1, 4)
    for h in range(5):
        for k in range(f):
            for c in range(8):
                want = w1[h, c * f + k] if c < 6 else 0.0
                assert tex[h, k * g + c // 4, c % 4] == np.float32(want)
        for c in range(8):
            assert tex[h, f * g + c // 4, c % 4] == (w2[c, h] if c < 6 else 0.0)
        assert tex[h, f * g + g, 0] == b1[h]
    assert list(tex[5, :g].reshape(-1)[:6]) == list(b2) and not tex[5, :g].reshape(-1)[6:].any()


def test_page_reads_params_filters_and_bias():
    """The texture holds ``params()``'s b1 (any filter bias folded in); the page's taps are
    ``params().filters`` per channel, a shared bank repeated on every channel."""
    model = _random_model(channels=6, hidden=5, filters="sobel_laplacian")
    b1 = torch.arange(5, dtype=torch.float32) - 2.5
    taps = _random_taps(model.config, 1)
    tex = pack_weights(_WithTaps(model, taps, b1))
    assert np.array_equal(tex[:5, 4 * 2 + 2, 0], b1.numpy())
    assert np.array_equal(filter_taps(_WithTaps(model, taps)), taps.double().numpy())
    shared = _random_taps(model.config, 2, depthwise=False)
    got = filter_taps(_WithTaps(model, shared))
    assert got.shape == (4, 6, 3, 3)
    assert all(np.array_equal(got[:, c], shared.double().numpy()) for c in range(6))
    assert np.array_equal(filter_taps(model)[:, 5], model.config.filters)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (3, 3, 3), (4, 6, 9), (4, 6, 3, 3, 1)])
def test_filters_of_another_shape_are_refused(shape):
    model = _random_model(channels=6, hidden=5, filters="sobel_laplacian")
    with pytest.raises(ValueError, match=r"^filters: expected taps of shape \(4, 3, 3\) or "
                                         r"\(4, 6, 3, 3\) for 4 filters on 6 channels, got"):
        render_page(_WithTaps(model, torch.zeros(shape)), 16, "m")


def test_non_finite_taps_are_refused():
    model = _random_model(channels=6, hidden=5)
    taps = _random_taps(model.config, 0)
    taps[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="filters: the model's filter taps are not all finite"):
        render_page(_WithTaps(model, taps), 16, "m")


def test_page_is_self_contained():
    model = _random_model(channels=16, hidden=8)
    text = render_page(model, 24, "a </script> name")
    # Nothing is fetched: no URL, no external script, style, font or image; a policy forbids it.
    for needle in ("http:", "https:", " src=", "<link", "@import", "url("):
        assert needle not in text.lower(), needle
    assert "default-src 'none'" in text
    assert len(re.findall(r"<script\b", text)) == 2 and "a </script> name" not in text
    data = re.search(r'<script type="application/json" id="nca-model">(.*?)</script>', text, re.S)
    page = json.loads(data.group(1))
    assert page["name"] == "a </script> name" and page["size"] == 24
    weights = np.frombuffer(base64.b64decode(page["weights"]), dtype="<f4")
    assert np.array_equal(weights, pack_weights(model).reshape(-1))


def test_cli_export_writes_the_page(tmp_path, capsys):
    out = tmp_path / "new" / "flower.html"
    assert cli.main(["export", "flower", "--html", str(out)]) == 0
    text = out.read_text()
    assert '"name":"flower"' in text and '"size":40' in text
    assert "wrote" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["flower.html"]        # no temporary left


@pytest.mark.parametrize("case, expected", [
    ("not_a_model", "not a safetensors model file"),
    ("too_many_channels", "channels: the web page runs models of at most 32 channels"),
    ("no_such_model", "MODEL nope: no such file, and not the name of a shipped model"),
    ("not_html", "expected a .html file name"),
    ("unwritable", "--html /proc/"),
    ("tiny_grid", "--size: expected an integer in [3, 8192]"),
])
def test_cli_export_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, expected):
    out = tmp_path / "page.html"
    out.write_text("kept")
    model, extra = "flower", []
    if case == "not_a_model":
        model = tmp_path / "junk.safetensors"
        model.write_bytes(b"\x00" * 40)
    elif case == "too_many_channels":
        model = tmp_path / "wide.safetensors"
        NCA(NCAConfig(channels=40, hidden=8)).save(model)
    elif case == "no_such_model":
        model = "nope"
    elif case == "not_html":
        out = tmp_path / "page.png"
    elif case == "unwritable":
        out = pathlib.Path("/proc/nca-export/page.html")
    elif case == "tiny_grid":
        extra = ["--size", "2"]
    assert cli.main(["export", str(model), "--html", str(out), *extra]) == cli.USAGE_ERROR
    assert expected in _error_line(capsys)
    assert (tmp_path / "page.html").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".html") == ["page.html"]


# ------------------------------------------------------------------ in the browser
@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """The shipped flower and the published lizard, 32 and 96 steps, in one browser."""
    if find_chromium() is None:
        pytest.skip("no Chromium on this machine: the page cannot be run")
    folder = tmp_path_factory.mktemp("parity")
    paths = {"flower": shipped_models()["flower"]}
    if ARTICLE:
        paths["ex3_lizard"] = DISTILL / "ex3_lizard.json"
    runs = {(name, steps, seed): page_url(export_html(p, folder / f"{name}.html"), steps=steps,
                                          seed=seed)
            for name, p in paths.items() for steps, seed in ((32, 3), (96, 5))}
    states = run_urls(runs.values())
    return paths, {key: states[url] for key, url in runs.items()}


@needs_browser
@pytest.mark.parametrize("which", ["flower", pytest.param("ex3_lizard", marks=needs_article)])
@pytest.mark.parametrize("steps, seed", [(32, 3), (96, 5)])
def test_page_matches_the_engine(parity_runs, which, steps, seed):
    """32 steps: every value within 1e-3 of the torch backend's; 96 steps: the picture's MSE
    below 1e-3 (the update masks, alive masks and dense layers all agree)."""
    paths, states = parity_runs
    state, info = states[(which, steps, seed)]
    want = _engine(load_any(paths[which], backend="torch"), state.shape[1], steps, seed)
    assert state.shape == want.shape and info["steps"] == steps
    assert (want[3] > 0.1).sum() > 20                         # grown: the check can fail
    if steps == 32:
        assert np.abs(state[:4] - want[:4]).max() <= 1e-3
        assert np.abs(state - want).max() <= 1e-3
    else:
        assert ((state[:4] - want[:4]) ** 2).mean() < 1e-3


@pytest.fixture(scope="module")
def every_model(tmp_path_factory):
    """Every shipped and published model's page, run in one browser: 8 steps on a 24 x 24 grid."""
    if find_chromium() is None:
        pytest.skip("no Chromium on this machine: the page cannot be run")
    folder = tmp_path_factory.mktemp("pages")
    paths = {**{f"shipped:{k}": v for k, v in shipped_models().items()},
             **{p.stem: p for p in ARTICLE}}
    pages = {name: export_html(p, folder / f"{name.replace(':', '_')}.html") for name, p in
             paths.items()}
    states = run_pages(list(pages.values()), 8, 11, size=24)
    return {name: (paths[name], states[pages[name].resolve()]) for name in pages}


MODEL_NAMES = [f"shipped:{k}" for k in sorted(shipped_models())] + [p.stem for p in ARTICLE]


@needs_browser
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs_in_the_page(every_model, name):
    path, (state, _) = every_model[name]
    want = _engine(load_any(path, backend="torch"), 24, 8, 11)
    assert (want[3] > 0.1).sum() > 4
    assert np.abs(state - want).max() <= 1e-3


def test_all_article_models_are_listed():
    if not ARTICLE:
        pytest.skip(f"the published Distill models are absent ({DISTILL})")
    assert len([n for n in MODEL_NAMES if not n.startswith("shipped:")]) >= 30


@needs_browser
def test_every_config_the_page_runs(tmp_path):
    """Other channel counts, filter banks, paddings, alpha channels, fire rates, no alive
    masking, no last-layer bias; three render targets per pass, so 32 channels take three
    passes."""
    configs = [
        dict(channels=6, hidden=16, filters="sobel_laplacian", padding="circular",
             alive_threshold=None, fire_rate=0.7, last_bias=False),
        dict(channels=12, hidden=8, alpha_channel=5, alive_threshold=0.05,
             filters=[[[0.3, 0, -1], [0, 2, 0], [0.1, 0, 0]], [[0, 1, 0], [1, 0, 1], [0, 1, 0]]]),
        dict(channels=32, hidden=24, padding="circular"),
        dict(channels=3, hidden=4, alpha_channel=0, fire_rate=1.0, alive_threshold=0.0),
    ]
    sizes = [20, 13, 17, 9]
    models = [_random_model(i, **c) for i, c in enumerate(configs)]
    pages = [export_html(m, tmp_path / f"c{i}.html", size=s)
             for i, (m, s) in enumerate(zip(models, sizes))]
    states = run_pages(pages, 10, 2**63 - 1, targets=3)
    for model, page, size in zip(models, pages, sizes):
        state, info = states[page.resolve()]
        want = _engine(model, size, 10, 2**63 - 1)
        assert info["seed"] == str(2**63 - 1)
        assert (np.abs(want) > 1e-6).sum() > 20
        assert np.abs(state - want).max() <= 1e-4, model.config


@needs_browser
def test_erasing_a_disc(tmp_path):
    path = shipped_models()["flower"]
    page = export_html(path, tmp_path / "page.html", size=32)
    state, _ = run_page(page, 40, 0, erase="16,13.5,5")
    want = _engine(load_any(path, backend="torch"), 32, 40, 0)
    y, x = np.mgrid[:32, :32]
    gone = np.hypot(x + 0.5 - 16, y + 0.5 - 13.5) < 5
    assert np.abs(want[:, gone]).max() > 0.1                 # the disc held live cells
    assert not state[:, gone].any()
    assert np.abs(state[:, ~gone] - want[:, ~gone]).max() <= 1e-3


@needs_browser
def test_screenshot_shows_the_grown_pattern(tmp_path):
    page = export_html(shipped_models()["flower"], tmp_path / "page.html")
    png = screenshot(page, tmp_path / "shot.png", 96, 0, window=(400, 460))
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    saturated = (rgb.max(axis=2) - rgb.min(axis=2)) > 60     # the flower's pink, yellow, green
    assert saturated.sum() > 2000, saturated.sum()
    blank = screenshot(page, tmp_path / "seed.png", 0, 0, window=(400, 460))
    rgb0 = np.asarray(Image.open(blank).convert("RGB")).astype(int)
    # The seed alone: only the controls' blue.
    assert ((rgb0.max(axis=2) - rgb0.min(axis=2)) > 60).sum() < saturated.sum() / 4


@needs_browser
def test_page_runs_its_ui_loop(tmp_path):
    """Opened without #steps, the page starts its frame loop at once: its first frame has
    stepped and drawn when the page has loaded (how many animation frames follow before
    Chromium dumps the page depends on the machine's load: 0 to 10 were seen here)."""
    from nca_fast.export.headless import _browse

    page = export_html(shipped_models()["flower"], tmp_path / "page.html")
    dom = _browse(["--virtual-time-budget=10000", "--dump-dom", page_url(page)], 180, None)
    assert int(re.search(r'id="nca-step">step (\d+)<', dom).group(1)) > 0
    assert re.search(r'id="nca-message" hidden', dom)


@needs_browser
def test_grid_beyond_the_texture_limit_is_refused_on_the_page(tmp_path):
    page = export_html(shipped_models()["flower"], tmp_path / "page.html")
    with pytest.raises(BrowserError, match="larger than this browser's WebGL texture limit"):
        run_page(page, 1, 0, size=100000)


@needs_browser
def test_every_padding_and_learned_taps(tmp_path):
    """Replicate and reflect padding (with and without alive masking), per-channel (depthwise)
    taps with a non-zero b1 (a partial last channel group; 32 channels and 4 filters in three
    passes), a learned shared bank: the page's state after 10 steps is the reference's within
    1e-4, and each case's state differs from the one its padding or taps would not give."""
    cases = [   # (config, size, taps: None (the bank), "shared" or "depthwise")
        (dict(channels=8, hidden=16, filters="sobel_laplacian", padding="replicate",
              alive_threshold=None, fire_rate=0.7), 11, None),
        (dict(channels=5, hidden=12, padding="reflect", alive_threshold=None, last_bias=False),
         10, "shared"),
        (dict(channels=8, hidden=16, padding="replicate"), 7, None),
        (dict(channels=6, hidden=16, padding="reflect", alive_threshold=0.02), 8, "depthwise"),
        (dict(channels=8, hidden=16, padding="reflect"), 7, None),
        (dict(channels=7, hidden=16, filters="sobel_laplacian", padding="zeros",
              learn_filters="depthwise", filter_bias=True), 12, "depthwise"),
        (dict(channels=32, hidden=24, filters="sobel_laplacian", padding="circular",
              alive_threshold=None, learn_filters="depthwise"), 7, "depthwise"),
    ]
    models = []
    for i, (config, size, taps) in enumerate(cases):
        model = _random_model(10 + i, **config)
        if taps is None and model.config.alive_masking:
            with torch.no_grad():       # alpha grows: live cells reach the grid's edges
                model.w2.bias[model.config.alpha_channel] = 0.1
        if taps is not None:
            b1 = torch.randn(model.config.hidden, generator=torch.Generator().manual_seed(i)) * 0.3
            model = _WithTaps(model, _random_taps(model.config, i, taps == "depthwise"), b1)
        models.append(model)
    pages = [export_html(m, tmp_path / f"v{i}.html", size=size)
             for i, (m, (_, size, _)) in enumerate(zip(models, cases))]
    states = run_pages(pages, 10, 12345, targets=3)
    for model, page, (config, size, taps) in zip(models, pages, cases):
        state, _ = states[page.resolve()]
        want = _oracle(model, size, 10, 12345)
        assert (np.abs(want) > 1e-6).sum() > 20, config
        if config["padding"] in ("replicate", "reflect"):
            other = _oracle(model, size, 10, 12345, padding="zeros")
            assert np.abs(want - other).max() > 1e-2, config
        if taps == "depthwise":
            shared = _WithTaps(model, model.params().filters[:, 0])
            assert np.abs(want - _oracle(shared, size, 10, 12345)).max() > 1e-2, config
        assert np.abs(state - want).max() <= 1e-4, config
