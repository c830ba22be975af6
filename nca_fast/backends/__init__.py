"""The backends of ``NCA.forward``: two modules with one signature (``interface``).

- ``torch`` (``torch_backend``): PyTorch ops, any device; a CPU's fast path.
- ``triton`` (``triton_backend``): the fused Triton kernels; CUDA (or Triton's CPU interpreter).

``"auto"`` picks triton for CUDA tensors when triton is installed, torch otherwise.
"""
from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend, triton_backend
from .interface import has_triton

BACKENDS = ("auto", "torch", "triton")
_MODULES = {"torch": torch_backend, "triton": triton_backend}


def resolve(name: str, device: torch.device) -> str:
    """The backend ``name`` ("auto", "torch" or "triton") runs as for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and has_triton() else "torch"
    return name


def get(name: str) -> ModuleType:
    """The module of backend ``name`` ("torch" or "triton"): its ``rollout`` is the interface."""
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {tuple(_MODULES)}, got {name!r}")
    return _MODULES[name]
