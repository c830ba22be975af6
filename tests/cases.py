"""Shared test inputs (imported by test modules, like tolerances.py)."""
import torch

from nca_fast import NCA, NCAConfig

# The smallest training run that exercises every part of the trainer on a CPU in seconds.
TINY = dict(size=8, pad=2, hidden=32, batch=4, pool_size=16, rollout_min=6, rollout_max=10,
            backend="torch", device="cpu")


def random_model(seed=0, *, w2_bias_std=0.01, w1_scale=1.0, **config):
    """A torch-backend ``NCA(NCAConfig(**config))`` that is not the identity: the weights drawn
    from ``seed``, then w2 ~ N(0, 0.05), its bias ~ N(0, w2_bias_std), w1 times w1_scale."""
    torch.manual_seed(seed)
    model = NCA(NCAConfig(**config), backend="torch")
    with torch.no_grad():
        model.w2.weight.normal_(0, 0.05)
        if model.w2.bias is not None:
            model.w2.bias.normal_(0, w2_bias_std)
        model.w1.weight.mul_(w1_scale)
    return model


def ragged_state(cfg, b, h, w, dtype, seed=1):
    """Random channels; alpha mostly dead with some cells near and well above the threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, cfg.channels, h, w, generator=g, dtype=dtype) - 0.5
    choices = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.09, 0.12, 0.6, 1.0], dtype=dtype)
    x[:, cfg.alpha_channel] = choices[torch.randint(0, 8, (b, h, w), generator=g)]
    return x
