"""Side-by-side CPU timing: nca_fast's torch backend against a plain PyTorch eager port.

    python -m bench.cpu_speed [--repeats 7] [--steps 64] [--batch 8] [--size 72] [--threads N]
                              [--scenario alive|grow|grown]

The eager port (``bench.eager.EagerNCA``, the benchmark suite's baseline) is the style of
the common PyTorch NCA ports: NCHW, perception by ``F.conv2d(groups=C)`` with the filters
repeated per channel, two ``nn.Conv2d`` 1x1 layers, ``torch.rand`` update mask,
``F.max_pool2d`` alive masks. Both run the article's configuration
from the same state and weights. Timing is ``bench.timing.time_interleaved``: rounds of at
least 100 ms in which the two take turns, so that load from other processes on the machine hits
both alike; the figures are medians over the rounds, with the spread (min..max), in wall-clock
and in process CPU time (CPU time is less sensitive to other processes; spin-waiting threads
count in it).

Modes: ``forward`` is a 64-step rollout under ``torch.no_grad()``; ``train`` is one training
iteration: the rollout with gradients, MSE loss on RGBA, backward, Adam step.

Scenarios: ``alive`` (default) starts from a fully alive random grid with small random weights:
the worst case for nca_fast, which only computes the cells that fire near live ones. ``grow``
starts from the seed with the published lizard model (../shared/data/distill/ex1_lizard.json),
as a training rollout of the article's first experiment does: the live region grows from one
cell. ``grown`` starts from the lizard grown for 128 steps, like a pool sample of the second
and third experiments.
"""
from __future__ import annotations

import os
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F

from bench.eager import EagerNCA
from bench.harness import Parser, UsageError, run_cli, split_list
from bench.runners import Weights
from bench.timing import time_interleaved
from nca_fast import NCA, NCAConfig, load_distill

DISTILL = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "distill"


def make_models(config: NCAConfig, seed: int = 0, distill=None):
    """The fast NCA and the eager port with the same weights: random (W2 non-zero, so cells
    change) or a published model's."""
    torch.manual_seed(seed)
    if distill is not None:
        fast = load_distill(distill, backend="torch")
    else:
        fast = NCA(config, backend="torch")
        with torch.no_grad():
            fast.w2.weight.normal_(0.0, 0.02)
            fast.w2.bias.normal_(0.0, 0.002)
    eager = EagerNCA(fast.config).load(Weights(*(p.detach().clone() for p in fast.weights())))
    return fast, eager


def live_state(config: NCAConfig, b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """A fully alive grid (alpha in [0.3, 1)): the worst case for skipping dead cells."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, config.channels, h, w, generator=g)
    x[:, config.alpha_channel] = 0.3 + 0.7 * x[:, config.alpha_channel]
    return x


def main(argv=None) -> int:
    ap = Parser(prog="python -m bench.cpu_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=72)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="forward,train")
    ap.add_argument("--scenario", choices=("alive", "grow", "grown"), default="alive")

    def parse():
        args = ap.parse_args(argv)
        for name in ("repeats", "steps", "batch", "size", "threads"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name}: expected a positive integer, got {v}")
        args.modes = split_list(args.modes, ("forward", "train"), "--modes")
        return args

    return run_cli("bench.cpu_speed", parse, run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = NCAConfig()
    if args.scenario in ("grow", "grown"):
        path = DISTILL / "ex1_lizard.json"
        if not path.is_file():
            print(f"error: --scenario {args.scenario} needs {path} (../shared absent)",
                  file=sys.stderr)
            return 2
        fast, eager = make_models(config, distill=path)
        x0 = fast.seed_state(args.batch, args.size, args.size)
        if args.scenario == "grown":
            with torch.no_grad():
                x0 = fast(x0, 128, seed=11)
    else:
        fast, eager = make_models(config)
        x0 = live_state(config, args.batch, args.size, args.size)
    target = torch.rand(args.batch, 4, args.size, args.size,
                        generator=torch.Generator().manual_seed(2))
    # A real Adam step, at a learning rate too small to change the workload between repeats.
    opt_fast = torch.optim.Adam(fast.parameters(), lr=1e-9)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=1e-9)
    steps = args.steps

    def fwd_eager():
        with torch.no_grad():
            eager(x0, steps)

    def fwd_fast():
        with torch.no_grad():
            fast(x0, steps, seed=7)

    def train_eager():
        opt_eager.zero_grad(set_to_none=True)
        y = eager(x0, steps)
        F.mse_loss(y[:, :4], target).backward()
        opt_eager.step()

    def train_fast():
        opt_fast.zero_grad(set_to_none=True)
        y = fast(x0, steps, seed=7)
        F.mse_loss(y[:, :4], target).backward()
        opt_fast.step()

    with torch.no_grad():
        y = fast(x0, steps, seed=7)
        alive = (F.max_pool2d(y[:, 3:4], 3, 1, 1) > 0.1).float().mean().item()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.batch} x {args.size}x{args.size}, C={config.channels}, hidden={config.hidden}, "
          f"{steps} steps, {args.repeats} interleaved repeats, scenario {args.scenario}; alive "
          f"fraction at the end {alive:.2f}; load average {os.getloadavg()[0]:.1f} before")
    pairs = {"forward": (fwd_eager, fwd_fast), "train": (train_eager, train_fast)}
    res = {mode: time_interleaved(dict(zip(("eager", "fast"), pairs[mode])), args.repeats, 1,
                                  "cpu")
           for mode in args.modes}
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    failed = [(m, p, t.error) for m in args.modes for p, t in res[m].items() if t.error is not None]
    if failed:
        print(f"bench.cpu_speed: failed: {failed}", file=sys.stderr)
        return 1
    print(f"{'mode':8} {'provider':14} {'wall s (min..max)':>24} {'cpu s':>8}")
    for mode in args.modes:
        for prov, name in (("eager", "torch eager"), ("fast", "nca_fast torch")):
            walls, cpus = res[mode][prov].times, res[mode][prov].cpu_times
            print(f"{mode:8} {name:14} {statistics.median(walls):8.3f} "
                  f"({min(walls):.3f}..{max(walls):.3f}) {statistics.median(cpus):8.3f}")
        ew, fw = res[mode]["eager"].times, res[mode]["fast"].times
        ec, fc = res[mode]["eager"].cpu_times, res[mode]["fast"].cpu_times
        pair = [a / b for a, b in zip(ew, fw)]
        print(f"{mode:8} speed-up: wall {statistics.median(ew) / statistics.median(fw):.2f}x "
              f"(per-pair median {statistics.median(pair):.2f}x, range "
              f"{min(pair):.2f}..{max(pair):.2f}), "
              f"cpu {statistics.median(ec) / statistics.median(fc):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
