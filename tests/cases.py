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
