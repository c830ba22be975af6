"""Ahead-of-time compile report of the Triton step kernels, for GPUs this machine does not have.

Every kernel variant the launchers in ``kernels/`` can pick is compiled for sm_90a (Hopper) and
sm_80 (Ampere) exactly as the JIT would specialise it: the launcher is called on CPU tensors of a
nominal 1 x 1024 x 1024 grid with ``JITFunction.run`` patched to record the launch instead of
running it, and triton's own binder turns the recorded arguments into the ``ASTSource`` and
options (launch configuration from ``kernels/configs.py``: tiles, warps, register ceiling,
hidden chunk, persistent grid). Per variant the report reads:

- from ``ptxas -v`` (the ptxas that ships with triton, run by triton's own cubin stage):
  registers per thread, spill stores / loads and stack frame, in bytes;
- from triton's metadata: the shared memory the kernel allocates;
- from the PTX: tensor-core instructions (``wgmma.mma_async`` on sm_90a, ``mma.sync`` on sm_80)
  and the widest global load / store, in bytes (16 = ``ld.global.v4.b32``);
- with ``--sass`` (sm_90a): SASS instructions by class, and the **executed** warp-instructions
  per cell of the launch: the control-flow graph of the SASS, its loop's body counted once per
  trip (a persistent program's tile loop runs once per tile it owns), forward branches on
  their longer side, nothing after EXIT. The same count as ``shared/tools/sass_count.py``
  makes for the default variants (tests/test_compile.py holds them within 2 %).

A variant *fails* when it does not compile, spills, needs more registers or shared memory than
the SM has for its launch, or (tf32 / bf16 kernels with dense layers) has no tensor-core
instruction of its architecture. "ieee" precision is exact fp32 and has no tensor-core
instruction by design.

Usage (from the repository root; no GPU, no CUDA driver needed)::

    python -m bench.compile_report --quick                 # representative subset, both archs
    python -m bench.compile_report --arch 90 --csv out.csv # every variant for sm_90a
    python -m bench.compile_report --subset ci --json r.json
    python -m bench.compile_report --subset defaults --sass  # executed counts, default model

Every variant is 2,336 compiles per architecture, about 2-5 CPU-seconds each: hours on 2 cores;
--quick is a few dozen. Each run compiles from scratch into a temporary triton cache that is
deleted at exit. Exit status 1 when any variant fails.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


# The nominal launch: one 1024 x 1024 grid (the grid shared/tools/sass_count.py measures).
GRID = (1, 1024, 1024)
N_CELLS = GRID[0] * GRID[1] * GRID[2]
ALPHA_CHANNEL = 3
ARCHS = (90, 80)
PRECISION_NAMES = {0: "ieee", 1: "tf32", 2: "bf16"}
KERNEL_NAMES = ("fwd", "bwd_gp", "bwd_weights", "bwd_input")
DENSE_KERNELS = ("fwd", "bwd_gp", "bwd_weights")
# (filters, bank code) the launchers compile: 0 = taps read from memory (any bank), 1 = "sobel",
# 2 = "sobel_laplacian" (and "sobel_laplacian16", the same code with W1 scaled).
BANKS = ((3, 0), (3, 1), (4, 0), (4, 2))
BANK_FILTERS = {1: "sobel", 2: "sobel_laplacian"}
# Largest dynamic shared memory one block may opt in to, bytes (CUDA programming guide,
# "Technical Specifications per Compute Capability": 227 KB on 9.0, 163 KB on 8.0).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
REGISTER_FILE = 65536          # 32-bit registers per SM (and per block) on sm_80 and sm_90
MAX_REGISTERS = 255            # per thread
MAX_WORKERS = 2


# ------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a kernel.

    kernel: "fwd" (_nca_step_fwd_kernel), "bwd_gp" (_nca_step_bwd_gp_kernel), "bwd_weights"
    (_nca_step_bwd_weights_kernel) or "bwd_input" (_nca_step_bwd_input_kernel; no dense layer:
    hidden and precision are 0). bank: the filter-bank code (BANKS). has_q / alive: the
    forward's input owes a mask / alive masking on (the backward kernels read cell words
    instead). next: the weight kernel computes its g from the next step (the rollout's steps
    but the last). arch: compute capability, 90 (compiled as sm_90a) or 80.
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
    circular: bool = False
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

    @property
    def dense(self) -> bool:
        return self.kernel in DENSE_KERNELS

    def switches(self) -> str:
        names = [("Q", self.has_q), ("A", self.alive), ("next", self.next),
                 ("circ", self.circular), ("i64", self.int64)]
        return "+".join(n for n, on in names if on) or "-"

    def label(self) -> str:
        prec = PRECISION_NAMES[self.precision] if self.dense else "-"
        arch = f"sm_{self.arch}{'a' if self.arch >= 90 else ''}"
        bank = {0: "data", 1: "sobel", 2: "lap"}[self.bank]
        return (f"{self.kernel} {arch} C={self.channels} hidden={self.hidden} "
                f"F={self.filters}:{bank} {prec} {self.switches()}")


def load_configs():
    """``nca_fast.kernels.configs``: plain Python (no kernel), safe to import in any process,
    interpreted or not."""
    return importlib.import_module("nca_fast.kernels.configs")


def all_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """Every variant the launchers can pick, over the shapes and precisions configs.py declares
    supported: per arch 1,152 forward, 384 perception-gradient, 768 weight and 32 input
    kernels (C {16, 32}, hidden {32, 64, 128, 256}, the banks, three precisions)."""
    cfg = load_configs()
    masks = ((False, False), (False, True), (True, True))        # (has_q, alive)
    out = []
    for arch in archs:
        for c in cfg.SUPPORTED_CHANNELS:
            for f, bank in BANKS:
                for circ in (False, True):
                    for i64 in (False, True):
                        common = dict(arch=arch, channels=c, filters=f, bank=bank,
                                      circular=circ, int64=i64)
                        if "bwd_input" in kernels:
                            out.append(Variant("bwd_input", hidden=0, precision=0, **common))
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
                _v(k, arch, 16, 128, 3, 1, 1, circular=True, int64=True, **sw, **nx),
            ]
        out += [_v("fwd", arch, 16, 128, 3, 1, 1, alive=True),                # first step
                _v("fwd", arch, 16, 128, 3, 1, 1),                            # no masking
                _v("bwd_weights", arch, 16, 128, 3, 1, 1),                    # last step
                _v("bwd_input", arch, 16, 0, 3, 1, 0), _v("bwd_input", arch, 32, 0, 4, 0, 0),
                _v("bwd_input", arch, 16, 0, 3, 1, 0, circular=True, int64=True)]
    return [v for v in out if v.kernel in kernels]


def ci_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES) -> List[Variant]:
    """The CI subset: the default step's kernels, bf16, the largest shapes, INT64, circular,
    a bank given as data, and the shapes of the CI variants of the kernels before v2 (their
    executed counts are compared in bench/NOTES.md)."""
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
            _v("bwd_input", arch, 32, 0, 4, 0, 0, circular=True, int64=True),
            _v("bwd_gp", arch, 16, 128, 3, 0, 1, circular=True),
        ]
        if arch >= 90:
            out += [_v("bwd_gp", arch, 32, 256, 4, 2, 1),
                    _v("bwd_weights", arch, 32, 256, 4, 2, 1, next=True)]
        else:
            out.append(_v("bwd_gp", arch, 32, 32, 4, 2, 2))
    return [v for v in out if v.kernel in kernels]


SUBSETS = {"all": all_variants, "quick": quick_variants, "ci": ci_variants,
           "defaults": default_variants}


# ------------------------------------------------------------------ recording the launch
_FUNCS = {"fwd": "_nca_step_fwd_kernel", "bwd_gp": "_nca_step_bwd_gp_kernel",
          "bwd_weights": "_nca_step_bwd_weights_kernel", "bwd_input": "_nca_step_bwd_input_kernel"}


def load_kernels():
    """Import ``nca_fast.kernels`` compiled-mode; returns its modules (configs, step_fwd,
    step_bwd).

    ``@triton.jit`` decides at import whether a kernel is a compilable JITFunction or an
    interpreted one (TRITON_INTERPRET), so this runs only in processes that exist to compile
    (the spawned workers of ``Compiler``), before anything imported triton interpreted.
    """
    # The decorator reads TRITON_INTERPRET when a module is executed, triton's own included:
    # unset it for good in this process, which exists only to compile.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language.standard as tl_standard

    if not isinstance(tl_standard.cdiv, triton.runtime.JITFunction):
        raise RuntimeError("load_kernels: triton was imported with TRITON_INTERPRET=1 in this "
                           "process; compile in a fresh process (see Compiler)")
    return tuple(importlib.import_module(f"nca_fast.kernels.{m}")
                 for m in ("configs", "step_fwd", "step_bwd"))


class _Recorder:
    """Patches ``JITFunction.run``: launches are recorded, not run."""

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self.cls, self.orig, self.launches = JITFunction, JITFunction.run, []

        def run(fn, *args, grid, warmup=False, **kwargs):
            self.launches.append((fn, grid, args, kwargs))

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.orig


def record_launch(v: Variant, modules, grid: Tuple[int, int, int] = GRID, step: int = 7,
                  seed: int = 2**40 + 12345):
    """(kernel, grid, args, kwargs) of ``v``: its launcher called on CPU tensors of a
    B x H x W grid (the nominal one by default; the forward as a mid-rollout step, the weight
    kernel with a next step or not)."""
    import torch
    from nca_fast.config import FILTER_BANKS

    configs, step_fwd, step_bwd = modules
    B, H, W = grid
    C, HID, F_ = v.channels, v.hidden or 32, v.filters
    prec = PRECISION_NAMES[v.precision]
    filt = (torch.tensor(FILTER_BANKS[BANK_FILTERS[v.bank]]) if v.bank else
            torch.full((F_, 3, 3), 0.5)).reshape(F_, 9)
    r, g = torch.zeros(B, H, W, C), torch.zeros(B, H, W, C)
    w1k, b1, w2t, b2 = (torch.zeros(F_, C, HID), torch.zeros(HID), torch.zeros(HID, C),
                        torch.zeros(C))
    cw = torch.zeros(B, H, W, dtype=torch.int16)
    kw = dict(circular=v.circular, precision=prec, bank=v.bank)
    orig, target = configs.needs_int64, configs.TARGET_CAPABILITY
    configs.needs_int64 = lambda *a: v.int64       # the switch alone, at the nominal size
    configs.TARGET_CAPABILITY = divmod(v.arch, 10)  # the variant's arch's choices
    try:
        with _Recorder() as rec:
            if v.kernel == "fwd":
                q = step_fwd.hq_plane(B, H, W, "cpu") if v.has_q else None
                step_fwd.nca_step_fwd(r, q, w1k, b1, w2t, b2, filt, seed=seed, step=step,
                                      fire_threshold=1 << 23,
                                      alive_threshold=0.1 if v.alive else None,
                                      alpha_channel=ALPHA_CHANNEL, circular=v.circular,
                                      precision=prec, named_bank=v.bank, cw_out=cw)
            elif v.kernel == "bwd_gp":
                step_bwd.bwd_gp(r, cw, g, w1k, b1, w2t, filt, **kw)
            elif v.kernel == "bwd_weights":
                parts = step_bwd.new_parts(B, H, W, C, HID, F_, "cpu", prec)
                nxt = (torch.zeros(B * H * W, F_, C), cw, g) if v.next else None
                step_bwd.bwd_weights(r, cw, g, parts, w1k, b1, w2t, filt, next_step=nxt, **kw)
            else:
                step_bwd.bwd_input(torch.zeros(B * H * W, F_, C), cw, g, filt, (B, H, W, C),
                                   circular=v.circular, bank=v.bank)
    finally:
        configs.needs_int64, configs.TARGET_CAPABILITY = orig, target
    if len(rec.launches) != 1:
        raise RuntimeError(f"{v.label()}: the launcher made {len(rec.launches)} launches")
    return rec.launches[0]


def specialise(launch, arch: int):
    """(ASTSource, options dict, bound arguments) of a recorded launch, as triton's JIT builds
    them (its binder and ``_pack_args``)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, grid, args, kwargs = launch
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs, debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, dict(bound)


def grid_size(grid, bound) -> Tuple[int, int, int]:
    g = grid(bound) if callable(grid) else grid
    g = tuple(int(x) for x in g) + (1, 1)
    return g[0], g[1], g[2]


# ------------------------------------------------------------------- executed instructions
_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*(\.L_\w+):\s*$")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


def _nvdisasm(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True,
                              check=True).stdout


def parse_cfg(text: str):
    """Instructions [(op, predicated, target index or None)] of nvdisasm text, in order."""
    ins, labels, pending, targets = [], {}, [], []
    for raw in text.splitlines():
        m = _LABEL.match(raw)
        if m:
            pending.append(m[1])
            continue
        m = _INS.match(raw)
        if not m:
            continue
        for lab in pending:
            labels[lab] = len(ins)
        pending = []
        t = _TARGET.search(m[4]) if m[3].split(".")[0] in ("BRA", "JMP") else None
        ins.append([m[3], bool(m[2]), None])
        targets.append(t[1] if t else None)
    for i, lab in enumerate(targets):
        if lab is not None:
            ins[i][2] = labels[lab]
    return ins


def executed_per_program(ins, trips: int, inner_trips: int = 0) -> int:
    """Instructions one program executes: the longest path from the entry to EXIT, the loop
    body (a backward branch) counted ``trips`` times.

    At most one loop, or the tile loop with one loop nested in it (the hidden chunks of
    weights staged per tile), whose body counts ``inner_trips`` times per tile.
    Forward branches take their longer side; a conditional branch falls through or jumps;
    EXIT and unconditional branches end a path (with a predicate, EXIT falls through too)."""
    n = len(ins)
    # a branch to itself is the trap ptxas places after the last EXIT, never reached
    back = sorted((t, i) for i, (op, _, t) in enumerate(ins) if t is not None and t < i)
    inner = None
    if len(back) == 2 and inner_trips:
        (h0, l0), (h1, l1) = back
        if not (h0 <= h1 and l1 < l0):
            raise ValueError("2 loops in the SASS, not nested")
        inner = (h1, l1)
        back = [(l0, h0)]
    elif len(back) > 1:
        raise ValueError(f"{len(back)} loops in the SASS; the report counts kernels with one "
                         f"(or one nested in the tile loop)")
    else:
        back = [(i, t) for t, i in back]
    head, latch = (back[0][1], back[0][0]) if back else (n, n)

    def succ(i):
        op, pred, t = ins[i]
        base = op.split(".")[0]
        out = []
        if base in ("EXIT", "RET") and not pred:
            return out
        if base in ("BRA", "JMP") and t is not None:
            if t > i:                     # the back edge is the loop, walked separately
                out.append(t)
            elif t == i:                  # the trap after EXIT
                return out
            if not pred:
                return out
        if i + 1 < n:
            out.append(i + 1)
        return out

    def longest(start, stop_set, lo, hi):
        """Longest path length from start through instructions in [lo, hi] to any stop."""
        memo: Dict[int, int] = {}
        for i in range(hi, lo - 1, -1):
            best = None
            for j in succ(i):
                if j in stop_set or j > hi:
                    cand = 0
                elif j < lo:
                    continue
                else:
                    cand = memo.get(j)
                    if cand is None:
                        continue
                best = cand if best is None else max(best, cand)
            if best is None:
                best = 0 if not succ(i) else None
            if best is not None:
                memo[i] = best + 1
        return memo.get(start, 0)

    if not back:
        return longest(0, set(), 0, n - 1)
    if inner is None:
        body = longest(head, {latch + 1}, head, latch)     # one trip: head .. the back edge
    else:                                                  # head .. inner loop .. back edge
        ih, il = inner
        body = (longest(head, {ih}, head, ih - 1) if ih > head else 0)
        body += longest(ih, {il + 1}, ih, il) * inner_trips
        body += longest(il + 1, {latch + 1}, il + 1, latch)
    before = longest(0, {head}, 0, head - 1) if head else 0
    after = longest(latch + 1, set(), latch + 1, n - 1) if latch + 1 < n else 0
    return before + body * trips + after


def executed_per_cell(sass_text: str, launch, bound, num_warps: int) -> float:
    """Executed warp-instructions per cell of a recorded persistent launch."""
    gx, gy, gz = grid_size(launch[1], bound)
    programs = gx * gy * gz
    n_tiles = int(bound["n_tiles"])
    ins = parse_cfg(sass_text)
    # a loop inside the tile loop: the hidden chunks (weights staged per tile)
    inner = int(bound["HID"]) // int(bound["HC"]) if bound.get("HC") else 0
    total = 0
    for p in range(gx):              # programs along axis 0 walk tiles p, p + gx, ...
        trips = max(0, -(-(n_tiles - p) // gx))
        total += executed_per_program(ins, trips, inner) * gy * gz
    return total * num_warps / N_CELLS if programs else 0.0


# ----------------------------------------------------------------------------------- results
@dataclass
class Result:
    """What one compile produced. Sizes in bytes; ``seconds``: wall time of the compile."""

    variant: Variant
    block_m: int = 0
    num_warps: int = 0
    num_stages: int = 0
    maxnreg: Optional[int] = None  # register ceiling the launcher passes (None: ptxas's choice)
    status: str = "ok"            # "ok" or "error"
    error: str = ""
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    smem: int = -1
    wgmma: int = 0
    mma_sync: int = 0
    widest_load: int = 0
    widest_store: int = 0
    loads: Dict[int, int] = dataclasses.field(default_factory=dict)   # width -> count in PTX
    ptxas_notes: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0      # this process + ptxas; unlike ``seconds``, load-independent
    sass: Dict[str, int] = dataclasses.field(default_factory=dict)  # class -> static count
    executed: float = 0.0         # executed warp-instructions per cell (``--sass``)
    programs: int = 0             # the persistent launch's programs

    @property
    def warp_instr_per_cell(self) -> float:
        """Executed warp-instructions per cell of the nominal launch: each program's tile loop
        counted once per tile it owns (``executed_per_cell``). 0 without ``--sass``."""
        return self.executed

    @property
    def tensor_core(self) -> int:
        """Tensor-core instructions native to the arch (the count the checks use)."""
        return self.wgmma if self.variant.arch >= 90 else self.mma_sync

    def problems(self) -> List[str]:
        """Why this variant would break or crawl on its GPU; empty when it passes."""
        v = self.variant
        if self.status != "ok":
            return [f"compile error: {self.error}"]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.registers * self.num_warps * 32 > REGISTER_FILE:
            out.append(f"{self.registers} registers x {self.num_warps * 32} threads exceed the "
                       f"{REGISTER_FILE}-register file")
        if self.smem > SMEM_LIMIT[v.arch]:
            out.append(f"shared memory {self.smem} B > {SMEM_LIMIT[v.arch]} B")
        if v.dense and v.precision in (1, 2) and self.tensor_core == 0:
            instr = "wgmma.mma_async" if v.arch >= 90 else "mma.sync"
            out.append(f"no {instr} for a {PRECISION_NAMES[v.precision]} kernel")
        return out

    def row(self) -> dict:
        v = self.variant
        return dict(kernel=v.kernel, arch=f"sm_{v.arch}{'a' if v.arch >= 90 else ''}",
                    C=v.channels, hidden=v.hidden or "-", F=v.filters, bank=v.bank,
                    precision=PRECISION_NAMES[v.precision] if v.dense else "-",
                    switches=v.switches(), BLOCK_M=self.block_m, warps=self.num_warps,
                    programs=self.programs,
                    stages=self.num_stages, maxnreg=self.maxnreg, status=self.status,
                    registers=self.registers,
                    spill_stores=self.spill_stores, spill_loads=self.spill_loads,
                    stack=self.stack, smem=self.smem, wgmma=self.wgmma, mma_sync=self.mma_sync,
                    tensor_core=self.tensor_core, widest_load=self.widest_load,
                    widest_store=self.widest_store,
                    loads=" ".join(f"{w}B:{n}" for w, n in sorted(self.loads.items(),
                                                                   reverse=True)),
                    ptxas_notes=self.ptxas_notes, seconds=round(self.seconds, 1),
                    cpu_seconds=round(self.cpu_seconds, 1),
                    sass=" ".join(f"{k}:{n}" for k, n in self.sass.items()),
                    warp_instr_per_cell=round(self.warp_instr_per_cell, 1),
                    problems="; ".join(self.problems()), error=self.error)


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_NOTE = re.compile(r"\((C\d+)\) ([^\n]*)")
_MEM_OP = re.compile(r"\b(ld|st)\.global((?:\.\w+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")


def parse_ptxas(log: str) -> dict:
    """Registers, spills, stack and advisory notes from a ``ptxas -v`` log (one entry)."""
    props, regs = _PTXAS_PROPS.search(log), _PTXAS_REGS.search(log)
    if not (props and regs):
        raise ValueError(f"ptxas log: no register / spill lines in {log[:400]!r}")
    # line numbers differ per variant; without them equal notes group in the summary
    notes = sorted({f"{code}: {re.sub(r'line [0-9]+', 'line N', text)[:110]}"
                    for code, text in _PTXAS_NOTE.findall(log)})
    return dict(stack=int(props[1]), spill_stores=int(props[2]), spill_loads=int(props[3]),
                registers=int(regs[1]), ptxas_notes=" | ".join(notes))


def parse_ptx(ptx: str) -> dict:
    """Tensor-core instruction counts and global load / store widths (bytes) in PTX text."""
    loads: Dict[int, int] = {}
    widest = {"ld": 0, "st": 0}
    for op, _, vec, bits in _MEM_OP.findall(ptx):
        width = int(vec or 1) * int(bits) // 8
        widest[op] = max(widest[op], width)
        if op == "ld":
            loads[width] = loads.get(width, 0) + 1
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                mma_sync=len(re.findall(r"(?<![\w.])mma\.sync\.", ptx)),
                widest_load=widest["ld"], widest_store=widest["st"], loads=loads)


# SASS opcode (before the first ".") -> class, for the instruction histogram of --sass.
_SASS_CLASSES = {
    "tensor": ("HGMMA", "HMMA", "IMMA", "WARPGROUP"),
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "MUFU", "FCHK", "FRND",
             "F2F", "F2FP", "HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSETP2"),
    "int": ("IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "LEA",
            "SEL", "PRMT", "IABS", "I2F", "F2I", "FLO", "POPC", "IMUL", "BMSK", "SGXT", "LEA_HI",
            "PLOP3", "P2R", "R2P", "VIADD", "VIMNMX", "I2FP", "F2IP"),
    "ld.global": ("LDG",), "st.global": ("STG", "RED", "ATOMG"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "LDGSTS", "UBLKCP", "UTMALDG", "SYNCS"),
    "local": ("LDL", "STL"),
    "shuffle": ("SHFL",), "move": ("MOV", "UMOV", "S2R", "S2UR", "CS2R", "R2UR", "LDC", "ULDC"),
    "control": ("BRA", "BAR", "EXIT", "NOP", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "RET",
                "CALL", "YIELD", "VOTE", "VOTEU", "MEMBAR", "FENCE", "ERRBAR", "CCTL"),
}
_SASS_CLASS_OF = {op: cls for cls, ops in _SASS_CLASSES.items() for op in ops}
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def parse_sass(sass: str) -> Dict[str, int]:
    """Static instruction counts of ``cuobjdump -sass`` text by class (see _SASS_CLASSES);
    opcodes outside the table count as "other"; uniform-datapath ops (U*) join their class."""
    counts = {cls: 0 for cls in (*_SASS_CLASSES, "other")}
    for op in _SASS_LINE.findall(sass):
        cls = _SASS_CLASS_OF.get(op) or (_SASS_CLASS_OF.get(op[1:]) if op.startswith("U")
                                         else None)
        counts[cls or "other"] += 1
    return {k: n for k, n in counts.items() if n}


def _sass(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def _short_error(exc: BaseException) -> str:
    """The innermost compiler message with its kernel-relative line, on one line."""
    from triton.compiler.errors import CompilationError

    inner = exc
    while isinstance(inner.__cause__, CompilationError):
        inner = inner.__cause__
    if isinstance(inner, CompilationError):
        fn = re.search(r"def (\w+)", inner.src or "")
        where = f"{fn[1] if fn else 'jit function'}"
        src = ""
        if inner.src and hasattr(inner.node, "lineno"):
            where += f", line {inner.node.lineno} of its source"
            src = inner.src.split("\n")[inner.node.lineno - 1].strip()
        cause = inner.__cause__ or inner.error_message
        cause = cause if isinstance(cause, str) else repr(cause)
        return f"{where}: `{src}`: {cause}" if src else f"{where}: {cause}"
    text = str(exc).strip().splitlines()
    keep = [ln for ln in text if "error" in ln.lower()] or text[:1]
    return f"{type(exc).__name__}: {' / '.join(keep[:3])}"[:600]


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _run_ptxas(ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu, src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        return proc.stderr


# ---------------------------------------------------------------------------------- compiling
_STATE: dict = {}


def _init_worker(cache_dir: str, sass: bool = False) -> None:
    # Before triton is imported: it decides interpreted or compiled at import (see load_kernels).
    os.environ.pop("TRITON_INTERPRET", None)
    # Each run compiles from scratch: a cache hit would skip ptxas and its log.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True     # triton prints its own ptxas -v log
    _STATE["modules"] = load_kernels()
    _STATE["sass"] = sass


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished children (ptxas)."""
    usage = (resource.getrusage(resource.RUSAGE_SELF),
             resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def compile_variant(v: Variant, edge: bool = False) -> Result:
    """Compile ``v`` (after ``_init_worker``) and measure it. Never raises for kernel errors.

    edge: launched on a 1 x 1 x 1 grid at step 1 with seed 1, so that the JIT specialises every
    size, count and the step as the constant 1 (it does so for an int argument equal to 1):
    code that calls methods on such an argument fails to compile there only."""
    import triton
    from triton.backends.compiler import GPUTarget

    res = Result(v)
    start, cpu = time.perf_counter(), _cpu_time()
    log = io.StringIO()
    try:
        launch = (record_launch(v, _STATE["modules"], grid=(1, 1, 1), step=1, seed=1) if edge
                  else record_launch(v, _STATE["modules"]))
        src, options, bound = specialise(launch, v.arch)
        res.num_warps = int(options.get("num_warps", 4))
        res.num_stages = int(options.get("num_stages", 1))
        res.maxnreg = options.get("maxnreg")
        res.block_m = int(bound.get("TH", 0)) * int(bound.get("TW", 0))
        gx, gy, gz = grid_size(launch[1], bound)
        res.programs = gx * gy * gz
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=options)
    except Exception as exc:  # a kernel that does not compile is a finding, not a crash
        res.status, res.error = "error", _short_error(exc)
        res.seconds, res.cpu_seconds = time.perf_counter() - start, _cpu_time() - cpu
        return res
    res.seconds, res.cpu_seconds = time.perf_counter() - start, _cpu_time() - cpu
    ptx = compiled.asm["ptx"]
    text = log.getvalue()
    if "Used" not in text:       # the log knob was ignored (another triton): run ptxas here
        text = _run_ptxas(ptx, v.arch)
    for key, val in {**parse_ptxas(text), **parse_ptx(ptx)}.items():
        setattr(res, key, val)
    res.smem = int(compiled.metadata.shared)
    if _STATE.get("sass"):
        res.sass = parse_sass(_sass(compiled.asm["cubin"]))
        try:
            res.executed = executed_per_cell(_nvdisasm(compiled.asm["cubin"]), launch, bound,
                                             res.num_warps)
        except ValueError as exc:
            res.error = f"executed count: {exc}"
    return res


def _cost(v: Variant) -> float:
    """Rough relative compile time, to start the slowest compiles first."""
    return ((3.0 if v.dense and v.precision == 0 else 1.0)
            * (2.0 if v.kernel.startswith("bwd_") and v.dense else 1.0)
            * (1.0 + v.hidden / 128) * v.channels * v.filters)


class Compiler:
    """A pool of compile processes sharing a fresh triton cache, deleted on ``close``.

    Workers are spawned, never forked, and import the kernels themselves: a caller that imported
    them interpreted (any test process) or must keep TRITON_INTERPRET set is left untouched.
    """

    def __init__(self, workers: int = MAX_WORKERS, sass: bool = False):
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: expected 1..{MAX_WORKERS}, got {workers}")
        self.cache = tempfile.mkdtemp(prefix="nca_aot_cache_")
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker,
                                        initargs=(self.cache, sass))

    def submit(self, v: Variant, edge: bool = False) -> "Future[Result]":
        return self.pool.submit(compile_variant, v, edge)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.cache, ignore_errors=True)

    def __enter__(self) -> "Compiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(variants: Sequence[Variant], workers: int = MAX_WORKERS, progress=None,
        sass: bool = False) -> List[Result]:
    """Compile every variant (``workers`` processes, at most 2) in a fresh triton cache;
    ``sass``: also count SASS instructions by class (cuobjdump, ~1 s per variant).

    Returns results in the order of ``variants``. ``progress(result, done, total)`` is called as
    each finishes.
    """
    results: List[Optional[Result]] = [None] * len(variants)
    with Compiler(workers, sass) as compiler:
        # slowest first, so that the last compile does not leave a worker idle for long
        order = sorted(range(len(variants)), key=lambda i: -_cost(variants[i]))
        futures = {compiler.submit(variants[i]): i for i in order}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            results[i] = fut.result()
            if progress:
                progress(results[i], done, len(variants))
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ output
_COLUMNS = (("kernel", 11), ("arch", 7), ("C", 3), ("hidden", 6), ("F", 2), ("bank", 4),
            ("precision", 9), ("switches", 18), ("BLOCK_M", 7), ("warps", 5), ("stages", 6), ("registers", 9),
            ("spill", 11), ("stack", 5), ("smem", 7), ("TC", 5), ("ld", 3), ("s", 5),
            ("check", 5))


def format_table(results: Iterable[Result]) -> str:
    """A fixed-width text table; spill = stores/loads bytes, TC = native tensor-core
    instructions, ld = widest global load in bytes, s = compile seconds."""
    lines = [" ".join(f"{name:>{w}}" for name, w in _COLUMNS)]
    for r in results:
        row = r.row()
        ok = r.status == "ok"
        cells = dict(row, spill=f"{r.spill_stores}/{r.spill_loads}" if ok else "-",
                     TC=r.tensor_core if ok else "-", ld=r.widest_load if ok else "-",
                     s=f"{r.seconds:.1f}", check="ok" if not r.problems() else
                     ("ERROR" if not ok else "FAIL"))
        for key in ("registers", "stack", "smem"):
            if not ok:
                cells[key] = "-"
        lines.append(" ".join(f"{str(cells[name]):>{w}}" for name, w in _COLUMNS))
    return "\n".join(lines)


def format_sass(results: Iterable[Result]) -> str:
    """Static SASS instruction counts by class, and executed warp-instructions per cell."""
    classes = (*_SASS_CLASSES, "other")
    head = f"{'variant':<58} {'w-inst/cell':>11} " + " ".join(f"{c:>9}" for c in classes)
    lines = [head]
    for r in results:
        if r.status == "ok" and r.sass:
            lines.append(f"{r.variant.label():<58} {r.warp_instr_per_cell:>11.1f} "
                         + " ".join(f"{r.sass.get(c, 0):>9}" for c in classes))
    return "\n".join(lines)


def format_problems(results: Sequence[Result]) -> str:
    """Failing variants, one line each; identical compile errors grouped."""
    lines, errors = [], {}
    for r in results:
        if r.status != "ok":
            errors.setdefault(r.error, []).append(r.variant.label())
        elif r.problems():
            lines.append(f"FAIL {r.variant.label()} (BLOCK_M={r.block_m}, warps={r.num_warps}): "
                         f"{'; '.join(r.problems())}; {r.registers} registers")
    for msg, labels in errors.items():
        lines.append(f"ERROR in {len(labels)} variant(s), e.g. {labels[0]}:\n    {msg}")
    notes = {}
    for r in results:
        for note in filter(None, r.ptxas_notes.split(" | ")):
            notes.setdefault(note, []).append(r.variant.label())
    for note, labels in notes.items():
        lines.append(f"ptxas note in {len(labels)} variant(s), e.g. {labels[0]}: {note}")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv(results: Sequence[Result], path: Path) -> None:
    buf = io.StringIO()
    rows = [r.row() for r in results]
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["kernel"])
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, buf.getvalue())


def write_json(results: Sequence[Result], path: Path, meta: dict) -> None:
    rows = [dict(r.row(), variant=dataclasses.asdict(r.variant)) for r in results]
    _atomic_write(path, json.dumps(dict(meta, results=rows), indent=1))


def versions() -> dict:
    import triton

    ptxas = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+), (V[\d.]+)", ptxas)
    return dict(triton=triton.__version__, ptxas=release.group(2) if release else "unknown",
                date=time.strftime("%Y-%m-%d"))


# --------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the representative subset (= --subset "
                   "quick)")
    p.add_argument("--subset", choices=sorted(SUBSETS), default=None,
                   help="which variants: every one (default), quick, the CI test's, or the "
                        "default model's training step (defaults)")
    p.add_argument("--arch", type=int, choices=ARCHS, action="append",
                   help="compute capability to compile for (repeatable; default both)")
    p.add_argument("--kernel", choices=KERNEL_NAMES, action="append",
                   help="restrict to a kernel (repeatable; default all four)")
    p.add_argument("--workers", type=int, default=MAX_WORKERS, help="compile processes (1 or 2)")
    p.add_argument("--csv", type=Path, help="write every measured column here")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--sass", action="store_true",
                   help="count SASS instructions by class and executed warp-instructions per "
                        "cell (loop trip counts)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)

    if args.quick and args.subset not in (None, "quick"):
        p.error("--quick conflicts with --subset " + args.subset)
    if not 1 <= args.workers <= MAX_WORKERS:
        p.error(f"--workers: expected 1..{MAX_WORKERS}, got {args.workers}")
    for out in (args.csv, args.json):
        if out is not None and not out.resolve().parent.is_dir():
            p.error(f"--csv/--json: folder {out.resolve().parent} does not exist")
    subset = "quick" if args.quick else (args.subset or "all")
    archs = tuple(args.arch or ARCHS)
    kernels = tuple(args.kernel or KERNEL_NAMES)
    variants = SUBSETS[subset](archs, kernels)
    if args.list:
        print("\n".join(v.label() for v in variants))
        return 0

    meta = dict(versions(), subset=subset, n_cells=N_CELLS)
    targets = ", ".join(f"sm_{a}{'a' if a >= 90 else ''}" for a in archs)
    print(f"compiling {len(variants)} variants ({subset}) for {targets} with {args.workers} "
          f"worker(s); "
          f"triton {meta['triton']}, ptxas {meta['ptxas']}", flush=True)
    start = time.perf_counter()

    def progress(r: Result, done: int, total: int) -> None:
        flag = "ok" if not r.problems() else r.status.upper() if r.status != "ok" else "FAIL"
        print(f"[{done}/{total}] {r.seconds:6.1f}s {flag:5} {r.variant.label()}", flush=True)

    results = run(variants, args.workers, progress, args.sass)
    wall = time.perf_counter() - start
    meta.update(wall_s=round(wall, 1), compile_s=round(sum(r.seconds for r in results), 1),
                cpu_s=round(sum(r.cpu_seconds for r in results), 1))
    print()
    print(format_table(results))
    if args.sass:
        print()
        print(format_sass(results))
    problems = format_problems(results)
    if problems:
        print()
        print(problems)
    failing = sum(1 for r in results if r.problems())
    print(f"\n{len(results)} variants, {failing} failing; wall {wall:.1f} s; per-variant compile "
          f"wall {meta['compile_s']:.1f} s and CPU {meta['cpu_s']:.1f} s summed; "
          f"triton {meta['triton']}, ptxas {meta['ptxas']}, {meta['date']}")
    if args.csv:
        write_csv(results, args.csv)
    if args.json:
        write_json(results, args.json, meta)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
