"""Model files: ours (safetensors + JSON config) and the Distill WebGL exports, read and written
as an ``NCAConfig`` and the module's parameter tensors (``model.NCA`` builds the layer from them).

Nothing here uses pickle. Our format is one ``.safetensors`` file: the parameter tensors
(``param_shapes(config)``: ``PARAM_NAMES``, less ``w2.bias`` without ``last_bias``, plus the
learned ``filters`` and ``filter_bias`` when the config has them; shaped as in
``NCA.state_dict()``), with the ``NCAConfig`` as JSON in the safetensors metadata. A model
file may come from anyone: sizes are capped and every header is checked against the config
before a tensor is allocated.
"""
from __future__ import annotations

import base64
import binascii
import pathlib
import struct
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from .config import FILTER_BANKS, NCAConfig
from .files import PathLike, atomic_write, parse_json
from .params import from_bands

FORMAT_VERSION = "1"
CONFIG_KEY = "nca_fast_config"
VERSION_KEY = "format_version"
PARAM_NAMES = ("w1.weight", "w1.bias", "w2.weight", "w2.bias")

# Sizes accepted from a model file, which may come from anyone: far above any published NCA
# (16 channels, 128 hidden units, 3-4 filters), far below what would exhaust memory before the
# tensors are checked. A model built in Python (NCAConfig) has no such cap.
MAX_FILE_CHANNELS = 1024
MAX_FILE_HIDDEN = 16384
MAX_FILE_FILTERS = 64
SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

Tensors = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------- our model format
def write_model(path: PathLike, config: NCAConfig, tensors: Mapping[str, torch.Tensor], *,
                metadata: Optional[Dict[str, str]] = None) -> pathlib.Path:
    """Write one model to a ``.safetensors`` file at ``path``, atomically.

    tensors: at least ``param_shapes(config)``'s (an ``NCA.state_dict()``): ``w1.weight``
    (hidden x F*C x 1 x 1), ``w1.bias`` (hidden), ``w2.weight`` (C x hidden x 1 x 1),
    ``w2.bias`` (C; not with ``config.last_bias`` False), ``filters`` (F x 3 x 3, or
    F x C x 3 x 3 for depthwise; only with ``config.learn_filters``) and ``filter_bias``
    (F x C; only with ``config.filter_bias``). The file
    also holds the metadata entries ``nca_fast_config`` (``config`` as JSON) and
    ``format_version``; ``metadata``: more string entries to store with them (e.g. how the model
    was trained), read back by ``read_metadata``.
    """
    from safetensors.torch import save as st_save

    if not isinstance(config, NCAConfig):
        raise TypeError(f"config: expected an NCAConfig, got {type(config).__name__}")
    extra = dict(metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: expected str keys and values, got {k!r}: "
                            f"{type(v).__name__}")
        if k in (CONFIG_KEY, VERSION_KEY):
            raise ValueError(f"metadata: {k!r} is reserved for the model's own entries")
    names = tuple(param_shapes(config))
    missing = [k for k in names if k not in tensors]
    if missing:
        raise ValueError(f"tensors: missing {missing}; expected {list(names)}")
    data = st_save({k: tensors[k].detach().to("cpu").contiguous() for k in names},
                   metadata={**extra, CONFIG_KEY: config.to_json(), VERSION_KEY: FORMAT_VERSION})
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The safetensors metadata of a model file: its config, format version and the entries
    given to ``save(..., metadata=...)``. Reads only the header."""
    path = pathlib.Path(path)
    return dict(_safetensors_header(path, _read_bytes(path, "model file")).get("__metadata__")
                or {})


def read_model(path: PathLike) -> Tuple[NCAConfig, Tensors]:
    """Read a model written by ``write_model`` (``NCA.save``): its config and checked parameter
    tensors (``param_shapes(config)``'s names, on the CPU, as stored).

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
    check_tensors(tensors, config, path)
    return config, tensors


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


def param_shapes(config: NCAConfig) -> Dict[str, tuple]:
    """The parameter shapes of an NCA with ``config`` (as in its state_dict), without one."""
    c, h = config.channels, config.hidden
    shapes = {"w1.weight": (h, config.num_filters * c, 1, 1), "w1.bias": (h,),
              "w2.weight": (c, h, 1, 1), "w2.bias": (c,)}
    if not config.last_bias:
        del shapes["w2.bias"]
    f = config.num_filters
    if config.learn_filters == "shared":
        shapes["filters"] = (f, 3, 3)
    elif config.learn_filters == "depthwise":
        shapes["filters"] = (f, c, 3, 3)
    if config.filter_bias:
        shapes["filter_bias"] = (f, c)
    return shapes


def _config_hint(names, config: NCAConfig) -> str:
    """Why the config wants (or refuses) the tensors ``names``, for an error message."""
    hints = []
    if "w2.bias" in names:
        hints.append(f"last_bias {str(config.last_bias).lower()}")
    if "filters" in names:
        hints.append(f"learn_filters {config.learn_filters!r}" +
                     (": learned filters are stored with the weights"
                      if config.learn_filters else ": the fixed bank is in the config"))
    if "filter_bias" in names:
        hints.append(f"filter_bias {str(config.filter_bias).lower()}")
    return f" (the stored config has {'; '.join(hints)})" if hints else ""


def _check_file_sizes(path, channels: int, hidden: int, num_filters: int) -> None:
    for name, v, cap in (("channels", channels, MAX_FILE_CHANNELS),
                         ("hidden", hidden, MAX_FILE_HIDDEN),
                         ("filters", num_filters, MAX_FILE_FILTERS)):
        if v > cap:
            raise ValueError(f"{path}: {name}={v} is more than a model file may ask for "
                             f"(at most {cap}); refusing to allocate it")


def _check_names(path, names, config: NCAConfig) -> None:
    """``names`` (tensor names) are exactly those of ``param_shapes(config)``."""
    want = list(param_shapes(config))
    missing = [k for k in want if k not in names]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; expected {want}"
                         f"{_config_hint(missing, config)}")
    extra = sorted(set(names) - set(want))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra}; expected {want}"
                         f"{_config_hint(extra, config)}")


def _check_header_shapes(path, header: dict, config: NCAConfig) -> None:
    """The safetensors header's tensor names, shapes and dtypes against the config's."""
    names = [k for k in header if k != "__metadata__"]
    _check_names(path, names, config)
    for k, shape in param_shapes(config).items():
        info = header[k]
        got = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(got, list) or tuple(got) != shape:
            raise ValueError(f"{path}: tensor {k!r} has shape "
                             f"{tuple(got) if isinstance(got, list) else got!r}, but the stored "
                             f"config needs {shape}")
        if info.get("dtype") not in SAFETENSORS_FLOAT_DTYPES:
            raise ValueError(f"{path}: tensor {k!r} has dtype {info.get('dtype')!r}, expected "
                             f"floating point ({', '.join(SAFETENSORS_FLOAT_DTYPES)})")


def check_tensors(tensors: Mapping[str, torch.Tensor], config: NCAConfig, path) -> None:
    """``tensors`` hold exactly the tensors of ``param_shapes(config)``, so shaped, floating
    point and finite; a ValueError names ``path`` and the first problem."""
    expected = param_shapes(config)
    _check_names(path, tensors, config)
    for k in expected:
        t = tensors[k]
        if tuple(t.shape) != expected[k]:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, but the stored "
                             f"config needs {expected[k]}")
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            what = " (learned filter taps)" if k == "filters" else ""
            raise ValueError(f"{path}: tensor {k!r}{what} holds NaN or infinite values")


# --------------------------------------------------------------------------- Distill exports
def read_distill(path: PathLike) -> Tuple[NCAConfig, Tensors]:
    """Read a Distill WebGL 8-bit export (``ex*_NAME.json``): its config and parameter tensors.

    Format (shared/data/distill/README.md): a JSON list of two dense layers (3C -> hidden, then
    hidden -> C), each with ``data_b64`` decoding to ``(in_ch + 1) * out_ch`` bytes, row-major
    ``(in_ch + 1) x out_ch`` with the bias in the last row; byte ``b`` means
    ``(b / 255 - 0.5) * weight_scale`` (``bias_scale`` for the bias row). The first layer's
    inputs are band-major (``k*C + c``); they are permuted to our interleaved ``c*F + k``
    (docs/MODEL.md, "W1 layouts"). The config is the article's: Sobel bank, fire rate 0.5,
    alive threshold 0.1, zero padding.
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
    w1 = from_bands(torch.from_numpy(w1.T).reshape(hidden, n_filters, channels))
    w2 = np.ascontiguousarray(w2.T, dtype=np.float32)
    tensors = {
        "w1.weight": w1.to(torch.float32)[:, :, None, None],
        "w1.bias": torch.from_numpy(b1.astype(np.float32)),
        "w2.weight": torch.from_numpy(w2)[:, :, None, None],
        "w2.bias": torch.from_numpy(b2.astype(np.float32)),
    }
    check_tensors(tensors, config, path)
    return config, tensors


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


def read_any(path: PathLike) -> Tuple[NCAConfig, Tensors]:
    """Read either of our ``.safetensors`` models or a Distill ``.json`` export.

    The extension decides; for other extensions the content does (a Distill export is JSON text
    starting with ``[``; a safetensors file starts with an 8-byte header length).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_distill(path)
    if suffix == ".safetensors":
        return read_model(path)
    head = _read_bytes(path, "model file")[:64]
    if head.lstrip()[:1] == b"[":
        return read_distill(path)
    return read_model(path)
