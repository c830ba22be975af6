"""Draw the project's default training target: a flower, made with Pillow primitives only.

Part of nca_fast and under the project's license (no third-party artwork). The picture is drawn
at 4x and downsampled with Lanczos for smooth, anti-aliased edges; the background is transparent,
as the Growing-NCA recipe needs (alpha marks the cells that should be alive).

    python -m nca_fast.assets.make_target [OUT.png] [--size 256]
"""
from __future__ import annotations

import argparse
import math
import pathlib

from PIL import Image, ImageDraw

OUT = pathlib.Path(__file__).resolve().parent / "default_target.png"

# Distinct hues and a dark outline, so that a model has to learn both shape and colour.
PETAL = (236, 72, 153, 255)        # pink
PETAL_INNER = (249, 168, 212, 255)  # light pink
CENTRE = (250, 204, 21, 255)       # yellow
CENTRE_DOT = (180, 83, 9, 255)     # brown
STEM = (22, 163, 74, 255)          # green
LEAF = (74, 222, 128, 255)         # light green
OUTLINE = (60, 20, 40, 255)


def draw(size: int = 256) -> Image.Image:
    """The flower as a ``size`` x ``size`` RGBA image on a transparent background."""
    if size < 8:
        raise ValueError(f"size: expected at least 8 pixels, got {size}")
    s = 4 * size                        # supersampling for anti-aliasing
    u = s / 100.0                      # drawing unit: 1/100 of the side
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx, cy = 50 * u, 40 * u

    def ellipse(x0, y0, x1, y1, fill, width=0):
        d.ellipse([x0 * u, y0 * u, x1 * u, y1 * u], fill=fill, outline=OUTLINE if width else None,
                  width=int(width * u))

    # Stem and a leaf on each side, behind the flower head.
    d.line([(cx, cy), (cx, 97 * u)], fill=OUTLINE, width=int(7 * u))
    d.line([(cx, cy), (cx, 97 * u)], fill=STEM, width=int(4 * u))
    for side in (-1, 1):
        leaf = [(cx, 80 * u), (cx + side * 14 * u, 66 * u), (cx + side * 30 * u, 70 * u),
                (cx + side * 16 * u, 84 * u)]
        d.polygon(leaf, fill=LEAF, outline=OUTLINE, width=int(1.5 * u))
        d.line([(cx, 80 * u), (cx + side * 24 * u, 71 * u)], fill=STEM, width=int(1.2 * u))

    # Six petals: ellipses rotated about the centre, each drawn as a polygon.
    for i in range(6):
        a = math.pi / 2 + i * math.pi / 3
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            ex, ey = 20 * math.cos(t) + 20, 10.5 * math.sin(t)   # ellipse from the centre out
            pts.append((cx + (ex * math.cos(a) - ey * math.sin(a)) * u,
                        cy - (ex * math.sin(a) + ey * math.cos(a)) * u))
        d.polygon(pts, fill=PETAL, outline=OUTLINE, width=int(1.5 * u))
        mid = [(cx + (p[0] - cx) * 0.55, cy + (p[1] - cy) * 0.55) for p in pts]
        d.polygon(mid, fill=PETAL_INNER)

    ellipse(37, 27, 63, 53, CENTRE, width=1.5)
    for dx, dy in ((-5, -4), (5, -4), (0, 5), (-6, 4), (6, 4), (0, -7)):
        ellipse(50 + dx - 1.8, 40 + dy - 1.8, 50 + dx + 1.8, 40 + dy + 1.8, CENTRE_DOT)
    return img.resize((size, size), Image.LANCZOS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(OUT), help=f"PNG to write (default {OUT.name})")
    p.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    args = p.parse_args(argv)
    from nca_fast.files import atomic_write

    img = draw(args.size)
    atomic_write(args.out, lambda tmp: img.save(tmp, format="PNG", optimize=True))
    print(f"wrote {args.out} ({args.size}x{args.size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
