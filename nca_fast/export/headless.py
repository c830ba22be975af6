"""Running an exported page in a headless Chromium: the state after N steps, and screenshots.

The page's test contract (``nca_fast.export``): opened as ``PAGE.html#steps=N&seed=S``, it runs
N steps and writes ``<pre id="nca-state">`` with the state as JSON, which
``chromium --headless --dump-dom`` prints. WebGL2 runs there on the CPU (SwiftShader) when the
machine has no GPU.
"""
from __future__ import annotations

import base64
import html
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No network, no first-run work, a fresh profile each time (given per call). --no-sandbox: the
# sandbox cannot start as root, as in CI containers.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         # WebGL on the CPU (SwiftShader) where there is no GPU: Chromium asks for this opt-in.
         "--enable-unsafe-swiftshader")
STATE = re.compile(r'<pre id="nca-state">(.*?)</pre>', re.S)


class BrowserError(RuntimeError):
    """The browser did not run the page, or the page reported an error."""


def find_chromium() -> Optional[str]:
    """The path of a Chromium (or Chrome) executable, or None: ``$NCA_CHROMIUM``, else the first
    of ``BROWSERS`` on the PATH."""
    env = os.environ.get("NCA_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def page_url(page, **params) -> str:
    """``file://`` URL of ``page`` with ``params`` in the fragment (``#steps=32&seed=0``)."""
    url = pathlib.Path(page).resolve().as_uri()
    if params:
        url += "#" + "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
    return url


def _browse(args, timeout: float, browser: Optional[str]) -> str:
    browser = browser or find_chromium()
    if browser is None:
        raise BrowserError("no Chromium found (install Debian's chromium package, or set "
                           "NCA_CHROMIUM to a Chromium or Chrome executable)")
    with tempfile.TemporaryDirectory(prefix="nca-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"{browser} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise BrowserError(f"{browser} exited with status {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def run_page(page, steps: int, seed: int = 0, *, size: Optional[int] = None,
             targets: Optional[int] = None, erase: Optional[str] = None, timeout: float = 120.0,
             browser: Optional[str] = None):
    """Run ``steps`` steps of the page in a headless Chromium; returns (state, info): the
    state as a C x H x W float32 array and the rest of the page's JSON (``ms``: the steps' wall
    time in the page, ``renderer``, ``seed``, ``steps``). ``targets``: at most this many render
    targets per shader pass; ``erase``: "X,Y,R", the disc erased after the steps."""
    url = page_url(page, steps=steps, seed=seed, size=size, targets=targets, erase=erase)
    dom = _browse(["--dump-dom", url], timeout, browser)
    found = STATE.search(dom)
    if not found or not found.group(1).strip():
        raise BrowserError("the page wrote no state into <pre id=\"nca-state\">")
    return _state(html.unescape(found.group(1)))


def _state(text: str):
    info = json.loads(text)
    if "error" in info:
        raise BrowserError(f"the page reported: {info['error']}")
    shape = tuple(info.pop("shape"))
    data = np.frombuffer(base64.b64decode(info.pop("data")), dtype="<f4")
    if data.size != int(np.prod(shape)):
        raise BrowserError(f"the page's state has {data.size} values, expected {shape}")
    return data.reshape(shape).copy(), info


def screenshot(page, png, steps: int, seed: int = 0, *, size: Optional[int] = None,
               window=(400, 460), timeout: float = 120.0,
               browser: Optional[str] = None) -> pathlib.Path:
    """A PNG of the page after ``steps`` steps (the canvas shows the grown state)."""
    png = pathlib.Path(png).resolve()
    _browse([f"--screenshot={png}", f"--window-size={window[0]},{window[1]}",
             page_url(page, steps=steps, seed=seed, size=size)], timeout, browser)
    if not png.is_file():
        raise BrowserError(f"the browser wrote no screenshot to {png}")
    return png


HARNESS = """<!DOCTYPE html>
<html><body><pre id="nca-states"></pre><script>
const urls = @URLS@, got = {};
window.addEventListener("message", (ev) => {
  got[ev.data.page] = ev.data.state;
  if (Object.keys(got).length === urls.length) {
    document.getElementById("nca-states").textContent = JSON.stringify(got);
    document.querySelectorAll("iframe").forEach((f) => f.remove());
  }
});
for (const u of urls) {
  const f = document.createElement("iframe");
  f.src = u;
  document.body.appendChild(f);
}
</script></body></html>
"""


def run_urls(urls, *, timeout: float = 300.0, browser: Optional[str] = None):
    """Many page runs in one browser: each URL (``page_url(page, steps=..., seed=...)``) opens
    in a frame of one harness page and posts its state to it. Returns {url: (state, info)}."""
    urls = list(urls)
    with tempfile.TemporaryDirectory(prefix="nca-harness-") as folder:
        harness = pathlib.Path(folder) / "harness.html"
        harness.write_text(HARNESS.replace("@URLS@", json.dumps(urls)), encoding="utf-8")
        # Virtual time: the dump waits until the frames' messages have been handled.
        dom = _browse(["--virtual-time-budget=600000", "--dump-dom", harness.as_uri()], timeout,
                      browser)
    found = re.search(r'<pre id="nca-states">(.*?)</pre>', dom, re.S)
    if not found or not found.group(1).strip():
        raise BrowserError(f"the harness page did not receive the states of all {len(urls)} "
                           "pages")
    states = json.loads(html.unescape(found.group(1)))
    return {u: _state(states[u]) for u in urls}


def run_pages(pages, steps: int, seed: int = 0, *, size: Optional[int] = None,
              targets: Optional[int] = None, timeout: float = 300.0,
              browser: Optional[str] = None):
    """``run_page`` for many pages in one browser (``run_urls``). Returns {page: (state, info)}
    for the resolved paths of ``pages``."""
    pages = [pathlib.Path(p).resolve() for p in pages]
    urls = [page_url(p, steps=steps, seed=seed, size=size, targets=targets) for p in pages]
    states = run_urls(urls, timeout=timeout, browser=browser)
    return {p: states[u] for p, u in zip(pages, urls)}
