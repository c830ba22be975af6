"""The drop-in layer: ``NCA``, an nn.Module whose forward is a differentiable rollout."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from . import backends, formats, reference
from .backends import BACKENDS
from .config import NCAConfig, filter_tensor, initial_filters
from .media import ASSETS
from .params import Params
from .rng import random_seed


class NCA(nn.Module):
    """A Growing-NCA as a layer.

    Parameters are laid out as in common PyTorch ports, so their state_dicts load as is:
    ``w1 = Conv2d(F*C, hidden, 1)`` over perception interleaved ``c*F + k`` (docs/MODEL.md,
    "W1 layouts") and ``w2 = Conv2d(hidden, C, 1)``, which starts at zero (a new model is the
    identity map). The perception filters ``filters`` are a fixed buffer built from
    ``config.filters`` (not in the state_dict), or with ``config.learn_filters`` a parameter
    starting at ``config.initial_filters``: F x 3 x 3 ("shared") or F x C x 3 x 3
    ("depthwise"); ``config.filter_bias`` adds ``filter_bias`` (F x C, starting at zero), which
    ``params()`` folds into the first layer's bias. A state_dict from a model with another
    ``learn_filters`` or ``filter_bias`` is refused (docs/MODEL.md, "Learned filters").
    The forward hands ``params()`` and the config to a backend
    (``nca_fast.backends``); nothing below this module reads it.

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
        self.w2 = nn.Conv2d(config.hidden, c, 1, bias=config.last_bias)
        nn.init.zeros_(self.w2.weight)
        if config.last_bias:
            nn.init.zeros_(self.w2.bias)
        if config.learn_filters is None:
            self.register_buffer("filters", filter_tensor(config), persistent=False)
        else:
            self.filters = nn.Parameter(initial_filters(config))
        if config.filter_bias:
            self.filter_bias = nn.Parameter(torch.zeros(f, c))
        else:
            self.register_parameter("filter_bias", None)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .double() would round the float32 taps (0.3 -> 0.30000001192...): a fixed
        # filter bank is rebuilt from the config at the buffer's new dtype and device instead.
        # Learned filters are parameters: converted like the weights, never rebuilt.
        super()._apply(fn, recurse)
        if (self.config.learn_filters is None and self.filters.is_floating_point()
                and self.filters.device.type != "meta"):
            self.filters = filter_tensor(self.config, dtype=self.filters.dtype,
                                         device=self.filters.device)
        return self

    def _perception_mismatch(self, state_dict, prefix: str, strict: bool) -> Optional[str]:
        """Why ``state_dict`` cannot be this model's (its learned filters or filter bias of
        another form), or None. Filters or a filter bias that are absent are a mismatch only
        when ``strict``: a non-strict load leaves them at their initial values."""
        want = self.config.learn_filters
        f = state_dict.get(prefix + "filters")
        got = None if f is None else ("shared" if f.dim() == 3 else "depthwise")
        if got != want and (f is not None or strict):
            have = "no 'filters' (a fixed filter bank)" if f is None else \
                f"'filters' of shape {tuple(f.shape)} (learned, {got!r})"
            return (f"learn_filters: the state_dict holds {have}, but this model has "
                    f"learn_filters={want!r}; build the NCA with the config the weights were "
                    f"trained with")
        has_bias = (prefix + "filter_bias") in state_dict
        if has_bias != self.config.filter_bias and (has_bias or strict):
            return (f"filter_bias: the state_dict {'holds' if has_bias else 'has no'} "
                    f"'filter_bias', but this model has filter_bias={self.config.filter_bias}; "
                    f"build the NCA with the config the weights were trained with")
        return None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, refusing (ValueError, one line naming
        ``learn_filters`` or ``filter_bias``) weights trained with another perception: learned
        filters into a fixed bank or the reverse, shared into depthwise or the reverse."""
        problem = self._perception_mismatch(state_dict, "", strict)
        if problem:
            raise ValueError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The same check when this model is loaded as part of another module (torch passes
        # strict=True here whatever the caller asked: absent tensors are left to its own
        # missing-keys report).
        problem = self._perception_mismatch(state_dict, prefix, strict=False)
        if problem:
            raise ValueError(problem)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        cfg = self.config
        bias = ", filter_bias=True" if cfg.filter_bias else ""
        return (f"channels={cfg.channels}, hidden={cfg.hidden}, filters={cfg.num_filters}, "
                f"learn_filters={cfg.learn_filters!r}{bias}, "
                f"fire_rate={cfg.fire_rate}, alive_threshold={cfg.alive_threshold}, "
                f"padding={cfg.padding!r}, last_bias={cfg.last_bias}, backend={self.backend!r}")

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
        """The backend this model runs on for tensors on ``device`` ("torch" or "triton")."""
        return backends.resolve(self.backend, device)

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
        # The parameters' device: x's once it is checked (the backend's first act).
        backend = backends.get(self.resolve_backend(self.w1.weight.device))
        seed = random_seed() if seed is None else seed
        return backend.rollout(x, self.params(), self.config, steps=steps, seed=seed,
                               first_step=first_step, checkpoint=checkpoint, frames=frames)

    def save(self, path, *, metadata=None):
        """Write the weights (safetensors) and the config (JSON) to ``path``, atomically;
        ``metadata``: more str -> str entries for the file (``nca_fast.formats.read_metadata``).
        Returns the path written."""
        return formats.write_model(path, self.config, self.state_dict(), metadata=metadata)

    # ------------------------------------------------------------------ helpers
    def _b2(self) -> torch.Tensor:
        """The second layer's bias, or zeros (no parameter, no gradient) without one."""
        if self.w2.bias is not None:
            return self.w2.bias
        return self.w2.weight.new_zeros(self.config.channels)

    def _b1(self) -> torch.Tensor:
        """The first layer's bias, with ``filter_bias`` folded in when the model has one.

        A perception bias is the same in every cell, so ``W1 (p + beta) + b1 = W1 p + (b1 +
        W1 beta)`` exactly, ``beta`` the bias of each perception column (column ``c*F + k``
        gets ``filter_bias[k, c]``). Differentiable: filter_bias gets its gradient through it."""
        b1 = self.w1.bias
        if self.filter_bias is None:
            return b1
        beta = self.filter_bias.t().reshape(-1)                 # [C, F] -> column c*F + k
        return b1 + self.w1.weight.flatten(1) @ beta

    def weights(self):
        """(w1, b1, w2, b2) as 2-D / 1-D tensors: hidden x F*C, hidden, C x hidden, C (b1 with
        ``filter_bias`` folded in, b2 zeros when ``config.last_bias`` is False). The perception
        filters are ``params().filters``."""
        return (self.w1.weight.flatten(1), self._b1(), self.w2.weight.flatten(1), self._b2())

    def params(self) -> Params:
        """The parameters and the filters as the backends take them (``nca_fast.params``; the
        weights as the 1x1 convolutions hold them): b1 with ``filter_bias`` folded in, and the
        filters F x 3 x 3 (a fixed bank, or learned with ``learn_filters="shared"``) or
        F x C x 3 x 3 (``learn_filters="depthwise"``)."""
        return Params(self.w1.weight, self._b1(), self.w2.weight, self._b2(), self.filters)


# ------------------------------------------------------------------------------ model files
def _from_file(read, path, backend: str) -> NCA:
    config, tensors = read(path)
    model = NCA(config, backend=backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])
    return model


def load(path, *, backend: str = "auto") -> NCA:
    """A model written by ``NCA.save`` (safetensors weights + JSON config), on the CPU.

    Raises FileNotFoundError when ``path`` does not exist and ValueError, naming the file and the
    problem, when it is not a valid nca_fast model (truncated, corrupt, not safetensors, missing
    metadata or tensors, shapes that disagree with the stored config, non-finite weights)."""
    return _from_file(formats.read_model, path, backend)


def load_distill(path, *, backend: str = "auto") -> NCA:
    """A Distill WebGL 8-bit export (``ex*_NAME.json``) as an ``NCA`` on the CPU
    (``nca_fast.formats.read_distill`` describes the format)."""
    return _from_file(formats.read_distill, path, backend)


def load_any(path, *, backend: str = "auto") -> NCA:
    """``load`` or ``load_distill``, by extension (``.safetensors`` / ``.json``), else by
    content."""
    return _from_file(formats.read_any, path, backend)


def shipped_models() -> dict:
    """Names of the models shipped in the package's assets -> their files: ``flower`` (the
    default model) and the size curriculum's stages (``flower96`` ...; docs/TRAINING.md)."""
    found = {}
    for path in sorted(ASSETS.glob("*.safetensors")):
        found["flower" if path.name == "default_model.safetensors" else path.stem] = path
    return found
