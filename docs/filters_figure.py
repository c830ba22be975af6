"""Draw a model's learned perception filters next to the bank they started from
(docs/filters_quick.png).

    python docs/filters_figure.py MODEL [--channel C] [--out OUT.png]

MODEL: a .safetensors written by ``nca-fast train --learn-filters ...``. One row holds the
fixed bank the filters started from (``config.filters``: identity, Sobel-x, Sobel-y, ...), the
row below the learned taps; each 3 x 3 filter is drawn as coloured squares (red positive, blue
negative, white zero, one colour scale for the whole figure) with each tap's value written in.
For depthwise filters (F x C x 3 x 3) ``--channel`` picks the channel drawn (default 0).
Prints the taps and, per filter, the largest change from its start.
"""
from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

import nca_fast
from nca_fast.config import filter_tensor
from nca_fast.files import atomic_write

NAMES = ("identity", "Sobel-x", "Sobel-y", "Laplacian")


def colour(v: float, scale: float):
    """Red for positive, blue for negative, white for zero; ``scale`` maps to full colour."""
    t = max(-1.0, min(1.0, v / scale)) if scale > 0 else 0.0
    fade = int(round(255 * (1 - abs(t))))
    return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def draw_filter(draw: ImageDraw.ImageDraw, taps: torch.Tensor, x0: int, y0: int, cell: int,
                scale: float) -> None:
    for dy in range(3):
        for dx in range(3):
            v = float(taps[dy, dx])
            box = (x0 + dx * cell, y0 + dy * cell, x0 + (dx + 1) * cell - 1,
                   y0 + (dy + 1) * cell - 1)
            draw.rectangle(box, fill=colour(v, scale), outline=(160, 160, 160))
            draw.text((box[0] + 4, box[1] + cell // 2 - 6), f"{v:+.2f}", fill="black")


def figure(start: torch.Tensor, learned: torch.Tensor, title: str, out, cell: int = 44) -> None:
    """start, learned: F x 3 x 3. Two labelled rows of F filters, written to ``out`` (PNG)."""
    f = start.shape[0]
    scale = float(torch.cat([start.abs().flatten(), learned.abs().flatten()]).max())
    label_w, gap, top = 110, 16, 26
    side = 3 * cell
    width = label_w + f * (side + gap)
    height = top + 2 * (side + 22) + 8
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title, fill="black")
    for row, (name, bank) in enumerate((("fixed (start)", start), ("learned", learned))):
        y0 = top + row * (side + 22)
        draw.text((6, y0 + side // 2 - 6), name, fill="black")
        for k in range(f):
            x0 = label_w + k * (side + gap)
            draw_filter(draw, bank[k], x0, y0, cell, scale)
            label = NAMES[k] if k < len(NAMES) else f"filter {k}"
            draw.text((x0, y0 + side + 4), label, fill="black")
    atomic_write(out, lambda tmp: img.save(tmp, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--channel", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    model = nca_fast.load(a.model, backend="torch")
    cfg = model.config
    if cfg.learn_filters is None:
        p.error(f"model: {a.model} has a fixed filter bank (learn_filters None): nothing learned "
                "to draw")
    learned = model.filters.detach()
    where = "shared: one bank for every channel"
    if cfg.learn_filters == "depthwise":
        if not 0 <= a.channel < cfg.channels:
            p.error(f"--channel: expected an integer in [0, {cfg.channels}), got {a.channel}")
        learned = learned[:, a.channel]
        where = f"depthwise: channel {a.channel}"
    start = filter_tensor(cfg)
    for k in range(start.shape[0]):
        name = NAMES[k] if k < len(NAMES) else f"filter {k}"
        change = float((learned[k] - start[k]).abs().max())
        print(f"{name}: largest change {change:.4f}\n{learned[k].numpy().round(4)}")
    if a.out:
        figure(start, learned, f"learned filters ({where}) and the bank they started from",
               a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
