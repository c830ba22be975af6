"""Pictures in and out: target images (any file Pillow reads, the Distill sprite), states drawn
as RGB frames, PNG files and GIF or MP4 videos, all written atomically.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterable, Optional, Union

import numpy as np
import torch

from .files import PathLike, atomic_write

# Left to right in the Distill sprite ``emoji_targets.png``; each tile is 40 x 40.
DISTILL_TARGETS = ("lizard", "smiley", "boom", "eye", "fish", "butterfly", "ladybug", "web",
                   "pretzel", "tree")
DISTILL_TILE = 40

VIDEO_EXTENSIONS = (".gif", ".mp4")

# The package's own images (the flower target, the photographs): nca_fast/assets/README.md.
ASSETS = pathlib.Path(__file__).resolve().parent / "assets"


def mp4_missing() -> Optional[str]:
    """Why MP4 videos cannot be written here ("needs ... : pip install ..."), or None."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return ("needs the imageio-ffmpeg package: pip install -e '.[video]' in a checkout of "
                "nca_fast, or pip install 'nca-fast[video]' from a package index")
    return None


# --------------------------------------------------------------------------- target images
def load_target(path_or_image, size: int = 40, pad: int = 16) -> torch.Tensor:
    """A target image as a 4 x (size + 2 pad) x (size + 2 pad) float32 tensor, premultiplied RGBA.

    ``path_or_image``: an image file path, a ``PIL.Image`` or an H x W x 3|4 uint8 array: any
    RGB or RGBA image (or gray, palette, 16-bit gray). As in the article, the image is fitted in
    ``size`` x ``size`` keeping its aspect ratio (Lanczos resampling, up or down; an image
    narrower on one side is centred on a transparent square), scaled to [0, 1], RGB multiplied
    by alpha, then padded with ``pad`` empty cells on each side. Transparent pixels are dead
    cells of the target; an opaque image (RGB, gray, or alpha 255 everywhere) is a full square
    of live cells, which fills the whole grid when ``pad`` is 0.

    A large image is not converted or copied at full size: a JPEG is decoded at the smallest
    1/2, 1/4 or 1/8 scale still at least the fitted size (Pillow's draft mode); other formats are
    decoded once and resized in their own pixel mode before any conversion to RGBA.

    Pixel values are scaled by their type's real range: 8-bit images (every colour mode) by
    255, 16-bit grayscale (PNG, TIFF) by 65535, float images are taken as they are and must lie
    in [0, 1]; 32-bit integer images other than 16-bit PNGs have no known full scale and are
    refused, as are images that are fully transparent (there would be nothing to grow).
    """
    from PIL import Image

    _check_positive("size", size)
    _check_non_negative("pad", pad)
    img, where, fmt = _open_image(path_or_image, size)
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    at = ((size - new[0]) // 2, (size - new[1]) // 2)
    gray = _high_depth_gray(img, where, fmt)
    if gray is None:                                   # 8-bit: Pillow converts every mode
        try:
            if new != (w, h) and img.mode in ("RGB", "RGBA", "L", "LA", "RGBa", "La"):
                img = img.resize(new, Image.LANCZOS)   # before converting
            img = img.convert("RGBA")
            if img.size != new:
                img = img.resize(new, Image.LANCZOS)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: cannot convert its {img.mode!r} pixels to RGBA ({e})"
                             ) from None
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(img, at)
        target = _premultiplied_padded(np.asarray(canvas), pad)
    else:                                              # opaque gray in [0, 1], float32
        g = Image.fromarray(gray)                     # float32: mode "F"
        if new != (w, h):
            g = g.resize(new, Image.LANCZOS)
        rgba = np.zeros((size, size, 4), dtype=np.float32)
        rgba[at[1]:at[1] + new[1], at[0]:at[0] + new[0], :3] = \
            np.clip(np.asarray(g), 0.0, 1.0)[..., None]
        rgba[at[1]:at[1] + new[1], at[0]:at[0] + new[0], 3] = 1.0
        rgba = np.pad(rgba, ((pad, pad), (pad, pad), (0, 0)))
        target = torch.from_numpy(np.ascontiguousarray(rgba.transpose(2, 0, 1)))
    if not bool((target[3] > 0).any()):
        raise ValueError(f"{where}: the image is fully transparent (alpha 0 everywhere"
                         f"{'' if new == (w, h) else f' once fitted in {size} x {size} cells'})"
                         f"; there is nothing to grow toward")
    return target


def _high_depth_gray(img, where: str, fmt) -> Optional[np.ndarray]:
    """The pixels of a 16-bit or float grayscale image as float32 in [0, 1]; None for the
    8-bit modes, which ``Image.convert`` handles (it clips wider ones: 40000 became white,
    0.5 black). Raises ValueError for pixels whose full scale is unknown."""
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32) / 65535.0
    if img.mode == "I":
        a = np.asarray(img)
        if fmt == "PNG" and a.size and 0 <= a.min() and a.max() <= 65535:
            return a.astype(np.float32) / 65535.0      # how some Pillows read 16-bit PNGs
        raise ValueError(f"{where}: 32-bit integer pixels ({a.min() if a.size else 0} to "
                         f"{a.max() if a.size else 0}) have no known full scale; save the "
                         f"image as an 8- or 16-bit PNG")
    if img.mode == "F":
        a = np.asarray(img).astype(np.float32)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0.0 or a.max() > 1.0)):
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
            raise ValueError(f"{where}: float pixels must lie in [0, 1], found values from "
                             f"{lo:g} to {hi:g}{'' if np.isfinite(a).all() else ' and NaN/inf'}"
                             f"; rescale the image or save it as an 8- or 16-bit PNG")
        return a
    return None


def load_distill_target(which: Union[int, str], sprite: PathLike, *, pad: int = 16) -> torch.Tensor:
    """One target of the Distill sprite (``emoji_targets.png``) as a 4 x (40 + 2 pad)^2 tensor.

    ``which``: an index 0..9 or a name from ``DISTILL_TARGETS`` (lizard, smiley, boom, eye, fish,
    butterfly, ladybug, web, pretzel, tree). Premultiplied RGBA in [0, 1], padded by ``pad``
    empty cells on each side: the article's 72 x 72 training target at the default.
    """
    from PIL import Image

    _check_non_negative("pad", pad)
    if isinstance(which, str):
        if which not in DISTILL_TARGETS:
            raise ValueError(f"which: unknown Distill target {which!r}; expected an index 0..9 or "
                             f"one of {list(DISTILL_TARGETS)}")
        index = DISTILL_TARGETS.index(which)
    elif (isinstance(which, int) and not isinstance(which, bool)
          and 0 <= which < len(DISTILL_TARGETS)):
        index = which
    else:
        raise ValueError(f"which: expected an index 0..{len(DISTILL_TARGETS) - 1} or a target "
                         f"name, got {which!r}")
    sprite = pathlib.Path(sprite)
    if not sprite.exists():
        raise FileNotFoundError(f"{sprite}: no such sprite image")
    try:
        with Image.open(sprite) as im:
            img = im.convert("RGBA")
    except Exception as e:
        raise ValueError(f"{sprite}: not a readable image ({e})") from None
    need = (DISTILL_TILE * len(DISTILL_TARGETS), DISTILL_TILE)
    if img.size != need:
        raise ValueError(f"{sprite}: expected a {need[0]} x {need[1]} sprite of "
                         f"{len(DISTILL_TARGETS)} tiles, got {img.size[0]} x {img.size[1]}")
    tile = np.asarray(img)[:, index * DISTILL_TILE:(index + 1) * DISTILL_TILE]
    return _premultiplied_padded(tile, pad)


def _open_image(obj, fit: Optional[int] = None):
    """(PIL image, name for messages, file format or None) of a path, PIL image or array; a file
    is decoded at a reduced scale when its format allows one that still covers ``fit`` cells."""
    from PIL import Image

    if isinstance(obj, Image.Image):
        return obj, "path_or_image", getattr(obj, "format", None)
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8 or obj.ndim != 3 or obj.shape[2] not in (3, 4):
            raise ValueError(f"path_or_image: expected an H x W x 3|4 uint8 array, got "
                             f"{obj.dtype} {obj.shape}")
        return Image.fromarray(obj), "path_or_image", None
    if isinstance(obj, (str, os.PathLike)):
        p = pathlib.Path(obj)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such image file")
        try:
            im = Image.open(p)
            fmt = im.format
            if fit is not None and max(im.size) > fit:
                w, h = im.size
                scale = fit / max(w, h)
                im.draft(im.mode if im.mode in ("RGB", "L") else None,
                         (max(1, round(w * scale)), max(1, round(h * scale))))
            im.load()
            return im, str(p), fmt
        except Exception as e:
            raise ValueError(f"{p}: not a readable image ({e})") from None
    raise TypeError(f"path_or_image: expected a path, a PIL.Image or a uint8 array, got "
                    f"{type(obj).__name__}")


def _premultiplied_padded(rgba_u8: np.ndarray, pad: int) -> torch.Tensor:
    img = rgba_u8.astype(np.float32) / 255.0
    img[..., :3] *= img[..., 3:4]
    img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _check_positive(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


def _check_non_negative(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")


# --------------------------------------------------------------------------- frames and videos
def to_rgb(frame: torch.Tensor, *, scale: int = 1) -> np.ndarray:
    """A state (C x H x W, C >= 4) as an (H*scale) x (W*scale) x 3 uint8 image on white.

    As in the article: ``rgb + 1 - alpha`` with alpha (channel 3) clipped to [0, 1], the result
    clipped to [0, 1]; RGB is premultiplied, so this composes the cells over a white background.
    ``scale``: nearest-neighbour upscaling factor, so that a 72 x 72 grid is visible.
    """
    if not isinstance(frame, torch.Tensor):
        raise TypeError(f"frame: expected a torch.Tensor C x H x W, got {type(frame).__name__}")
    if frame.dim() == 4 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.dim() != 3 or frame.shape[0] < 4:
        raise ValueError(f"frame: expected a C x H x W state with C >= 4 (RGBA first), got shape "
                         f"{tuple(frame.shape)}")
    _check_positive("scale", scale)
    x = frame.detach().to("cpu", torch.float32)
    a = x[3].clamp(0.0, 1.0)
    rgb = (x[:3] + 1.0 - a).clamp(0.0, 1.0)
    img = (rgb * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.ascontiguousarray(img)


def write_png(frame: torch.Tensor, path: PathLike, *, scale: int = 1) -> pathlib.Path:
    """Write one state (C x H x W) as an RGB PNG on white (see ``to_rgb``), atomically."""
    from PIL import Image

    img = to_rgb(frame, scale=scale)
    return atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def write_video(frames: Iterable[torch.Tensor], path: PathLike, *, fps: float = 20.0,
                scale: int = 1) -> pathlib.Path:
    """Write states (each C x H x W) as an animated GIF or an MP4, chosen by ``path``'s extension.

    Frames are rendered on white (see ``to_rgb``) and upscaled by ``scale`` (nearest neighbour).
    GIF needs only Pillow; MP4 needs the ``imageio-ffmpeg`` package
    (``pip install -e '.[video]'`` in a checkout). The file is written atomically.
    """
    path = pathlib.Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(f"{path}: unsupported video extension {path.suffix!r}; expected one of "
                         f"{list(VIDEO_EXTENSIONS)}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise ValueError(f"fps: expected a number in (0, 1000], got {fps!r}")
    if ext == ".mp4" and mp4_missing():
        raise ImportError(f"{path}: writing MP4 {mp4_missing()} (or write a .gif)")
    images = [to_rgb(f, scale=scale) for f in frames]
    if not images:
        raise ValueError("frames: expected at least one frame")
    if any(im.shape != images[0].shape for im in images):
        raise ValueError("frames: every frame must have the same height and width")
    stack = np.stack(images)
    if ext == ".gif":
        return atomic_write(path, lambda tmp: _write_gif(stack, tmp, fps))
    return atomic_write(path, lambda tmp: _write_mp4(stack, tmp, fps))


def _write_gif(stack: np.ndarray, tmp: pathlib.Path, fps: float) -> None:
    from PIL import Image

    first, *rest = (Image.fromarray(im) for im in stack)
    # GIF delays are whole centiseconds; Pillow takes milliseconds and rounds.
    first.save(tmp, format="GIF", save_all=True, append_images=rest, loop=0,
               duration=max(20, round(1000.0 / fps)), disposal=1)


def _write_mp4(stack: np.ndarray, tmp: pathlib.Path, fps: float) -> None:
    import imageio.v2 as imageio

    # yuv420p (the format every player reads) needs even sides: pad with white, never rescale.
    n, h, w, _ = stack.shape
    stack = np.pad(stack, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1)
    try:
        for im in stack:
            writer.append_data(im)
    finally:
        writer.close()
