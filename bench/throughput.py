"""The throughput suite: cell-steps per second of every provider, forward and training.

    python -m bench.throughput [--device cpu|cuda] [--sizes 8x72x72@64,...] [--modes ...]
                               [--providers ...] [--repeats N] [--out DIR] [--time-budget S]

(``nca-fast bench ...`` forwards here.) One run:

1. checks that every provider computes the same step as the float64 reference (fire rate 1,
   random nonzero w2; see ``bench.providers.check_same_step``) and drops one that disagrees;
2. measures the machine's ceiling (a large matmul) for the compute floor of a cell-step;
3. for each size and mode, times every provider from the same state with the same weights:
   a first call each (its excess over the median is reported as ``compile_s``), then timed by
   ``bench.harness.time_interleaved``: ``triton.testing.do_bench`` on CUDA; on a CPU
   ``repeats`` rounds of at least 100 ms each in which the providers take turns, in a rotating
   order, so that load from other processes on a shared machine hits all of them alike;
4. prints the table, writes ``throughput.csv`` (rewritten after every case, atomically, so an
   interrupted run keeps what it measured) and ``throughput.png`` to ``--out`` (default: the
   current folder).

Size tokens: ``BxHxW@T`` (batch, height, width, steps), ``N@T`` for 1xNxN; a suffix
``/forward`` or ``/train`` restricts the token to those modes (e.g. ``1x1024x1024@1/forward``).
Modes: ``forward`` (a T-step rollout without gradients), ``train`` (one training iteration: the
rollout, MSE on RGBA, backward, gradient normalisation, Adam), ``memory`` (the training
iteration's memory, see ``bench.memory``). Metric: cell-steps per second, B*H*W*T / seconds;
medians with the 20th and 80th percentiles over the rounds; ``ratio_vs_eager`` is the paired
per-round ratio of torch-eager's time to the provider's on a CPU, the ratio of the medians on
CUDA.

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

from bench.ceilings import measure as measure_ceilings
from bench.harness import (FLOPS_PER_CELL_STEP, MODES, TRAIN_FACTOR, Case, Parser, Recorder,
                           UsageError, environment, measure_case, parse_sizes, prepare_out,
                           read_csv, resolve_device, run_check, save_figure, split_list)
from bench.memory import run_sweeps
from bench.providers import PROVIDER_NAMES, Provider, get_providers, make_weights
from nca_fast import NCAConfig


DEFAULT_SIZES = {
    # CPU: the article's batch and grid with few steps, one larger grid, one forward-only step at
    # 1024^2; sized for a whole suite under 5 minutes on a shared 2-core machine.
    "cpu": "8x72x72@2,1x256x256@1,1x1024x1024@1/forward",
    # GPU: the article's configuration, then grids that fill an H200; 16384^2 forward only.
    # Most important first: a time budget cuts the tail.
    "cuda": ("8x72x72@64,1x1024x1024@64,1x4096x4096@16,1x16384x16384@4/forward,"
             "1x256x256@64"),
}
# torch.compile and JAX compile anew for every shape (tens of seconds each on a 2-core CPU):
# with the default CPU sizes they are measured on the article's configuration only.
DEFAULT_EXCLUDE = {
    "cpu": ("torch-compile@1x256x256,torch-compile@1x1024x1024,cax@1x256x256,"
            "cax@1x1024x1024"),
    "cuda": "",
}
DEFAULT_REPEATS = {"cpu": 3, "cuda": 10}
DEFAULT_BUDGET = {"cpu": 270.0, "cuda": 240.0}


# ---------------------------------------------------------------------------------- suite
def record_floor(device, rec: Recorder, log=print) -> None:
    """Measure the ceilings (``bench.ceilings``) and record the floors of forward and train.

    The compute floor uses the matmul the dense layers would use: TF32 on CUDA (the kernels'
    default precision), fp32 on a CPU; training is TRAIN_FACTOR times the forward's FLOPs.
    """
    kind = "tf32" if torch.device(device).type == "cuda" else "fp32"
    measure_ceilings(device, rec, log=log)
    rate = next(r["median"] for r in rec.rows if r["mode"] == f"matmul_{kind}")
    rec.add("floor", "forward", "", "", "cell_steps_per_s", rate / FLOPS_PER_CELL_STEP,
            note=f"{FLOPS_PER_CELL_STEP} FLOPs per cell-step at the measured {kind} matmul rate")
    rec.add("floor", "train", "", "", "cell_steps_per_s",
            rate / (TRAIN_FACTOR * FLOPS_PER_CELL_STEP),
            note=f"{TRAIN_FACTOR}x the forward's FLOPs at the measured {kind} matmul rate")


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
              config: Optional[NCAConfig] = None, csv_name: str = "throughput.csv",
              exclude: Sequence[str] = (), log: Callable[[str], None] = print) -> SuiteResult:
    """Check, then time every case; rows go to ``out_dir/csv_name`` after every case.

    exclude: ``provider@BxHxW`` or ``provider@BxHxW/mode`` tokens: that provider is not run on
    that size (in that mode), recorded as skipped; e.g. to keep torch.compile's per-shape compile
    time out of a short run.
    """
    device = torch.device(device)
    start = time.monotonic()
    config = config or NCAConfig()
    rec = Recorder(environment(device))
    csv_path = pathlib.Path(out_dir) / csv_name if out_dir is not None else None
    save = (lambda: rec.write(csv_path)) if csv_path is not None else (lambda: None)
    log(f"device: {rec.env['device']}; torch {rec.env['torch']}, triton {rec.env['triton']}, "
        f"commit {rec.env['commit']}")
    log("same-step check (fire rate 1, float64 reference):")
    keep = run_check(providers, device, rec, log)
    ok = not any(r["metric"] == "rejected" for r in rec.rows)
    if floor:
        record_floor(device, rec, log)
    save()
    weights = make_weights(config)
    for case in cases:
        for mode in ("forward", "train"):
            wanted = mode in modes and mode in case.modes
            with_memory = (mode == "train" and "memory" in modes and "memory" in case.modes)
            if not (wanted or with_memory):
                continue
            if time_budget is not None and time.monotonic() - start > time_budget:
                for p in keep:
                    rec.add(p.name, mode, case.size, case.steps, "skipped",
                            note=f"time budget of {time_budget:g} s spent")
                log(f"  skipped {mode} {case.size}: time budget spent")
                continue
            run = [p for p in keep if f"{p.name}@{case.size}" not in exclude
                   and f"{p.name}@{case.size}/{mode}" not in exclude]
            for p in keep:
                if p not in run:
                    rec.add(p.name, mode, case.size, case.steps, "skipped",
                            note="excluded by --exclude")
            ok &= measure_case(run, config, weights, case, mode, device, rec,
                               repeats=repeats if wanted else 0, warmup=warmup,
                               memory=with_memory, log=log)
            save()
    seconds = time.monotonic() - start
    log(f"suite done in {seconds:.0f} s")
    return SuiteResult(rec.rows, ok, csv_path, keep, seconds)


# ---------------------------------------------------------------------------------- output


# ---------------------------------------------------------------------------------- output
def _fmt(v: float) -> str:
    return "-" if v != v else f"{v:.3g}"


def format_table(rows: Sequence[dict]) -> str:
    """The suite as a text table: one line per (mode, size, provider)."""
    by = {}
    for r in rows:
        by.setdefault((r["mode"], r["size"], str(r["steps"]), r["provider"]), {})[r["metric"]] = r
    head = (f"{'mode':8s} {'size':>14s} {'T':>5s} {'provider':16s} {'cell-steps/s':>12s} "
            f"{'p20..p80':>19s} {'vs eager':>8s} {'compile s':>9s} {'memory MiB':>10s}  note")
    lines = [head, "-" * len(head)]
    for (mode, size, steps, prov), m in by.items():
        if mode not in ("forward", "train", "train-ckpt") and "unavailable" not in m \
                and "rejected" not in m:
            continue
        cs = m.get("cell_steps_per_s")
        ratio = m.get("ratio_vs_eager")
        comp = m.get("compile_s")
        mem = m.get("peak_bytes") or m.get("saved_bytes")
        note = next((m[k]["note"] for k in ("unavailable", "rejected", "error", "skipped")
                     if k in m), "")
        lines.append(
            f"{mode:8s} {size:>14s} {steps:>5s} {prov:16s} "
            f"{_fmt(cs['median']) if cs else '-':>12s} "
            f"{(_fmt(cs['p20']) + '..' + _fmt(cs['p80'])) if cs else '-':>19s} "
            f"{(_fmt(ratio['median']) + 'x') if ratio else '-':>8s} "
            f"{_fmt(comp['median']) if comp else '-':>9s} "
            f"{_fmt(mem['median'] / 2**20) if mem else '-':>10s}  {note}")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], modes: Optional[Sequence[str]] = None) -> str:
    """The suite as a Markdown table (for bench/RESULTS.md), with the ratio to the floor.

    ratio to floor: measured cell-steps/s over the run's own compute floor for that mode (the
    ``floor`` rows: matmul rate / FLOPs per cell-step; see bench/NOTES.md); 1.0 would be the
    dense layers running at the matmul rate with everything else free.
    """
    floors = {r["mode"]: r["median"] for r in rows if r["provider"] == "floor"}
    by = {}
    for r in rows:
        if (r["mode"] in modes if modes else r["mode"] != "check") \
                and r["provider"] in PROVIDER_NAMES:
            by.setdefault((r["mode"], r["size"], str(r["steps"]), r["provider"]), {})[
                r["metric"]] = r
    per_cpu = any(r["metric"] == "cell_steps_per_cpu_s" for r in rows)
    out = ["| mode | size (BxHxW) | T | provider | cell-steps/s median [p20, p80] | vs eager "
           "| compile s | memory MiB | ratio to floor |" + (" cell-steps per CPU-s |" if per_cpu
                                                              else ""),
           "| --- " * (10 if per_cpu else 9) + "|"]
    for (mode, size, steps, prov), m in by.items():
        cs, ratio = m.get("cell_steps_per_s"), m.get("ratio_vs_eager")
        comp, mem = m.get("compile_s"), m.get("peak_bytes") or m.get("saved_bytes")
        note = next((m[k]["note"] for k in ("error", "skipped") if k in m), "")
        if cs is None and not note:
            continue
        speed = (f"{cs['median']:.3g} [{cs['p20']:.3g}, {cs['p80']:.3g}]" if cs else note)
        floor = floors.get(mode)
        out.append(f"| {mode} | {size} | {steps} | {prov} | {speed} | "
                   f"{(format(ratio['median'], '.2f') + 'x') if ratio else '-'} | "
                   f"{format(comp['median'], '.2g') if comp else '-'} | "
                   f"{format(mem['median'] / 2**20, '.3g') if mem else '-'} | "
                   f"{format(cs['median'] / floor, '.3f') if cs and floor else '-'} |"
                   + (f" {format(m['cell_steps_per_cpu_s']['median'], '.3g')} |"
                      if per_cpu and "cell_steps_per_cpu_s" in m else (" - |" if per_cpu else "")))
    return "\n".join(out)


def plot(rows: Sequence[dict], path) -> pathlib.Path:
    """Bar chart of cell-steps/s per size (log scale), one panel per mode, p20..p80 whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("forward", "train") if any(
        r["mode"] == m and r["metric"] == "cell_steps_per_s" for r in rows)]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6.5 * max(len(modes), 1), 4.2),
                             squeeze=False)
    env = rows[0] if rows else {}
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode and r["metric"] == "cell_steps_per_s"
               and r["provider"] in PROVIDER_NAMES]
        sizes = list(dict.fromkeys(f"{r['size']}\nT={r['steps']}" for r in sel))
        provs = [p for p in PROVIDER_NAMES if any(r["provider"] == p for r in sel)]
        width = 0.8 / max(len(provs), 1)
        for j, p in enumerate(provs):
            xs, ys, lo, hi = [], [], [], []
            for i, s in enumerate(sizes):
                r = next((r for r in sel if r["provider"] == p
                          and f"{r['size']}\nT={r['steps']}" == s), None)
                if r is not None:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(r["median"])
                    lo.append(r["median"] - r["p20"])
                    hi.append(r["p80"] - r["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=p, capsize=2)
        floor = next((r["median"] for r in rows if r["provider"] == "floor"
                      and r["mode"] == mode), None)
        if floor:
            ax.axhline(floor, color="k", ls="--", lw=1, label="compute floor (matmul rate)")
        ax.set_xticks(range(len(sizes)), sizes, fontsize=8)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.set_yscale("log")
        ax.set_ylabel("cell-steps / s (median)")
        ax.set_title(f"{mode}")
        ax.legend(fontsize=7)
    return save_figure(fig, path, env)


# ---------------------------------------------------------------------------------- CLI
def build_parser(prog: str = "python -m bench.throughput") -> Parser:
    p = Parser(prog=prog, description="Throughput of nca_fast against PyTorch ports "
                                       "(cell-steps per second, forward and training).")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--sizes", help="comma-separated BxHxW@T tokens, optional /forward or /train; "
                                   f"default cpu: {DEFAULT_SIZES['cpu']}; cuda: "
                                   f"{DEFAULT_SIZES['cuda']}")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--providers", default=",".join(PROVIDER_NAMES),
                   help="comma-separated subset of " + ",".join(PROVIDER_NAMES))
    p.add_argument("--repeats", type=int, help="timed rounds per case, each at least 100 ms on a "
                   "CPU; about that many calls under do_bench on CUDA (default cpu 3, cuda 10)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per provider first (at least one is made: its excess over "
                        "the median is compile_s)")
    p.add_argument("--out", default=".", help="folder for throughput.csv/.png (default: the "
                   "current folder)")
    p.add_argument("--time-budget", type=float,
                   help="seconds after which remaining cases are recorded as skipped "
                        "(default cpu 270, cuda 240; 0 = none)")
    p.add_argument("--sweep", default="none",
                   help="also run bench.memory's sweeps: none, t, grid or t,grid")
    p.add_argument("--exclude",
                   help="comma-separated provider@BxHxW[/mode] not to run, e.g. "
                        "torch-compile@1x4096x4096 (default with the default sizes: cpu: "
                        f"{DEFAULT_EXCLUDE['cpu']}; cuda: none; '' for none)"),
    p.add_argument("--no-floor", action="store_true", help="skip the matmul ceiling")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only")
    p.add_argument("--plot-from", metavar="CSV", help="only redraw the plot of an existing CSV")
    p.add_argument("--markdown-from", metavar="CSV",
                   help="only print an existing CSV as a Markdown table")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def cold_compile_caches() -> Optional[str]:
    """Point inductor at an empty cache, so torch-compile's compile_s is a first run's cost."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return None
    d = tempfile.mkdtemp(prefix="nca_bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
    return d


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point (``python -m bench.throughput``, ``nca-fast bench``); returns the status."""
    try:
        args = build_parser().parse_args(argv)
        if args.markdown_from:
            print(markdown_table(read_csv(args.markdown_from)))
            return 0
        if args.plot_from:
            rows = read_csv(args.plot_from)
            png = pathlib.Path(args.plot_from).with_suffix(".png")
            print(f"wrote {plot(rows, png)}")
            return 0
        device = resolve_device(args.device)
        cases = parse_sizes(args.sizes or DEFAULT_SIZES[device.type])
        modes = split_list(args.modes, MODES, "--modes")
        names = split_list(args.providers, PROVIDER_NAMES, "--providers")
        sweeps = [] if args.sweep == "none" else split_list(args.sweep, ("t", "grid"), "--sweep")
        repeats = DEFAULT_REPEATS[device.type] if args.repeats is None else args.repeats
        if repeats < 1 or args.warmup < 0:
            raise UsageError("--repeats must be >= 1 and --warmup >= 0")
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError("--threads: expected a positive integer")
            torch.set_num_threads(args.threads)
        if args.exclude is None:
            args.exclude = "" if args.sizes else DEFAULT_EXCLUDE[device.type]
        exclude = [t.strip() for t in args.exclude.split(",") if t.strip()]
        for t in exclude:
            name, at, size = t.partition("@")
            size, _, mode = size.partition("/")
            if (name not in PROVIDER_NAMES or not at or not size
                    or mode not in ("", "forward", "train")):
                raise UsageError(f"--exclude: bad pair {t!r}; expected provider@BxHxW[/mode] "
                                 f"with a provider from {','.join(PROVIDER_NAMES)}")
        budget = DEFAULT_BUDGET[device.type] if args.time_budget is None else args.time_budget
        out = prepare_out(args.out)
    except UsageError as e:
        print(f"bench.throughput: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # --help
        return int(e.code or 0)
    cache = cold_compile_caches()
    try:
        res = run_suite(get_providers(names), device, cases, modes=modes, repeats=repeats,
                        warmup=args.warmup, out_dir=out, time_budget=budget or None,
                        floor=not args.no_floor, exclude=exclude)
        print()
        print(format_table(res.rows))
        print(f"\nwrote {res.csv_path}")
        if not args.no_plot:
            print(f"wrote {plot(res.rows, out / 'throughput.png')}")
        ok = res.ok
        if sweeps:
            left = max(budget - res.seconds, 1.0) if budget else None
            ok &= run_sweeps(res.kept, device, sweeps, out, repeats=repeats, check=False,
                             time_budget=left, plot_it=not args.no_plot)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
