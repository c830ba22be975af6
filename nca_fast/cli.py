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
from .media import ASSETS
from .usage import USAGE_ERROR, Parser, UsageError

PROG = "nca-fast"
DEFAULT_MODEL = ASSETS / "default_model.safetensors"
# The shipped model grows its 24-cell flower (trained on a 32-cell grid): 40 cells frame it
# (assets/default_model.json, grow_hint). Other models get the article's grid.
DEFAULT_GROW_SIZE = 40


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
    parser = Parser(
        prog=PROG, description="Growing Neural Cellular Automata: fused Triton kernels and a "
                               "PyTorch reference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("grow", help="grow a model from the seed and write the video and last frame",
                       description="Grow a saved (.safetensors) or Distill (.json) model from the "
                                   "one-cell seed; write the growth video (GIF, or MP4 by "
                                   "extension) and the final frame as a PNG with the same stem.")
    from .model import shipped_models
    from .training import stability

    shipped = ", ".join(sorted(shipped_models()))
    g.add_argument("--model", metavar="PATH|NAME",
                   help="model file: saved by nca_fast (.safetensors) or a Distill export "
                        f"(ex*_NAME.json), or the name of a model shipped with the package "
                        f"({shipped}); default: flower")
    g.add_argument("--size", type=_positive_int, default=None,
                   help="grid side in cells (default: the grid the model was trained on when "
                        f"its file says; {DEFAULT_GROW_SIZE} for the default model; else 72, "
                        "the article's)")
    g.add_argument("--steps", type=_non_negative_int, default=None,
                   help="NCA steps (default: 96, or twice the model's longest training rollout "
                        "when its file says)")
    g.add_argument("--target", metavar="PNG", default=None,
                   help="target image to score the growth against (default: the one the model "
                        "was trained on, when its file names it)")
    g.add_argument("--seed", type=_seed_int, default=stability.SEED,
                   help=f"key of the update masks and of the damage circle ({stability.SEED}: "
                        "the key of the trainer's long-horizon score, so that the score printed "
                        "here is the one in the model's record)")
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

    e = sub.add_parser("export", help="write a model's standalone web page (WebGL2)",
                       description="Write one self-contained HTML file that runs the model on the "
                                   "viewer's GPU (WebGL2): it grows from the seed, regrows where "
                                   "the pointer erases it. No network access, no external files.")
    e.add_argument("model", metavar="MODEL",
                   help="model file (.safetensors saved by nca_fast, or a Distill ex*_NAME.json) "
                        f"or the name of a shipped model ({shipped})")
    e.add_argument("--html", required=True, metavar="OUT.html", help="the page to write")
    e.add_argument("--size", type=_int_parser(3, "an integer in [3, 8192]", 8192), default=None,
                   help="grid side in cells (default: as grow; the page's #size=N overrides it)")

    sub.add_parser("train", add_help=False, help="train a model (see: nca-fast train --help)")
    sub.add_parser("selftest", add_help=False,
                   help="check the fused kernels on this machine against the reference and time "
                        "them (under a minute on a GPU; see: nca-fast selftest --help)")
    sub.add_parser("bench", add_help=False,
                   help="kernel throughput benchmark, from a source checkout "
                        "(see: nca-fast bench --help)")
    return parser


def resolve_model(arg: Optional[str], option: str = "--model") -> pathlib.Path:
    """``--model`` (or ``option``): a file, or the name of a shipped model (a file of that name
    wins)."""
    from .model import shipped_models

    if arg is None:
        return DEFAULT_MODEL
    path = pathlib.Path(arg)
    named = shipped_models()
    if not path.exists() and arg in named:
        return named[arg]
    if not path.exists() and not path.suffix:
        raise UsageError(f"{option} {arg}: no such file, and not the name of a shipped model ("
                         + ", ".join(sorted(named)) + ")")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``nca-fast`` and ``python -m nca_fast``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # train, bench and selftest own their options: forward everything after the command.
        if argv and argv[0] == "train":
            return _forward("nca_fast.train", "cli_main", argv[1:], "nca-fast train")
        if argv and argv[0] == "bench":
            return _run_bench(argv[1:])
        if argv and argv[0] == "selftest":
            return _forward("nca_fast.selftest", "main", argv[1:], "nca-fast selftest")
        args = build_parser().parse_args(argv)
        return export(args) if args.command == "export" else grow(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- export
def export(args: argparse.Namespace) -> int:
    """The ``export`` command: the model's web page (``nca_fast.export``)."""
    from .export import export_html

    out = pathlib.Path(args.html)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--html {out}: expected a .html file name")
    if out.is_dir():
        raise UsageError(f"--html {out}: is a folder; expected a .html file name")
    model_path = resolve_model(args.model, "MODEL")
    name = "flower" if model_path == DEFAULT_MODEL else model_path.stem
    try:
        written = export_html(model_path, out, size=args.size, name=name)
    except ValueError as e:
        # The model file's own errors name the file; the page's limits name the config field.
        raise UsageError(str(e) if str(e).startswith(str(model_path)) else
                         f"MODEL {args.model}: {e}") from None
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--html {out}: {e}") from None
    print(f"wrote {written} ({written.stat().st_size // 1024} KB): open it in a browser",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- grow
def grow(args: argparse.Namespace) -> int:
    """The ``grow`` command: seed -> ``args.steps`` steps -> video + final PNG."""
    import torch

    from .backends.interface import triton_usable
    from .devices import resolve_device
    from .files import writable_folder
    from .media import mp4_missing, write_png, write_video
    from .model import load_any
    from .resources import MemoryLimitError, check
    from .training import damage, stability

    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".gif", ".mp4"):
        raise UsageError(f"--out {out}: expected a .gif or .mp4 file name")
    png = out.with_suffix(".png")
    model_path = resolve_model(args.model)
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
    facts = stability.model_facts(model_path)
    hint = facts.get("grow_hint") if isinstance(facts.get("grow_hint"), dict) else {}
    if args.size is None:
        args.size = hint.get("size") or facts.get("grid") or (
            DEFAULT_GROW_SIZE if args.model is None else ARTICLE_GRID)
    longest = facts.get("longest_rollout")
    if args.steps is None:
        args.steps = hint.get("steps") or (2 * int(longest) if longest else 96)
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
    target = _score_target(args, facts, model_path)      # after the memory check: size^2 pixels

    x = model.seed_state(1, args.size, args.size)
    frames = [x[0].cpu()]
    damage_at = args.steps // 2 if args.damage else None
    marks, base = _score_steps(args.steps, longest)
    threshold = model.config.alive_threshold or stability.LIVE_THRESHOLD
    t_live = stability.target_live_cells(target, threshold) if target is not None else None
    scores = []
    with torch.no_grad(), _progress(args.steps, args.quiet) as bar:
        for t in range(args.steps):
            if t == damage_at:
                centre, radius = damage.seeded_circle(args.seed)
                x = x * damage.keep_mask(args.size, args.size, centre, radius, device=device)
            # Step t's own masks: the last frame is the state of model(x, steps, seed=seed).
            x = model(x, 1, seed=args.seed, first_step=t)
            frames.append(x[0].cpu())
            if t + 1 in marks:
                err = None if target is None else \
                    float(stability.mse(x, target.to(x.device))[0])
                scores.append(stability.HorizonPoint(
                    marks[t + 1], t + 1, err, int(stability.live_cells(x, threshold)[0]), t_live))
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
        if scores:
            what = (f"x the longest training rollout, {base} steps" if longest else
                    f"x {base} steps (steps / 10: the model file has no training record)")
            against = "" if target is not None else " (no target known: live cells only; " \
                "--target PNG scores against one)"
            print(f"long-horizon score, update-mask seed {args.seed}; horizon in {what}"
                  f"{against}:\n{stability.format_rows(scores)}")
    return 0


def _score_steps(steps: int, longest):
    """Steps of ``grow``'s score -> their multiple of the base horizon: 1x, 2x, 5x, 10x the
    model's longest training rollout that fit in ``steps`` (and ``steps`` itself), or of
    steps / 10 for a model without a training record."""
    from .training.stability import MULTIPLES

    if steps < 1:
        return {}, 0
    base = int(longest) if longest else max(1, steps // 10)
    marks = {m * base: m for m in MULTIPLES if m * base <= steps}
    if steps not in marks:
        marks[steps] = round(steps / base, 2)
    return marks, base


def _score_target(args, facts: dict, model_path: pathlib.Path):
    """The target image on the grow grid (4 x size x size), or None: ``--target``, else the
    image the model's training metadata names, fitted as in training and padded to the grid."""
    import torch.nn.functional as F

    from .media import load_target
    from .training.stability import resolve_target

    if args.target is not None:
        image = pathlib.Path(args.target)
        if not image.is_file():
            raise UsageError(f"--target {image}: no such file")
    else:
        image = resolve_target(facts.get("target"), model_path)
        if image is None:
            return None
    size, pad = facts.get("size"), facts.get("pad")
    if not (isinstance(size, int) and isinstance(pad, int)):
        # No training record: the article's geometry (40 cells in a 72 grid) scaled to --size.
        size = max(1, round(args.size * 40 / ARTICLE_GRID))
        pad = (args.size - size) // 2
    grid = size + 2 * pad
    if grid > args.size:
        if args.target is not None:
            raise UsageError(f"--target: the model was trained with the target in {size} cells "
                             f"on a {grid} grid; grow on --size {grid} or more to score it")
        return None
    try:
        t = load_target(image, size, pad)
    except (OSError, ValueError) as e:
        raise UsageError(f"--target {image}: {e}") from None
    extra = args.size - grid
    return F.pad(t, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))


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
        Term(f"--size {size}", "the score's target, RGBA on the grid", 4 * size * size * 4, HOST),
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
