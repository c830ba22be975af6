"""Draw docs/hires_curriculum.png: each stage of a size curriculum grown from the seed.

    python docs/hires_figure.py OUT.png MODEL:GRID:STEPS [MODEL:GRID:STEPS ...]

Every panel grows MODEL (a .safetensors from ``nca-fast train``) from one live cell on a
GRID x GRID grid for STEPS steps (update-mask seed 7, the torch backend) and draws the RGB of
the final state on white, scaled to a common height, with "size S, step N" below it.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

import nca_fast
from nca_fast.files import atomic_write
from nca_fast.media import to_rgb

HEIGHT = 384
LABEL = 22


def panel(spec: str) -> Image.Image:
    path, grid, steps = spec.rsplit(":", 2)
    grid, steps = int(grid), int(steps)
    model = nca_fast.load(path, backend="torch")
    with torch.no_grad():
        y = model(model.seed_state(1, grid, grid), steps, seed=7)
    rgb = Image.fromarray(to_rgb(y[0]))
    rgb = rgb.resize((HEIGHT, HEIGHT), Image.NEAREST if grid < HEIGHT else Image.LANCZOS)
    out = Image.new("RGB", (HEIGHT, HEIGHT + LABEL), "white")
    out.paste(rgb, (0, 0))
    ImageDraw.Draw(out).text((6, HEIGHT + 4), f"{grid} x {grid} grid, step {steps}", fill="black")
    return out


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    panels = [panel(s) for s in argv[1:]]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1),
                              panels[0].height), "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 8
    atomic_write(argv[0], lambda tmp: sheet.save(tmp, format="PNG", optimize=True))
    print(f"wrote {argv[0]} {sheet.size}; mean colour {np.asarray(sheet).mean():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
