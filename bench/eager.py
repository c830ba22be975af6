"""The plain PyTorch port every ratio is measured against, eager or under ``torch.compile``.

``EagerNCA`` is written in the style most public PyTorch NCAs share: op by op, NCHW, grouped
``F.conv2d`` perception, 1x1 ``nn.Conv2d`` layers, ``max_pool2d`` alive masks, a ``torch.rand``
update mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.runners import TorchRunner, Weights
from nca_fast import NCAConfig
from nca_fast.config import filter_tensor
from nca_fast.rng import update_mask


class EagerNCA(nn.Module):
    """The common PyTorch port of the Growing-NCA, written op by op in NCHW.

    masks: "torch" draws each step's update mask with ``torch.rand`` (what public ports do; at
    fire rate 1 it is all ones), "philox" uses ``nca_fast.rng.update_mask`` (the masks of every
    nca_fast backend, so a rollout can be compared exactly at any fire rate).
    """

    def __init__(self, config: NCAConfig, masks: str = "torch"):
        super().__init__()
        if masks not in ("torch", "philox"):
            raise ValueError(f"masks: expected 'torch' or 'philox', got {masks!r}")
        self.config = config
        self.masks = masks
        c, f = config.channels, config.num_filters
        # The bank repeated per channel: grouped conv output c*F + k is filter k on channel c.
        self.register_buffer("kernel", filter_tensor(config).repeat(c, 1, 1).unsqueeze(1))
        self.fc0 = nn.Conv2d(f * c, config.hidden, 1)
        self.fc1 = nn.Conv2d(config.hidden, c, 1)

    def load(self, weights: Weights) -> "EagerNCA":
        with torch.no_grad():
            for dst, src in zip((self.fc0.weight, self.fc0.bias, self.fc1.weight, self.fc1.bias),
                                weights.as_tuple()):
                dst.copy_(src.reshape(dst.shape))
        return self

    def perceive(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.padding == "circular":
            return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), self.kernel,
                            groups=self.config.channels)
        return F.conv2d(x, self.kernel, padding=1, groups=self.config.channels)

    def alive(self, x: torch.Tensor) -> torch.Tensor:
        a = self.config.alpha_channel
        alpha = x[:, a:a + 1]
        if self.config.padding == "circular":
            pooled = F.max_pool2d(F.pad(alpha, (1, 1, 1, 1), mode="circular"), 3, stride=1)
        else:
            # max_pool2d pads with -inf: outside the grid is dead, as the spec says.
            pooled = F.max_pool2d(alpha, 3, stride=1, padding=1)
        return pooled > self.config.alive_threshold

    def step(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One step; ``mask`` is B x 1 x H x W, 1 where the cell updates."""
        masking = self.config.alive_threshold is not None
        if masking:
            pre = self.alive(x)
        dx = self.fc1(F.relu(self.fc0(self.perceive(x))))
        x = x + dx * mask
        if masking:
            x = x * (pre & self.alive(x)).to(x.dtype)
        return x

    def update_mask(self, x: torch.Tensor, seed: int, t: int) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.masks == "philox":
            return update_mask(b, h, w, fire_rate=self.config.fire_rate, seed=seed, step=t,
                               device=x.device)
        return (torch.rand(b, 1, h, w, device=x.device) < self.config.fire_rate).to(x.dtype)

    def forward(self, x: torch.Tensor, steps: int, seed: int = 0, step_fn=None) -> torch.Tensor:
        step_fn = step_fn or self.step
        for t in range(steps):
            x = step_fn(x, self.update_mask(x, seed, t))
        return x


class EagerRunner(TorchRunner):
    """``torch-eager`` (compile=False) and ``torch-compile`` (the port's step compiled)."""

    def __init__(self, name: str, config: NCAConfig, weights: Weights, device, *,
                 compile: bool = False, masks: str = "torch"):
        super().__init__(device)
        self.name = name
        self.model = EagerNCA(config, masks=masks).load(weights).to(self.device)
        self._step = None
        if compile:
            import torch._dynamo
            # Every (runner, shape, grad mode) is a new specialisation of the same step; the
            # default limit of 8 would silently fall back to eager partway through the suite.
            cfg = torch._dynamo.config
            limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, limit, max(getattr(cfg, limit), 256))
            self._step = torch.compile(self.model.step, dynamic=False)

    def rollout(self, x, steps, seed):
        return self.model(x, steps, seed, step_fn=self._step)

    def parameters(self):
        return list(self.model.parameters())
