"""The kernel variants: every specialisation the launchers in ``kernels/`` can pick.

A ``Variant`` names one kernel with its shape, filter bank, precision and switches, for one
architecture; ``SUBSETS`` holds the named selections the report and the tests compile.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import List, Sequence


# The nominal launch: one 1024 x 1024 grid (the grid shared/tools/sass_count.py measures).


GRID = (1, 1024, 1024)
N_CELLS = GRID[0] * GRID[1] * GRID[2]
ALPHA_CHANNEL = 3
ARCHS = (90, 80)
PRECISION_NAMES = {0: "ieee", 1: "tf32", 2: "bf16"}
KERNEL_NAMES = ("fwd", "bwd_gp", "bwd_weights", "bwd_input", "bwd_filters")
STENCIL_KERNELS = ("bwd_input", "bwd_filters")   # no dense layer: hidden and precision 0
DENSE_KERNELS = ("fwd", "bwd_gp", "bwd_weights")
# (filters, bank code) the launchers compile: 0 = taps read from memory (any bank, learned shared
# filters), 1 = "sobel", 2 = "sobel_laplacian" (and "sobel_laplacian16", the same code with W1
# scaled), 4 = taps per channel read from memory (depthwise filters).
BANKS = ((3, 0), (3, 1), (4, 0), (4, 2), (3, 4), (4, 4))
BANK_FILTERS = {1: "sobel", 2: "sobel_laplacian"}
# The grid paddings (kernels/spec.py's PADDING_CODES), each compiled as its own PADDING.
PADDINGS = ("zeros", "circular", "replicate", "reflect")
PADDING_SWITCHES = {"circular": "circ", "replicate": "repl", "reflect": "refl"}


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a kernel.

    kernel: "fwd" (_nca_step_fwd_kernel), "bwd_gp" (_nca_step_bwd_gp_kernel), "bwd_weights"
    (_nca_step_bwd_weights_kernel), "bwd_input" (_nca_step_bwd_input_kernel) or "bwd_filters"
    (_nca_step_bwd_filters_kernel, a learned bank's gradient: bank 0 only); the last two have no
    dense layer: hidden and precision are 0. bank: the filter-bank code (BANKS). has_q / alive:
    the
    forward's input owes a mask / alive masking on (the backward kernels read cell words
    instead). next: the weight kernel computes its g from the next step (the rollout's steps
    but the last). padding: one of PADDINGS. arch: compute capability, 90 (compiled as sm_90a)
    or 80.
    """

    kernel: str
    arch: int
    channels: int
    hidden: int
    filters: int
    bank: int
    precision: int
    has_q: bool = False
    alive: bool = False
    padding: str = "zeros"
    int64: bool = False
    next: bool = False

    def __post_init__(self):
        if self.kernel not in KERNEL_NAMES:
            raise ValueError(f"kernel: expected one of {KERNEL_NAMES}, got {self.kernel!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        if (self.filters, self.bank) not in BANKS:
            raise ValueError(f"filters, bank: expected one of {BANKS}, got "
                             f"{(self.filters, self.bank)}")
        if self.has_q and not self.alive:
            raise ValueError("has_q: pending pre-mask bits exist only with alive masking on")
        if (self.has_q or self.alive) and self.kernel != "fwd":
            raise ValueError("has_q, alive: switches of the forward kernel only")
        if self.next and self.kernel != "bwd_weights":
            raise ValueError("next: a switch of the weight kernel only")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding: expected one of {PADDINGS}, got {self.padding!r}")
        if self.kernel == "bwd_filters" and self.bank != 0:
            raise ValueError("bank: the filters' gradient exists for a bank read as data (0) "
                             "only")

    @property
    def dense(self) -> bool:
        return self.kernel in DENSE_KERNELS

    def switches(self) -> str:
        names = [("Q", self.has_q), ("A", self.alive), ("next", self.next),
                 (PADDING_SWITCHES.get(self.padding), self.padding != "zeros"),
                 ("i64", self.int64)]
        return "+".join(n for n, on in names if on) or "-"

    def label(self) -> str:
        prec = PRECISION_NAMES[self.precision] if self.dense else "-"
        arch = f"sm_{self.arch}{'a' if self.arch >= 90 else ''}"
        bank = {0: "data", 1: "sobel", 2: "lap", 4: "chan"}[self.bank]
        return (f"{self.kernel} {arch} C={self.channels} hidden={self.hidden} "
                f"F={self.filters}:{bank} {prec} {self.switches()}")


def load_configs():
    """``nca_fast.kernels.configs``: plain Python (no kernel), safe to import in any process,
    interpreted or not."""
    return importlib.import_module("nca_fast.kernels.configs")


def all_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """Every variant the launchers can pick, over the shapes and precisions configs.py declares
    supported: per arch 3,456 forward, 1,152 perception-gradient, 2,304 weight, 96 input and 32
    filter-gradient kernels (C {16, 32}, hidden {32, 64, 128, 256}, the banks, three
    precisions, four paddings)."""
    cfg = load_configs()
    masks = ((False, False), (False, True), (True, True))        # (has_q, alive)
    out = []
    for arch in archs:
        for c in cfg.SUPPORTED_CHANNELS:
            for f, bank in BANKS:
                for padding in PADDINGS:
                    for i64 in (False, True):
                        common = dict(arch=arch, channels=c, filters=f, bank=bank,
                                      padding=padding, int64=i64)
                        for k in STENCIL_KERNELS:
                            if k in kernels and (k == "bwd_input" or bank == 0):
                                out.append(Variant(k, hidden=0, precision=0, **common))
                        for hid in cfg.SUPPORTED_HIDDEN:
                            for prec in sorted(cfg.PRECISION_CODES.values()):
                                dense = dict(common, hidden=hid, precision=prec)
                                if "fwd" in kernels:
                                    out += [Variant("fwd", has_q=q, alive=a, **dense)
                                            for q, a in masks]
                                if "bwd_gp" in kernels:
                                    out.append(Variant("bwd_gp", **dense))
                                if "bwd_weights" in kernels:
                                    out += [Variant("bwd_weights", next=n, **dense)
                                            for n in (False, True)]
    return out


def _v(kernel, arch, c, hid, f, bank, prec, **kw) -> Variant:
    return Variant(kernel, arch, c, hid, f, bank, prec, **kw)


def default_variants(archs: Sequence[int] = (90,), kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """The kernels of one mid-rollout training step of the default model (C = 16, hidden 128,
    "sobel", tf32, alive masking on): what shared/tools/sass_count.py measures."""
    out = []
    for arch in archs:
        out += [_v("fwd", arch, 16, 128, 3, 1, 1, has_q=True, alive=True),
                _v("bwd_gp", arch, 16, 128, 3, 1, 1),
                _v("bwd_weights", arch, 16, 128, 3, 1, 1, next=True)]
    return [v for v in out if v.kernel in kernels]


def learned_variants(archs: Sequence[int] = (90,), kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """The default model's training step with learned filters: ``learn_filters="shared"`` (taps
    read as data, bank 0), then ``"depthwise"`` (taps per channel, bank 4), and the filters'
    gradient kernel both launch."""
    out = []
    for arch in archs:
        for bank in (0, 4):
            out += [_v("fwd", arch, 16, 128, 3, bank, 1, has_q=True, alive=True),
                    _v("bwd_gp", arch, 16, 128, 3, bank, 1),
                    _v("bwd_weights", arch, 16, 128, 3, bank, 1, next=True)]
        out.append(_v("bwd_filters", arch, 16, 0, 3, 0, 0))       # reads no taps: one kernel
    return [v for v in out if v.kernel in kernels]


def quick_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """A representative subset: every switch, bank, precision and size extreme once."""
    out = []
    for arch in archs:
        for k in DENSE_KERNELS:
            sw = dict(has_q=True, alive=True) if k == "fwd" else {}
            nx = dict(next=True) if k == "bwd_weights" else {}
            out += [
                _v(k, arch, 16, 128, 3, 1, 1, **sw, **nx),        # the default, mid-rollout
                _v(k, arch, 16, 128, 3, 1, 2, **sw, **nx),        # bf16
                _v(k, arch, 16, 128, 3, 1, 0, **sw, **nx),        # ieee
                _v(k, arch, 16, 128, 3, 0, 1, **sw, **nx),        # a bank given as data
                _v(k, arch, 32, 256, 4, 2, 1, **sw, **nx),        # the largest shapes
                _v(k, arch, 32, 256, 4, 0, 2, **sw, **nx),
                _v(k, arch, 16, 32, 3, 1, 1, **sw, **nx),         # the smallest hidden layer
                _v(k, arch, 16, 128, 3, 1, 1, padding="circular", int64=True, **sw, **nx),
                _v(k, arch, 16, 128, 3, 0, 1, padding="replicate", **sw, **nx),
                _v(k, arch, 16, 128, 4, 2, 1, padding="reflect", **sw, **nx),
                _v(k, arch, 16, 128, 3, 4, 1, **sw, **nx),       # taps per channel
            ]
        out += [_v("fwd", arch, 16, 128, 3, 1, 1, alive=True),                # first step
                _v("fwd", arch, 16, 128, 3, 1, 1),                            # no masking
                _v("bwd_weights", arch, 16, 128, 3, 1, 1),                    # last step
                _v("bwd_input", arch, 16, 0, 3, 1, 0), _v("bwd_input", arch, 32, 0, 4, 0, 0),
                _v("bwd_input", arch, 16, 0, 3, 1, 0, padding="circular", int64=True),
                _v("bwd_input", arch, 16, 0, 3, 0, 0, padding="replicate"),
                _v("bwd_input", arch, 32, 0, 4, 2, 0, padding="reflect", int64=True),
                _v("bwd_filters", arch, 16, 0, 3, 0, 0), _v("bwd_filters", arch, 32, 0, 4, 0, 0),
                _v("bwd_filters", arch, 16, 0, 3, 0, 0, padding="reflect", int64=True)]
    return [v for v in out if v.kernel in kernels]


def ci_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """The CI subset: the default step's kernels, bf16, the largest shapes, INT64, every
    padding, a bank given as data (learned filters: the step and the filters' gradient), and the
    shapes whose executed counts bench/NOTES.md compares across kernel designs ("The CI
    subset")."""
    out = []
    for arch in archs:
        out += [
            _v("fwd", arch, 16, 128, 3, 1, 1, has_q=True, alive=True),
            _v("fwd", arch, 16, 128, 3, 1, 2),
            _v("fwd", arch, 32, 256, 4, 2, 2, has_q=True, alive=True),
            _v("fwd", arch, 16, 128, 3, 1, 1, has_q=True, alive=True, int64=True),
            _v("fwd", arch, 32, 32, 4, 2, 0, alive=True, int64=True),
            _v("bwd_gp", arch, 16, 128, 3, 1, 1),
            _v("bwd_gp", arch, 16, 128, 3, 1, 2),
            _v("bwd_weights", arch, 16, 128, 3, 1, 1, next=True),
            _v("bwd_weights", arch, 16, 128, 3, 1, 2),
            _v("bwd_input", arch, 16, 0, 3, 1, 0),
            _v("bwd_input", arch, 32, 0, 4, 0, 0, padding="circular", int64=True),
            _v("bwd_gp", arch, 16, 128, 3, 0, 1, padding="circular"),
            # learned filters at the default shape, and the edge paddings
            # (not yet spill-free under triton 3.9, bench/NOTES.md section 9: the forward with
            # taps as data at C = 16 on sm_90a, the Laplacian bank's at C = 16 hidden >= 128,
            # the weight kernel with taps per channel on sm_80)
            _v("fwd", arch, 16, 128, 3, 1, 1, has_q=True, alive=True, padding="replicate"),
            _v("fwd", arch, 16, 128, 3, 1, 1, has_q=True, alive=True, padding="reflect"),
            _v("bwd_weights", arch, 16, 128, 3, 0, 1, next=True),
            _v("bwd_gp", arch, 16, 128, 3, 4, 1),
            _v("bwd_filters", arch, 16, 0, 3, 0, 0),
            _v("bwd_filters", arch, 32, 0, 4, 0, 0, padding="reflect", int64=True),
            _v("bwd_input", arch, 16, 0, 3, 4, 0),
            _v("bwd_input", arch, 16, 0, 3, 0, 0, padding="reflect"),
            _v("bwd_gp", arch, 16, 128, 3, 1, 1, padding="replicate"),
        ]
        if arch >= 90:
            out += [_v("bwd_weights", arch, 16, 128, 3, 4, 1, next=True),
                    _v("bwd_gp", arch, 32, 256, 4, 2, 1),
                    _v("bwd_weights", arch, 32, 256, 4, 2, 1, next=True)]
        else:
            out.append(_v("bwd_gp", arch, 32, 32, 4, 2, 2))
    return [v for v in out if v.kernel in kernels]


SUBSETS = {"all": all_variants, "quick": quick_variants, "ci": ci_variants,
           "defaults": default_variants, "learned": learned_variants}
