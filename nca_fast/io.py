"""Files in and out: models (ours and the Distill exports), target images, PNG frames and videos.

Nothing here uses pickle. Our model format is one ``.safetensors`` file: the four parameter
tensors, with the ``NCAConfig`` as JSON in the safetensors metadata. Every file a user keeps is
written through ``atomic_write``, so an interrupted save never leaves a half-written file behind.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import pathlib
import re
import secrets
import struct
import sys
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from .config import FILTER_BANKS, NCAConfig
from .model import NCA

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = "1"
CONFIG_KEY = "nca_fast_config"
VERSION_KEY = "format_version"
PARAM_NAMES = ("w1.weight", "w1.bias", "w2.weight", "w2.bias")

# Left to right in the Distill sprite ``emoji_targets.png``; each tile is 40 x 40.
DISTILL_TARGETS = ("lizard", "smiley", "boom", "eye", "fish", "butterfly", "ladybug", "web",
                   "pretzel", "tree")
DISTILL_TILE = 40

VIDEO_EXTENSIONS = (".gif", ".mp4")

# Sizes accepted from a model file, which may come from anyone: far above any published NCA
# (16 channels, 128 hidden units, 3-4 filters), far below what would exhaust memory before the
# tensors are checked. A model built in Python (NCAConfig) has no such cap.
MAX_FILE_CHANNELS = 1024
MAX_FILE_HIDDEN = 16384
MAX_FILE_FILTERS = 64
SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: PathLike, write_fn: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Create or replace ``path`` so that readers see either the old file or the complete new one.

    ``write_fn(tmp)`` must write the whole content to ``tmp``, a fresh empty file in the same
    folder whose name ends with the same extension as ``path`` (so writers that pick a format by
    extension, like imageio, still work). It may reopen or truncate ``tmp`` freely. The new file is
    then flushed to disk (fsync) and renamed over ``path`` (``os.replace``, atomic on POSIX and
    Windows). If ``write_fn`` raises, the temporary file is removed, ``path`` is left untouched
    and the exception propagates. Returns ``path`` as a ``pathlib.Path``.

    Example: ``atomic_write("log.json", lambda tmp: tmp.write_text(json.dumps(d)))``.
    """
    path = pathlib.Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    # O_EXCL on a random name: never clobbers another writer's temporary file; mode 0o666 lets
    # the umask decide the final permissions, as for a file created with open().
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
    return path


# atomic_write's temporary files: ".NAME.<8 hex digits>.tmp<NAME's extension>".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def remove_stale_temporaries(folder: PathLike) -> List[pathlib.Path]:
    """Delete the temporary files that ``atomic_write`` leaves behind when its process is
    killed mid-write (SIGKILL, power loss), e.g. ``.checkpoint.safetensors.1a2b3c4d.tmp
    .safetensors``. Only call it while no other process writes to ``folder`` (a run folder
    whose lock is held). Returns the files removed."""
    removed = []
    for p in pathlib.Path(folder).iterdir():
        m = _TEMP_NAME.match(p.name)
        if m is None or (m.group("suffix") or "") != pathlib.PurePath(m.group("name")).suffix:
            continue
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    return removed


def writable_folder(folder: PathLike) -> pathlib.Path:
    """Create ``folder`` (with its parents) if needed and check that files can be created in it.

    Raises OSError with a one-line message naming the folder and the reason (permission denied,
    a file in the way, read-only file system, ...). Returns the folder as a ``pathlib.Path``.
    """
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder {folder}: {e.strerror or e}") from None
    try:
        fd, name = tempfile.mkstemp(prefix=".nca_fast-write-check.", dir=folder)
    except OSError as e:
        raise OSError(f"cannot write in the folder {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)
    return folder


def parse_json(text: Union[str, bytes], where: str):
    """``json.loads`` with every failure as a one-line ValueError naming ``where``: syntax
    errors, bytes that are not UTF-8, and nesting too deep for Python's recursion limit."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to be a model or config "
                         f"(deeper than Python's recursion limit, "
                         f"{sys.getrecursionlimit()})") from None


def _fsync_folder(folder: pathlib.Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- our model format
def save(model: NCA, path: PathLike, *, metadata: Optional[Dict[str, str]] = None) -> pathlib.Path:
    """Write ``model`` to one ``.safetensors`` file at ``path``, atomically.

    The file holds the tensors ``w1.weight`` (hidden x F*C x 1 x 1), ``w1.bias`` (hidden),
    ``w2.weight`` (C x hidden x 1 x 1) and ``w2.bias`` (C) as in ``model.state_dict()``, and the
    metadata entries ``nca_fast_config`` (the ``NCAConfig`` as JSON) and ``format_version``.
    ``metadata``: more string entries to store with them (e.g. how the model was trained); read
    them back with ``read_metadata``.
    """
    from safetensors.torch import save as st_save

    if not isinstance(model, NCA):
        raise TypeError(f"model: expected an nca_fast.NCA, got {type(model).__name__}")
    extra = dict(metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: expected str keys and values, got {k!r}: "
                            f"{type(v).__name__}")
        if k in (CONFIG_KEY, VERSION_KEY):
            raise ValueError(f"metadata: {k!r} is reserved for the model's own entries")
    state = model.state_dict()
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in PARAM_NAMES}
    metadata = {**extra, CONFIG_KEY: model.config.to_json(), VERSION_KEY: FORMAT_VERSION}
    data = st_save(tensors, metadata=metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The safetensors metadata of a model file: its config, format version and the entries
    given to ``save(..., metadata=...)``. Reads only the header."""
    path = pathlib.Path(path)
    return dict(_safetensors_header(path, _read_bytes(path, "model file")).get("__metadata__")
                or {})


def load(path: PathLike, *, backend: str = "auto") -> NCA:
    """Read a model written by ``save`` / ``NCA.save``; returns an ``NCA`` on the CPU.

    Raises FileNotFoundError when ``path`` does not exist and ValueError, naming the file and the
    problem, when it is not a valid nca_fast model (truncated, corrupt, not safetensors, missing
    metadata or tensors, shapes that disagree with the stored config, non-finite weights).
    """
    from safetensors.torch import load as st_load

    path = pathlib.Path(path)
    data = _read_bytes(path, "model file")
    header = _safetensors_header(path, data)
    meta = header.get("__metadata__") or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: not an nca_fast model: the safetensors metadata has no "
                         f"{CONFIG_KEY!r} entry (files from NCA.save have one)")
    version = meta.get(VERSION_KEY)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported by this nca_fast "
                         f"(expected {FORMAT_VERSION!r}); upgrade nca_fast to read it")
    doc = parse_json(meta[CONFIG_KEY], f"{path}: model config")
    try:
        config = NCAConfig.from_dict(doc)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid model config: {e}") from None
    # Before anything is allocated: the config's sizes are capped, and the tensors the header
    # announces must be the ones the config needs (the header's data is in the file, checked
    # by _safetensors_header, so nothing larger than the file is read).
    _check_file_sizes(path, config.channels, config.hidden, config.num_filters)
    _check_header_shapes(path, header, config)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise ValueError(f"{path}: corrupt safetensors data: {e}") from None
    model = NCA(config, backend=backend)
    _load_parameters(model, tensors, path)
    return model


def _read_bytes(path: pathlib.Path, what: str) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {what}")
    if path.is_dir():
        raise ValueError(f"{path}: expected a {what}, found a folder")
    return path.read_bytes()


def _safetensors_header(path: pathlib.Path, data: bytes) -> dict:
    """The JSON header of a safetensors file, checked against the file's length."""
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors model file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if data[8:9] != b"{":
        raise ValueError(f"{path}: not a safetensors model file (no JSON header after the "
                         f"8-byte length)")
    if n > len(data) - 8:
        raise ValueError(f"{path}: truncated or not a safetensors file (header of {n} bytes "
                         f"announced, {len(data) - 8} present)")
    try:
        header = parse_json(data[8:8 + n], "header")
    except ValueError as e:
        raise ValueError(f"{path}: corrupt or not a safetensors file (unreadable {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    payload = len(data) - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry {name!r}") from None
    if end > payload:
        raise ValueError(f"{path}: truncated: tensor data needs {end} bytes, {payload} present")
    return header


def _param_shapes(config: NCAConfig) -> Dict[str, tuple]:
    """The parameter shapes of an NCA with ``config`` (as in its state_dict), without one."""
    c, h = config.channels, config.hidden
    return {"w1.weight": (h, config.num_filters * c, 1, 1), "w1.bias": (h,),
            "w2.weight": (c, h, 1, 1), "w2.bias": (c,)}


def _check_file_sizes(path, channels: int, hidden: int, num_filters: int) -> None:
    for name, v, cap in (("channels", channels, MAX_FILE_CHANNELS),
                         ("hidden", hidden, MAX_FILE_HIDDEN),
                         ("filters", num_filters, MAX_FILE_FILTERS)):
        if v > cap:
            raise ValueError(f"{path}: {name}={v} is more than a model file may ask for "
                             f"(at most {cap}); refusing to allocate it")


def _check_header_shapes(path, header: dict, config: NCAConfig) -> None:
    """The safetensors header's tensor names, shapes and dtypes against the config's."""
    names = [k for k in header if k != "__metadata__"]
    missing = [k for k in PARAM_NAMES if k not in names]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; expected {list(PARAM_NAMES)}")
    extra = sorted(set(names) - set(PARAM_NAMES))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra}; expected {list(PARAM_NAMES)}")
    for k, shape in _param_shapes(config).items():
        info = header[k]
        got = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(got, list) or tuple(got) != shape:
            raise ValueError(f"{path}: tensor {k!r} has shape "
                             f"{tuple(got) if isinstance(got, list) else got!r}, but the stored "
                             f"config needs {shape}")
        if info.get("dtype") not in SAFETENSORS_FLOAT_DTYPES:
            raise ValueError(f"{path}: tensor {k!r} has dtype {info.get('dtype')!r}, expected "
                             f"floating point ({', '.join(SAFETENSORS_FLOAT_DTYPES)})")


def _load_parameters(model: NCA, tensors: dict, path) -> None:
    """Check names, shapes and values of ``tensors`` and copy them into ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in PARAM_NAMES}
    missing = [k for k in PARAM_NAMES if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; expected {list(PARAM_NAMES)}")
    extra = sorted(set(tensors) - set(PARAM_NAMES))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra}; expected {list(PARAM_NAMES)}")
    for k in PARAM_NAMES:
        t = tensors[k]
        if tuple(t.shape) != expected[k]:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, but the stored "
                             f"config needs {expected[k]}")
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {k!r} holds NaN or infinite values")
    with torch.no_grad():
        for k in PARAM_NAMES:
            layer, attr = k.split(".")
            getattr(getattr(model, layer), attr).copy_(tensors[k])


# --------------------------------------------------------------------------- Distill exports
def load_distill(path: PathLike, *, backend: str = "auto") -> NCA:
    """Read a Distill WebGL 8-bit export (``ex*_NAME.json``) as an ``NCA`` on the CPU.

    Format (shared/data/distill/README.md): a JSON list of two dense layers (3C -> hidden, then
    hidden -> C), each with ``data_b64`` decoding to ``(in_ch + 1) * out_ch`` bytes, row-major
    ``(in_ch + 1) x out_ch`` with the bias in the last row; byte ``b`` means
    ``(b / 255 - 0.5) * weight_scale`` (``bias_scale`` for the bias row). The first layer's
    inputs are band-major (``k*C + c``); they are permuted to our interleaved ``c*F + k``.
    The config is the article's: Sobel bank, fire rate 0.5, alive threshold 0.1, zero padding.
    """
    path = pathlib.Path(path)
    raw = _read_bytes(path, "Distill model file")
    try:
        layers = parse_json(raw, "content")
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(layers, list) or len(layers) != 2:
        raise ValueError(f"{path}: expected a JSON list of 2 dense layers (Distill export), got "
                         f"{_describe(layers)}")
    (w1, b1), (w2, b2) = (_decode_layer(path, i, layer) for i, layer in enumerate(layers))
    hidden, channels = w1.shape[1], w2.shape[1]
    if w2.shape[0] != hidden:
        raise ValueError(f"{path}: layer 1 has in_ch={w2.shape[0]}, but layer 0 has "
                         f"out_ch={hidden}; they must match")
    n_filters = len(FILTER_BANKS["sobel"])
    if w1.shape[0] != n_filters * channels:
        raise ValueError(f"{path}: layer 0 has in_ch={w1.shape[0]}, expected "
                         f"{n_filters} x {channels} = {n_filters * channels} perception values "
                         f"for {channels} channels (layer 1's out_ch)")
    _check_file_sizes(path, channels, hidden, n_filters)
    config = NCAConfig(channels=channels, hidden=hidden, fire_rate=0.5, alive_threshold=0.1,
                       filters="sobel", padding="zeros")
    # (in, out) band-major rows k*C + c  ->  (out, in) interleaved columns c*F + k.
    w1 = w1.T.reshape(hidden, n_filters, channels).transpose(0, 2, 1).reshape(hidden, -1)
    tensors = {
        "w1.weight": torch.from_numpy(np.ascontiguousarray(w1, dtype=np.float32))[:, :, None, None],
        "w1.bias": torch.from_numpy(b1.astype(np.float32)),
        "w2.weight": torch.from_numpy(np.ascontiguousarray(w2.T, dtype=np.float32))[:, :, None, None],
        "w2.bias": torch.from_numpy(b2.astype(np.float32)),
    }
    model = NCA(config, backend=backend)
    _load_parameters(model, tensors, path)
    return model


def _describe(v) -> str:
    if isinstance(v, list):
        return f"a list of {len(v)} items"
    return f"a JSON {type(v).__name__}"


def _decode_layer(path, i: int, layer):
    """One Distill layer -> (weight ``in x out``, bias ``out``) in float64."""
    where = f"{path}: layer {i}"
    if not isinstance(layer, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_describe(layer)}")
    keys = ("data_b64", "in_ch", "out_ch", "weight_scale", "bias_scale")
    missing = [k for k in keys if k not in layer]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if layer.get("type", "uint8") != "uint8":
        raise ValueError(f"{where}: type {layer['type']!r} is not supported, expected 'uint8'")
    in_ch, out_ch = layer["in_ch"], layer["out_ch"]
    for name, v in (("in_ch", in_ch), ("out_ch", out_ch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")
    for name in ("weight_scale", "bias_scale"):
        v = layer[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"{where}: {name} must be a finite number, got {v!r}")
    if not isinstance(layer["data_b64"], str):
        raise ValueError(f"{where}: data_b64 must be a base64 string")
    try:
        data = base64.b64decode(layer["data_b64"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: data_b64 is not valid base64") from None
    expected = (in_ch + 1) * out_ch
    for name, v in (("in_ch", in_ch), ("out_ch", out_ch)):
        if v > MAX_FILE_FILTERS * MAX_FILE_CHANNELS + MAX_FILE_HIDDEN:
            raise ValueError(f"{where}: {name}={v} is more than a model file may ask for")
    if len(data) != expected:
        raise ValueError(f"{where}: data_b64 decodes to {len(data)} bytes, expected "
                         f"(in_ch + 1) * out_ch = ({in_ch} + 1) * {out_ch} = {expected}")
    q = np.frombuffer(data, dtype=np.uint8).reshape(in_ch + 1, out_ch).astype(np.float64)
    v = q / 255.0 - 0.5
    return v[:in_ch] * float(layer["weight_scale"]), v[in_ch] * float(layer["bias_scale"])


def load_any(path: PathLike, *, backend: str = "auto") -> NCA:
    """Load either of our ``.safetensors`` models or a Distill ``.json`` export.

    The extension decides; for other extensions the content does (a Distill export is JSON text
    starting with ``[``; a safetensors file starts with an 8-byte header length).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_distill(path, backend=backend)
    if suffix == ".safetensors":
        return load(path, backend=backend)
    head = _read_bytes(path, "model file")[:64]
    if head.lstrip()[:1] == b"[":
        return load_distill(path, backend=backend)
    return load(path, backend=backend)


# --------------------------------------------------------------------------- target images
def load_target(path_or_image, size: int = 40, pad: int = 16) -> torch.Tensor:
    """A target image as a 4 x (size + 2 pad) x (size + 2 pad) float32 tensor, premultiplied RGBA.

    ``path_or_image``: an image file path, a ``PIL.Image`` or an H x W x 3|4 uint8 array. As in
    the article, the image is fitted in ``size`` x ``size`` keeping its aspect ratio (Lanczos
    resampling; an image narrower on one side is centred on a transparent square), scaled to
    [0, 1], RGB multiplied by alpha, then padded with ``pad`` empty cells on each side.

    Pixel values are scaled by their type's real range: 8-bit images (every colour mode) by
    255, 16-bit grayscale (PNG, TIFF) by 65535, float images are taken as they are and must lie
    in [0, 1]; 32-bit integer images other than 16-bit PNGs have no known full scale and are
    refused, as are images that are fully transparent (there would be nothing to grow).
    """
    from PIL import Image

    _check_positive("size", size)
    _check_non_negative("pad", pad)
    img, where, fmt = _open_image(path_or_image)
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    at = ((size - new[0]) // 2, (size - new[1]) // 2)
    gray = _high_depth_gray(img, where, fmt)
    if gray is None:                                   # 8-bit: Pillow converts every mode
        try:
            img = img.convert("RGBA")
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: cannot convert its {img.mode!r} pixels to RGBA ({e})"
                             ) from None
        if new != (w, h):
            img = img.resize(new, Image.LANCZOS)
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
    elif isinstance(which, int) and not isinstance(which, bool) and 0 <= which < len(DISTILL_TARGETS):
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


def _open_image(obj):
    """(PIL image, name for messages, file format or None) of a path, PIL image or array."""
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
            with Image.open(p) as im:
                im.load()
                return im.copy(), str(p), im.format
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
    (``pip install nca-fast[video]``). The file is written atomically.
    """
    path = pathlib.Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(f"{path}: unsupported video extension {path.suffix!r}; expected one of "
                         f"{list(VIDEO_EXTENSIONS)}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise ValueError(f"fps: expected a number in (0, 1000], got {fps!r}")
    if ext == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ImportError(f"{path}: writing MP4 needs the imageio-ffmpeg package: "
                              "pip install nca-fast[video] (or write a .gif)") from None
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


__all__ = ["atomic_write", "save", "load", "load_distill", "load_any", "load_target",
           "load_distill_target", "to_rgb", "write_png", "write_video", "DISTILL_TARGETS",
           "FORMAT_VERSION"]
