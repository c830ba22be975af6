"""Optional peers: other projects' NCAs, timed when they import (the project does not depend on
them).

- ``cax``: the NCA built from CAX's modules (JAX); see ``CaxRunner`` for the two differences of
  CAX's model from the spec and how the weights absorb them.
"""
from __future__ import annotations

import importlib.util

import torch

from bench.runners import LEARNING_RATE, Provider, Runner, Weights
from nca_fast import NCAConfig
from nca_fast.config import filter_tensor


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
        # A Variable's array is set with var[...] = array (the Flax that CAX needs deprecates
        # the .value setter).
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
