import os
import pathlib

import torch

# The Triton interpreter must be chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DISTILL = SHARED / "data" / "distill"


def interpreter_needs_older_numpy() -> bool:
    """Triton 3.6's interpreter runs a loop over ``range(a, b, c)`` of 1-element arrays, which
    numpy 2.4 no longer converts to ints: every kernel with a runtime loop bound fails there."""
    import numpy as np

    try:
        import triton
    except ImportError:
        return False
    major_minor = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    return major_minor(triton.__version__) < (3, 7) and major_minor(np.__version__) >= (2, 4)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long opt-in checks (sweeps), run with --runslow")
    if os.environ.get("TRITON_INTERPRET") == "1" and interpreter_needs_older_numpy():
        import numpy as np
        import triton

        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter (the kernel tests on a CPU) needs "
            f"numpy < 2.4, found {np.__version__}: pip install 'numpy<2.4' (triton 3.7 and "
            f"later need no such pin)")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow "
                     "(the opt-in sweeps: every compile variant, every Distill model, ...)")


def pytest_collection_modifyitems(config, items):
    """Opt-in sweeps are deselected, not skipped: thousands of skips explain nothing. The
    summary then says what was left out and how to run it (pytest_terminal_summary)."""
    if config.getoption("--runslow") or "slow" in (config.option.markexpr or ""):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if not slow:
        return
    items[:] = [item for item in items if "slow" not in item.keywords]
    config.hook.pytest_deselected(items=slow)
    per_file = {}
    for item in slow:
        per_file[item.nodeid.split("::")[0]] = per_file.get(item.nodeid.split("::")[0], 0) + 1
    config.stash[_LEFT_OUT] = per_file


_LEFT_OUT = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    per_file = config.stash.get(_LEFT_OUT, None)
    if not per_file:
        return
    total = sum(per_file.values())
    terminalreporter.write_sep("-", f"{total} opt-in tests left out (marked slow)")
    for path, n in sorted(per_file.items()):
        terminalreporter.write_line(f"  {path}: {n}")
    terminalreporter.write_line(
        "  run them with: python -m pytest --runslow FILE (-k narrows a sweep, e.g. "
        "-k \"sm_90a and fwd\" in tests/test_compile.py: hours for all on 2 cores)")


@pytest.fixture
def distill_dir():
    if not DISTILL.is_dir():
        pytest.skip(f"the published Distill models are not at {DISTILL} (../shared absent)")
    return DISTILL


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with ``pytestmark``). The grids in tests
    are tiny: with 2 threads each op's OpenMP barrier costs more than the op, a descheduled
    thread on a loaded 2-core machine stalls every barrier, and bitwise comparisons of
    training runs need one fixed reduction order. Results do not depend on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
