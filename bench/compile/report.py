"""Ahead-of-time compile report of the Triton step kernels, for GPUs this machine does not have.

Every kernel variant the launchers in ``kernels/`` can pick is compiled for sm_90a (Hopper) and
sm_80 (Ampere) exactly as the JIT would specialise it (``bench.compile.capture``). Per variant the
report gives registers, spills and stack, shared memory, tensor-core instructions and the widest
global load / store; with ``--sass`` (sm_90a) SASS instructions by class and the executed
warp-instructions per cell (``bench.compile.sass``). A variant fails as
``bench.compile.compiler.Result.problems`` says.

Usage (from the repository root; no GPU, no CUDA driver needed)::

    python -m bench.compile.report --quick                 # representative subset, both archs
    python -m bench.compile.report --arch 90 --csv out.csv # every variant for sm_90a
    python -m bench.compile.report --subset ci --json r.json
    python -m bench.compile.report --subset defaults --sass  # executed counts, default model

Every variant is 7,040 compiles per architecture, --quick a few dozen (compile times:
bench/NOTES.md, section 5). Each run compiles from scratch into a temporary triton cache that is
deleted at exit. Exit status 1 when any variant fails.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from bench.compile.compiler import MAX_WORKERS, Result, run
from bench.compile.sass import SASS_CLASSES, ptxas_path
from bench.compile.variants import ARCHS, KERNEL_NAMES, N_CELLS, SUBSETS
from nca_fast.files import atomic_write


_COLUMNS = (("kernel", 11), ("arch", 7), ("C", 3), ("hidden", 6), ("F", 2), ("bank", 4),
            ("precision", 9), ("switches", 18), ("BLOCK_M", 7), ("warps", 5), ("stages", 6),
            ("registers", 9), ("spill", 11), ("stack", 5), ("smem", 7), ("TC", 5), ("ld", 3), ("s", 5),
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
    classes = (*SASS_CLASSES, "other")
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




def write_csv(results: Sequence[Result], path: Path) -> None:
    buf = io.StringIO()
    rows = [r.row() for r in results]
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["kernel"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def write_json(results: Sequence[Result], path: Path, meta: dict) -> None:
    rows = [dict(r.row(), variant=dataclasses.asdict(r.variant)) for r in results]
    text = json.dumps(dict(meta, results=rows), indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def versions() -> dict:
    import triton

    ptxas = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+), (V[\d.]+)", ptxas)
    return dict(triton=triton.__version__, ptxas=release.group(2) if release else "unknown",
                date=time.strftime("%Y-%m-%d"))


# --------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile.report",
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
