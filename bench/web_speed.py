"""Steps per second of the exported web page in a headless Chromium, next to the torch backend.

    python -m bench.web_speed [--model PATH|NAME] [--sizes 72 256] [--steps 96] [--repeats 3]
                              [--threads N]

The page runs ``--steps`` steps from the seed (``PAGE.html#steps=N&seed=0&size=S``) and times
them itself, waiting for the last one to finish; its shaders are compiled during the first
step, so each repeat runs the page twice, for 1 and for N steps, and counts N - 1 steps over the
difference. Headless Chromium here has no GPU: WebGL2 runs on the CPU (SwiftShader). The torch
backend grows the same model from the same seed state for the same steps (``torch.no_grad()``,
``--threads`` threads). The two alternate within each repeat; the figures are medians.

Both skip the work of cells far from live ones, so growing from the seed is the fast case;
``--no-alive`` runs the same weights with alive masking off, where every cell is computed in
every step (the worst case, as for texture NCAs).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from nca_fast.cli import resolve_model
from nca_fast.export import export_html
from nca_fast.export.headless import find_chromium, run_page
from nca_fast.model import load_any

DISTILL = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "distill"


def page_rate(page, size: int, steps: int) -> float:
    _, one = run_page(page, 1, 0, size=size, timeout=900)
    _, full = run_page(page, steps, 0, size=size, timeout=900)
    return (steps - 1) / max(full["ms"] - one["ms"], 1e-3) * 1000.0


def torch_rate(model, size: int, steps: int) -> float:
    x = model.seed_state(1, size, size)
    with torch.no_grad():
        model(x, 1, seed=0)                                  # warm-up
        t0 = time.perf_counter()
        model(x, steps, seed=0)
        return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.web_speed",
                                description=__doc__.split("\n")[0])
    default = DISTILL / "ex3_lizard.json"
    p.add_argument("--model", default=str(default) if default.is_file() else "flower")
    p.add_argument("--sizes", type=int, nargs="+", default=[72, 256])
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-alive", action="store_true",
                   help="alive masking off: every cell computed (the worst case)")
    args = p.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print("no Chromium found: install Debian's chromium package", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_any(path, backend="torch")
    if args.no_alive:
        from nca_fast import NCA

        plain = NCA(model.config.replace(alive_threshold=None), backend="torch")
        plain.load_state_dict(model.state_dict())
        model = plain
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"model {path.name}{' (alive masking off)' if args.no_alive else ''}, {args.steps} "
          f"steps from the seed, {version} headless "
          f"(WebGL2 on SwiftShader), torch {torch.__version__} with {args.threads} threads")
    print("| grid | page steps/s | torch backend steps/s | page / torch |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        page = export_html(model, pathlib.Path(folder) / "page.html", name=path.stem)
        for size in args.sizes:
            pages, torches = [], []
            for _ in range(args.repeats):
                pages.append(page_rate(page, size, args.steps))
                torches.append(torch_rate(model, size, args.steps))
            pr, tr = statistics.median(pages), statistics.median(torches)
            print(f"| {size} x {size} | {pr:.1f} ({min(pages):.1f}-{max(pages):.1f}) | "
                  f"{tr:.1f} ({min(torches):.1f}-{max(torches):.1f}) | {pr / tr:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
