"""Model configuration: every default of the Growing-NCA article, each one a validated field.

The model these fields parameterise, and what each one changes, is docs/MODEL.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

# The filter banks (and the kernels' precisions) are defined once, with the kernels' codes for
# them: nca_fast.kernels.spec (plain Python, no triton).
from .kernels.spec import (FILTER_BANKS, IDENTITY, LAPLACIAN, PRECISION_CODES,  # noqa: F401
                           SOBEL_X, SOBEL_Y, Filter)

PADDINGS = ("zeros", "circular", "replicate", "reflect")
# NCAConfig.learn_filters: None keeps the bank fixed; "shared" learns one [F, 3, 3] bank for every
# channel (the article's form); "depthwise" learns [F, C, 3, 3], a filter per filter-channel pair.
LEARN_FILTERS = (None, "shared", "depthwise")
# The dense layers' operand precisions are the kernels' to define (the torch backend computes in
# fp32 whatever the precision): a new one is added there.
PRECISIONS = tuple(PRECISION_CODES)
# NCAConfig.textures(): the Self-Organising Textures model's fields.
TEXTURES = dict(channels=12, hidden=96, filters="sobel_laplacian", alive_threshold=None,
                padding="circular", last_bias=False)
# The article's grid: a 40-cell target padded by 16 cells on each side.
ARTICLE_GRID = 72


def _as_filter_bank(filters) -> Tuple[Filter, ...]:
    if isinstance(filters, str):
        if filters not in FILTER_BANKS:
            raise ValueError(f"filters: unknown bank {filters!r}; expected one of "
                             f"{sorted(FILTER_BANKS)} or a sequence of 3x3 filters")
        return FILTER_BANKS[filters]
    try:
        bank = tuple(tuple(tuple(float(v) for v in row) for row in f) for f in filters)
    except (TypeError, ValueError):
        raise ValueError("filters: expected a bank name or a sequence of 3x3 numeric filters, "
                         f"got {filters!r}") from None
    if not bank or any(len(f) != 3 or any(len(r) != 3 for r in f) for f in bank):
        raise ValueError(f"filters: expected a non-empty sequence of 3x3 filters, got {filters!r}")
    if any(not math.isfinite(v) for f in bank for r in f for v in r):
        raise ValueError("filters: every tap must be finite")
    return bank


@dataclass(frozen=True)
class NCAConfig:
    """Hyper-parameters of one NCA (docs/MODEL.md).

    channels: state channels C (RGBA + hidden). hidden: units of the first dense layer.
    fire_rate: probability that a cell updates in a step. alive_threshold: alpha above which a
    cell is alive (3x3 max-pool, before and after the update); None switches alive masking off.
    alpha_channel: index of alpha. filters: the perception bank, F fixed 3x3 cross-correlation
    filters applied to every channel (a name from FILTER_BANKS or explicit taps; with
    ``learn_filters``, the learned filters' initial taps). padding: what a neighbour across the
    grid's edge is: "zeros" (empty and dead), "circular" (the grid is a torus), "replicate" (the
    nearest edge cell) or "reflect" (the cell mirrored about the edge cell; grids of at least
    2 x 2). learn_filters: None (the bank is fixed), "shared" (one learned [F, 3, 3] bank for
    every channel) or "depthwise" (learned [F, C, 3, 3]: filter k of channel c feeds perception
    column c*F + k). filter_bias: a learned bias [F, C] on each depthwise perception value
    ("depthwise" only). precision: operand
    precision of the dense layers in the Triton kernels ("ieee" fp32, "tf32", or "bf16"), with fp32
    accumulation; the state is always fp32. last_bias: whether the second dense layer has a bias
    (False: the update is ``W2 h`` alone, as in Self-Organising Textures).
    """

    channels: int = 16
    hidden: int = 128
    fire_rate: float = 0.5
    alive_threshold: Optional[float] = 0.1
    alpha_channel: int = 3
    filters: Tuple[Filter, ...] = field(default=FILTER_BANKS["sobel"])
    padding: str = "zeros"
    precision: str = "tf32"
    last_bias: bool = True
    learn_filters: Optional[str] = None
    filter_bias: bool = False

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        if not _is_int(self.channels) or self.channels < 1:
            bad("channels", "a positive integer")
        if not _is_int(self.hidden) or self.hidden < 1:
            bad("hidden", "a positive integer")
        if not _is_real(self.fire_rate) or not 0.0 <= self.fire_rate <= 1.0:
            bad("fire_rate", "a number in [0, 1]")
        if self.alive_threshold is not None and (
                not _is_real(self.alive_threshold) or not math.isfinite(self.alive_threshold)
                or self.alive_threshold < 0):
            bad("alive_threshold", "None (no alive masking) or a finite number >= 0")
        if not _is_int(self.alpha_channel) or not 0 <= self.alpha_channel < self.channels:
            bad("alpha_channel", f"an integer in [0, channels={self.channels})")
        object.__setattr__(self, "filters", _as_filter_bank(self.filters))
        if self.padding not in PADDINGS:
            bad("padding", f"one of {PADDINGS}")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {PRECISIONS}")
        if not isinstance(self.last_bias, bool):
            bad("last_bias", "True or False")
        if self.learn_filters not in LEARN_FILTERS:
            bad("learn_filters", f"one of {LEARN_FILTERS}")
        if not isinstance(self.filter_bias, bool):
            bad("filter_bias", "True or False")
        if self.filter_bias and self.learn_filters != "depthwise":
            bad("filter_bias", "False unless learn_filters='depthwise' (a bias on each "
                "depthwise perception value)")

    @property
    def num_filters(self) -> int:
        return len(self.filters)

    @property
    def perception_size(self) -> int:
        return self.num_filters * self.channels

    @property
    def alive_masking(self) -> bool:
        return self.alive_threshold is not None

    @property
    def dense_flops(self) -> int:
        """FLOPs of the two dense layers per cell-step (a multiply-add counts 2): 16,384 at the
        article's defaults. Perception, biases, ReLU and masks add about 900 more."""
        return 2 * self.hidden * (self.perception_size + self.channels)

    @classmethod
    def growing(cls, **changes) -> "NCAConfig":
        """The Growing NCA (Distill 2020): every default; ``changes`` override fields."""
        return cls(**changes)

    @classmethod
    def textures(cls, **changes) -> "NCAConfig":
        """Self-Organising Textures (Distill 2021): 12 channels, 96 hidden units, identity +
        Sobel + Laplacian perception, no alive masking, a torus (circular padding) and no bias
        on the last layer; ``changes`` override fields. (The article's Sobel taps are 8x ours
        and its Laplacian the same: a scale the first layer's weights absorb.)"""
        return cls(**{**TEXTURES, **changes})

    def replace(self, **changes) -> "NCAConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["filters"] = [[list(r) for r in f] for f in self.filters]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NCAConfig":
        return from_fields(cls, d, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def from_fields(cls, d, what: str):
    """``cls(**d)`` for a dataclass ``cls`` read from JSON: ``d`` must be an object whose keys
    are fields of ``cls``; a ValueError names ``what`` and the unknown fields."""
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}; expected a subset of "
                         f"{sorted(names)}")
    return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def filter_tensor(config: NCAConfig, dtype=None, device=None):
    """The filter bank as an F x 3 x 3 tensor (the fixed bank, or learned filters' initial
    taps)."""
    import torch

    return torch.tensor(config.filters, dtype=dtype or torch.float32, device=device)


def initial_filters(config: NCAConfig, dtype=None, device=None):
    """The filters a new model starts from: F x 3 x 3, or F x C x 3 x 3 (the bank on every
    channel) for ``learn_filters="depthwise"``."""
    bank = filter_tensor(config, dtype, device)
    if config.learn_filters == "depthwise":
        return bank[:, None].repeat(1, config.channels, 1, 1)
    return bank


__all__ = ["NCAConfig", "FILTER_BANKS", "PADDINGS", "LEARN_FILTERS", "PRECISIONS", "ARTICLE_GRID",
           "IDENTITY", "SOBEL_X", "SOBEL_Y", "LAPLACIAN", "filter_tensor", "initial_filters"]
