"""The drop-in layer: ``NCA``, an nn.Module whose forward is a differentiable rollout."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from . import reference
from .config import NCAConfig, filter_tensor
from .rng import check_seed, random_seed

BACKENDS = ("auto", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    if device.type == "cuda":
        return _has_triton()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _has_triton()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class NCA(nn.Module):
    """A Growing-NCA as a layer.

    Parameters are laid out as in common PyTorch ports, so their state_dicts load as is:
    ``w1 = Conv2d(F*C, hidden, 1)`` over perception interleaved ``c*F + k`` and
    ``w2 = Conv2d(hidden, C, 1)``, which starts at zero (a new model is the identity map).

    backend: "torch" (pure PyTorch, any device), "triton" (fused kernels: CUDA, or CPU under
    ``TRITON_INTERPRET=1``), or "auto" (triton on CUDA tensors, torch elsewhere).
    """

    def __init__(self, config: Optional[NCAConfig] = None, *, backend: str = "auto"):
        super().__init__()
        if config is None:
            config = NCAConfig()
        if not isinstance(config, NCAConfig):
            raise TypeError(f"config: expected an NCAConfig, got {type(config).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.config = config
        self.backend = backend
        c, f = config.channels, config.num_filters
        self.w1 = nn.Conv2d(f * c, config.hidden, 1)
        self.w2 = nn.Conv2d(config.hidden, c, 1)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)
        self.register_buffer("filters", filter_tensor(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .double() would round the float32 taps (0.3 -> 0.30000001192...): the
        # filter bank is rebuilt from the config at the buffer's new dtype and device instead.
        super()._apply(fn, recurse)
        if self.filters.is_floating_point() and self.filters.device.type != "meta":
            self.filters = filter_tensor(self.config, dtype=self.filters.dtype,
                                         device=self.filters.device)
        return self

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"channels={cfg.channels}, hidden={cfg.hidden}, filters={cfg.num_filters}, "
                f"fire_rate={cfg.fire_rate}, alive_threshold={cfg.alive_threshold}, "
                f"padding={cfg.padding!r}, backend={self.backend!r}")

    # ------------------------------------------------------------------ public API
    def seed_state(self, batch: int, height: int, width: int, *, device=None) -> torch.Tensor:
        """The spec's seed state, B x C x H x W: one live cell in the centre."""
        for name, v in (("batch", batch), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if device is None:
            device = self.w1.weight.device
        return reference.seed_state(batch, height, width, self.config.channels,
                                    self.config.alpha_channel, device=device)

    def resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "triton" if device.type == "cuda" and _has_triton() else "torch"
        return self.backend

    def forward(self, x: torch.Tensor, steps: int = 1, *, seed: Optional[int] = None,
                checkpoint: Union[None, str, int] = None, frames: Optional[int] = None,
                first_step: int = 0,
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Run ``steps`` NCA steps on ``x`` (B x C x H x W) and return the final state.

        The result is always a new tensor (a copy of ``x`` for ``steps=0``); the triton backend
        returns it with channels-last strides, the torch backend in ``x``'s memory format
        (channels-last for a channels-last ``x``, else contiguous).

        seed: key of the update masks (``None`` draws one from torch's generator); the same seed
        gives the same masks on every backend. checkpoint: ``None`` keeps each step's input for
        backward; ``"sqrt"`` or an int segment length keeps only segment boundaries and recomputes
        segments during backward (same gradients, one extra forward). frames: when an int k, also
        returns a list of the detached states at steps 0, k, 2k, ... and the final one.
        first_step: index of the first step in the mask counter, so that a rollout run in pieces
        (``model(x, 10, seed=s)`` then ``model(y, 5, seed=s, first_step=10)``) draws the same
        masks as ``model(x, 15, seed=s)``.
        """
        self._check_input(x)
        steps = _check_steps(steps)
        seed = random_seed() if seed is None else check_seed(seed)
        segment = resolve_checkpoint(checkpoint, steps)
        if isinstance(first_step, bool) or not isinstance(first_step, int) or not (
                0 <= first_step < 2**32):
            raise ValueError(f"first_step: expected an integer in [0, 2**32), got {first_step!r}")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)
                                   or frames < 1):
            raise ValueError(f"frames: expected None or a positive integer, got {frames!r}")
        backend = self.resolve_backend(x.device)
        if backend == "triton":
            if not triton_usable(x.device):
                raise RuntimeError(
                    f"backend='triton' cannot run on a {x.device.type} tensor here: use "
                    "backend='torch', move the input to CUDA, or set TRITON_INTERPRET=1 before "
                    "importing nca_fast to run the kernels in Triton's CPU interpreter")
            from .functional import nca_rollout
            run = nca_rollout
        else:
            from .cpu import rollout as run
        return _rollout_with_frames(run, self, x, steps, seed, segment, frames, first_step)

    def save(self, path, *, metadata=None) -> None:
        """Write the weights (safetensors) and the config (JSON) to ``path``, atomically;
        ``metadata``: more str -> str entries for the file (``nca_fast.io.read_metadata``)."""
        from .io import save
        save(self, path, metadata=metadata)

    # ------------------------------------------------------------------ helpers
    def weights(self):
        """(w1, b1, w2, b2) as 2-D / 1-D views: hidden x F*C, hidden, C x hidden, C."""
        return (self.w1.weight.flatten(1), self.w1.bias, self.w2.weight.flatten(1), self.w2.bias)

    def _check_input(self, x) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor B x C x H x W, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.channels:
            raise ValueError(f"x: expected {cfg.channels} channels (config.channels), got "
                             f"{x.shape[1]} in shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor (float32), got {x.dtype}")
        if x.dtype != self.w1.weight.dtype:
            raise TypeError(f"x: dtype {x.dtype} differs from the parameters' "
                            f"{self.w1.weight.dtype}; convert one of them")
        if x.device != self.w1.weight.device:
            raise ValueError(f"x: on {x.device} but the parameters are on "
                             f"{self.w1.weight.device}; move the model or the input")
        if min(x.shape) == 0:
            raise ValueError(f"x: expected non-empty dimensions, got shape {tuple(x.shape)}")


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    return steps


def resolve_checkpoint(checkpoint, steps: int) -> Optional[int]:
    """The segment length that ``checkpoint`` asks for (None: keep every step's input)."""
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint == "sqrt":
        return max(1, math.isqrt(max(steps, 1) - 1) + 1) if steps > 1 else 1
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(f"checkpoint: expected None, 'sqrt' or a positive integer segment "
                         f"length, got {checkpoint!r}")
    return checkpoint


def _rollout_with_frames(run, model, x, steps, seed, segment, frames, first_step=0):
    if frames is None:
        return run(model, x, steps, seed=seed, first_step=first_step, segment=segment)
    out: List[torch.Tensor] = [x.detach().clone()]
    t = 0
    while t < steps:
        n = min(frames, steps - t)
        x = run(model, x, n, seed=seed, first_step=first_step + t, segment=segment)
        t += n
        out.append(x.detach().clone())
    return x, out
