"""The benchmarks' harness: what ``bench.throughput``, ``bench.memory``, ``bench.ceilings`` and
``bench.cpu_speed`` share, so that each script holds only its own measurements.

- Cases: ``Case`` (batch x height x width for T steps, in modes) and ``parse_sizes``.
- Timing: ``bench.timing.time_interleaved`` (``do_bench`` on CUDA, interleaved rounds of at
  least 100 ms on a CPU).
- Memory: ``measure_memory`` (what a training iteration keeps or peaks at).
- Records: ``Recorder`` rows with the ``COLUMNS`` (provider, mode, size, steps, metric, median,
  p20, p80 and the machine's columns from ``environment``: device, torch, triton, date, commit),
  ``spread``, ``write_csv`` / ``read_csv`` (atomic), ``save_figure``.
- The same-step check and one case measured across providers: ``run_check``, ``measure_case``
  (what the providers share is a ``Setup``, what is measured a ``Task``).
- Command lines: ``UsageError``, ``Parser``, ``suite_options`` / ``read_providers`` (the options
  the scripts share), ``split_list``, ``resolve_device``, ``prepare_out``, ``run_cli``.

Outputs go where ``--out`` says (default: the current folder), never into the package tree.
"""
from __future__ import annotations

import csv
import datetime
import os
import pathlib
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.providers import BASELINE, PROVIDER_NAMES, check_same_step, get_providers
from bench.runners import Provider, Runner, TorchRunner, Weights, random_state
from bench.timing import Timing, describe_error, free_memory, out_of_memory, time_interleaved
from nca_fast import NCAConfig
from nca_fast.devices import resolve_device as _resolve
from nca_fast.files import atomic_write
from nca_fast.usage import Parser, UsageError

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]     # read for its commit, never written
COLUMNS = ("provider", "mode", "size", "steps", "metric", "median", "p20", "p80", "device",
           "torch", "triton", "date", "commit", "note")
MODES = ("forward", "train", "memory")
# The work of a cell-step at the article's defaults: the dense layers' FLOPs (the compute floor)
# and the state read and written once in fp32 (the memory floor of a fused step).
FLOPS_PER_CELL_STEP = NCAConfig().dense_flops
BYTES_PER_CELL_STEP = 2 * 4 * NCAConfig().channels
# Training's least work: the forward plus, per dense layer, the input- and weight-gradient
# products (2x the forward's FLOPs). A design may also recompute the forward (docs/MODEL.md,
# "Work per cell-step": about 4x), but a floor must not assume it.
TRAIN_FACTOR = 3


# ---------------------------------------------------------------------------------- CLI
def resolve_device(name: str) -> torch.device:
    """``--device``: "auto", "cpu", "cuda" or "cuda:N"."""
    try:
        return _resolve(name)
    except ValueError as e:
        raise UsageError(f"--device {e}") from None


def prepare_out(path: str) -> pathlib.Path:
    """``--out``: the folder, created if needed and checked writable."""
    out = pathlib.Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out: folder {out} is not writable")
    return out


def suite_options(p: Parser, files: str) -> Parser:
    """Add the options the suite's scripts share: --device, --providers, --out (the folder of
    ``files``) and --threads."""
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--providers", default=",".join(PROVIDER_NAMES),
                   help="comma-separated subset of " + ",".join(PROVIDER_NAMES))
    p.add_argument("--out", default=".", help=f"folder for {files} (default: the current folder)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def read_providers(args) -> List[Provider]:
    """``--providers``, after setting ``--threads`` (both from ``suite_options``)."""
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads: expected a positive integer")
        torch.set_num_threads(args.threads)
    return get_providers(split_list(args.providers, PROVIDER_NAMES, "--providers"))


def run_cli(prog: str, parse: Callable[[], object], run: Callable[[object], int]) -> int:
    """``run(parse())``; a ``UsageError`` is one line on stderr and exit status 2, ``--help``
    exits 0."""
    try:
        parsed = parse()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # --help
        return int(e.code or 0)
    return run(parsed)


def split_list(value: str, allowed: Sequence[str], option: str) -> List[str]:
    """A comma-separated subset of ``allowed`` given to ``option``."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(f"{option}: expected a comma-separated subset of {','.join(allowed)}, "
                         f"got {value!r}")
    return items


# ---------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One workload: batch x height x width cells for ``steps`` steps, in ``modes``."""

    batch: int
    height: int
    width: int
    steps: int
    modes: tuple = ("forward", "train", "memory")

    @property
    def size(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"

    @property
    def cell_steps(self) -> int:
        return self.batch * self.height * self.width * self.steps


def parse_sizes(spec: str) -> List[Case]:
    """Parse ``--sizes``: comma-separated ``BxHxW@T`` / ``N@T`` tokens, optional ``/mode+mode``."""
    cases = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        body, _, modes = token.partition("/")
        dims, at, steps = body.partition("@")
        try:
            if not at:
                raise ValueError
            nums = [int(v) for v in dims.lower().split("x")]
            t = int(steps)
        except ValueError:
            raise UsageError(f"--sizes: bad token {token!r}; expected BxHxW@T or N@T, e.g. "
                             "8x72x72@64 or 256@16, optionally /forward or /train") from None
        if len(nums) == 1:
            nums = [1, nums[0], nums[0]]
        elif len(nums) == 2:
            nums = [1] + nums
        if len(nums) != 3 or min(nums) < 1 or t < 1:
            raise UsageError(f"--sizes: bad token {token!r}; batch, height, width and steps must "
                             "be positive integers")
        mode_list = tuple(m for m in modes.split("+") if m) if modes else MODES
        bad = [m for m in mode_list if m not in MODES]
        if bad:
            raise UsageError(f"--sizes: unknown mode {bad[0]!r} in {token!r}; expected {MODES}")
        cases.append(Case(*nums, t, mode_list))
    if not cases:
        raise UsageError("--sizes: no size given")
    return cases


# ---------------------------------------------------------------------------------- records
def git_commit() -> str:
    """Short commit of the checkout, with ``-dirty`` when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CHECKOUT, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=CHECKOUT,
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty and commit else "")


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def environment(device) -> Dict[str, str]:
    """The columns every row carries: device, torch, triton, date (UTC), commit."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(torch.device(device)), "torch": torch.__version__,
            "triton": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit()}


def spread(values: Sequence[float]):
    """(median, p20, p80) of ``values`` (linear interpolation), NaNs when empty."""
    if len(values) == 0:
        return (float("nan"),) * 3
    a = np.asarray(values, dtype=float)
    return float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80))


@dataclass
class Recorder:
    """Rows of one run; each row has the COLUMNS, ``env`` fills the machine's columns."""

    env: Dict[str, str]
    rows: List[dict] = field(default_factory=list)

    def add(self, provider: str, mode: str, size: str, steps, metric: str, values=(),
            note: str = "") -> dict:
        if isinstance(values, (int, float)):
            values = [values]
        median, p20, p80 = spread(list(values))
        row = {"provider": provider, "mode": mode, "size": size, "steps": steps,
               "metric": metric, "median": median, "p20": p20, "p80": p80, **self.env,
               "note": note}
        self.rows.append(row)
        return row

    def write(self, path) -> pathlib.Path:
        return write_csv(self.rows, path)


def write_csv(rows: Sequence[dict], path) -> pathlib.Path:
    """Write rows with COLUMNS to ``path`` atomically (readers never see half a file)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    return atomic_write(path, write)


def read_csv(path) -> List[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80"):
            r[k] = float(r[k]) if r[k] not in ("", None) else float("nan")
    return rows


def save_figure(fig, path, env):
    """Title ``fig`` with the run's device, versions, commit and date; write it atomically as
    PNG and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{env.get('device', '')} | torch {env.get('torch', '')} | triton "
                 f"{env.get('triton', '')} | {env.get('commit', '')} | {env.get('date', '')}",
                 fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------- measuring
def measure_memory(runner, x, target, steps: int, seed: int):
    """Memory of one training iteration of ``runner``: (metric, bytes, note), or None.

    None for a provider whose memory torch cannot see (JAX).

    - CUDA: ``peak_bytes``, ``torch.cuda.max_memory_allocated`` during one training iteration
      minus what was allocated just before it (inputs, weights, Adam state).
    - CPU (no allocator counter to read): ``saved_bytes``, the bytes of the distinct tensor
      storages that autograd keeps for the backward, counted through
      ``torch.autograd.graph.saved_tensors_hooks``: the dominant term of a rollout's peak, exact
      whatever the allocator caches. Counting needs only the forward, so the rollout runs with
      gradients and stops there. Transient buffers of a single op are not counted; nca_fast's
      checkpointed rollouts save their segment boundaries through the same hooks. (Not the process
      RSS: glibc keeps freed pages, so an RSS delta depends on what ran before.)
    """
    if not isinstance(runner, TorchRunner):
        return None
    dev = runner.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        runner.sync(runner.train_step(x, target, steps, seed))
        peak = torch.cuda.max_memory_allocated(dev) - base
        return "peak_bytes", float(peak), "max_memory_allocated during the iteration minus before"
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    # Only the forward saves tensors: the rollout alone (with its graph) is enough to count them.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = runner.rollout(x, steps, seed)
    del y
    return "saved_bytes", float(sum(storages.values())), "distinct storages saved for backward"


def blocking(runner: Runner, fn: Callable[[], object]) -> Callable[[], None]:
    """A call that returns only when the device has finished ``fn``'s work."""
    def call():
        runner.sync(fn())
    return call


@dataclass(frozen=True)
class Setup:
    """What the providers of a measurement share: the model's config, its weights, the device."""

    config: NCAConfig
    weights: Weights
    device: torch.device


@dataclass(frozen=True)
class Task:
    """One measurement of ``case``: its ``mode`` ("forward" or "train") timed over ``repeats``
    rounds (0: the first call only) after ``warmup`` calls.

    memory: also the training iteration's memory (``measure_memory``).
    checkpoint: passed to providers that support it (nca_fast's); the others are left out.
    label: the rows' mode column (default: ``mode``).
    """

    case: Case
    mode: str
    repeats: int
    warmup: int = 1
    memory: bool = False
    checkpoint: Optional[str] = None
    label: Optional[str] = None

    def add(self, rec: "Recorder", provider: str, metric: str, values=(), note: str = ""):
        """A row of this task's case and label."""
        return rec.add(provider, self.label or self.mode, self.case.size, self.case.steps,
                       metric, values, note)


def _inputs(setup: Setup, case: Case, train: bool):
    """The state (and the training target) every provider starts from."""
    dev = torch.device(setup.device)
    x = random_state(case.batch, case.height, case.width, setup.config, seed=2, device=dev)
    target = None
    if train:
        target = torch.rand(case.batch, 4, case.height, case.width, device=dev,
                            generator=torch.Generator(device=dev).manual_seed(3))
    return x, target


def _record_times(rec: Recorder, task: Task, name: str, tm: Timing, base: Optional[Timing],
                  cpu: bool) -> float:
    """Rows of one provider's times; returns its median seconds per call."""
    cells = task.case.cell_steps
    sec = spread(tm.times)[0]
    task.add(rec, name, "seconds", tm.times)
    task.add(rec, name, "cell_steps_per_s", [cells / t for t in tm.times])
    task.add(rec, name, "compile_s", max(tm.first - sec, 0.0),
             note="first call minus the median call")
    if base is not None and base.error is None and base.times and name != BASELINE:
        if cpu:
            n = min(len(base.times), len(tm.times))
            task.add(rec, name, "ratio_vs_eager", [base.times[i] / tm.times[i] for i in range(n)],
                     note="paired rounds: torch-eager seconds / provider seconds")
        else:
            task.add(rec, name, "ratio_vs_eager", spread(base.times)[0] / sec,
                     note="torch-eager median seconds / provider median seconds")
    if cpu:
        # On a shared CPU the wall clock includes other processes' turns; the process's CPU
        # time does not (with one thread it is the work's own cost).
        task.add(rec, name, "cell_steps_per_cpu_s", [cells / t for t in tm.cpu_times if t > 0],
                 note="process CPU time, all threads (per core-second)")
    return sec


def measure_case(providers: Sequence[Provider], setup: Setup, task: Task, rec: Recorder,
                 log: Callable[[str], None] = print) -> bool:
    """Time ``task`` for ``providers``, all from the same state with the same weights, and add
    its rows to ``rec``. Returns False when a provider failed (an error other than running out
    of memory)."""
    ok = True
    torch.manual_seed(0)
    case, label, device = task.case, task.label or task.mode, setup.device
    x, target = _inputs(setup, case, task.mode == "train")
    runners, calls = {}, {}
    for p in providers:
        try:
            r = p.build(setup.config, setup.weights, device)
            if task.checkpoint is not None:
                if not r.supports_checkpoint:
                    continue
                r.checkpoint = task.checkpoint
            xs = r.prepare(x)
            if task.mode == "forward":
                calls[p.name] = blocking(r, lambda r=r, xs=xs: r.forward(xs, case.steps, 7))
            else:
                ts = r.prepare_target(target)
                calls[p.name] = blocking(r, lambda r=r, xs=xs, ts=ts:
                                         r.train_step(xs, ts, case.steps, 7))
            runners[p.name] = r
        except Exception as e:
            ok = False
            task.add(rec, p.name, "error", note=f"build failed: {e}")
    timings = time_interleaved(calls, task.repeats, task.warmup, device)
    cpu = torch.device(device).type == "cpu"
    for name, tm in timings.items():
        line = f"  {name:16s} {label:16s} {case.size:>14s} T={case.steps:<5d}"
        if tm.error is not None:
            ok = ok and tm.error == "out of memory"
            task.add(rec, name, "error", note=tm.error)
            log(f"  {name:16s} {label:16s} {case.size:>14s} T={case.steps}: {tm.error}")
            continue
        if tm.times:
            sec = _record_times(rec, task, name, tm, timings.get(BASELINE), cpu)
            line += f" {case.cell_steps / sec:10.3g} cell-steps/s"
        if task.memory:
            try:
                measured = measure_memory(runners[name], runners[name].prepare(x),
                                          runners[name].prepare_target(target), case.steps, 7)
            except Exception as e:
                measured = None
                ok = ok and out_of_memory(e)
                task.add(rec, name, "error", note="memory: " + describe_error(e))
                free_memory(device)
            if measured is not None:
                metric, nbytes, note = measured
                task.add(rec, name, metric, nbytes, note=note)
                line += f"  {metric} {nbytes / 2**20:.1f} MiB"
        log(line)
    del runners, calls
    free_memory(device)
    return ok


def run_check(providers: Sequence[Provider], device, rec: Recorder, log=print) -> List[Provider]:
    """The same-step check; returns the providers that agree, records the others."""
    keep = []
    for res in check_same_step(providers, device):
        prov = next(p for p in providers if p.name == res.name)
        if res.error is None:
            keep.append(prov)
            rec.add(res.name, "check", "2x24x37", 2, "check_max_abs_err", res.max_err,
                    note="agrees with the float64 reference (fire rate 1)")
        elif res.error.startswith("unavailable: "):
            rec.add(res.name, "check", "", "", "unavailable", note=res.error[len("unavailable: "):])
            log(f"  {res.name}: {res.error}")
        else:
            rec.add(res.name, "check", "2x24x37", 2, "rejected", res.max_err, note=res.error)
            log(f"  {res.name}: REJECTED, not timed: {res.error}")
    return keep
