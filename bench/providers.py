"""The implementations under test, built from one config and one set of weights.

Every provider runs the model of docs/MODEL.md with the same weights on the same
inputs, so their timings compare the same work:

- ``nca_fast-triton``: ``NCA(backend="triton")``, the fused kernels. Timed only on CUDA: under
  ``TRITON_INTERPRET`` on a CPU the kernels run in Triton's Python interpreter, which measures the
  interpreter, not the kernels (``NCA_FAST_BENCH_INTERPRETED=1`` runs them there all the same:
  the GPU check's rehearsal, which checks the suite's Triton paths, not their speed).
- ``nca_fast-torch``: ``NCA(backend="torch")``, the package's PyTorch path
  (``nca_fast/backends/torch_backend.py``).
- ``torch-eager``: ``EagerNCA`` below, a port in the style most public PyTorch NCAs share
  (op by op, NCHW, grouped ``F.conv2d`` perception, 1x1 ``nn.Conv2d`` layers, ``max_pool2d``
  alive masks, a ``torch.rand`` update mask). It is the baseline of every ratio.
- ``torch-compile``: the same port with its step wrapped in ``torch.compile``.
- ``cax``: the NCA built from CAX's modules (JAX), when ``cax`` imports; see ``CaxRunner`` for the
  two differences of CAX's model from the spec and how the weights absorb them.

A provider gives a ``Runner``; the suite only calls ``prepare``, ``forward``, ``train_step``,
``sync`` and ``to_torch``, so a JAX provider fits as well as a PyTorch one.

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
import torch.nn.functional as F
from torch import nn

from nca_fast import NCA, NCAConfig, reference
from nca_fast.config import filter_tensor
from nca_fast.rng import update_mask

PROVIDER_NAMES = ("nca_fast-triton", "nca_fast-torch", "torch-eager", "torch-compile", "cax")
BASELINE = "torch-eager"
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


class CaxRunner(Runner):
    """The NCA assembled from CAX's ``ConvPerceive`` and ``NCAUpdate`` (JAX, NHWC).

    CAX's model differs from the spec in two ways that the weights absorb exactly:
    alpha is CAX's last channel (the state's channels are permuted so that the spec's alpha comes
    last, and w1's columns and w2's rows follow), and its update mask is ``nnx.Dropout``, which
    scales kept updates by 1 / fire_rate (w2 and b2 are multiplied by fire_rate). What remains
    different: the masks come from JAX's PRNG (the same distribution, other cells), and the
    perception filters are constants (not parameters), as in the article. Zero padding and alive
    masking only: CAX has no circular padding here.
    """

    name = "cax"

    def __init__(self, config: NCAConfig, weights: Weights, device):
        import jax
        import jax.numpy as jnp
        import optax
        from cax.core import ComplexSystem
        from cax.core.perceive import ConvPerceive
        from cax.core.update import NCAUpdate
        from flax import nnx

        if config.padding != "zeros" or config.alive_threshold is None:
            raise ValueError("cax: only zero padding with alive masking is comparable")
        if config.fire_rate <= 0:
            raise ValueError("cax: fire_rate must be > 0 (dropout rate 1 zeroes every update)")
        self._jax, self._jnp = jax, jnp
        c, nf, a = config.channels, config.num_filters, config.alpha_channel
        self.perm = [i for i in range(c) if i != a] + [a]   # CAX channel j = spec's perm[j]
        self.inv_perm = [self.perm.index(i) for i in range(c)]
        cols = [self.perm[j] * nf + k for j in range(c) for k in range(nf)]
        w1, b1, w2, b2 = (t.double() for t in weights.as_tuple())
        w1 = w1[:, cols]
        w2 = w2[self.perm] * config.fire_rate
        b2 = b2[self.perm] * config.fire_rate

        class FixedFilters(nnx.Variable):
            """Perception taps: state of the module, but not a trained parameter."""

        class CaxNCA(ComplexSystem):
            def __init__(self, rngs):
                self.perceive = ConvPerceive(c, nf * c, kernel_size=(3, 3), padding="SAME",
                                             feature_group_count=c, use_bias=False, rngs=rngs)
                self.update = NCAUpdate(c, nf * c, (config.hidden,),
                                        cell_dropout_rate=1.0 - config.fire_rate,
                                        alive_threshold=config.alive_threshold, rngs=rngs)

            def _step(self, state, input=None, *, sow=False):
                return self.update(state, self.perceive(state), input)

        self.cs = CaxNCA(nnx.Rngs(params=0, dropout=1))
        taps = filter_tensor(config).double()                   # F x 3 x 3, [dy, dx]
        kernel = taps.permute(1, 2, 0).repeat(1, 1, c).unsqueeze(2)   # 3 x 3 x 1 x C*F, HWIO
        self.cs.perceive.conv.kernel = FixedFilters(jnp.asarray(kernel.float().numpy()))
        first, last = self.cs.update.layers[0], self.cs.update.layers[-1]
        # Flax 0.12 sets a Variable's array with var[...] = array (the .value setter is
        # deprecated there); CAX 0.3 needs that Flax.
        first.kernel[...] = jnp.asarray(w1.T.float().numpy()).reshape(1, 1, nf * c, -1)
        first.bias[...] = jnp.asarray(b1.float().numpy())
        last.kernel[...] = jnp.asarray(w2.T.float().numpy()).reshape(1, 1, -1, c)
        last.bias[...] = jnp.asarray(b2.float().numpy())
        self.cs.update.dropout.deterministic = config.fire_rate >= 1.0
        self.optimizer = nnx.Optimizer(self.cs, optax.adam(LEARNING_RATE), wrt=nnx.Param)
        rgba = jnp.asarray(self.inv_perm[:4])

        @nnx.jit(static_argnames=("steps",))
        def train(cs, optimizer, x, target, steps):
            def loss_fn(cs):
                y = cs(x, num_steps=steps)
                return jnp.mean((y[..., rgba[: target.shape[-1]]] - target) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(cs)
            grads = jax.tree.map(lambda g: g / (jnp.linalg.norm(g) + 1e-8), grads)
            optimizer.update(cs, grads)
            return loss

        self._train = train

    def prepare(self, x):
        return self._jnp.asarray(x.detach().float().cpu().permute(0, 2, 3, 1)[..., self.perm]
                                 .contiguous().numpy())

    def prepare_target(self, target):
        return self._jnp.asarray(target.detach().float().cpu().permute(0, 2, 3, 1)
                                 .contiguous().numpy())

    def forward(self, x, steps, seed):
        return self.cs(x, num_steps=steps)

    def train_step(self, x, target, steps, seed):
        return self._train(self.cs, self.optimizer, x, target, steps)

    def sync(self, out=None):
        if out is not None:
            self._jax.block_until_ready(out)

    def to_torch(self, out):
        import numpy as np

        y = torch.from_numpy(np.array(out))[..., self.inv_perm]
        return y.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------- providers
class Provider:
    """A named implementation: ``unavailable(device)`` gives the reason it cannot run (or None),
    ``build(config, weights, device)`` gives a ``Runner``."""

    name = "?"

    def unavailable(self, device: torch.device) -> Optional[str]:
        return None

    def build(self, config: NCAConfig, weights: Weights, device) -> Runner:
        raise NotImplementedError


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


class Cax(Provider):
    name = "cax"

    def unavailable(self, device):
        missing = [m for m in ("jax", "flax", "optax", "cax")
                   if importlib.util.find_spec(m) is None]
        if missing:
            return (f"{', '.join(missing)} not importable (CAX is JAX; the project does not "
                    "depend on it)")
        import jax

        want = "gpu" if torch.device(device).type == "cuda" else "cpu"
        if jax.default_backend() != want:
            return f"JAX's default backend is {jax.default_backend()}, not {want}"
        return None

    def build(self, config, weights, device):
        return CaxRunner(config, weights, device)


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
