"""What every backend shares: the arguments of a rollout, checked once, and the frames loop.

A backend is a module with one function::

    rollout(x, params, config, *, steps, seed, first_step=0, checkpoint=None, frames=None)

``x``: B x C x H x W floating point, on the device and of the dtype of ``params``
(``nca_fast.params.Params``); ``config``: the ``NCAConfig`` the parameters belong to. It returns
the state after ``steps`` steps, a new tensor differentiable in ``x`` and the weights; with
``frames=k`` it returns ``(state, frames)``, ``frames`` the detached states at steps 0, k, 2k, ...
and the last one. ``seed`` keys the update masks of steps ``first_step .. first_step + steps - 1``
(docs/MODEL.md, "Update masks"); ``checkpoint``: None (keep every step's input for backward),
"sqrt" or a segment length (keep segment boundaries, recompute segments in backward).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..config import NCAConfig
from ..params import Params
from ..rng import check_seed

Checkpoint = Union[None, str, int]
Result = Union[Tensor, Tuple[Tensor, List[Tensor]]]


# The Triton releases (major.minor) the kernels are verified on: interpreter tests, spill-free
# compiles and executed-instruction counts (bench/toolchains.py writes the table, bench/NOTES.md
# section 7 holds it).
VERIFIED_TRITON = ("3.6", "3.7", "3.8", "3.9")


_FOUND: Dict[str, Optional[str]] = {}


def triton_version() -> Optional[str]:
    """The installed triton's version, or None when it cannot be imported (it is a Linux-only
    dependency). Looked up once per process: ``backends.resolve("auto")`` asks on every forward
    on CUDA, and a failed import searches the whole path each time. (A dict, not
    ``functools.lru_cache``: torch.compile traces this function and warns about a cache wrapper.)
    ``triton_version.cache_clear()`` makes the next call look again."""
    if "triton" not in _FOUND:
        try:
            import triton
            _FOUND["triton"] = triton.__version__
        except ImportError:
            _FOUND["triton"] = None
    return _FOUND["triton"]


triton_version.cache_clear = _FOUND.clear


def has_triton() -> bool:
    """True when triton can be imported."""
    return triton_version() is not None


def triton_problem() -> Optional[str]:
    """Why the Triton kernels should not be picked by default here (triton missing, or a release
    outside ``VERIFIED_TRITON``), or None."""
    version = triton_version()
    verified = f"{VERIFIED_TRITON[0]} to {VERIFIED_TRITON[-1]}"
    if version is None:
        return f"triton is not installed (the kernels are verified on triton {verified})"
    if ".".join(version.split(".")[:2]) not in VERIFIED_TRITON:
        return (f"triton {version} is installed; the kernels are verified on triton {verified} "
                f"only")
    return None


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``: CUDA, or the CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if device.type == "cuda":
        return has_triton()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and has_triton()


def resolve_checkpoint(checkpoint: Checkpoint, steps: int) -> Optional[int]:
    """The segment length that ``checkpoint`` asks for (None: keep every step's input)."""
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint == "sqrt":
        return max(1, math.isqrt(max(steps, 1) - 1) + 1) if steps > 1 else 1
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(f"checkpoint: expected None, 'sqrt' or a positive integer segment "
                         f"length, got {checkpoint!r}")
    return checkpoint


def check_input(x, params: Params, config: NCAConfig) -> None:
    """``x`` against the config's channels and the parameters' dtype and device."""
    w1 = params.w1
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor B x C x H x W, got shape {tuple(x.shape)}")
    if x.shape[1] != config.channels:
        raise ValueError(f"x: expected {config.channels} channels (config.channels), got "
                         f"{x.shape[1]} in shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor (float32), got {x.dtype}")
    if x.dtype != w1.dtype:
        raise TypeError(f"x: dtype {x.dtype} differs from the parameters' {w1.dtype}; convert "
                        "one of them")
    if x.device != w1.device:
        raise ValueError(f"x: on {x.device} but the parameters are on {w1.device}; move the "
                         "model or the input")
    if min(x.shape) == 0:
        raise ValueError(f"x: expected non-empty dimensions, got shape {tuple(x.shape)}")
    if config.padding == "reflect" and min(x.shape[-2:]) < 2:
        raise ValueError(f"x: padding 'reflect' needs H and W of at least 2, got shape "
                         f"{tuple(x.shape)}")


def check_filters(params: Params, config: NCAConfig) -> None:
    """``params.filters`` against the config: F x 3 x 3 (fixed or shared learned filters) or
    F x C x 3 x 3 (``learn_filters="depthwise"``), w1's dtype and device, finite taps."""
    f, w1 = params.filters, params.w1
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"filters: expected a torch.Tensor, got {type(f).__name__}")
    nf, c = config.num_filters, config.channels
    if config.learn_filters == "depthwise":
        want = (nf, c, 3, 3)
        what = f"F x C x 3 x 3 = {nf} x {c} x 3 x 3 (learn_filters='depthwise')"
    else:
        want, what = (nf, 3, 3), f"F x 3 x 3 = {nf} x 3 x 3"
    if tuple(f.shape) != want:
        raise ValueError(f"filters: expected shape {what}, got {tuple(f.shape)}")
    if f.dtype != w1.dtype:
        raise TypeError(f"filters: dtype {f.dtype} differs from w1's {w1.dtype}")
    if f.device != w1.device:
        raise ValueError(f"filters: on {f.device} but w1 is on {w1.device}")
    # a host sync, once per rollout; skipped while compiling, where a data-dependent branch
    # would break the graph
    if (f.device.type != "meta" and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(f).all())):
        raise ValueError("filters: every tap must be finite (found NaN or inf)")


def check_rollout(x, params: Params, config: NCAConfig, steps, seed, first_step, checkpoint,
                  frames) -> Tuple[Params, Optional[int]]:
    """Every argument of ``rollout`` checked, each error naming its argument. Returns the
    parameters with w1 and w2 as matrices, and the checkpoint segment length (None: no
    checkpointing).

    ``params.filters`` is F x 3 x 3 (the fixed bank, or shared learned filters) or
    F x C x 3 x 3 (``learn_filters="depthwise"``). A filter bias never reaches a backend: it is
    the same for every cell, so the caller folds it into b1 exactly
    (``b1 + w1 @ bias.t().reshape(-1)``).
    """
    check_input(x, params, config)
    check_filters(params, config)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    check_seed(seed)
    segment = resolve_checkpoint(checkpoint, steps)
    if isinstance(first_step, bool) or not isinstance(first_step, int) or not (
            0 <= first_step < 2**32):
        raise ValueError(f"first_step: expected an integer in [0, 2**32), got {first_step!r}")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)
                               or frames < 1):
        raise ValueError(f"frames: expected None or a positive integer, got {frames!r}")
    # The module's 1x1 convolution weights as matrices: views, made here rather than by the
    # caller so that under torch.compile the torch backend's rollout stays one graph break.
    return params._replace(w1=params.w1.flatten(1), w2=params.w2.flatten(1)), segment


def run_in_frames(run: Callable[[Tensor, int, int], Tensor], x: Tensor, steps: int,
                  first_step: int, frames: Optional[int]) -> Result:
    """``run(x, n, first)`` (n steps from step ``first``) over the whole rollout, or in pieces
    of ``frames`` steps, keeping a detached copy of the state before and after each piece."""
    if frames is None:
        return run(x, steps, first_step)
    out: List[Tensor] = [x.detach().clone()]
    t = 0
    while t < steps:
        n = min(frames, steps - t)
        x = run(x, n, first_step + t)
        t += n
        out.append(x.detach().clone())
    return x, out
