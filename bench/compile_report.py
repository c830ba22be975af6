"""Ahead-of-time compile report of the Triton step kernels, for GPUs this machine does not have.

Every kernel variant the launchers in ``kernels/`` can pick is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for sm_90a (Hopper) and
sm_80 (Ampere), with the launch configuration (BLOCK_M, num_warps, num_stages, the ptxas register
ceiling ``maxnreg``, hidden chunk, tap unrolling) that ``kernels/configs.py`` returns for a GPU.
Per variant the report reads:

- from ``ptxas -v`` (the ptxas that ships with triton, run by triton's own cubin stage, with
  triton's flags): registers per thread, spill stores / loads and stack frame, in bytes;
- from triton's metadata: the shared memory the kernel allocates;
- from the PTX: tensor-core instructions (``wgmma.mma_async`` on sm_90a, ``mma.sync`` on sm_80)
  and the widest global load / store, in bytes (16 = ``ld.global.v4.b32``).

A variant *fails* when it does not compile, spills, needs more registers or shared memory than
the SM has for its launch, or (tf32 / bf16 kernels with dense layers) has no tensor-core
instruction of its architecture. "ieee" precision is exact fp32 and has no tensor-core
instruction by design.

Signatures follow what the launchers pass: fp32 state pointers (``q`` pointers ``*u8`` when the
kernel reads / writes them; the launcher passes the fp32 state in their place otherwise), 16-byte
aligned as torch allocations are; seed ``i64`` (as for a seed >= 2**31; the JIT gives smaller
seeds an i32 key), step and fire threshold ``i32``, thr ``fp32``, sizes ``i32`` (``i64`` with
INT64). Sizes carry no divisibility hint (the general case; the JIT marks a size that is a multiple
of 16, so a 1024-wide grid may compile slightly differently).

Usage (from the repository root; no GPU, no CUDA driver needed)::

    python -m bench.compile_report --quick                 # representative subset, both archs
    python -m bench.compile_report --arch 90 --csv out.csv # every variant for sm_90a
    python -m bench.compile_report --subset ci --json r.json
    python -m bench.compile_report --quick --arch 90 --kernel fwd --sass  # instruction mix

Every variant is 1184 compiles per architecture, 1-26 CPU-seconds each (about 5 typical): hours
on 2 cores; --quick is 44 compiles. Each run compiles from scratch into a temporary triton cache
that is deleted at exit. Exit status 1 when any variant fails.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib
import importlib.util
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
from typing import Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"

# A grid large enough that the selectors pick their GPU tiles (8 Mi cells, 1024 x 1024 x 8) but
# below the INT64 threshold; INT64 is a switch of its own below.
N_CELLS = 1024 * 1024 * 8
ALPHA_CHANNEL = 3
ARCHS = (90, 80)
PRECISION_NAMES = {0: "ieee", 1: "tf32", 2: "bf16"}
KERNEL_NAMES = ("fwd", "bwd_gp", "bwd_weights", "bwd_input", "bwd_keep")
DENSE_KERNELS = ("fwd", "bwd_gp", "bwd_weights")
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
    (_nca_step_bwd_weights_kernel), "bwd_input" (_nca_step_bwd_input_kernel) or "bwd_keep"
    (_nca_step_bwd_keep_kernel); the last two have no dense layer: hidden and precision are 0
    (and filters, for bwd_keep, which runs only with pending bits).
    arch: compute capability, 90 (compiled as sm_90a) or 80.
    """

    kernel: str
    arch: int
    channels: int
    hidden: int
    filters: int
    precision: int
    has_q: bool
    alive: bool
    circular: bool
    int64: bool

    def __post_init__(self):
        if self.kernel not in KERNEL_NAMES:
            raise ValueError(f"kernel: expected one of {KERNEL_NAMES}, got {self.kernel!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        if self.has_q and not self.alive and self.dense:
            raise ValueError("has_q: pending pre-mask bits exist only with alive masking on")

    @property
    def dense(self) -> bool:
        return self.kernel in DENSE_KERNELS

    def switches(self) -> str:
        names = [("Q", self.has_q), ("A", self.alive and self.dense), ("circ", self.circular),
                 ("i64", self.int64)]
        return "+".join(n for n, on in names if on) or "-"

    def label(self) -> str:
        prec = PRECISION_NAMES[self.precision] if self.dense else "-"
        arch = f"sm_{self.arch}{'a' if self.arch >= 90 else ''}"
        return (f"{self.kernel} {arch} C={self.channels} hidden={self.hidden} "
                f"F={self.filters} {prec} {self.switches()}")


def _dense(kernel, arch, c, hid, f, prec, has_q, alive, circ=False, i64=False) -> Variant:
    return Variant(kernel, arch, c, hid, f, prec, has_q, alive, circ, i64)


def _transpose(arch, c, f, has_q, circ=False, i64=False) -> Variant:
    return Variant("bwd_input", arch, c, 0, f, 0, has_q, has_q, circ, i64)


def _keep(arch, c, circ=False, i64=False) -> Variant:
    return Variant("bwd_keep", arch, c, 0, 0, 0, True, True, circ, i64)


def load_configs(kernels_dir: Path = KERNELS_DIR):
    """``configs.py`` of ``kernels_dir`` on its own: plain Python (no kernel), safe to import in
    any process, interpreted or not."""
    path = Path(kernels_dir) / "configs.py"
    if not path.is_file():
        raise FileNotFoundError(f"kernels_dir: no configs.py in {kernels_dir}")
    name = "_nca_aot_configs"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod       # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


def all_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES,
                 kernels_dir: Path = KERNELS_DIR) -> List[Variant]:
    """Every variant the launchers can pick, over the shapes and precisions configs.py declares
    supported: 576 per dense kernel, 32 transposes and 8 keep-mask kernels per arch at C
    {16, 32}, hidden {32, 64, 128, 256}, F {3, 4}, three precisions."""
    cfg = load_configs(kernels_dir)
    masks = ((False, False), (False, True), (True, True))        # (HAS_Q, ALIVE)
    out = []
    for arch in archs:
        for c in cfg.SUPPORTED_CHANNELS:
            if "bwd_keep" in kernels:
                out += [_keep(arch, c, circ, i64) for circ in (False, True)
                        for i64 in (False, True)]
            for f in cfg.SUPPORTED_FILTERS:
                for circ in (False, True):
                    for i64 in (False, True):
                        if "bwd_input" in kernels:
                            for q in (False, True):
                                out.append(_transpose(arch, c, f, q, circ, i64))
                        for kernel in ("fwd", "bwd_gp", "bwd_weights"):
                            if kernel not in kernels:
                                continue
                            for hid in cfg.SUPPORTED_HIDDEN:
                                for prec in sorted(cfg.PRECISION_CODES.values()):
                                    for q, alive in masks:
                                        out.append(_dense(kernel, arch, c, hid, f, prec, q, alive,
                                                          circ, i64))
    return out


def quick_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES,
                   kernels_dir: Path = KERNELS_DIR) -> List[Variant]:
    """A representative subset (33 per arch): every switch, precision and size extreme once."""
    out = []
    for arch in archs:
        for k in ("fwd", "bwd_gp", "bwd_weights"):
            out += [
                _dense(k, arch, 16, 128, 3, 1, True, True),       # the default, mid-rollout
                _dense(k, arch, 16, 128, 3, 1, False, True),      # first step of a rollout
                _dense(k, arch, 16, 128, 3, 1, False, False),     # alive masking off
                _dense(k, arch, 16, 128, 3, 2, True, True),
                _dense(k, arch, 16, 128, 3, 0, True, True),
                _dense(k, arch, 32, 256, 4, 1, True, True),       # the largest shapes
                _dense(k, arch, 32, 256, 4, 2, True, True),
                _dense(k, arch, 16, 32, 3, 1, True, True),        # the smallest hidden layer
                _dense(k, arch, 16, 128, 3, 1, True, True, True, True),
            ]
        out += [_transpose(arch, 16, 3, True), _transpose(arch, 16, 3, False),
                _transpose(arch, 32, 4, True), _transpose(arch, 16, 3, True, True, True),
                _keep(arch, 16), _keep(arch, 32, True, True)]
    return [v for v in out if v.kernel in kernels]


def ci_variants(archs: Sequence[int] = ARCHS, kernels: Sequence[str] = KERNEL_NAMES,
                kernels_dir: Path = KERNELS_DIR) -> List[Variant]:
    """The CI subset (14 on sm_90a, 12 on sm_80): tf32 and bf16 at the defaults with alive off /
    on / pending bits, spread over both dense kernels rather than crossed; the largest shapes
    (the largest backward, the slowest compile, on sm_90a only); INT64; two variants that
    spilled before their configs changed (regressions)."""
    out = []
    for arch in archs:
        out += [
            _dense("fwd", arch, 16, 128, 3, 1, True, True),
            _dense("fwd", arch, 16, 128, 3, 2, False, False),
            _dense("bwd_gp", arch, 16, 128, 3, 1, True, True),
            _dense("bwd_weights", arch, 16, 128, 3, 1, True, True),
            _dense("bwd_gp", arch, 16, 128, 3, 2, False, True),
            _dense("bwd_weights", arch, 16, 128, 3, 2, False, True),
            _dense("fwd", arch, 32, 256, 4, 2, True, True),
            _dense("fwd", arch, 16, 128, 3, 1, True, True, False, True),
            _transpose(arch, 16, 3, True),
            _transpose(arch, 32, 4, True, False, True),
            _keep(arch, 32, True, True),
        ]
        if arch >= 90:
            out.append(_dense("bwd_gp", arch, 32, 256, 4, 1, True, True))
            out.append(_dense("bwd_weights", arch, 32, 256, 4, 1, True, True))
            # spilled 8 B before "ieee" took 16-unit chunks over the widest inputs
            out.append(_dense("fwd", arch, 32, 32, 4, 0, False, True, False, True))
        else:
            # spilled 24 B before the widest single-chunk perception gradient took two chunks
            out.append(_dense("bwd_gp", arch, 32, 32, 4, 2, True, True))
    return [v for v in out if v.kernel in kernels]


SUBSETS = {"all": all_variants, "quick": quick_variants, "ci": ci_variants}


# ------------------------------------------------------------------------------ kernel loading
_KERNEL_FUNCS = {"fwd": ("step_fwd", "_nca_step_fwd_kernel"),
                 "bwd_gp": ("step_bwd", "_nca_step_bwd_gp_kernel"),
                 "bwd_weights": ("step_bwd", "_nca_step_bwd_weights_kernel"),
                 "bwd_input": ("step_bwd", "_nca_step_bwd_input_kernel"),
                 "bwd_keep": ("step_bwd", "_nca_step_bwd_keep_kernel")}


def load_kernels(kernels_dir: Path = KERNELS_DIR):
    """Import the kernel package at ``kernels_dir`` afresh, compiled-mode, under a private name.

    ``@triton.jit`` decides at import whether a kernel is a compilable JITFunction or an
    interpreted one (TRITON_INTERPRET), and test processes import ``nca_fast.kernels``
    interpreted; a private copy is unaffected by that. Returns (configs module, {name: kernel}).
    """
    # The decorator reads TRITON_INTERPRET when a module is executed, triton's own included:
    # unset it for good in this process, which exists only to compile.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language.standard as tl_standard

    if not isinstance(tl_standard.cdiv, triton.runtime.JITFunction):
        raise RuntimeError("load_kernels: triton was imported with TRITON_INTERPRET=1 in this "
                           "process; compile in a fresh process (see Compiler)")
    init = Path(kernels_dir) / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"kernels_dir: no kernel package at {kernels_dir} "
                                f"(expected {init})")
    name = f"_nca_aot_kernels_{abs(hash(str(Path(kernels_dir).resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, init,
                                                      submodule_search_locations=[str(init.parent)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
    configs = importlib.import_module(f"{name}.configs")
    funcs = {}
    for kernel, (module, attr) in _KERNEL_FUNCS.items():
        fn = getattr(importlib.import_module(f"{name}.{module}"), attr)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise TypeError(f"{attr}: imported as {type(fn).__name__}, not a JITFunction; "
                            "TRITON_INTERPRET must be unset when the kernels are imported")
        funcs[kernel] = fn
    return configs, funcs


def launch_config(v: Variant, configs):
    """(BLOCK_M, num_warps, num_stages, maxnreg) the launcher picks for ``v`` on a GPU."""
    if configs.interpreting():
        raise RuntimeError("launch_config: TRITON_INTERPRET=1 would select interpreter tiles")
    if v.kernel == "fwd":
        cfg = configs.select_forward(N_CELLS, v.channels, v.hidden, v.filters, None,
                                     PRECISION_NAMES[v.precision])
    elif v.kernel in ("bwd_gp", "bwd_weights"):
        select = configs.select_backward if v.kernel == "bwd_gp" else configs.select_weights
        cfg = select(N_CELLS, v.channels, v.hidden, v.filters, None, PRECISION_NAMES[v.precision])
    elif v.kernel == "bwd_input":
        cfg = configs.select_transpose(N_CELLS, v.channels, v.filters)
    else:
        cfg = configs.select_keep(N_CELLS, v.channels)
    _CFG[v] = cfg
    return cfg.block_m, cfg.num_warps, cfg.num_stages, getattr(cfg, "maxnreg", None)


_CFG: Dict["Variant", object] = {}


def _hidden_chunk(v: Variant) -> int:
    """The hidden-layer chunk (HC) the launcher passes for ``v`` (set by launch_config)."""
    return _CFG[v].hidden_chunk


def signature(v: Variant, fn, block_m: int):
    """(signature, constexprs, attrs) of ``ASTSource`` for ``v``, argument by argument."""
    size = "i64" if v.int64 else "i32"
    q_type = "*u8" if v.has_q else "*fp32"
    types = {
        "fwd": dict(r_ptr="*fp32", q_ptr=q_type, out_ptr="*fp32",
                    q_out_ptr="*u8" if v.alive else "*fp32",
                    w1_ptr="*fp32", b1_ptr="*fp32", w2_ptr="*fp32", b2_ptr="*fp32",
                    filt_ptr="*fp32", seed="i64", step="i32", fire_threshold="i32", thr="fp32",
                    n_cells=size, HW=size, H=size, W=size),
        "bwd_gp": dict(r_ptr="*fp32", keep_ptr=q_type, g_ptr="*fp32", gp_ptr="*fp32",
                       w1_ptr="*fp32", b1_ptr="*fp32", w2_ptr="*fp32", filt_ptr="*fp32",
                       seed="i64", step="i32", fire_threshold="i32",
                       n_cells=size, HW=size, H=size, W=size),
        "bwd_weights": dict(r_ptr="*fp32", keep_ptr=q_type, g_ptr="*fp32", part_ptr="*fp32",
                            w1_ptr="*fp32", b1_ptr="*fp32", w2_ptr="*fp32", filt_ptr="*fp32",
                            seed="i64", step="i32", fire_threshold="i32",
                            n_cells=size, n_programs="i32", tiles_per_program="i32",
                            HW=size, H=size, W=size, n_taps="i32"),
        "bwd_input": dict(keep_ptr=q_type, g_ptr="*fp32", gp_ptr="*fp32", gr_ptr="*fp32",
                          filt_ptr="*fp32", n_cells=size, HW=size, H=size, W=size),
        "bwd_keep": dict(r_ptr="*fp32", q_ptr="*u8", keep_ptr="*u8", thr="fp32",
                         n_cells=size, HW=size, H=size, W=size),
    }[v.kernel]
    constexprs = dict(C=v.channels, BLOCK_M=block_m, CIRCULAR=v.circular, INT64=v.int64)
    if v.kernel != "bwd_keep":
        constexprs.update(NF=v.filters, HAS_Q=v.has_q)
    if v.kernel in ("fwd", "bwd_keep"):
        constexprs.update(ALPHA=ALPHA_CHANNEL)
    if v.dense:
        constexprs.update(HID=v.hidden, PRECISION=v.precision, HC=_hidden_chunk(v))
    if v.kernel == "fwd":
        constexprs.update(ALIVE=v.alive)
    if v.kernel == "bwd_input":
        constexprs.update(UNROLL=_CFG[v].unroll_taps)
    names = list(fn.arg_names)
    missing = set(names) - set(types) - set(constexprs)
    extra = (set(types) | set(constexprs)) - set(names)
    if missing or extra:
        raise RuntimeError(f"{fn.__name__}: the report's argument list is out of date with the "
                           f"kernel (missing {sorted(missing)}, unknown {sorted(extra)})")
    sig = {n: types.get(n, "constexpr") for n in names}
    # Torch allocations are 256-byte aligned; the JIT marks such pointers divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items()
             if t.startswith("*")}
    return sig, constexprs, attrs


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

    @property
    def warp_instr_per_cell(self) -> float:
        """Static SASS instructions x warps / BLOCK_M: warp-instructions issued per cell by a
        loop-free kernel (fwd, bwd_input); for bwd, the prologue counts once per program and the
        tile loop once per tile, so it is an estimate. 0 without ``--sass``."""
        total = sum(self.sass.values())
        return total * self.num_warps / self.block_m if total and self.block_m else 0.0

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
                    C=v.channels, hidden=v.hidden or "-", F=v.filters,
                    precision=PRECISION_NAMES[v.precision] if v.dense else "-",
                    switches=v.switches(), BLOCK_M=self.block_m, warps=self.num_warps,
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


def _init_worker(kernels_dir: str, cache_dir: str, sass: bool = False) -> None:
    # Before triton is imported: it decides interpreted or compiled at import (see load_kernels).
    os.environ.pop("TRITON_INTERPRET", None)
    # Each run compiles from scratch: a cache hit would skip ptxas and its log.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True     # triton prints its own ptxas -v log
    _STATE["configs"], _STATE["funcs"] = load_kernels(Path(kernels_dir))
    _STATE["sass"] = sass


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished children (ptxas)."""
    usage = (resource.getrusage(resource.RUSAGE_SELF),
             resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def compile_variant(v: Variant) -> Result:
    """Compile ``v`` (after ``_init_worker``) and measure it. Never raises for kernel errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    configs, funcs = _STATE["configs"], _STATE["funcs"]
    res = Result(v)
    res.block_m, res.num_warps, res.num_stages, res.maxnreg = launch_config(v, configs)
    fn = funcs[v.kernel]
    sig, constexprs, attrs = signature(v, fn, res.block_m)
    start, cpu = time.perf_counter(), _cpu_time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs,
                                                attrs=attrs),
                                      target=GPUTarget("cuda", v.arch, 32),
                                      options=dict(num_warps=res.num_warps,
                                                   num_stages=res.num_stages,
                                                   maxnreg=res.maxnreg))
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
    return res


def _cost(v: Variant) -> float:
    """Rough relative compile time, to start the slowest compiles first."""
    return ((3.0 if v.dense and v.precision == 0 else 1.0) * (2.0 if v.kernel.startswith("bwd_") and v.dense else 1.0)
            * (1.0 + v.hidden / 128) * v.channels * v.filters)


class Compiler:
    """A pool of compile processes sharing a fresh triton cache, deleted on ``close``.

    Workers are spawned, never forked, and import the kernels themselves: a caller that imported
    them interpreted (any test process) or must keep TRITON_INTERPRET set is left untouched.
    """

    def __init__(self, workers: int = MAX_WORKERS, kernels_dir: Path = KERNELS_DIR,
                 sass: bool = False):
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: expected 1..{MAX_WORKERS}, got {workers}")
        self.cache = tempfile.mkdtemp(prefix="nca_aot_cache_")
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker,
                                        initargs=(str(kernels_dir), self.cache, sass))

    def submit(self, v: Variant) -> "Future[Result]":
        return self.pool.submit(compile_variant, v)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.cache, ignore_errors=True)

    def __enter__(self) -> "Compiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(variants: Sequence[Variant], workers: int = MAX_WORKERS,
        kernels_dir: Path = KERNELS_DIR, progress=None, sass: bool = False) -> List[Result]:
    """Compile every variant (``workers`` processes, at most 2) in a fresh triton cache;
    ``sass``: also count SASS instructions by class (cuobjdump, ~1 s per variant).

    Returns results in the order of ``variants``. ``progress(result, done, total)`` is called as
    each finishes.
    """
    results: List[Optional[Result]] = [None] * len(variants)
    with Compiler(workers, kernels_dir, sass) as compiler:
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
_COLUMNS = (("kernel", 9), ("arch", 7), ("C", 3), ("hidden", 6), ("F", 2), ("precision", 9),
            ("switches", 14), ("BLOCK_M", 7), ("warps", 5), ("stages", 6), ("registers", 9),
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
    """Static SASS instruction counts by class, and warp-instructions per cell (see Result)."""
    classes = (*_SASS_CLASSES, "other")
    head = f"{'variant':<52} {'w-inst/cell':>11} " + " ".join(f"{c:>9}" for c in classes)
    lines = [head]
    for r in results:
        if r.status == "ok" and r.sass:
            lines.append(f"{r.variant.label():<52} {r.warp_instr_per_cell:>11.1f} "
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
                   help="which variants: every one (default), quick, or the CI test's")
    p.add_argument("--arch", type=int, choices=ARCHS, action="append",
                   help="compute capability to compile for (repeatable; default both)")
    p.add_argument("--kernel", choices=KERNEL_NAMES, action="append",
                   help="restrict to a kernel (repeatable; default all three)")
    p.add_argument("--workers", type=int, default=MAX_WORKERS, help="compile processes (1 or 2)")
    p.add_argument("--csv", type=Path, help="write every measured column here")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--kernels-dir", type=Path, default=KERNELS_DIR,
                   help="kernel package to compile (default: the repository's kernels/)")
    p.add_argument("--sass", action="store_true",
                   help="count SASS instructions by class (table: warp-instructions per cell)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)

    if args.quick and args.subset not in (None, "quick"):
        p.error("--quick conflicts with --subset " + args.subset)
    if not 1 <= args.workers <= MAX_WORKERS:
        p.error(f"--workers: expected 1..{MAX_WORKERS}, got {args.workers}")
    if not (args.kernels_dir / "__init__.py").is_file():
        p.error(f"--kernels-dir: no kernel package at {args.kernels_dir}")
    for out in (args.csv, args.json):
        if out is not None and not out.resolve().parent.is_dir():
            p.error(f"--csv/--json: folder {out.resolve().parent} does not exist")
    subset = "quick" if args.quick else (args.subset or "all")
    archs = tuple(args.arch or ARCHS)
    kernels = tuple(args.kernel or KERNEL_NAMES)
    variants = SUBSETS[subset](archs, kernels, args.kernels_dir)
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

    results = run(variants, args.workers, args.kernels_dir, progress, args.sass)
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
