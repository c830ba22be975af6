"""The implementations under test, by name, and the same-step check that runs before any timing.

Every provider runs the model of docs/MODEL.md with the same weights on the same inputs, so
their timings compare the same work:

- ``nca_fast-triton``: ``NCA(backend="triton")``, the fused kernels. Timed only on CUDA: under
  ``TRITON_INTERPRET`` on a CPU the kernels run in Triton's Python interpreter, which measures the
  interpreter, not the kernels (``NCA_FAST_BENCH_INTERPRETED=1`` runs them there all the same:
  the GPU check's rehearsal, which checks the suite's Triton paths, not their speed).
- ``nca_fast-torch``: ``NCA(backend="torch")``, the package's PyTorch path
  (``nca_fast/backends/torch_backend.py``).
- ``torch-eager``: ``bench.eager.EagerNCA``, the common op-by-op PyTorch port: the baseline of
  every ratio.
- ``torch-compile``: the same port with its step wrapped in ``torch.compile``.
- ``cax``: CAX's NCA (JAX), when it imports (``bench.peers``).

``check_same_step`` runs every provider on one small random state with fire rate 1 (the update is
then deterministic) and compares it with ``nca_fast.reference`` in float64; the suite drops a
provider that disagrees before timing anything.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from bench.eager import EagerRunner
from bench.peers import Cax
from bench.runners import NCAFastRunner, Provider, make_weights, random_state
from nca_fast import NCAConfig, reference

PROVIDER_NAMES = ("nca_fast-triton", "nca_fast-torch", "torch-eager", "torch-compile", "cax")
BASELINE = "torch-eager"


class NCAFastTriton(Provider):
    name = "nca_fast-triton"

    def unavailable(self, device):
        device = torch.device(device)
        rehearsal = (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                     and os.environ.get("NCA_FAST_BENCH_INTERPRETED") == "1")
        if device.type != "cuda" and not rehearsal:
            return ("needs CUDA: on a CPU the kernels only run in Triton's interpreter, which is "
                    "not timed")
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None

    def build(self, config, weights, device):
        return NCAFastRunner(self.name, "triton", config, weights, device)


class NCAFastTorch(Provider):
    name = "nca_fast-torch"

    def build(self, config, weights, device):
        return NCAFastRunner(self.name, "torch", config, weights, device)


class TorchEager(Provider):
    name = "torch-eager"

    def build(self, config, weights, device):
        return EagerRunner(self.name, config, weights, device)


class TorchCompile(Provider):
    name = "torch-compile"

    def unavailable(self, device):
        if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            return "torch.compile on CPU needs a C++ compiler (none on PATH)"
        if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton"
        return None

    def build(self, config, weights, device):
        return EagerRunner(self.name, config, weights, device, compile=True)


PROVIDERS: Dict[str, Provider] = {p.name: p for p in
                                  (NCAFastTriton(), NCAFastTorch(), TorchEager(), TorchCompile(),
                                   Cax())}


def get_providers(names: Optional[Sequence[str]] = None) -> List[Provider]:
    """Providers by name, in PROVIDER_NAMES order when ``names`` is None."""
    if names is None:
        return [PROVIDERS[n] for n in PROVIDER_NAMES]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; expected names from "
                         f"{list(PROVIDER_NAMES)}")
    return [PROVIDERS[n] for n in names]


# ---------------------------------------------------------------------------------- check
@dataclass
class CheckResult:
    """Outcome of the same-step check for one provider; ``error`` is None when it agrees."""

    name: str
    error: Optional[str]
    max_err: float = float("nan")
    bad_cells: int = 0


def check_tolerance(device) -> tuple:
    """(atol, allowed share of differing cells) for the same-step check on ``device``.

    CPU providers compute in fp32 (error ~1e-6 after two steps). On CUDA the dense layers may use
    TF32 (~1e-3 relative); a TF32 rounding can also move an alpha across the 0.1 threshold and
    flip a whole cell, so a few cells (0.5%) may differ there. A wrong step differs by ~0.1 in
    most cells.
    """
    if torch.device(device).type == "cuda":
        return 5e-3, 5e-3
    return 1e-4, 0.0


def check_same_step(providers: Sequence[Provider], device, config: Optional[NCAConfig] = None,
                    *, steps: int = 2, shape=(2, 24, 37), seed: int = 1) -> List[CheckResult]:
    """Compare each provider's ``steps``-step rollout with the float64 reference.

    The config is ``config`` (default: the spec's) at fire rate 1, so every cell updates and the
    result does not depend on any RNG. Weights are random with w2 ~ N(0, 0.1^2): updates of ~0.1
    that a wrong perception, layer or mask cannot hide. The state is random with dead regions, on
    a non-square grid (a transposed H/W shows). Returns one CheckResult per provider; a provider
    that is unavailable on ``device`` is reported with its reason.
    """
    cfg = (config or NCAConfig()).replace(fire_rate=1.0)
    weights = make_weights(cfg, seed=seed, w2_std=0.1)
    b, h, w = shape
    x = random_state(b, h, w, cfg, seed=seed, dead_fraction=0.7)
    ref = reference.rollout(x.double(), *weights.as_tuple(torch.float64), cfg, steps, seed=0)
    atol, allowed = check_tolerance(device)
    results = []
    for p in providers:
        reason = p.unavailable(device)
        if reason is not None:
            results.append(CheckResult(p.name, f"unavailable: {reason}"))
            continue
        try:
            runner = p.build(cfg, weights, device)
            out = runner.forward(runner.prepare(x), steps, 0)
            runner.sync(out)
            y = runner.to_torch(out).double()
        except Exception as e:  # a provider that cannot run the check is not timed either
            results.append(CheckResult(p.name, f"failed to run the check: {type(e).__name__}: {e}"))
            continue
        if y.shape != ref.shape:
            results.append(CheckResult(p.name, f"output shape {tuple(y.shape)}, expected "
                                               f"{tuple(ref.shape)}"))
            continue
        err = (y - ref).abs().nan_to_num(float("inf")).amax(dim=1)     # per cell, B x H x W
        bad = int((err > atol).sum())
        max_err = float(err.max())
        error = None
        if bad > allowed * err.numel():
            where = tuple(int(i) for i in (err == err.max()).nonzero()[0])
            error = (f"disagrees with the reference step: {bad} of {err.numel()} cells differ by "
                     f"more than {atol:g} (max {max_err:.3g} at b,y,x={where})")
        results.append(CheckResult(p.name, error, max_err, bad))
    return results
