"""pytest-benchmark suites of the hot paths: one rollout forward, one training iteration.

    python -m pytest bench -q --benchmark-only [--benchmark-json out.json]

Not part of the test run (pytest.ini: ``testpaths = tests``); collected anyway, every benchmark
skips unless ``--benchmark-only`` is given, so a plain ``pytest bench`` is not a slow surprise.
Sizes: the article's 8 x 72 x 72 grid for a few steps on a CPU (64 steps on CUDA), plus one
256 x 256 grid. Every provider that the same-step check accepts is benchmarked; the others skip
with the reason. Providers and inputs come from ``bench.providers``, so the figures match the
suite's (``python -m bench.throughput``), which adds interleaving, ratios and the CSV.
"""
import pytest
import torch

from bench.providers import PROVIDER_NAMES, PROVIDERS, check_same_step
from bench.runners import make_weights, random_state
from nca_fast import NCAConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 64 if DEVICE.type == "cuda" else 4
SIZES = {"8x72x72": (8, 72, 72), "1x256x256": (1, 256, 256)}
_CHECKED = {}


@pytest.fixture(autouse=True)
def _benchmark_only(request):
    if not request.config.getoption("benchmark_only", False):
        pytest.skip("benchmark: run with python -m pytest bench --benchmark-only")


def _runner(name):
    """A runner of ``name`` that passed the same-step check (checked once per session)."""
    provider = PROVIDERS[name]
    if name not in _CHECKED:
        (res,) = check_same_step([provider], DEVICE)
        _CHECKED[name] = res.error
    if _CHECKED[name] is not None:
        pytest.skip(f"{name}: {_CHECKED[name]}")
    cfg = NCAConfig()
    return provider.build(cfg, make_weights(cfg), DEVICE), cfg


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_forward(benchmark, name, size):
    runner, cfg = _runner(name)
    b, h, w = SIZES[size]
    x = runner.prepare(random_state(b, h, w, cfg, seed=2))
    benchmark.group = f"forward {size} T={STEPS} ({DEVICE.type})"
    benchmark.extra_info["cell_steps"] = b * h * w * STEPS
    # One untimed call first: compilation (torch.compile, JAX, Triton) is not the hot path.
    runner.sync(runner.forward(x, STEPS, 7))
    benchmark.pedantic(lambda: runner.sync(runner.forward(x, STEPS, 7)), rounds=5, iterations=1)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_train_iteration(benchmark, name, size):
    runner, cfg = _runner(name)
    b, h, w = SIZES[size]
    x = runner.prepare(random_state(b, h, w, cfg, seed=2))
    target = runner.prepare_target(
        torch.rand(b, 4, h, w, generator=torch.Generator().manual_seed(3)))
    benchmark.group = f"train {size} T={STEPS} ({DEVICE.type})"
    benchmark.extra_info["cell_steps"] = b * h * w * STEPS
    runner.sync(runner.train_step(x, target, STEPS, 7))
    benchmark.pedantic(lambda: runner.sync(runner.train_step(x, target, STEPS, 7)), rounds=5,
                       iterations=1)
