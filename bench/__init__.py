"""Benchmarks of nca_fast against plain PyTorch ports (see bench/RESULTS.md).

- ``bench.providers``: every implementation under test, built from the same config and weights,
  and the same-step check that runs before any timing.
- ``bench.throughput``: the suite (``python -m bench.throughput``): cell-steps per second of the
  forward rollout and of a training iteration, CSV and plot in bench/results/.
- ``bench.memory``: peak memory of a training iteration, and the sweeps over rollout length T and
  grid size (``python -m bench.memory``).
- ``bench.ceilings``: the machine's own ceilings (copy bandwidth, matmul rates) for the floors.
- ``bench/gpu_check.sh OUTDIR``: the one-call GPU check (tests, ceilings, suite).
- ``bench/test_bench_step.py``: pytest-benchmark suites of the hot paths
  (``python -m pytest bench -q --benchmark-only``).
"""
