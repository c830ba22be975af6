"""What a step's launches are compiled and run for, in one place: the step's static scalars
(``StepSpec``), its five weight tensors (``StepWeights``), and the named codes the kernels
compile against (precisions, paddings, filter banks, the bits of the per-cell words).

Plain Python, no triton or torch: ``nca_fast.config`` takes its filter banks and precisions
from here, and the package imports without triton. A new option (a padding, a precision, a
bank) is a code here, a field of ``StepSpec`` if it needs one, and the kernel code that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

# ---------------------------------------------------------------- dense-layer precisions
# constexpr PRECISION: the operands of every tl.dot (fp32 accumulation throughout)
IEEE = 0        # exact fp32 products (FMA dots on CUDA cores)
TF32 = 1        # tensor cores, tf32 operands
BF16 = 2        # tensor cores, bf16 operands
PRECISION_CODES = {"ieee": IEEE, "tf32": TF32, "bf16": BF16}

# --------------------------------------------------------------------------- grid paddings
# constexpr PADDING: what a neighbour across the grid's edge is
ZEROS = 0       # a zero state (the tap is masked off)
CIRCULAR = 1    # the cell on the opposite edge (a torus)
REPLICATE = 2   # the nearest edge cell
REFLECT = 3     # the cell mirrored about the edge cell (the edge itself not repeated)
PADDING_CODES = {"zeros": ZEROS, "circular": CIRCULAR, "replicate": REPLICATE,
                 "reflect": REFLECT}

# ---------------------------------------------------------------------------- filter banks
Filter = Tuple[Tuple[float, float, float], ...]

IDENTITY: Filter = ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))
# Cross-correlation taps; x grows to the right (along W), y grows down (along H).
SOBEL_X: Filter = ((-0.125, 0.0, 0.125), (-0.25, 0.0, 0.25), (-0.125, 0.0, 0.125))
SOBEL_Y: Filter = ((-0.125, -0.25, -0.125), (0.0, 0.0, 0.0), (0.125, 0.25, 0.125))
LAPLACIAN: Filter = ((1.0, 2.0, 1.0), (2.0, -12.0, 2.0), (1.0, 2.0, 1.0))

# The named perception banks (``nca_fast.FILTER_BANKS``): name -> F filters of 3 x 3 taps.
FILTER_BANKS = {
    "sobel": (IDENTITY, SOBEL_X, SOBEL_Y),
    "sobel_laplacian": (IDENTITY, SOBEL_X, SOBEL_Y, LAPLACIAN),
    "sobel_laplacian16": (IDENTITY, SOBEL_X, SOBEL_Y,
                          tuple(tuple(v / 16.0 for v in row) for row in LAPLACIAN)),
}

# constexpr BANK: 0 reads the taps from memory (any bank: F x 9 numbers, the same for every
# channel); 4 reads them per channel (F x 9 x C: depthwise filters); a named bank's taps are
# constants of the kernels (``_tile._bank``: the Sobel pair's zero taps skipped, their 1/8 and
# the Laplacian's scale folded into W1's rows instead).
BANK_DATA = 0
BANK_SOBEL = 1
BANK_SOBEL_LAPLACIAN = 2
BANK_SOBEL_LAPLACIAN16 = 3      # compiled as BANK_SOBEL_LAPLACIAN, W1's Laplacian rows / 16
BANK_CHANNELS = 4
DATA_BANKS = (BANK_DATA, BANK_CHANNELS)     # the codes whose taps are read from memory
BANK_CODES = {"sobel": BANK_SOBEL, "sobel_laplacian": BANK_SOBEL_LAPLACIAN,
              "sobel_laplacian16": BANK_SOBEL_LAPLACIAN16}
NAMED_BANKS = {code: FILTER_BANKS[name] for name, code in BANK_CODES.items()}
# The named banks' Sobel filters are 1/8 of the integer ones the kernels apply.
SOBEL_SCALE = 0.125


def kernel_bank(code: int) -> int:
    """The BANK a bank code compiles as: the scaled Laplacian as the unscaled one."""
    return BANK_SOBEL_LAPLACIAN if code == BANK_SOBEL_LAPLACIAN16 else code


def lap_scale(code: int) -> float:
    """The Laplacian's scale folded into W1's rows for a named bank (1 unless scaled)."""
    return 0.0625 if code == BANK_SOBEL_LAPLACIAN16 else 1.0


def w1_scales(code: int, num_filters: int) -> Tuple[float, ...]:
    """The scale folded into each filter's rows of W1 (and taken out of their gradients):
    1 for a bank given as data; for a named bank the identity 1, the Sobel pair 1/8, the
    Laplacian ``lap_scale``. Powers of two: the products are exactly those of the taps."""
    if code in DATA_BANKS:
        return (1.0,) * num_filters
    return (1.0, SOBEL_SCALE, SOBEL_SCALE, lap_scale(code))[:num_filters]


# ------------------------------------------------------------------- hq planes, cell words
# hq bytes (one per cell, in a plane with a zero border of HALO cells on each side):
HALO = 2
HQ_Q = 1 << 0           # the pre-update alive mask the cell still owes
HQ_HOT = 1 << 1         # its raw alpha above the alive threshold
# The forward's per-cell word cw: the 9 taps in three 10-bit rows (tap (dy, dx) at bit
# 10 * (dy + 1) + 2 * (dx + 2): ``_tile._tap_bit``), and two bits of the cell itself.
CW_PRE = 1 << 0         # the cell's pre-update alive mask
CW_FIRE = 1 << 1        # the cell updates this step
# A row word of the 5x5 hq window: 2 bits per cell k = dx + 2, q at bit 2k, hot at 2k + 1.
ROW_HOT = 0x2AA         # the hot bits of the 5 cells
ROW_Q_INNER = 0x54      # the q bits of the 3 inner cells (dx = -1, 0, 1)
# The 16-bit word the forward saves for the backward: tap t at bit t, fire at bit 9.
PACKED_KEEP = 1 << 4    # tap t = 4, the cell itself: its own deferred alive mask
PACKED_FIRE = 1 << 9


# --------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class StepSpec:
    """The static scalars of a step's launches, the same for every step of a rollout.

    padding: a name of PADDING_CODES; precision: a name of PRECISION_CODES; bank: the named
    bank's code (BANK_CODES), BANK_DATA or BANK_CHANNELS. alive_threshold: None switches alive masking off;
    alpha_channel: the channel it reads. fire_threshold (a 24-bit threshold, ``nca_fast.rng``)
    and seed: the stochastic update, read by the forward only.
    """

    padding: str = "zeros"
    precision: str = "tf32"
    bank: int = BANK_DATA
    alive_threshold: Optional[float] = None
    alpha_channel: int = 3
    fire_threshold: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISION_CODES:
            raise ValueError(f"precision: expected one of {tuple(PRECISION_CODES)}, "
                             f"got {self.precision!r}")
        if self.padding not in PADDING_CODES:
            raise ValueError(f"padding: expected one of {tuple(PADDING_CODES)}, "
                             f"got {self.padding!r}")
        if self.bank not in DATA_BANKS and self.bank not in NAMED_BANKS:
            raise ValueError(f"bank: expected {BANK_DATA} (taps as data), {BANK_CHANNELS} (taps "
                             f"per channel) or a named bank's code {tuple(NAMED_BANKS)}, got "
                             f"{self.bank!r}")

    @property
    def alive(self) -> bool:
        return self.alive_threshold is not None

    # the kernels' constexprs and scalars
    @property
    def padding_code(self) -> int:
        return PADDING_CODES[self.padding]

    @property
    def precision_code(self) -> int:
        return PRECISION_CODES[self.precision]

    @property
    def kernel_bank(self) -> int:
        return kernel_bank(self.bank)

    @property
    def lap_scale(self) -> float:
        return lap_scale(self.bank)


def spec_of(spec: Optional[StepSpec], options: dict) -> StepSpec:
    """A launcher's spec: ``spec``, or one made of its keyword options (``StepSpec``'s
    fields)."""
    if spec is None:
        return StepSpec(**options)
    if options:
        raise TypeError(f"give a spec or its options, not both: {sorted(options)}")
    return spec


class StepWeights(NamedTuple):
    """The step's weights in the kernels' layouts (contiguous, the state's dtype and device)."""

    w1k: Any        # [F, C, HID]  W1_k[c, j] = w1[j, c*F + k]
    b1: Any         # [HID]
    w2t: Any        # [HID, C]     the transpose of w2
    b2: Any         # [C]
    filters: Any    # [F, 9, C] filter k's tap t (row-major 3 x 3) on channel c (BANK_DATA)

    def contiguous(self) -> "StepWeights":
        return StepWeights(*(t.contiguous() for t in self))
