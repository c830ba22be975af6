"""One variant compiled and measured, and the pool of processes that compiles many.

A variant *fails* (``Result.problems``) when it does not compile, spills, needs more registers
or shared memory than the SM has for its launch, or (tf32 / bf16 kernels with dense layers) has
no tensor-core instruction of its architecture. "ieee" precision is exact fp32 and has no
tensor-core instruction by design.

Each pool compiles from scratch into a temporary triton cache that is deleted when it closes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import resource
import shutil
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from bench.compile import sass as sass_text
from bench.compile.capture import grid_size, load_kernels, record_launch, specialise
from bench.compile.variants import PRECISION_NAMES, Variant

# Largest dynamic shared memory one block may opt in to, bytes (CUDA programming guide,
# "Technical Specifications per Compute Capability": 227 KB on 9.0, 163 KB on 8.0).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
REGISTER_FILE = 65536          # 32-bit registers per SM (and per block) on sm_80 and sm_90
MAX_REGISTERS = 255            # per thread
MAX_WORKERS = 2


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
        text = sass_text.run_ptxas(ptx, v.arch)
    for key, val in {**sass_text.parse_ptxas(text), **sass_text.parse_ptx(ptx)}.items():
        setattr(res, key, val)
    res.smem = int(compiled.metadata.shared)
    if _STATE.get("sass"):
        res.sass = sass_text.parse_sass(sass_text.cuobjdump_sass(compiled.asm["cubin"]))
        try:
            res.executed = sass_text.executed_per_cell(
                sass_text.nvdisasm(compiled.asm["cubin"]), launch, bound, res.num_warps)
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
    ``sass``: also count SASS instructions by class (cuobjdump) and the executed ones.

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
