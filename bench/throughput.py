"""The throughput suite: cell-steps per second of every provider, forward and training.

    python -m bench.throughput [--device cpu|cuda] [--sizes 8x72x72@64,...] [--modes ...]
                               [--providers ...] [--repeats N] [--out DIR] [--time-budget S]

(``nca-fast bench ...`` forwards here.) One run checks that every provider computes the same
step as the float64 reference and drops one that disagrees (``bench.providers``); measures the
machine's matmul ceiling for the compute floor (``bench.ceilings``); then times every provider
on each size and mode from the same state with the same weights (``bench.harness.measure_case``:
``compile_s`` is the first call's excess over the median); prints the table and writes
``throughput.csv`` (rewritten after every case, so an interrupted run keeps what it measured)
and ``throughput.png`` to ``--out``.

Size tokens: ``BxHxW@T`` or ``N@T`` for 1xNxN, optionally ``/forward``, ``/train`` or
``/train+memory``. Modes: ``forward`` (a T-step rollout without gradients), ``train`` (one
training iteration: rollout, MSE on RGBA, backward, gradient normalisation, Adam), ``memory``
(the training iteration's memory, ``bench.memory``). ``ratio_vs_eager``: torch-eager's time over
the provider's, per paired round on a CPU, of the medians on CUDA.

Exit status: 0 when every available provider agreed and was measured, 1 when a provider was
rejected by the check or failed, 2 on a usage error.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from bench.ceilings import measure_floors
from bench.harness import (MODES, Case, Parser, Recorder, Setup, Task, UsageError, environment,
                           measure_case, parse_sizes, prepare_out, read_csv, read_providers,
                           resolve_device, run_check, run_cli, split_list, suite_options)
from bench.memory import run_sweeps
from bench.providers import PROVIDER_NAMES, Provider
from bench.runners import make_weights
from bench.tables import format_table, markdown_table, plot_throughput
from nca_fast import NCAConfig

# Most important first: a time budget cuts the tail. CPU: sized for a whole suite under 5
# minutes on a shared 2-core machine. CUDA: the article's configuration, then grids that fill
# an H200.
DEFAULT_SIZES = {"cpu": "8x72x72@2,1x256x256@1,1x1024x1024@1/forward",
                 "cuda": "8x72x72@64,1x1024x1024@64,1x4096x4096@16,1x16384x16384@4/forward,"
                         "1x256x256@64"}
# torch.compile and JAX compile anew for every shape (tens of seconds each on a 2-core CPU).
DEFAULT_EXCLUDE = {"cpu": "torch-compile@1x256x256,torch-compile@1x1024x1024,cax@1x256x256,"
                          "cax@1x1024x1024", "cuda": ""}
DEFAULT_REPEATS = {"cpu": 3, "cuda": 10}
DEFAULT_BUDGET = {"cpu": 270.0, "cuda": 240.0}


@dataclass
class SuiteResult:
    rows: List[dict]
    ok: bool
    csv_path: Optional[pathlib.Path]
    kept: List[Provider]          # the providers that passed the same-step check
    seconds: float


def run_suite(providers: Sequence[Provider], device, cases: Sequence[Case], *,
              modes: Sequence[str] = MODES, repeats: int = 3, warmup: int = 1,
              out_dir=None, time_budget: Optional[float] = None, floor: bool = True,
              config: Optional[NCAConfig] = None, exclude: Sequence[str] = (),
              log: Callable[[str], None] = print) -> SuiteResult:
    """Check, then time every case; rows go to ``out_dir/throughput.csv`` after every case.

    exclude: ``provider@BxHxW`` or ``provider@BxHxW/mode`` tokens: that provider is not run on
    that size (in that mode), recorded as skipped.
    """
    device, start = torch.device(device), time.monotonic()
    rec = Recorder(environment(device))
    csv_path = pathlib.Path(out_dir) / "throughput.csv" if out_dir is not None else None
    save = (lambda: rec.write(csv_path)) if csv_path is not None else (lambda: None)
    log(f"device: {rec.env['device']}; torch {rec.env['torch']}, triton {rec.env['triton']}, "
        f"commit {rec.env['commit']}")
    log("same-step check (fire rate 1, float64 reference):")
    keep = run_check(providers, device, rec, log)
    ok = not any(r["metric"] == "rejected" for r in rec.rows)
    if floor:
        measure_floors(device, rec, log)
    save()
    config = config or NCAConfig()
    setup = Setup(config, make_weights(config), device)
    for case in cases:
        for mode in ("forward", "train"):
            timed = mode in modes and mode in case.modes
            task = Task(case, mode, repeats if timed else 0, warmup, memory=(
                mode == "train" and "memory" in modes and "memory" in case.modes))
            if not (timed or task.memory):
                continue
            if time_budget is not None and time.monotonic() - start > time_budget:
                for p in keep:
                    task.add(rec, p.name, "skipped", note=f"time budget of {time_budget:g} s spent")
                log(f"  skipped {mode} {case.size}: time budget spent")
                continue
            run = [p for p in keep if f"{p.name}@{case.size}" not in exclude
                   and f"{p.name}@{case.size}/{mode}" not in exclude]
            for p in keep:
                if p not in run:
                    task.add(rec, p.name, "skipped", note="excluded by --exclude")
            ok &= measure_case(run, setup, task, rec, log=log)
            save()
    seconds = time.monotonic() - start
    log(f"suite done in {seconds:.0f} s")
    return SuiteResult(rec.rows, ok, csv_path, keep, seconds)


def build_parser(prog: str = "python -m bench.throughput") -> Parser:
    p = suite_options(Parser(prog=prog, description="Throughput of nca_fast against PyTorch "
                             "ports (cell-steps per second, forward and training)."),
                      "throughput.csv/.png")
    p.add_argument("--sizes", help="comma-separated BxHxW@T tokens, optional /forward or /train; "
                                   f"default cpu: {DEFAULT_SIZES['cpu']}; cuda: "
                                   f"{DEFAULT_SIZES['cuda']}")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--repeats", type=int, help="timed rounds per case, each at least 100 ms on a "
                   "CPU; about that many calls under do_bench on CUDA (default cpu 3, cuda 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per provider first (at "
                   "least one is made: its excess over the median is compile_s)")
    p.add_argument("--time-budget", type=float, help="seconds after which remaining cases are "
                   "recorded as skipped (default cpu 270, cuda 240; 0 = none)")
    p.add_argument("--sweep", default="none",
                   help="also run bench.memory's sweeps: none, t, grid or t,grid")
    p.add_argument("--exclude", help="comma-separated provider@BxHxW[/mode] not to run, e.g. "
                   "torch-compile@1x4096x4096 (default with the default sizes: cpu: "
                   f"{DEFAULT_EXCLUDE['cpu']}; cuda: none; '' for none)")
    p.add_argument("--no-floor", action="store_true", help="skip the matmul ceiling")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only")
    p.add_argument("--plot-from", metavar="CSV", help="only redraw the plot of an existing CSV")
    p.add_argument("--markdown-from", metavar="CSV",
                   help="only print an existing CSV as a Markdown table")
    return p


def parse_exclude(value: str) -> List[str]:
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    for t in tokens:
        name, at, size = t.partition("@")
        size, _, mode = size.partition("/")
        if name not in PROVIDER_NAMES or not at or not size or mode not in ("", "forward", "train"):
            raise UsageError(f"--exclude: bad pair {t!r}; expected provider@BxHxW[/mode] "
                             f"with a provider from {','.join(PROVIDER_NAMES)}")
    return tokens


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point (``python -m bench.throughput``, ``nca-fast bench``); returns the status."""
    def parse():
        args = build_parser().parse_args(argv)
        if args.markdown_from or args.plot_from:
            return args
        args.device = resolve_device(args.device)
        kind = args.device.type
        args.cases = parse_sizes(args.sizes or DEFAULT_SIZES[kind])
        args.modes = split_list(args.modes, MODES, "--modes")
        args.providers = read_providers(args)
        args.sweep = [] if args.sweep == "none" else split_list(args.sweep, ("t", "grid"),
                                                                "--sweep")
        args.repeats = DEFAULT_REPEATS[kind] if args.repeats is None else args.repeats
        if args.repeats < 1 or args.warmup < 0:
            raise UsageError("--repeats must be >= 1 and --warmup >= 0")
        default_exclude = "" if args.sizes else DEFAULT_EXCLUDE[kind]
        args.exclude = parse_exclude(default_exclude if args.exclude is None else args.exclude)
        if args.time_budget is None:
            args.time_budget = DEFAULT_BUDGET[kind]
        args.out = prepare_out(args.out)
        return args

    return run_cli("bench.throughput", parse, run)


def run(args) -> int:
    if args.markdown_from:
        print(markdown_table(read_csv(args.markdown_from)))
        return 0
    if args.plot_from:
        png = pathlib.Path(args.plot_from).with_suffix(".png")
        print(f"wrote {plot_throughput(read_csv(args.plot_from), png)}")
        return 0
    # inductor gets an empty cache, so that torch-compile's compile_s is a first run's cost
    cache = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nca_bench_")
    budget = args.time_budget or None
    try:
        res = run_suite(args.providers, args.device, args.cases, modes=args.modes,
                        repeats=args.repeats, warmup=args.warmup, out_dir=args.out,
                        time_budget=budget, floor=not args.no_floor, exclude=args.exclude)
        print(f"\n{format_table(res.rows)}\n\nwrote {res.csv_path}")
        if not args.no_plot:
            print(f"wrote {plot_throughput(res.rows, args.out / 'throughput.png')}")
        ok = res.ok
        if args.sweep:
            left = max(budget - res.seconds, 1.0) if budget else None
            ok &= run_sweeps(res.kept, args.device, args.sweep, args.out, repeats=args.repeats,
                             check=False, time_budget=left, plot_it=not args.no_plot)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
