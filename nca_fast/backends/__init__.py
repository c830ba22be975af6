"""The backends of ``NCA.forward``: two modules with one signature (``interface``).

- ``torch`` (``torch_backend``): PyTorch ops, any device; a CPU's fast path.
- ``triton`` (``triton_backend``): the fused Triton kernels; CUDA (or Triton's CPU interpreter).

``"auto"`` picks triton for CUDA tensors when a verified triton is installed, torch otherwise
(with a warning that says why, on CUDA).
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

from . import torch_backend, triton_backend
from .interface import triton_problem

BACKENDS = ("auto", "torch", "triton")
_MODULES = {"torch": torch_backend, "triton": triton_backend}


def resolve(name: str, device: torch.device) -> str:
    """The backend ``name`` ("auto", "torch" or "triton") runs as for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        problem = triton_problem()
        if problem is not None:
            warnings.warn(f"backend='auto' runs the torch backend on {device}: {problem}",
                          RuntimeWarning, stacklevel=3)
            return "torch"
        return "triton"
    return name


def get(name: str) -> ModuleType:
    """The module of backend ``name`` ("torch" or "triton"): its ``rollout`` is the interface."""
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {tuple(_MODULES)}, got {name!r}")
    return _MODULES[name]
