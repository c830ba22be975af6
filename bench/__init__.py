"""Benchmarks of nca_fast against plain PyTorch ports (see bench/RESULTS.md).

Imports flow one way: ``runners`` <- ``eager``, ``peers`` <- ``providers`` <- ``harness`` (with
``timing``) <- ``tables``, ``ceilings`` <- ``memory`` <- ``throughput`` (and ``cpu_speed``);
none imports another's private names.

- ``bench.runners``: the weights and inputs every implementation gets, and the ``Runner`` /
  ``Provider`` interfaces the suite drives.
- ``bench.eager``: the plain PyTorch port, the baseline of every ratio (eager and compiled).
- ``bench.peers``: optional peers from other projects (CAX, in JAX), when they import.
- ``bench.providers``: every implementation under test by name, and the same-step check that
  runs before any timing.
- ``bench.timing``: ``triton.testing.do_bench`` on CUDA, interleaved rounds of at least 100 ms
  on a CPU.
- ``bench.harness``: what the scripts share: cases, the measurement of one case across
  providers, memory, records, environment, spread, CSV, figures and command-line helpers.
- ``bench.tables``: the rows as text and Markdown tables and as figures.
- ``bench.throughput``: the suite (``python -m bench.throughput``, ``nca-fast bench``):
  cell-steps per second of the forward rollout and of a training iteration; CSV and plot in
  ``--out`` (default: the current folder).
- ``bench.memory``: memory of a training iteration, and the sweeps over rollout length T and
  grid size (``python -m bench.memory``).
- ``bench.ceilings``: the machine's own ceilings (copy bandwidth, matmul rates) for the floors.
- ``bench.cpu_speed``: the torch backend against the eager port at the article's size, on a CPU.
- ``bench.web_speed``: the exported web page's steps per second in headless Chromium.
- ``bench.compile``: ahead-of-time compiles of every kernel variant (no GPU needed;
  ``python -m bench.compile.report``).
- ``bench.toolchains``: the kernel checks under every supported Triton release.
- ``bench/gpu_check.sh OUTDIR``: the one-call GPU check, figures first (selftest, suite,
  ceilings, memory), the GPU tests last.
- ``bench/test_bench_step.py``: pytest-benchmark suites of the hot paths
  (``python -m pytest bench -q --benchmark-only``).
"""
