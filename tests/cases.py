"""Shared test inputs (imported by test modules, like tolerances.py)."""

# The smallest training run that exercises every part of the trainer on a CPU in seconds.
TINY = dict(size=8, pad=2, hidden=32, batch=4, pool_size=16, rollout_min=6, rollout_max=10,
            backend="torch", device="cpu")
