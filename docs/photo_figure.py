"""Score a photo model and draw it growing from the seed (docs/photo64.png).

    python docs/photo_figure.py MODEL PHOTO [--size 64] [--longest N] [--out OUT.png]

Grows MODEL (a .safetensors from ``nca-fast train`` or a shipped name) from one live cell on the
SIZE-cell grid of PHOTO fitted in SIZE cells with no padding (``--preset photo``), with the
long-horizon score's update-mask seed (7), and prints the RGB MSE and PSNR at 1, 2, 5 and 10 x
the longest training rollout (read from the model's record unless ``--longest`` is given) next
to the baseline: the photo's mean colour everywhere. PSNR = -10 log10(MSE) for pixel values in
[0, 1]; the MSE is over the RGB channels of the state as the model leaves them (the loss's
values, not clipped). With ``--out``, draws the photo and the state at a few steps from the seed
and at 1x and 10x, each labelled.
"""
from __future__ import annotations

import argparse
import math

import torch
from PIL import Image, ImageDraw

import nca_fast
from nca_fast.files import atomic_write
from nca_fast.media import load_target, to_rgb
from nca_fast.model import shipped_models
from nca_fast.training import stability


def psnr(mse: float) -> float:
    return -10 * math.log10(mse) if mse > 0 else math.inf


def score(model, target: torch.Tensor, longest: int):
    """[(multiple, steps, RGB MSE, state)] at stability.MULTIPLES x longest, and the baseline."""
    grid = int(target.shape[-1])
    rows, done = [], 0
    x = model.seed_state(1, grid, grid)
    with torch.no_grad():
        for m, s in zip(stability.MULTIPLES, stability.horizon_steps(longest)):
            x = model(x, s - done, seed=stability.SEED, first_step=done)
            done = s
            rows.append((m, s, float(((x[0, :3] - target[:3]) ** 2).mean()), x[0].clone()))
    mean = target[:3].mean(dim=(1, 2), keepdim=True)
    baseline = float(((target[:3] - mean) ** 2).mean())
    return rows, baseline


def figure(model, target, longest, rows, out, side=192):
    grid = int(target.shape[-1])
    early = [s for s in (8, 16, 24, 32, 48) if s < longest]
    panels = [("photo", torch.cat([target, torch.zeros(12, grid, grid)]))]
    with torch.no_grad():
        x, done = model.seed_state(1, grid, grid), 0
        for s in early:
            x = model(x, s - done, seed=stability.SEED, first_step=done)
            done = s
            panels.append((f"step {s}", x[0].clone()))
    for m, s, err, state in (rows[0], rows[-1]):
        panels.append((f"{m}x = step {s}: {psnr(err):.1f} dB", state))
    img = Image.new("RGB", (len(panels) * (side + 6), side + 22), "white")
    draw = ImageDraw.Draw(img)
    for i, (label, state) in enumerate(panels):
        pic = Image.fromarray(to_rgb(state)).resize((side, side), Image.NEAREST)
        img.paste(pic, (i * (side + 6), 0))
        draw.text((i * (side + 6) + 4, side + 5), label, fill="black")
    atomic_write(out, lambda tmp: img.save(tmp, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("photo")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--longest", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    path = shipped_models().get(a.model, a.model)
    model = nca_fast.load(path, backend="torch")
    longest = a.longest or stability.model_facts(path).get("longest_rollout")
    if not longest:
        p.error("--longest: the model's record has no rollout range; give it")
    target = load_target(a.photo, a.size, 0)
    rows, baseline = score(model, target, int(longest))
    print(f"{a.photo} on {a.size} x {a.size} cells; mean-colour baseline RGB MSE {baseline:.4f} "
          f"(PSNR {psnr(baseline):.2f} dB)")
    for m, s, err, _ in rows:
        print(f"  {m:>3}x {s:>5} steps: RGB MSE {err:.4f}  PSNR {psnr(err):.2f} dB  "
              f"({err / baseline:.2f} x the baseline's MSE)")
    print(f"  10x / 1x MSE: {rows[-1][2] / rows[0][2]:.2f}")
    if a.out:
        figure(model, target, int(longest), rows, a.out)


if __name__ == "__main__":
    main()
