"""One tolerance table for every kernel-vs-reference comparison, and a verbose allclose.

Keys: (dtype, precision). Values: (atol, rtol) for the forward state and for gradients.
fp64 and "ieee" fp32 are exact operand precision (the interpreter's tl.dot is numpy matmul);
TF32 keeps 10 mantissa bits (~1e-3 relative), bf16 7 bits (~8e-3): their accuracy is a GPU check.
"""
import pytest
import torch

from nca_fast.kernels.configs import FP64_COMPILED

# Kernel tests in float64 (gradcheck, the property tests) are interpreter checks.
FP64_KERNELS = pytest.mark.skipif(torch.cuda.is_available(), reason=f"on CUDA: {FP64_COMPILED}")

TOLERANCES = {
    (torch.float64, "ieee"): {"state": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    (torch.float32, "ieee"): {"state": (1e-5, 1e-5), "grad": (1e-5, 1e-4)},
    (torch.float32, "tf32"): {"state": (2e-2, 2e-2), "grad": (5e-2, 5e-2)},
    (torch.float32, "bf16"): {"state": (8e-2, 8e-2), "grad": (2e-1, 1e-1)},
}


def tolerance(dtype, precision, kind):
    return TOLERANCES[(dtype, precision)][kind]


def assert_close_verbose(actual, expected, atol, rtol, name="tensor", max_report=5):
    """Like torch.testing.assert_close, but says how many elements differ and where."""
    actual = actual.detach().to(expected.dtype).cpu()
    expected = expected.detach().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero()[:max_report].tolist()
        worst = [(tuple(i), actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, "
            f"rtol={rtol}, max abs diff {diff.nan_to_num(float('inf')).max().item():.3e}); "
            f"first (index, actual, expected): {worst}")
