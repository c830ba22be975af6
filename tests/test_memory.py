"""Memory for backward, counted (not timed): bytes saved per cell-step by a rollout.

The design (nca_fast/functional.py): with segment length S the triton backend saves, per cell,
the input (4C bytes), the stored state at every step t with 0 < t < T and t % S == 0, and the
final alive mask (1 byte). With S = 1 nothing is recomputed: every step also keeps its 16-bit
cell word (the neighbours its deferred mask kept, whether it fired), so at C = 16 fp32 a plain
rollout keeps 66 bytes per cell-step. With S > 1 a segment's first state keeps its hq plane
instead (one byte per cell of a grid padded by 2 on each side) and the backward recomputes the
rest; checkpoint="sqrt": S = ceil(sqrt(T)).
"""
import math
import os

import pytest
import torch

from nca_fast import NCA, NCAConfig

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def saved_bytes(model, x, steps, checkpoint):
    """Bytes of the tensors autograd saves during the forward, excluding the parameters."""
    params = {p.data_ptr() for p in model.parameters()} | {model.filters.data_ptr()}
    total = []

    def pack(t):
        if t.data_ptr() not in params:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, steps, seed=1, checkpoint=checkpoint)
    return sum(total)


def expected_bytes(steps, segment, channels, alive, height, width):
    """Bytes per cell."""
    stored = (steps - 1) // segment
    plane = (height + 4) * (width + 4) / (height * width) if alive and segment > 1 else 0
    words = 2 * steps if segment == 1 else 0
    return 4 * channels + stored * (4 * channels + plane) + words + (1 if alive else 0)


# At T = 256 only checkpoint="sqrt" with alive masks runs by default (the O(sqrt T) claim); the
# other three repeat T = 16's lesson at 16x the interpreted launches (~90 s each): opt-in.
CASES = [(t, c, a) for t in (16, 256) for c in (None, "sqrt") for a in (0.1, None)]


def _slow(case):
    return case[0] == 256 and case[1:] != ("sqrt", 0.1)


@pytest.mark.parametrize("steps,checkpoint,alive", [
    pytest.param(*case, marks=[pytest.mark.slow] if _slow(case) else []) for case in CASES])
def test_saved_bytes_per_cell_step(steps, checkpoint, alive):
    model = NCA(NCAConfig(hidden=32, alive_threshold=alive, precision="ieee"),
                backend="triton").to(DEVICE)
    x = model.seed_state(1, 2, 3).requires_grad_()
    cells = x.shape[0] * x.shape[2] * x.shape[3]
    segment = 1 if checkpoint is None else math.isqrt(steps - 1) + 1
    got = saved_bytes(model, x, steps, checkpoint) / cells
    want = expected_bytes(steps, segment, 16, alive is not None, 2, 3)
    assert got == pytest.approx(want, abs=1e-9), (got, want)
    per_cell_step = got / steps
    if checkpoint is None:
        assert per_cell_step == pytest.approx(66 + (1 / steps if alive is not None else 0))
    else:
        # O(sqrt T) states; this 2 x 3 grid's hq planes are 7 bytes per cell (a 72 x 72 grid's
        # 1.1): 16 steps -> 23.9 B, 256 steps -> 5.6 B per cell-step with alive masks
        assert per_cell_step <= 72 * 2 / math.sqrt(steps)


def test_checkpointed_gradients_are_bitwise_equal():
    model = NCA(NCAConfig(hidden=32, precision="ieee"), backend="triton").to(DEVICE)
    torch.nn.init.normal_(model.w2.weight, std=0.1)
    x0 = model.seed_state(2, 5, 6)
    grads = []
    for checkpoint in (None, "sqrt", 3):
        model.zero_grad()
        x = x0.clone().requires_grad_()
        model(x, 10, seed=2, checkpoint=checkpoint).pow(2).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters()])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


def test_grid_too_large_fails_before_launching(monkeypatch):
    from nca_fast import functional, resources

    model = NCA(NCAConfig(hidden=32, precision="ieee"), backend="triton").to(DEVICE)
    x = model.seed_state(1, 64, 64).requires_grad_()
    launched = []
    monkeypatch.setattr(functional._Steps, "fwd", lambda *a, **k: launched.append(1))
    monkeypatch.setattr(resources, "device_memory_bytes", lambda device: 10 * 2**20)  # 10 MiB
    with pytest.raises(torch.cuda.OutOfMemoryError, match="checkpoint='sqrt'"):
        model(x, 100, seed=0)
    assert not launched
    # the estimate is what the design keeps: 99 saved states of 64 B + 2 B per cell, and more
    need = resources.triton_rollout_bytes((1, 16, 64, 64), 100, 1, 3, True)
    assert need >= 99 * 66 * 64 * 64
    sqrt = resources.triton_rollout_bytes((1, 16, 64, 64), 100, 10, 3, True)
    assert sqrt < need / 3
    # the design's target: 1024 x 1024, 1,000 steps, checkpoint="sqrt" (segment 32) under 40 GB
    assert resources.triton_rollout_bytes((1, 16, 1024, 1024), 1000, 32, 3, True) < 40e9


def test_no_grad_rollout_keeps_no_states():
    model = NCA(NCAConfig(hidden=32, precision="ieee"), backend="triton").to(DEVICE)
    x = model.seed_state(1, 4, 4)
    with torch.no_grad():
        a = model(x, 5, seed=3)
    b = model(x.requires_grad_(), 5, seed=3)
    assert torch.equal(a, b.detach())


def test_a_forward_without_gradients_is_charged_the_forward_only(monkeypatch):
    """1 x 16 x 16384^2 for 4 steps without gradients: ~49 GiB, accepted on an 80 GiB card; the
    backward's scratch (~210 GiB more) is charged only when a gradient will be asked for."""
    from nca_fast import resources

    x = torch.empty((1, 16, 16384, 16384), device="meta")
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(resources, "device_memory_bytes", lambda device: free["bytes"])
    resources.check_fits(x, 4, 4, 3, True, grad=False)
    forward = resources.triton_rollout_bytes(tuple(x.shape), 4, 4, 3, True, grad=False)
    assert 48 * 2**30 < forward < 56 * 2**30
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"needs about \d+\.\d GiB"):
        resources.check_fits(x, 4, 4, 3, True, grad=True)
    free["bytes"] = 40 * 2**30                     # where it cannot fit: refused, with the estimate
    with pytest.raises(torch.cuda.OutOfMemoryError, match=f"needs about {forward / 2**30:.1f} GiB"):
        resources.check_fits(x, 4, 4, 3, True, grad=False)


def test_the_layer_checks_a_forward_without_gradients_as_a_forward(monkeypatch):
    """Through the op's entry point: under no_grad the estimate has no backward in it."""
    from nca_fast import resources

    seen = []
    real = resources.triton_rollout_bytes
    monkeypatch.setattr(resources, "device_memory_bytes", lambda device: 2**40)
    monkeypatch.setattr(resources, "triton_rollout_bytes",
                        lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    model = NCA(NCAConfig(hidden=32, precision="ieee"), backend="triton").to(DEVICE)
    x = model.seed_state(1, 4, 4)
    with torch.no_grad():
        model(x, 2, seed=3)
    model(x.requires_grad_(), 2, seed=3)
    assert seen == [False, True]
