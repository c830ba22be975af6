"""The benchmarks' harness: what ``bench.throughput``, ``bench.memory``, ``bench.ceilings`` and
``bench.cpu_speed`` share, so that each script holds only its own measurements.

- Cases: ``Case`` (batch x height x width for T steps, in modes) and ``parse_sizes``.
- Timing: ``time_interleaved``. On CUDA each provider is timed by ``triton.testing.do_bench``
  (CUDA events, L2 flushed between calls, every call kept). On a CPU providers take turns in
  rounds, in a rotating order, so that other processes' load hits all of them alike; a round
  repeats a provider's call until it lasts at least ``MIN_ROUND_S`` (100 ms), so that a round
  is not one scheduler time slice and the paired ratios are stable.
- Memory: ``measure_memory`` (what a training iteration keeps or peaks at).
- Records: ``Recorder`` rows with the ``COLUMNS`` (provider, mode, size, steps, metric, median,
  p20, p80 and the machine's columns from ``environment``: device, torch, triton, date, commit),
  ``spread``, ``write_csv`` / ``read_csv`` (atomic), ``save_figure``.
- The same-step check and one case measured across providers: ``run_check``, ``measure_case``.
- Command lines: ``UsageError``, ``Parser``, ``split_list``, ``resolve_device``,
  ``prepare_out``.

Outputs go where ``--out`` says (default: the current folder), never into the package tree.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.providers import (BASELINE, Provider, Runner, TorchRunner, check_same_step,
                             random_state)
from nca_fast import NCAConfig
from nca_fast.devices import resolve_device as _resolve
from nca_fast.files import atomic_write

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
MIN_ROUND_S = 0.1


# ---------------------------------------------------------------------------------- CLI
class UsageError(Exception):
    """A bad command-line argument: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are ``UsageError`` (one line, no usage block)."""

    def error(self, message):
        raise UsageError(message)


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


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(e)


def _describe(e: BaseException) -> str:
    """One line for the CSV's note: "out of memory" or the exception's first line."""
    if _out_of_memory(e):
        return "out of memory"
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _free_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call of one provider: ``first`` (the first call, compilation included),
    ``times`` (one value per round or per do_bench call) and ``cpu_times`` (this process's CPU
    time per call, all threads, same rounds; CPU only)."""

    first: float = float("nan")
    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)
    error: Optional[str] = None


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(calls: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                     device, min_round_s: float = MIN_ROUND_S) -> Dict[str, Timing]:
    """Time each of ``calls`` (name -> call that returns when the device is done).

    Each provider's first call is timed alone (``first``), then ``warmup - 1`` more calls. CUDA:
    one more call estimates its time, then ``do_bench`` runs about ``repeats`` calls (every
    call's time kept). CPU: ``repeats`` rounds; round r starts at provider r mod n, and repeats
    each provider's call until its turn lasts ``min_round_s``, recording the time per call. A
    call that raises is recorded as an error and not retried.
    """
    cuda = torch.device(device).type == "cuda"
    out = {name: Timing() for name in calls}
    estimate = {}
    for name, call in calls.items():
        try:
            out[name].first = _timed(call)
            for _ in range(max(warmup, 1) - 1):
                call()
            if cuda and repeats > 0:
                estimate[name] = max(_timed(call), 1e-6)
        except Exception as e:  # OOM or a provider bug: report it, keep the others going
            out[name].error = _describe(e)
            _free_memory(device)
    live = [n for n in calls if out[n].error is None]
    if repeats < 1:
        return out
    if cuda:
        import triton.testing

        for name in live:
            rep_ms = max(100.0, repeats * estimate[name] * 1e3)
            try:
                ms = triton.testing.do_bench(calls[name], warmup=0, rep=rep_ms, return_mode="all")
            except Exception as e:
                out[name].error = _describe(e)
                _free_memory(device)
                continue
            out[name].times = [m / 1e3 for m in ms]
        return out
    for r in range(repeats):
        k = r % len(live) if live else 0
        for name in live[k:] + live[:k]:
            if out[name].error is not None:
                continue
            try:
                n, c0, t0 = 0, time.process_time(), time.perf_counter()
                while n == 0 or time.perf_counter() - t0 < min_round_s:
                    calls[name]()
                    n += 1
                out[name].times.append((time.perf_counter() - t0) / n)
                out[name].cpu_times.append((time.process_time() - c0) / n)
            except Exception as e:
                out[name].error = _describe(e)
                _free_memory(device)
    return out


def seconds_per_call(fn: Callable[[], object], device, repeats: int = 5) -> List[float]:
    """Seconds per call of ``fn`` after a warm-up: ``do_bench`` on CUDA (every call), else
    ``repeats`` rounds of at least ``MIN_ROUND_S``."""
    timing = time_interleaved({"fn": lambda: _sync(fn(), device)}, repeats, 1, device)["fn"]
    if timing.error is not None:
        raise RuntimeError(timing.error)
    return timing.times


def _sync(_out, device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
      checkpointed rollouts save their segment boundaries through the same hooks. (The process
      RSS was not chosen: glibc keeps freed pages, so an RSS delta depends on what ran before.)
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


def measure_case(providers: Sequence[Provider], config: NCAConfig, weights, case: Case,
                 mode: str, device, rec: Recorder, *, repeats: int, warmup: int = 1,
                 memory: bool = False, checkpoint=None, mode_label: Optional[str] = None,
                 log: Callable[[str], None] = print) -> bool:
    """Time ``mode`` ("forward" or "train") of ``case`` for ``providers``; add rows to ``rec``.

    memory: also measure the training iteration's memory (``measure_memory``).
    checkpoint: passed to providers that support it (nca_fast's); others are skipped when set.
    Returns False when a provider failed (error, out of memory).
    """
    label = mode_label or mode
    ok = True
    torch.manual_seed(0)
    dev = torch.device(device)
    x = random_state(case.batch, case.height, case.width, config, seed=2, device=dev)
    target = None
    if mode == "train":
        target = torch.rand(case.batch, 4, case.height, case.width, device=dev,
                            generator=torch.Generator(device=dev).manual_seed(3))
    runners, calls = {}, {}
    for p in providers:
        try:
            r = p.build(config, weights, device)
            if checkpoint is not None:
                if not r.supports_checkpoint:
                    continue
                r.checkpoint = checkpoint
            xs = r.prepare(x)
            if mode == "forward":
                calls[p.name] = blocking(r, lambda r=r, xs=xs: r.forward(xs, case.steps, 7))
            else:
                ts = r.prepare_target(target)
                calls[p.name] = blocking(r, lambda r=r, xs=xs, ts=ts:
                                         r.train_step(xs, ts, case.steps, 7))
            runners[p.name] = r
        except Exception as e:
            ok = False
            rec.add(p.name, label, case.size, case.steps, "error", note=f"build failed: {e}")
    timings = time_interleaved(calls, repeats, warmup, device)
    base = timings.get(BASELINE)
    for name, tm in timings.items():
        if tm.error is not None:
            ok = ok and tm.error == "out of memory"
            rec.add(name, label, case.size, case.steps, "error", note=tm.error)
            log(f"  {name:16s} {label:16s} {case.size:>14s} T={case.steps}: {tm.error}")
            continue
        line = f"  {name:16s} {label:16s} {case.size:>14s} T={case.steps:<5d}"
        if tm.times:
            sec = spread(tm.times)[0]
            rec.add(name, label, case.size, case.steps, "seconds", tm.times)
            rec.add(name, label, case.size, case.steps, "cell_steps_per_s",
                    [case.cell_steps / t for t in tm.times])
            rec.add(name, label, case.size, case.steps, "compile_s", max(tm.first - sec, 0.0),
                    note="first call minus the median call")
            if base is not None and base.error is None and base.times and name != BASELINE:
                if dev.type == "cpu":
                    n = min(len(base.times), len(tm.times))
                    rec.add(name, label, case.size, case.steps, "ratio_vs_eager",
                            [base.times[i] / tm.times[i] for i in range(n)],
                            note="paired rounds: torch-eager seconds / provider seconds")
                else:
                    rec.add(name, label, case.size, case.steps, "ratio_vs_eager",
                            spread(base.times)[0] / sec,
                            note="torch-eager median seconds / provider median seconds")
            if dev.type == "cpu":
                # On a shared CPU the wall clock includes other processes' turns; the process's
                # CPU time does not (with one thread it is the work's own cost).
                rec.add(name, label, case.size, case.steps, "cell_steps_per_cpu_s",
                        [case.cell_steps / t for t in tm.cpu_times if t > 0],
                        note="process CPU time, all threads (per core-second)")
            line += f" {case.cell_steps / sec:10.3g} cell-steps/s"
        if memory:
            try:
                measured = measure_memory(runners[name], runners[name].prepare(x),
                                          runners[name].prepare_target(target), case.steps, 7)
            except Exception as e:
                measured = None
                ok = ok and _out_of_memory(e)
                rec.add(name, label, case.size, case.steps, "error",
                        note="memory: " + _describe(e))
                _free_memory(device)
            if measured is not None:
                metric, nbytes, note = measured
                rec.add(name, label, case.size, case.steps, metric, nbytes, note=note)
                line += f"  {metric} {nbytes / 2**20:.1f} MiB"
        log(line)
    del runners, calls
    _free_memory(device)
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
