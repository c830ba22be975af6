"""Timing of calls that return when the device is done, and the words for their failures.

On CUDA each call is timed by ``triton.testing.do_bench`` (CUDA events, L2 flushed between
calls, every call kept). On a CPU callers take turns in rounds, in a rotating order, so that
other processes' load hits all of them alike; a round repeats a call until it lasts at least
``MIN_ROUND_S`` (100 ms), so that a round is not one scheduler time slice and the paired ratios
are stable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

MIN_ROUND_S = 0.1


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(e)


def describe_error(e: BaseException) -> str:
    """One line for the CSV's note: "out of memory" or the exception's first line."""
    if out_of_memory(e):
        return "out of memory"
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def free_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


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
            out[name].error = describe_error(e)
            free_memory(device)
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
                out[name].error = describe_error(e)
                free_memory(device)
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
                out[name].error = describe_error(e)
                free_memory(device)
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
