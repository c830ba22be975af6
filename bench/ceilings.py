"""The machine's ceilings, measured in the same run as the suite: the denominators of the floors.

    python -m bench.ceilings [--device cuda|cpu] [--out ceilings.csv]

- copy: device-to-device bandwidth of one large ``dst.copy_(src)`` (bytes read + bytes written
  per second); with 128 bytes per cell-step (read and write the 16-channel fp32 state once) it
  gives the memory floor of a fused step.
- matmul: a large square matmul in TF32 and bf16 (CUDA) or fp32 (CPU), FLOP/s = 2 n^3 / s; with
  16,384 dense FLOPs per cell-step it gives the compute floor.
- ``measure_floors``: the same, and the compute floors of the suite's forward and training
  step (``bench.throughput`` draws them with its figures).

Times come from ``bench.timing.seconds_per_call``: ``triton.testing.do_bench`` on CUDA (CUDA
events, L2 flushed between calls, every call kept), rounds of at least 100 ms on a CPU; the
median and the 20th/80th percentiles are reported.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch

from bench.harness import (BYTES_PER_CELL_STEP, FLOPS_PER_CELL_STEP, TRAIN_FACTOR, Parser,
                           Recorder, UsageError, environment, resolve_device, run_cli, spread,
                           write_csv)
from bench.timing import seconds_per_call


def matmul_flops(device, kind: str = "fp32", n: int = 1024) -> List[float]:
    """FLOP/s of an n x n x n matmul, one value per call. kind: "fp32", "tf32" or "bf16"."""
    device = torch.device(device)
    if kind not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"kind: expected fp32, tf32 or bf16, got {kind!r}")
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        secs = seconds_per_call(lambda: torch.mm(a, b, out=out), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return [2.0 * n ** 3 / s for s in secs]


def copy_bandwidth(device, nbytes: int = 2**30) -> List[float]:
    """Bytes per second (read + written) of one device-to-device copy of ``nbytes``."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return [2.0 * n * 4 / s for s in seconds_per_call(lambda: dst.copy_(src), device)]


def measure(device, rec, *, matmul_n: Optional[int] = None, copy_bytes: Optional[int] = None,
            log=print) -> None:
    """Add the ceilings and the floors they imply to ``rec`` (a ``bench.harness.Recorder``)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = matmul_n or (8192 if cuda else 1024)
    nbytes = copy_bytes or (2**30 if cuda else 2**26)
    bw = copy_bandwidth(device, nbytes)
    rec.add("machine", "copy", f"{nbytes}B", "", "bytes_per_s", bw)
    m = spread(bw)[0]
    rec.add("floor", "memory", "", "", "cell_steps_per_s", m / BYTES_PER_CELL_STEP,
            note=f"{BYTES_PER_CELL_STEP} bytes per cell-step at the measured copy bandwidth")
    log(f"  copy {nbytes / 2**20:.0f} MiB: {m / 1e9:.1f} GB/s -> memory floor "
        f"{m / BYTES_PER_CELL_STEP:.3g} cell-steps/s")
    for kind in (("tf32", "bf16") if cuda else ("fp32",)):
        rates = matmul_flops(device, kind, n)
        rec.add("machine", f"matmul_{kind}", f"{n}x{n}x{n}", "", "flop_per_s", rates)
        r = spread(rates)[0]
        rec.add("floor", f"compute_{kind}", "", "", "cell_steps_per_s", r / FLOPS_PER_CELL_STEP,
                note=f"{FLOPS_PER_CELL_STEP} dense FLOPs per cell-step at the measured rate")
        log(f"  {kind} matmul {n}^3: {r / 1e9:.1f} GFLOP/s -> compute floor "
            f"{r / FLOPS_PER_CELL_STEP:.3g} cell-steps/s")


def measure_floors(device, rec: Recorder, log=print) -> None:
    """Measure the ceilings and record the compute floors of forward and train: the matmul the
    dense layers would use (TF32 on CUDA, fp32 on a CPU); training does TRAIN_FACTOR times the
    forward's FLOPs."""
    kind = "tf32" if torch.device(device).type == "cuda" else "fp32"
    measure(device, rec, log=log)
    rate = next(r["median"] for r in rec.rows if r["mode"] == f"matmul_{kind}")
    for mode, factor in (("forward", 1), ("train", TRAIN_FACTOR)):
        what = f"{FLOPS_PER_CELL_STEP} FLOPs per cell-step" if factor == 1 else \
            f"{TRAIN_FACTOR}x the forward's FLOPs"
        rec.add("floor", mode, "", "", "cell_steps_per_s", rate / (factor * FLOPS_PER_CELL_STEP),
                note=f"{what} at the measured {kind} matmul rate")


def main(argv: Optional[List[str]] = None) -> int:
    p = Parser(prog="python -m bench.ceilings", description="Copy bandwidth and matmul rates.")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--out", help="CSV to write (the suite's columns)")
    p.add_argument("--matmul-size", type=int, help="n of the n^3 matmul (cuda 8192, cpu 1024)")
    p.add_argument("--copy-bytes", type=int, help="bytes copied (cuda 1 GiB, cpu 64 MiB)")

    def parse():
        args = p.parse_args(argv)
        args.device = resolve_device(args.device)
        for name in ("matmul_size", "copy_bytes"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer")
        return args

    def run(args) -> int:
        rec = Recorder(environment(args.device))
        print(f"ceilings of {rec.env['device']}:")
        measure(args.device, rec, matmul_n=args.matmul_size, copy_bytes=args.copy_bytes)
        if args.out:
            print(f"wrote {write_csv(rec.rows, args.out)}")
        return 0

    return run_cli("bench.ceilings", parse, run)


if __name__ == "__main__":
    sys.exit(main())
