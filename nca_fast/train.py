"""``nca-fast train``: the command line and the Python entry point of training.

Run ``nca-fast train --help`` (or ``python -m nca_fast.train --help``); multi-GPU:
``torchrun --nproc_per_node=N -m nca_fast.train ...``. The parts: ``nca_fast.training.options``
(what a run is), ``.run_folder`` (its files), ``.trainer`` (the steps), ``.distributed`` (DDP).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import shlex
import sys
from typing import Callable, Optional, Sequence

import torch

from .backends import BACKENDS
from .config import FILTER_BANKS, LEARN_FILTERS, PADDINGS, PRECISIONS
from .files import remove_stale_temporaries, writable_folder
from .media import mp4_missing
from .training.distributed import init_distributed
from .model import shipped_models
from .training.options import DEVICES, EXPERIMENTS, PRESETS, RESUMABLE, TrainOptions, run_plan
from .training.run_folder import (CheckpointError, RunFolderBusy, RunFolderLock, append_text,
                                  default_out, read_run_options, write_config)
from .training.trainer import GracefulStop, Trainer, TrainingInterrupted, TrainResult
from .usage import USAGE_ERROR, Parser, UsageError


def train(options: TrainOptions, *, run_dir=None, resume: bool = False, progress: bool = False,
          log_every: int = 0, on_step: Optional[Callable[[Trainer], None]] = None,
          command: Optional[str] = None) -> TrainResult:
    """Train a model; write the checkpoint and outputs to ``run_dir`` (or ``options.out``).

    resume: continue from ``run_dir``'s checkpoint (its ``config.json`` must match ``options``
    except steps and the output settings). on_step: called after every step (tests use it to
    interrupt a run). Under torchrun (RANK / WORLD_SIZE set) this joins the process group and
    trains with DistributedDataParallel. Returns the model moved to the CPU.
    """
    if run_dir is None:
        run_dir = options.out or default_out(options)
    run_dir = pathlib.Path(run_dir)
    runner = _Runner(options, run_dir, resume, progress, log_every, command)
    runner.setup()
    return runner.finish(on_step)


# =========================================================================== command line
def _checkpoint_arg(text: str):
    if text in ("none", "None"):
        return None
    if text == "sqrt":
        return "sqrt"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none, sqrt or a segment length, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive segment length, got {v}")
    return v


def build_parser(prog: str = "nca-fast train") -> argparse.ArgumentParser:
    p = Parser(prog=prog, argument_default=argparse.SUPPRESS,
                description="Train a Growing-NCA on a target image (the Distill article's "
                            "recipe). Outputs go to one run folder: model.safetensors, "
                            "checkpoint.safetensors, config.json, command.txt, loss.png, "
                            "loss.csv, stability.csv, stability.png, events.csv, growth.gif "
                            "(regenerate.gif), final.png.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="defaults for: article (8000 steps, 72x72), quick "
      "(2-core CPU, < 10 min), photo (a 64-cell photograph from one cell, the shipped one unless "
      "--target), hires (large grids: --size 128 and up), hires512 / hires1024 (one "
      "GPU, from a smaller model given with --init)")
    a("--target", help="target image: any RGB or RGBA image Pillow reads (PNG, JPEG, ...; 8 or "
      "16 bit, colour or gray), fitted in --size cells keeping its aspect ratio (Lanczos "
      "resampling; a larger photo is reduced without a full-size copy) and centred; transparent "
      "pixels are dead cells, an opaque image a full square of live cells, which fills the grid "
      "with --pad 0 (--preset photo); the loss is MSE over premultiplied RGBA, so the model "
      "must also keep the padding dead. Default: the project's own flower drawing")
    a("--size", type=int, help="cells the target is fitted in (default 40)")
    a("--pad", type=int, help="dead cells around the target on each side (default 0.4 * size; "
      "0: the target is the whole grid)")
    a("--experiment", choices=EXPERIMENTS, help="grow (from the seed), persist (sample pool), "
      "regenerate (pool + damage); default persist")
    a("--steps", type=int, help="optimizer steps (default 8000)")
    a("--batch", type=int, help="global batch (default 8)")
    a("--pool-size", type=int, help="sample pool (default 1024)")
    a("--rollout", type=int, nargs=2, metavar=("MIN", "MAX"),
      help="rollout length uniform in [MIN, MAX) (default [64, 96) scaled by grid / 72)")
    a("--curriculum", type=float, help="fraction of the steps over which rollouts ramp from 1/4 "
      "to full length (default 0)")
    a("--lr", type=float, help="Adam learning rate (default 2e-3)")
    a("--lr-drop-at", type=int, help="step of the x0.1 drop (default 2000 * steps / 8000, at "
      "most 2000)")
    a("--lr-drop-factor", type=float, help="default 0.1")
    a("--replace", type=int, help="highest-loss samples reset to the seed per batch (default 1)")
    a("--damage", type=int, help="lowest-loss samples damaged per batch, regenerate (default 3)")
    a("--loss-levels", type=int, help="pyramid levels of the loss (default 1: plain MSE)")
    a("--channels", type=int, help="state channels (default 16)")
    a("--hidden", type=int, help="hidden units (default 128)")
    a("--fire-rate", type=float, help="default 0.5")
    a("--precision", choices=PRECISIONS, help="dense-layer operands in the Triton kernels "
      "(default tf32; the torch backend computes in fp32)")
    a("--filters", choices=tuple(FILTER_BANKS), help="perception filter bank (default sobel; "
      "with --learn-filters, the learned filters' initial taps)")
    a("--learn-filters", choices=tuple(v for v in LEARN_FILTERS if v), help="learn the "
      "perception filters, starting from --filters: shared (one bank of 3x3 filters for every "
      "channel) or depthwise (a 3x3 filter per filter and channel); default: a fixed bank")
    a("--filter-bias", action="store_true", help="a learned bias on each perception value "
      "(with --learn-filters depthwise only)")
    a("--padding", choices=PADDINGS, help="what a neighbour across the grid's edge is: zeros "
      "(an empty, dead cell), circular (the opposite edge: a torus), replicate (the nearest "
      "edge cell) or reflect (the cell mirrored about the edge cell); default zeros. The alive "
      "mask is the same under zeros, replicate and reflect (docs/MODEL.md, \"Paddings\"), and "
      "a dead edge cell is all zeros: with a dead border (--pad > 0) the three differ only "
      "where the model grows into the border, which the loss penalises")
    a("--no-last-bias", dest="last_bias", action="store_false", help="no bias on the second "
      "dense layer (the update is W2 h alone, as in Self-Organising Textures)")
    a("--init", metavar="MODEL", help="start from this model's weights (.safetensors, a "
      "Distill JSON, or the name of a shipped model) instead of a fresh initialisation: train "
      "small, then larger from it")
    a("--state-bound", type=float, help="a step whose states exceed this magnitude (or whose "
      "loss or gradients are not finite) is not applied; its pool states are reseeded "
      "(default 1e3)")
    a("--overflow-loss", type=float, metavar="W", help="penalty weight on state values outside "
      "[-1, 1] (default 0: off)")
    a("--late-loss", type=float, metavar="F", help="continue each n-step rollout to a second "
      "length in [n+1, F*n] and average the losses at both: trains the pattern to stay (default "
      "0: off)")
    a("--reseed-runaway", type=float, metavar="R", help="reseed pool states with more than R x "
      "the target's live cells instead of writing them back (default 0: off)")
    a("--no-stability", dest="stability", action="store_false", help="do not grow the "
      "long-horizon score (10x the longest rollout) at each checkpoint (nor keep "
      "best.safetensors, the best model so far by that score)")
    a("--stop-after-dead", type=int, metavar="N", help="end the run after N checkpoints in a "
      "row whose growth from the seed died (0 live cells) or diverged (default 0: never)")
    a("--seed", type=int, help="seed of every random choice (default 0)")
    a("--backend", choices=BACKENDS, help="NCA backend (default auto)")
    a("--device", choices=DEVICES, help="default auto (cuda when available)")
    a("--checkpoint", type=_checkpoint_arg, help="activation checkpointing: none, sqrt or a "
      "segment length (saves memory, one extra forward)")
    a("--accumulate", type=int, help="micro-batches per step per process (default 1)")
    a("--save-every", type=int, help="steps between checkpoints (default 500)")
    a("--video-steps", type=int, help="length of the growth video (default 2 * rollout max)")
    a("--mp4", action="store_true", help="write MP4 videos instead of GIF (needs imageio-ffmpeg)")
    a("--threads", type=int, help="torch CPU threads")
    a("--out", help="run folder (default runs/EXPERIMENT-DATE)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint "
      "(only --steps and output options may change)")
    a("--dry-run", action="store_true", help="print the memory and time estimates of the run "
      "(for --device cuda even on a machine without one) and exit")
    a("--no-progress", action="store_true", help="no progress bar; log a line every "
      "--log-every steps instead")
    a("--log-every", type=int, help="steps between log lines (default 50 without a progress bar)")
    return p


def options_from_args(ns: argparse.Namespace) -> TrainOptions:
    """Merge defaults <- preset <- explicit options (or the resumed run's config)."""
    given = dict(vars(ns))
    for k in ("resume", "no_progress", "log_every", "preset", "dry_run"):
        given.pop(k, None)
    if "rollout" in given:
        given["rollout_min"], given["rollout_max"] = given.pop("rollout")
    resume = getattr(ns, "resume", None)
    if resume is not None:
        if getattr(ns, "preset", None):
            raise ValueError("--preset: not allowed with --resume (the run's config.json holds "
                             "its options)")
        if "out" in given and pathlib.Path(given["out"]) != pathlib.Path(resume):
            raise ValueError("--out: a resumed run writes to its own folder (the --resume one)")
        saved = read_run_options(resume)
        fixed = sorted(k for k in given if k not in RESUMABLE and k != "out")
        changed = [k for k in fixed if given[k] != getattr(saved, k)]
        if changed:
            raise ValueError(f"--resume: options {changed} differ from {resume}/config.json; "
                             "only --steps and output options may change")
        merged = saved.to_dict()
        merged.update({k: v for k, v in given.items() if k in RESUMABLE})
        merged["out"] = str(resume)
        return TrainOptions.from_dict(merged)
    merged = dict(PRESETS[ns.preset]) if getattr(ns, "preset", None) else {}
    merged.update(given)
    if merged.get("target") is not None:
        # config.json must still find the image when the run is resumed from another folder.
        merged["target"] = str(pathlib.Path(merged["target"]).expanduser().absolute())
    if merged.get("init") is not None:
        init = pathlib.Path(merged["init"]).expanduser()
        named = shipped_models()
        if not init.exists() and merged["init"] in named:   # a shipped model by name
            init = named[merged["init"]]
        merged["init"] = str(init.absolute())
    return TrainOptions(**merged)


def _as_flag(message: str) -> str:
    """A TrainOptions message ("pool_size: expected ...") as the flag's ("--pool-size: ...")."""
    name, sep, rest = message.partition(": ")
    if sep and name in {f.name for f in dataclasses.fields(TrainOptions)}:
        flag = "--rollout" if name in ("rollout_min", "rollout_max") else \
            "--" + name.replace("_", "-")
        return f"{flag}: {rest}"
    return message


def _command(argv: Sequence[str]) -> str:
    if "LOCAL_WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        prog = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}", "-m",
                "nca_fast.train"]
    elif __name__ == "__main__":
        prog = ["python", "-m", "nca_fast.train"]
    else:
        prog = ["nca-fast", "train"]
    return shlex.join(prog + list(argv))


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``nca-fast train ...``: parse ``argv``, train, write the run folder. Returns the exit code.

    User mistakes (bad options, missing files, corrupt checkpoints, a run folder that cannot be
    written or that another run holds) print one line to stderr and return 2. Ctrl-C or SIGTERM
    stops after the step in progress, writes a checkpoint, prints the command that resumes the
    run and returns 128 + the signal's number (130, 143); a second one stops at once.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except UsageError as e:
        print(f"nca-fast train: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as e:            # --help
        return int(e.code or 0)
    resume = getattr(ns, "resume", None)
    try:
        options = options_from_args(ns)
        if options.mp4 and mp4_missing():
            raise ValueError(f"--mp4: {mp4_missing()}; or leave --mp4 out for GIF videos")
        progress = not getattr(ns, "no_progress", False)
        log_every = getattr(ns, "log_every", 0 if progress else 50)
        if isinstance(log_every, int) and log_every < 0:
            raise ValueError(f"--log-every: expected an integer >= 0, got {log_every}")
        if getattr(ns, "dry_run", False):
            dev = options.device if options.device != "auto" else (
                "cuda" if torch.cuda.is_available() else "cpu")
            for line in run_plan(options, options.accumulate, torch.device(dev)):
                print(line)
            return 0
        run_dir = pathlib.Path(resume) if resume is not None else \
            pathlib.Path(options.out or default_out(options))
        if resume is None and (run_dir / "checkpoint.safetensors").exists():
            raise ValueError(f"--out: {run_dir} already holds a run; continue it with --resume "
                             f"{run_dir} or choose another folder")
        runner = _Runner(options, run_dir, resume is not None, progress, log_every, _command(argv))
        runner.setup()
        if runner.dist_info.rank == 0:
            t = runner.trainer
            for line in run_plan(t.opts, t.shards, t.device, t.calibrate()):
                print(line, flush=True)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"nca-fast train: error: {_as_flag(str(e))}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("\nnca-fast train: interrupted before training started; nothing was saved",
              file=sys.stderr)
        return 130
    resume_cmd = _command(["--resume", str(run_dir)])
    try:
        with GracefulStop() as stop:
            runner.trainer.stop = stop
            result = runner.finish()
    except TrainingInterrupted as e:
        if runner.dist_info.rank == 0:
            print(f"nca-fast train: {e}; checkpoint saved; continue with: {resume_cmd}",
                  file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        # A second signal: stopped at once, with the last checkpoint as it was (or none).
        if (run_dir / "checkpoint.safetensors").exists():
            print(f"\nnca-fast train: interrupted; the last checkpoint is kept; continue with: "
                  f"{resume_cmd}", file=sys.stderr)
        else:
            print("\nnca-fast train: interrupted before the first checkpoint; nothing to "
                  f"resume: start again with: {_command(argv)}", file=sys.stderr)
        return 130
    if runner.dist_info.rank == 0:
        t = runner.trainer
        print(f"trained {result.steps} steps in {t.elapsed:.0f} s (process cpu "
              f"{t.cpu_time:.0f} s), final loss {result.losses[-1]:.6f}; outputs in "
              f"{result.run_dir}")
        if t.last_stability:
            from .training.stability import format_rows
            print(f"long-horizon score (grown from the seed; stability.csv):\n"
                  f"{format_rows(t.last_stability)}")
        for line in t.summary():
            print(line)
    return 0


class _Runner:
    """``train`` split in two, so that setup errors are user errors and training ones are not."""

    def __init__(self, options, run_dir, resume, progress, log_every, command):
        self.options, self.run_dir, self.resume = options, run_dir, resume
        self.progress, self.log_every, self.command = progress, log_every, command

    def setup(self):
        o = self.options
        if o.threads:
            torch.set_num_threads(o.threads)
        self.dist_info = init_distributed(o.device)
        self.lock: Optional[RunFolderLock] = None
        try:
            # Options, memory and target are checked before the folder is touched.
            self.trainer = Trainer(o, self.run_dir, dist_info=self.dist_info,
                                   progress=self.progress, log_every=self.log_every)
            self._open_run_folder()
            if self.resume:
                self.trainer.load_checkpoint()
        except BaseException:
            self._close()
            raise

    def _open_run_folder(self):
        """Rank 0 (the only writer) creates the folder, locks it for the run's life and removes
        what killed writers left behind; every rank learns whether that worked."""
        flag = "--resume" if self.resume else "--out"
        error = None
        if self.dist_info.rank == 0:
            try:
                writable_folder(self.run_dir)
                self.lock = RunFolderLock(self.run_dir, flag).acquire()
                remove_stale_temporaries(self.run_dir)
            except OSError as e:
                error = ValueError(f"{flag} {self.run_dir}: {e}")
            except RunFolderBusy as e:
                error = e
        if self.dist_info.any(error is not None, self.trainer.device):
            raise error or RunFolderBusy(f"{flag} {self.run_dir}: rank 0 could not open the "
                                         "run folder (see its error)")

    def finish(self, on_step=None) -> TrainResult:
        t, d = self.trainer, self.dist_info
        try:
            if d.rank == 0:
                if not self.resume:
                    write_config(self.run_dir, t.opts, t.model.config, t.dist.world, t.grid)
                if self.command is not None:
                    line = (f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                            f"in {os.getcwd()}\n")
                    append_text(self.run_dir / "command.txt", line + self.command + "\n")
            t.run(on_step)
            t.write_outputs()
            d.barrier()
            return TrainResult(run_dir=self.run_dir, model=t.model.to("cpu"),
                               losses=list(t.losses), steps=t.step)
        finally:
            self._close()

    def _close(self):
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
        if self.dist_info.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
