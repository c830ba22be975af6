"""What every implementation under test is built from, and how the suite drives it.

- ``Weights`` / ``make_weights``: the dense layers every provider loads; ``random_state``: the
  inputs.
- ``Runner``: one provider's model on one device (``prepare``, ``forward``, ``train_step``,
  ``sync``, ``to_torch``), so that a JAX provider fits as well as a PyTorch one;
  ``TorchRunner`` is the PyTorch one, ``NCAFastRunner`` runs ``nca_fast.NCA``.
- ``Provider``: a named implementation that gives a ``Runner`` (``bench.providers`` lists them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from nca_fast import NCA, NCAConfig

LEARNING_RATE = 2e-3       # the article's Adam learning rate


# ---------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Weights:
    """The dense layers every provider loads, in ``NCA.weights()`` layout (CPU, float32).

    w1: hidden x F*C over perception interleaved ``c*F + k``; b1: hidden; w2: C x hidden; b2: C.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def as_tuple(self, dtype=torch.float32, device=None):
        return tuple(t.to(dtype=dtype, device=device) for t in (self.w1, self.b1, self.w2, self.b2))


def make_weights(config: NCAConfig, *, seed: int = 0, w2_std: float = 0.02) -> Weights:
    """Random weights with a nonzero second layer (a new model's zero w2 would time a no-op).

    w1 and b1 follow ``nn.Conv2d``'s default range U(-1/sqrt(fan_in), 1/sqrt(fan_in)); w2 is
    N(0, w2_std^2) and b2 N(0, (w2_std/10)^2): small enough that a 1,024-step rollout of a random
    state stays finite, large enough that every cell's state changes every step.
    """
    g = torch.Generator().manual_seed(seed)
    c, hidden, fan_in = config.channels, config.hidden, config.perception_size
    bound = fan_in ** -0.5
    w1 = (torch.rand(hidden, fan_in, generator=g) * 2 - 1) * bound
    b1 = (torch.rand(hidden, generator=g) * 2 - 1) * bound
    w2 = torch.randn(c, hidden, generator=g) * w2_std
    b2 = torch.randn(c, generator=g) * (w2_std / 10)
    return Weights(w1, b1, w2, b2)


def random_state(batch: int, height: int, width: int, config: NCAConfig, *, seed: int = 0,
                 dead_fraction: float = 0.0, device=None) -> torch.Tensor:
    """A B x C x H x W float32 state, uniform in [0, 1), made on ``device`` (default CPU).

    dead_fraction > 0 zeroes alpha in about that share of the cells and in one block, so the alive
    masks have both outcomes (the same-step check needs that; timing uses a fully alive grid so
    that every backend does the same, dense, work). Made on the device itself because a
    16384 x 16384 state is 17 GB: too slow to fill on the host and copy.
    """
    device = torch.device(device or "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(batch, config.channels, height, width, generator=g, device=device)
    if dead_fraction > 0:
        a = config.alpha_channel
        x[:, a] *= (torch.rand(batch, height, width, generator=g, device=device)
                    >= dead_fraction).float()
        x[:, a, : height // 3, : width // 3] = 0.0
    return x


# ---------------------------------------------------------------------------------- runners
class Runner:
    """One provider's model on one device, holding its own copy of the weights.

    ``prepare`` converts a torch tensor to the provider's input (not timed); ``forward`` runs a
    rollout without gradients; ``train_step`` runs one training iteration (rollout, MSE on RGBA
    against a B x 4 x H x W target, backward, per-parameter gradient normalisation as in the
    article, one Adam step); ``sync`` waits until the device finished ``out``.
    """

    name = "?"
    supports_checkpoint = False

    def prepare(self, x: torch.Tensor):
        raise NotImplementedError

    def prepare_target(self, target: torch.Tensor):
        return self.prepare(target)

    def forward(self, x, steps: int, seed: int):
        raise NotImplementedError

    def train_step(self, x, target, steps: int, seed: int):
        raise NotImplementedError

    def sync(self, out=None) -> None:
        raise NotImplementedError

    def to_torch(self, out) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(Runner):
    """A PyTorch provider: subclasses give ``rollout`` (differentiable) and ``parameters``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._opt = None

    def rollout(self, x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def parameters(self) -> List[torch.Tensor]:
        raise NotImplementedError

    def prepare(self, x):
        return x.to(self.device, torch.float32).contiguous()

    def forward(self, x, steps, seed):
        with torch.no_grad():
            return self.rollout(x, steps, seed)

    def train_step(self, x, target, steps, seed):
        params = self.parameters()
        if self._opt is None:
            self._opt = torch.optim.Adam(params, lr=LEARNING_RATE)
        self._opt.zero_grad(set_to_none=True)
        y = self.rollout(x, steps, seed)
        loss = F.mse_loss(y[:, : target.shape[1]], target)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.grad.div_(p.grad.norm() + 1e-8)
        self._opt.step()
        return loss.detach()

    def sync(self, out=None):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to_torch(self, out):
        return out.detach().float().cpu()


class NCAFastRunner(TorchRunner):
    """``nca_fast.NCA`` with the given backend; ``checkpoint`` is passed to every forward."""

    supports_checkpoint = True

    def __init__(self, name: str, backend: str, config: NCAConfig, weights: Weights, device,
                 checkpoint=None):
        super().__init__(device)
        self.name = name
        self.checkpoint = checkpoint
        self.model = NCA(config, backend=backend).to(self.device)
        with torch.no_grad():
            for dst, src in zip(self.model.weights(), weights.as_tuple()):
                dst.copy_(src.reshape(dst.shape))

    def rollout(self, x, steps, seed):
        return self.model(x, steps, seed=seed, checkpoint=self.checkpoint)

    def parameters(self):
        return list(self.model.parameters())


# ---------------------------------------------------------------------------------- providers
class Provider:
    """A named implementation: ``unavailable(device)`` gives the reason it cannot run (or None),
    ``build(config, weights, device)`` gives a ``Runner``."""

    name = "?"

    def unavailable(self, device: torch.device) -> Optional[str]:
        return None

    def build(self, config: NCAConfig, weights: Weights, device) -> Runner:
        raise NotImplementedError
