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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long checks, opt-in with --runslow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def distill_dir():
    if not DISTILL.is_dir():
        pytest.skip(f"the published Distill models are not at {DISTILL} (../shared absent)")
    return DISTILL
