"""Memory of a training iteration, and memory and throughput against rollout length and grid size.

    python -m bench.memory [--device cpu|cuda] [--sweep t,grid] [--memcheck] [--out DIR]

What "memory" means depends on the device (``bench.harness.measure_memory``): on CUDA the peak
of one training iteration (``peak_bytes``), on a CPU, which has no allocator counter to read, the
bytes autograd keeps for the backward (``saved_bytes``).

Sweeps: a training iteration at growing T (fixed grid) and at growing grid (fixed T), each point
giving memory and cell-steps/s per provider; ``memory.csv`` and ``memory.png``.

``--memcheck`` (CUDA): the memory promise, training 1024x1024 for 1,000 steps in under 40 GB,
for nca_fast-triton with and without ``checkpoint="sqrt"``.
"""
from __future__ import annotations

import pathlib
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

from bench.harness import (Case, Parser, Recorder, Setup, Task, UsageError, environment,
                           measure_case, prepare_out, read_providers, resolve_device, run_check,
                           run_cli, split_list, suite_options, write_csv)
from bench.providers import Provider
from bench.runners import make_weights
from bench.tables import plot_sweeps
from nca_fast import NCAConfig

SWEEPS = {
    # (batch, grid side, steps) per point; a CPU's fit a shared 2-core machine
    "cpu": {"t": [(1, 32, t) for t in (4, 16, 64)],
            "grid": [(1, n, 4) for n in (32, 64, 128)]},
    "cuda": {"t": [(1, 256, t) for t in (16, 32, 64, 128, 256, 512, 1024)],
             "grid": [(1, n, 64) for n in (64, 128, 256, 512, 1024)]},
    # --quick: plumbing checks (tests, the GPU script's rehearsal), seconds on any machine.
    "quick": {"t": [(1, 16, t) for t in (2, 4)], "grid": [(1, n, 2) for n in (16, 32)]},
}
MEMCHECK = Case(1, 1024, 1024, 1000, ("train",))
MEMCHECK_LIMIT = 40e9     # bytes
# Left out of the sweeps on every device: torch.compile recompiles for every grid (more than the
# whole sweep costs; its memory and speed are in the suite's table), and JAX's memory is not
# visible to torch.
SWEEP_SKIP = ("torch-compile", "cax")


def run_sweeps(providers: Sequence[Provider], device, which: Sequence[str], out_dir, *,
               repeats: int = 3, memcheck: bool = False, check: bool = True,
               time_budget: Optional[float] = None, plot_it: bool = True, quick: bool = False,
               config: Optional[NCAConfig] = None, log: Callable[[str], None] = print) -> bool:
    """Run the sweeps (``which``: "t", "grid") and the memcheck; write memory.csv (and
    memory.png) to ``out_dir``. Providers in SWEEP_SKIP are left out. Returns False when a
    provider was rejected or failed, or the memcheck failed."""
    device, start = torch.device(device), time.monotonic()
    config = config or NCAConfig()
    rec = Recorder(environment(device))
    csv_path = pathlib.Path(out_dir) / "memory.csv"
    providers = [p for p in providers if p.name not in SWEEP_SKIP]
    ok = True
    if check:
        log("same-step check (fire rate 1, float64 reference):")
        providers = run_check(providers, device, rec, log)
        ok = not any(r["metric"] == "rejected" for r in rec.rows)
    setup = Setup(config, make_weights(config), device)
    work = []
    if memcheck:      # first: the promise matters more than the sweeps when time runs out
        triton = [p for p in providers if p.name == "nca_fast-triton"]
        if not triton:
            rec.add("nca_fast-triton", "train", MEMCHECK.size, MEMCHECK.steps, "unavailable",
                    note="memcheck needs nca_fast-triton on CUDA")
            ok = False
        work += [(Task(MEMCHECK, "train", 1, memory=True), triton),
                 (Task(MEMCHECK, "train", 1, memory=True, checkpoint="sqrt",
                       label="train-ckpt-sqrt"), triton)]
    table = SWEEPS["quick" if quick else device.type]
    work += [(Task(Case(b, n, n, t, ("train",)), "train", repeats, memory=True,
                   label=f"train:{w}-sweep"), providers) for w in which for b, n, t in table[w]]
    for task, provs in work:
        if not provs:
            continue
        if time_budget is not None and time.monotonic() - start > time_budget:
            for p in provs:
                task.add(rec, p.name, "skipped", note=f"time budget of {time_budget:g} s spent")
            log(f"  skipped {task.label} {task.case.size} T={task.case.steps}: time budget spent")
            continue
        ok &= measure_case(provs, setup, task, rec, log=log)
        write_csv(rec.rows, csv_path)
    if memcheck:
        ok &= record_memcheck(rec, log)
    write_csv(rec.rows, csv_path)
    log(f"wrote {csv_path}")
    if plot_it:
        log(f"wrote {plot_sweeps(rec.rows, pathlib.Path(out_dir) / 'memory.png')}")
    return ok


def record_memcheck(rec: Recorder, log) -> bool:
    """A ``memcheck_pass`` row per memcheck variant; the promise holds when either meets it."""
    for label in ("train", "train-ckpt-sqrt"):
        peak = next((r["median"] for r in rec.rows if r["mode"] == label
                     and r["size"] == MEMCHECK.size and r["metric"] == "peak_bytes"), None)
        passed = peak is not None and peak < MEMCHECK_LIMIT
        shown = "not measured" if peak is None else f"{peak / 1e9:.2f} GB"
        rec.add("nca_fast-triton", label, MEMCHECK.size, MEMCHECK.steps, "memcheck_pass",
                float(passed), note=f"train 1024x1024 for 1,000 steps in under 40 GB; peak {shown}")
        log(f"  memcheck {label}: {'PASS' if passed else 'FAIL'} ({shown}; limit 40 GB)")
    return any(r["metric"] == "memcheck_pass" and r["median"] == 1.0 for r in rec.rows)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bench.memory``: sweeps and memcheck; returns the exit status."""
    p = suite_options(Parser(prog="python -m bench.memory", description="Training memory and "
                             "throughput against T and grid size."), "memory.csv/.png")
    p.add_argument("--sweep", default="t,grid", help="t, grid, t,grid or none")
    p.add_argument("--memcheck", action="store_true",
                   help="CUDA: train 1024x1024 for 1,000 steps in under 40 GB")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per point")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = none")
    p.add_argument("--quick", action="store_true",
                   help="tiny sweeps (T 2,4 at 16x16; grids 16,32 at T=2): plumbing checks")
    p.add_argument("--no-plot", action="store_true")

    def parse():
        args = p.parse_args(argv)
        args.device = resolve_device(args.device)
        args.sweep = [] if args.sweep == "none" else split_list(args.sweep, ("t", "grid"),
                                                                "--sweep")
        args.providers = read_providers(args)
        if args.memcheck and args.device.type != "cuda":
            raise UsageError("--memcheck: needs --device cuda (1e9 cell-steps of training)")
        if args.repeats < 1:
            raise UsageError("--repeats must be >= 1")
        args.out = prepare_out(args.out)
        return args

    def run(args) -> int:
        ok = run_sweeps(args.providers, args.device, args.sweep, args.out, repeats=args.repeats,
                        memcheck=args.memcheck, time_budget=args.time_budget or None,
                        plot_it=not args.no_plot, quick=args.quick)
        return 0 if ok else 1

    return run_cli("bench.memory", parse, run)


if __name__ == "__main__":
    sys.exit(main())
