"""``nca-fast selftest`` (``python -m nca_fast.selftest``): do the fused kernels work here?

On the user's device: the Triton backend's forward and backward at two small shapes against the
float64 reference on the CPU, then a forward and a training step on a 1024 x 1024 grid timed
against a plain PyTorch eager port, and one verdict line with the errors and the cell-steps per
second. Under a minute on a GPU (most of it the kernels' first compiles).

The two checks: (1) the default model (C = 16, hidden 128, Sobel bank, tf32) on an even grid,
every cell alive with its alpha held at 1 (alive masking runs, but no rounding can move a cell
across the threshold); (2) an odd-sized grid with sparse alpha, alive masking and fire rate 0.5,
hidden 32 in "ieee" (fp32 operands: the result is the reference's to ~1e-6).

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``; this module starts
itself again with it set when it is not) at tiny sizes: it checks the install and the kernels'
logic, not their speed, and says so. Exit status: 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

# Largest error allowed, relative to the largest magnitude of the reference's tensor, per
# operand precision of the dense layers (state, gradients).
LIMITS = {"ieee": (1e-4, 1e-4), "tf32": (2e-2, 5e-2), "bf16": (8e-2, 2e-1)}
SEED = 5


def _sizes(cuda: bool) -> dict:
    if cuda:
        return dict(even=(2, 32, 48), odd=(1, 37, 29), check_steps=6, grid=1024,
                    fwd_steps=16, train_steps=8, repeats=3)
    return dict(even=(1, 8, 12), odd=(1, 7, 5), check_steps=3, grid=16, fwd_steps=2,
                train_steps=2, repeats=1)


def _weights(cfg, generator, dtype=torch.float32):
    c, f, hid = cfg.channels, cfg.num_filters, cfg.hidden
    w1 = torch.randn(hid, f * c, generator=generator, dtype=dtype) / (f * c) ** 0.5
    b1 = torch.randn(hid, generator=generator, dtype=dtype) * 0.1
    w2 = torch.randn(c, hid, generator=generator, dtype=dtype) * (0.5 / hid ** 0.5)
    b2 = torch.randn(c, generator=generator, dtype=dtype) * 0.05
    return [w1, b1, w2, b2]


def _case(cfg, shape, all_alive: bool, seed: int):
    """A state and weights: sparse alpha, or alpha 1 everywhere and held there (its rows of W2
    and b2 zero)."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    x = torch.rand(b, cfg.channels, h, w, generator=g)
    w1, b1, w2, b2 = _weights(cfg, g)
    a = cfg.alpha_channel
    if all_alive:
        x[:, a] = 1.0
        w2[a] = 0.0
        b2[a] = 0.0
    else:
        alpha = torch.rand(b, h, w, generator=g)
        x[:, a] = torch.where(alpha > 0.55, alpha, torch.zeros_like(alpha))
    return [x, w1, b1, w2, b2]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_against_reference(cfg, shape, steps: int, device, all_alive: bool, seed: int):
    """(state error, gradient error): the Triton backend on ``device`` against the float64
    reference on the CPU, forward and the gradients of x and every weight."""
    from . import reference
    from .config import filter_tensor
    from .functional import rollout

    tensors = _case(cfg, shape, all_alive, seed)
    probe = torch.randn(shape[0], cfg.channels, *shape[1:],
                        generator=torch.Generator().manual_seed(seed + 1))
    ours = [t.to(device, copy=True).requires_grad_() for t in tensors]
    out = rollout(*ours, filter_tensor(cfg, device=device), seed=seed, steps=steps,
                  fire_rate=cfg.fire_rate, alive_threshold=cfg.alive_threshold,
                  alpha_channel=cfg.alpha_channel, padding=cfg.padding,
                  precision=cfg.precision)
    (out * probe.to(device)).sum().backward()
    theirs = [t.to(torch.float64, copy=True).requires_grad_() for t in tensors]
    ref = reference.rollout(*theirs, cfg, steps, seed)
    (ref * probe.double()).sum().backward()
    state = _relative(out, ref)
    grad = max(_relative(a.grad, b.grad) for a, b in zip(ours, theirs))
    return state, grad


# ------------------------------------------------------------------------------ timing
def eager_port(x, w1, b1, w2, b2, filters, steps: int, fire_rate: float, threshold: float):
    """The usual PyTorch port of the article's step (depthwise perception, 1x1 convolutions,
    a random update mask, the alive max-pool), as users run it: the speed to beat."""
    c = x.shape[1]
    bank = filters.repeat(c, 1, 1).unsqueeze(1)
    for _ in range(steps):
        pre = F.max_pool2d(x[:, 3:4], 3, stride=1, padding=1) > threshold
        p = F.conv2d(F.pad(x, (1, 1, 1, 1)), bank, groups=c)
        dx = F.conv2d(F.relu(F.conv2d(p, w1[:, :, None, None], b1)), w2[:, :, None, None], b2)
        fire = torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < fire_rate
        x = x + dx * fire
        post = F.max_pool2d(x[:, 3:4], 3, stride=1, padding=1) > threshold
        x = x * (pre & post)
    return x


def _timed(fn: Callable[[], None], device, repeats: int) -> float:
    """Median seconds of ``fn`` after one untimed call (compiles, allocator warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_against_eager(cfg, grid: int, fwd_steps: int, train_steps: int, device,
                       repeats: int) -> dict:
    """Cell-steps per second of the Triton backend and of the eager port on a 1 x grid x grid
    state grown from the seed's neighbourhood: forward (no gradient), and a training step
    (forward, a loss on RGBA, backward into every weight)."""
    from .config import filter_tensor
    from .functional import rollout

    g = torch.Generator().manual_seed(SEED)
    x = (torch.rand(1, cfg.channels, grid, grid, generator=g) * 0.5).to(device)
    x[:, cfg.alpha_channel] = 1.0
    ws = [t.to(device).requires_grad_() for t in _weights(cfg, g)]
    filt = filter_tensor(cfg, device=device)
    kw = dict(fire_rate=cfg.fire_rate, alive_threshold=cfg.alive_threshold,
              alpha_channel=cfg.alpha_channel, precision=cfg.precision)

    def fused(steps):
        return rollout(x, *ws, filt, seed=SEED, steps=steps, **kw)

    def eager(steps):
        return eager_port(x, *ws, filt, steps, cfg.fire_rate, cfg.alive_threshold)

    def train(run, steps):
        def step():
            loss = run(steps)[:, :4].square().mean()
            torch.autograd.grad(loss, ws)
        return step

    def forward(run, steps):
        def step():
            with torch.no_grad():
                run(steps)
        return step

    cells = grid * grid
    out = {}
    for mode, steps, make in (("forward", fwd_steps, forward), ("train", train_steps, train)):
        for name, run in (("fused", fused), ("eager", eager)):
            seconds = _timed(make(run, steps), device, repeats)
            out[(mode, name)] = cells * steps / seconds
    return out


# ------------------------------------------------------------------------------ the verdict
def run(device: torch.device, log=print) -> bool:
    from .config import NCAConfig

    cuda = device.type == "cuda"
    sizes = _sizes(cuda)
    where = (torch.cuda.get_device_name(device) if cuda else
             "CPU: Triton's interpreter at tiny sizes (checks the kernels' logic, not their "
             "speed)")
    log(f"selftest: {where}; torch {torch.__version__}, triton {_triton_version()}")
    default, odd = NCAConfig(), NCAConfig(hidden=32, precision="ieee")
    ok = True
    errors: List[str] = []
    for name, cfg, shape, all_alive in (("default tf32", default, sizes["even"], True),
                                        ("odd ieee", odd, sizes["odd"], False)):
        try:
            state, grad = check_against_reference(cfg, shape, sizes["check_steps"], device,
                                                  all_alive, SEED)
        except Exception as e:            # the verdict names it; the traceback goes above
            traceback.print_exc()
            log(f"selftest: {name} {'x'.join(map(str, shape))}: FAILED to run: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            ok = False
            errors.append(f"{name} did not run")
            continue
        lim = LIMITS[cfg.precision]
        passed = state <= lim[0] and grad <= lim[1]
        ok &= passed
        log(f"selftest: {name} {'x'.join(map(str, shape))}, {sizes['check_steps']} steps: "
            f"state error {state:.1e} (limit {lim[0]:.0e}), gradients {grad:.1e} "
            f"(limit {lim[1]:.0e}): {'ok' if passed else 'FAILED'}")
        errors.append(f"{name} err {state:.1e}/{grad:.1e}")
    speed = ""
    if ok:
        try:
            t = time_against_eager(default, sizes["grid"], sizes["fwd_steps"],
                                   sizes["train_steps"], device, sizes["repeats"])
            speed = "; ".join(
                f"{sizes['grid']}^2 {mode} {t[(mode, 'fused')]:.3g} cell-steps/s "
                f"({t[(mode, 'fused')] / t[(mode, 'eager')]:.2f}x eager)"
                for mode in ("forward", "train"))
        except Exception as e:
            traceback.print_exc()
            ok = False
            speed = f"timing FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    verdict = "PASS" if ok else "FAIL"
    tail = "" if cuda else " [CPU interpreter: not kernel speed]"
    log(f"selftest: {verdict} | {device} | {', '.join(errors)}"
        + (f" | {speed}" if speed else "") + tail)
    return ok


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nca-fast selftest",
        description="Check the fused kernels on this machine's device against the float64 "
                    "reference and time them against a plain PyTorch port (under a minute on "
                    "a GPU; on a CPU, the Triton interpreter at tiny sizes).")
    parser.add_argument("--device", default="auto",
                        help="torch device (auto: cuda when available, else the CPU)")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available to torch")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: expected cuda or cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # triton reads TRITON_INTERPRET when the kernels are defined: start afresh with it set
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "nca_fast.selftest",
                               "--device", "cpu"], env=env).returncode
    torch.manual_seed(SEED)
    return 0 if run(device) else 1


if __name__ == "__main__":
    sys.exit(main())
