"""The ``nca-fast`` command: ``grow`` a model into a video, ``train`` one, ``bench`` the kernels.

User mistakes (missing or corrupt files, bad options) print one line on stderr and exit with
status 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
from typing import List, Optional

from .config import ARTICLE_GRID

PROG = "nca-fast"
DEFAULT_MODEL = pathlib.Path(__file__).resolve().parent / "assets" / "default_model.safetensors"
# The shipped model grows its 24-cell flower (trained on a 32-cell grid): 40 cells frame it
# (assets/default_model.json, grow_hint). Other models get the article's grid.
DEFAULT_GROW_SIZE = 40
USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake of the user's: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors (usage line + message, exit) turned into one UsageError line."""

    def error(self, message):
        raise UsageError(message)


def _int_parser(minimum: int, expected: str, maximum: Optional[int] = None):
    """An argparse type: an integer in [minimum, maximum], else ``expected`` in the message."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive_int = _int_parser(1, "a positive integer")
_non_negative_int = _int_parser(0, "an integer >= 0")
_seed_int = _int_parser(0, "an integer in [0, 2**63)", 2**63 - 1)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < v <= 1000:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1000], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Growing Neural Cellular Automata: fused Triton kernels and a "
                               "PyTorch reference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("grow", help="grow a model from the seed and write the video and last frame",
                       description="Grow a saved (.safetensors) or Distill (.json) model from the "
                                   "one-cell seed; write the growth video (GIF, or MP4 by "
                                   "extension) and the final frame as a PNG with the same stem.")
    g.add_argument("--model", metavar="PATH",
                   help="model file: saved by nca_fast (.safetensors) or a Distill export "
                        "(ex*_NAME.json); default: the model shipped with the package")
    g.add_argument("--size", type=_positive_int, default=None,
                   help="grid side in cells (default: the grid the shipped model is drawn for, "
                        f"{DEFAULT_GROW_SIZE}, with no --model; 72, the article's, with one)")
    g.add_argument("--steps", type=_non_negative_int, default=96, help="NCA steps (96)")
    g.add_argument("--seed", type=_seed_int, default=0,
                   help="key of the update masks and of the damage circle (0)")
    g.add_argument("--out", default="growth.gif", metavar="PATH",
                   help="video to write, .gif or .mp4 (growth.gif); the last frame goes to "
                        "the same path with .png")
    g.add_argument("--damage", action="store_true",
                   help="erase a random circle halfway through, to watch regeneration")
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="auto: Triton kernels on CUDA, PyTorch elsewhere")
    g.add_argument("--device", default="auto",
                   help="torch device, e.g. cpu or cuda:0 (auto: cuda when available)")
    g.add_argument("--scale", type=_positive_int, default=None,
                   help="pixels per cell in the outputs (default: about 288 pixels a side)")
    g.add_argument("--fps", type=_positive_float, default=20.0, help="video frame rate (20)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    sub.add_parser("train", add_help=False, help="train a model (see: nca-fast train --help)")
    sub.add_parser("bench", add_help=False,
                   help="kernel throughput benchmark, from a source checkout "
                        "(see: nca-fast bench --help)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``nca-fast`` and ``python -m nca_fast``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # train and bench own their options: forward everything after the command untouched.
        if argv and argv[0] == "train":
            return _forward("nca_fast.train", "cli_main", argv[1:], "nca-fast train")
        if argv and argv[0] == "bench":
            return _run_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return grow(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- grow
def grow(args: argparse.Namespace) -> int:
    """The ``grow`` command: seed -> ``args.steps`` steps -> video + final PNG."""
    import torch

    from . import damage
    from .backends.interface import triton_usable
    from .devices import resolve_device
    from .files import writable_folder
    from .media import mp4_missing, write_png, write_video
    from .model import load_any
    from .resources import MemoryLimitError, check

    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".gif", ".mp4"):
        raise UsageError(f"--out {out}: expected a .gif or .mp4 file name")
    png = out.with_suffix(".png")
    model_path = pathlib.Path(args.model) if args.model else DEFAULT_MODEL
    if args.model is None and not model_path.exists():
        raise UsageError(f"no --model given and the default model is not in this install "
                         f"({model_path}); pass --model PATH (a .safetensors saved by nca_fast "
                         f"or a Distill ex*_NAME.json)")
    try:
        model = load_any(model_path, backend=args.backend)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {e}") from None
    if args.backend == "triton" and not triton_usable(device):
        raise UsageError(f"--backend triton cannot run on {device.type} here: use a CUDA device, "
                         f"--backend torch, or set TRITON_INTERPRET=1 (Triton's slow CPU "
                         f"interpreter)")
    model = model.to(device)
    # Fail before the rollout, not after it, if the video cannot be written.
    if out.suffix.lower() == ".mp4" and mp4_missing():
        raise UsageError(f"--out {out}: MP4 {mp4_missing()} (or write a .gif)")
    if args.size is None:
        args.size = DEFAULT_GROW_SIZE if args.model is None else ARTICLE_GRID
    scale = args.scale if args.scale is not None else max(1, 288 // args.size)
    try:
        check(grow_memory(model, args.size, args.steps, scale, args.backend, device), device,
              "growing")
    except MemoryLimitError as e:
        raise UsageError(str(e)) from None
    try:
        writable_folder(out.parent)
    except OSError as e:
        raise UsageError(f"--out {out}: {e}") from None

    x = model.seed_state(1, args.size, args.size)
    frames = [x[0].cpu()]
    damage_at = args.steps // 2 if args.damage else None
    with torch.no_grad(), _progress(args.steps, args.quiet) as bar:
        for t in range(args.steps):
            if t == damage_at:
                centre, radius = damage.seeded_circle(args.seed)
                x = x * damage.keep_mask(args.size, args.size, centre, radius, device=device)
            # Step t's own masks: the last frame is the state of model(x, steps, seed=seed).
            x = model(x, 1, seed=args.seed, first_step=t)
            frames.append(x[0].cpu())
            bar.update(1)

    try:
        write_video(frames, out, fps=args.fps, scale=scale)
        write_png(frames[-1], png, scale=scale)
    except (ImportError, OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if not args.quiet:
        alive = int((frames[-1][3] > 0.1).sum())
        print(f"wrote {out} ({len(frames)} frames) and {png}; {alive} live cells at step "
              f"{args.steps}", file=sys.stderr)
    return 0


def grow_memory(model, size: int, steps: int, scale: int, backend: str, device):
    """The large buffers of ``grow`` (resources.Term): the rollout on ``device``, and on the
    host every state kept for the video and every rendered frame (with its stacked copy)."""
    from .resources import DEVICE, HOST, Term, rollout_bytes

    cfg = model.config
    n = steps + 1
    side = size * scale
    backend = model.resolve_backend(device) if backend == "auto" else backend
    work = rollout_bytes(backend, size * size, cfg.channels, cfg.hidden, cfg.num_filters, 1,
                         None, cfg.alive_masking, grad=False) + 2 * cfg.channels * size * size * 4
    return [
        Term(f"--size {size}", f"the rollout on a {size} x {size} grid", work, DEVICE),
        Term(f"--size {size} --steps {steps}", f"the {n} states kept for the video",
             n * cfg.channels * size * size * 4, HOST),
        Term(f"--scale {scale} --size {size} --steps {steps}",
             f"{n} rendered frames of {side} x {side} pixels", 2 * n * side * side * 3, HOST),
    ]


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, quiet: bool):
    if quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="growing", unit="step", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- train, bench
def _forward(module: str, func: str, argv: List[str], what: str) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise UsageError(f"{what} is not available: this install has no {module} module")
        raise UsageError(f"{what} is not available: importing {module} failed: {e}") from None
    except ImportError as e:
        raise UsageError(f"{what} is not available: importing {module} failed: {e}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise UsageError(f"{what} is not available: {module} has no {func}()")
    rc = fn(argv)
    return 0 if rc is None else int(rc)


def _repo_root() -> pathlib.Path:
    # bench/ lives beside the package in a source checkout and is not shipped in the wheel.
    return pathlib.Path(__file__).resolve().parent.parent


def _run_bench(argv: List[str]) -> int:
    root = _repo_root()
    if not (root / "bench" / "throughput.py").is_file():
        raise UsageError("nca-fast bench needs a source checkout: bench/throughput.py is not "
                         f"installed (looked in {root / 'bench'}); run it from a clone of the "
                         "repository installed with pip install -e .")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return _forward("bench.throughput", "main", argv, "nca-fast bench")


if __name__ == "__main__":  # pragma: no cover - python -m nca_fast.cli
    sys.exit(main())
