"""Draw a long-horizon figure (docs/holds_96.png): models grown from the seed, one row each, at
1, 2, 5 and 10 x their longest training rollout, each panel labelled with its score.

    python docs/holds_figure.py OUT.png SIZE PAD LONGEST LABEL=MODEL [LABEL=MODEL ...]

Every row grows MODEL (a .safetensors from ``nca-fast train``) from one live cell on the
(SIZE + 2 PAD)-cell grid of the shipped target fitted in SIZE cells (update-mask seed 7, the
torch backend, ``nca_fast.training.stability``'s seed and multiples) and draws the RGB of the
state at each multiple of LONGEST steps, with the MSE to the target and the live cells against
the target's below it, and LABEL and whether the pattern holds to the left.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

import nca_fast
from nca_fast.files import atomic_write
from nca_fast.media import ASSETS, load_target, to_rgb
from nca_fast.training import stability

SIDE = 224
LABEL = 34
LEFT = 190


def row(label: str, path: str, target: torch.Tensor, longest: int) -> Image.Image:
    model = nca_fast.load(path, backend="torch")
    grid = int(target.shape[-1])
    t_live = stability.target_live_cells(target)
    steps = stability.horizon_steps(longest)
    out = Image.new("RGB", (LEFT + len(steps) * (SIDE + 6), SIDE + LABEL), "white")
    draw = ImageDraw.Draw(out)
    x, done, points = model.seed_state(1, grid, grid), 0, []
    with torch.no_grad():
        for i, (m, s) in enumerate(zip(stability.MULTIPLES, steps)):
            x = model(x, s - done, seed=stability.SEED, first_step=done)
            done = s
            err = float(stability.mse(x, target)[0])
            live = int(stability.live_cells(x)[0])
            points.append(stability.HorizonPoint(m, s, err, live, t_live))
            pic = Image.fromarray(to_rgb(x[0])).resize((SIDE, SIDE), Image.NEAREST)
            left = LEFT + i * (SIDE + 6)
            out.paste(pic, (left, 0))
            draw.text((left + 4, SIDE + 3), f"{m}x = step {s}", fill="black")
            draw.text((left + 4, SIDE + 17), f"MSE {err:.4f}, live {live / t_live:.2f}x",
                      fill="black")
    verdict = "holds" if stability.holds(points) else "does not hold"
    draw.text((6, SIDE // 2 - 10), label, fill="black")
    draw.text((6, SIDE // 2 + 6), verdict, fill="darkgreen" if verdict == "holds" else "darkred")
    return out


def main(argv) -> int:
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    out, size, pad, longest = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    target = load_target(ASSETS / "default_target.png", size, pad)
    rows = [row(*spec.split("=", 1), target, longest) for spec in argv[4:]]
    sheet = Image.new("RGB", (rows[0].width, sum(r.height + 8 for r in rows) - 8), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 8
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG", optimize=True))
    print(f"wrote {out} {sheet.size}; mean colour {np.asarray(sheet).mean():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
