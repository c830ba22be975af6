"""One self-contained web page per model: WebGL2 shaders run the engine's step in the browser.

``export_html(model, "lizard.html")`` writes an HTML file with the model's weights and config,
the page's script (``engine.js``, ``shaders.js``, ``page.js`` beside this file) and its styles
inlined: no network access, no external script or font. The page grows the model from the
one-cell seed, erases a disc where the pointer drags, and has reset, pause, step, speed and zoom
controls. Opened as ``PAGE.html#steps=N&seed=S`` (optionally ``&size=CELLS``) it runs N steps
with update-mask seed S from ``NCA.seed_state``'s state and writes the state into
``<pre id="nca-state">`` as JSON: ``{"shape": [C, H, W], "steps": N, "data": base64 float32,
C-major, ...}`` (``nca_fast.export.headless`` reads it with a headless Chromium).

The shaders compute the step of docs/MODEL.md in float32, as the torch backend does, from the
tensors of ``model.params()`` and ``model.config``: perception with the filters as given (an
[F, 3, 3] bank on every channel, or [F, C, 3, 3] depthwise taps: filter k on channel c) under
any of the config's paddings (zeros, circular, replicate, reflect), the two dense layers (b1 as
``params()`` gives it, any filter bias folded in; b2 zeros without a last-layer bias), the
Philox update mask keyed by (seed, cell, step) and the alive masks. ``precision`` (the Triton
kernels' operand precision) does not apply in the page.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
from typing import Optional, Union

import numpy as np

from ..config import ARTICLE_GRID
from ..files import PathLike, atomic_write, writable_folder
from ..rng import fire_threshold

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = ("shaders.js", "engine.js", "page.js")
# WebGL2 guarantees 16 texture units per fragment shader; the mask pass samples the state
# before and after the update, ceil(C / 4) textures each.
MAX_CHANNELS = 32
MAX_SIZE = 8192


def _dense(model):
    """(w1, b1, w2, b2) of ``model.params()`` as float64 arrays: hidden x F*C, hidden,
    C x hidden, C."""
    p = model.params()
    w1, b1, w2, b2 = (t.detach().to("cpu").double().numpy() for t in p[:4])
    return w1.reshape(w1.shape[0], -1), b1, w2.reshape(w2.shape[0], -1), b2


def filter_taps(model) -> np.ndarray:
    """``model.params().filters`` as per-channel taps, F x C x 3 x 3 float64 (an [F, 3, 3] bank
    repeated on every channel); ValueError for any other shape."""
    cfg = model.config
    f, c = cfg.num_filters, cfg.channels
    taps = model.params().filters.detach().to("cpu").double().numpy()
    if taps.shape == (f, 3, 3):
        return np.repeat(taps[:, None], c, axis=1)
    if taps.shape != (f, c, 3, 3):
        raise ValueError(f"filters: expected taps of shape ({f}, 3, 3) or ({f}, {c}, 3, 3) "
                         f"for {f} filters on {c} channels, got {tuple(taps.shape)}")
    return taps


def pack_weights(model) -> np.ndarray:
    """The weights of ``model.params()`` as the shaders read them: a (hidden + 1) x
    (F*G + G + 1) x 4 float32 texture, G = ceil(C / 4). Row h: W1's vec4s (column k*G + g:
    filter k on channels 4g..4g+3), W2's (column F*G + g: outputs 4g..4g+3 of hidden unit h),
    b1[h] (column F*G + G, first component); row ``hidden``: b2 (columns 0..G-1). Channels past
    C are zero."""
    cfg = model.config
    c, f, hidden = cfg.channels, cfg.num_filters, cfg.hidden
    g = -(-c // 4)
    w1, b1, w2, b2 = _dense(model)
    tex = np.zeros((hidden + 1, f * g + g + 1, 4), dtype=np.float64)
    bands = np.zeros((hidden, f, 4 * g))
    bands[:, :, :c] = w1.reshape(hidden, c, f).transpose(0, 2, 1)       # [h, k, c] = w1[h, c*F+k]
    tex[:hidden, :f * g] = bands.reshape(hidden, f * g, 4)
    w2p = np.zeros((4 * g, hidden))
    w2p[:c] = w2
    tex[:hidden, f * g:f * g + g] = w2p.T.reshape(hidden, g, 4)
    tex[:hidden, f * g + g, 0] = b1
    b2p = np.zeros(4 * g)
    b2p[:c] = b2
    tex[hidden, :g] = b2p.reshape(g, 4)
    return tex.astype(np.float32)


def page_model(model, size: int, name: str) -> dict:
    """What the page reads from its ``nca-model`` JSON."""
    cfg = model.config
    tex = pack_weights(model)
    return {
        "name": name, "size": size, "channels": cfg.channels, "hidden": cfg.hidden,
        "filters": filter_taps(model).tolist(), "padding": cfg.padding,
        "fire_threshold": fire_threshold(cfg.fire_rate), "alive_threshold": cfg.alive_threshold,
        "alpha_channel": cfg.alpha_channel, "weights_shape": [tex.shape[1], tex.shape[0]],
        "weights": base64.b64encode(tex.tobytes()).decode("ascii"),
    }


def check_exportable(model, size: int) -> None:
    """ValueError naming the option when the page cannot run ``model`` on a ``size`` grid."""
    cfg = model.config
    if cfg.channels > MAX_CHANNELS:
        raise ValueError(f"channels: the web page runs models of at most {MAX_CHANNELS} channels "
                         f"(WebGL2 guarantees 16 texture units), this one has {cfg.channels}")
    if isinstance(size, bool) or not isinstance(size, int) or not 3 <= size <= MAX_SIZE:
        raise ValueError(f"size: expected an integer in [3, {MAX_SIZE}], got {size!r}")
    if not all(bool(np.isfinite(t).all()) for t in _dense(model)):
        raise ValueError("model: its weights are not all finite")
    if not np.isfinite(filter_taps(model)).all():
        raise ValueError("filters: the model's filter taps are not all finite")


def render_page(model, size: int, name: str) -> str:
    """The page's HTML text for ``model`` on a ``size`` x ``size`` grid."""
    check_exportable(model, size)
    data = json.dumps(page_model(model, size, name), separators=(",", ":"))
    # Inside <script>, "</" could close the element: JSON allows escaping "/".
    data = data.replace("</", "<\\/")
    script = "\n".join((HERE / s).read_text(encoding="utf-8") for s in SCRIPTS)
    if "</script" in script.lower():
        raise RuntimeError("the page's script contains '</script'")
    template = (HERE / "page.html").read_text(encoding="utf-8")
    title = f"{name}: a neural cellular automaton (nca_fast)"
    title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    # One pass over the template's markers: a value is never searched for further markers.
    parts = {"@TITLE@": title, "@MODEL@": data, "@SCRIPT@": script}
    out, rest = [], template
    while True:
        hits = [(rest.find(k), k) for k in parts if rest.find(k) >= 0]
        if not hits:
            break
        i, k = min(hits)
        out += [rest[:i], parts[k]]
        rest = rest[i + len(k):]
    return "".join(out) + rest


def default_size(path: Optional[pathlib.Path]) -> int:
    """The grid ``nca-fast grow`` uses for the model in ``path``: the model file's grow hint or
    training grid, else the article's 72."""
    from ..training import stability

    if path is None:
        return ARTICLE_GRID
    facts = stability.model_facts(path)
    hint = facts.get("grow_hint") if isinstance(facts.get("grow_hint"), dict) else {}
    size = hint.get("size") or facts.get("grid")
    return size if isinstance(size, int) and not isinstance(size, bool) else ARTICLE_GRID


def export_html(model: Union["object", PathLike], out: PathLike, *, size: Optional[int] = None,
                name: Optional[str] = None) -> pathlib.Path:
    """Write the page of ``model`` (an ``NCA``, or any object with its ``config`` and
    ``params()``; or a model file: ``.safetensors`` or a Distill ``.json``) to ``out``,
    atomically; returns the path. ``size``: the grid side in cells (default: as ``nca-fast
    grow``); ``name``: shown on the page (default: the file's stem)."""
    from ..model import load_any

    path = None
    if isinstance(model, (str, os.PathLike)):
        path = pathlib.Path(model)
        model = load_any(path, backend="torch")
    if name is None:
        name = path.stem if path is not None else "model"
    if size is None:
        size = default_size(path)
    text = render_page(model, size, name)
    out = pathlib.Path(out)
    writable_folder(out.parent)
    return atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


__all__ = ["export_html", "render_page", "page_model", "pack_weights", "filter_taps",
           "check_exportable",
           "default_size", "MAX_CHANNELS"]
