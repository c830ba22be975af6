"""The run folder: its lock, its checkpoints and the files a run writes there.

One folder per run (``--out``): ``checkpoint.safetensors`` (and ``checkpoint.rankN`` under DDP:
each rank's part of the pool), ``config.json`` (the options ``--resume`` reads back),
``command.txt``, ``loss.csv`` / ``loss.png``, ``model.safetensors``, the videos and
``final.png``. Every file is written atomically; the folder is locked for the run's life.
"""
from __future__ import annotations

import csv
import datetime
import io as _pyio
import json
import math
import os
import pathlib
import sys
from typing import Dict, Optional, Sequence

import torch

from ..config import NCAConfig
from ..files import atomic_write, parse_json
from ..model import NCA
from .options import TrainOptions

CHECKPOINT_FORMAT = "nca_fast.train/1"
CHECKPOINT_KEY = "nca_fast_train_checkpoint"
TRAINING_KEY = "nca_fast_training"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, truncated, or from another run)."""


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """An exclusive OS lock (``fcntl.flock``) on ``RUN_DIR/.lock``, held for a run's life.

    Two runs writing one folder interleave their checkpoints; the second one to start now fails
    at once, naming the holder's pid (written into the lock file). The OS drops the lock when
    its process dies, however it dies, so a killed run never leaves the folder locked. Without
    ``fcntl`` (Windows) there is no lock.
    """

    NAME = ".lock"

    def __init__(self, run_dir: pathlib.Path, flag: str = "--out"):
        self.path = pathlib.Path(run_dir) / self.NAME
        self.flag = flag
        self.fd: Optional[int] = None

    def acquire(self) -> "RunFolderLock":
        try:
            import fcntl
        except ImportError:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderBusy(
                    f"{self.flag} {self.path.parent}: another run (pid {holder}) is using this "
                    f"folder; wait for it to end, or choose another folder") from None
            # The previous holder removes the file as it releases it: a lock taken on a file
            # that is no longer at the path locks nothing; open the path again.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()          # while still held: see acquire
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def checkpoint_path(run_dir: pathlib.Path, rank: int) -> pathlib.Path:
    name = "checkpoint.safetensors" if rank == 0 else f"checkpoint.rank{rank}.safetensors"
    return run_dir / name


def write_safetensors(path: pathlib.Path, tensors: Dict[str, torch.Tensor], metadata: dict):
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: pathlib.Path):
        mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)         # safetensors recreates the file as 0600; keep umask's mode

    atomic_write(path, write)


def read_checkpoint(path: pathlib.Path):
    """(tensors, info) of a checkpoint written by ``Trainer.save_checkpoint``."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file (runs write one every --save-every "
                              "steps)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own types for every kind of damage
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    if CHECKPOINT_KEY not in meta:
        raise CheckpointError(f"{path}: not an nca_fast training checkpoint (no "
                              f"{CHECKPOINT_KEY!r} metadata)")
    try:
        info = parse_json(meta[CHECKPOINT_KEY], "metadata")
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{info.get('format') if isinstance(info, dict) else info!r}; "
                              f"expected {CHECKPOINT_FORMAT!r}")
    return tensors, info


def save_model(model: NCA, path: pathlib.Path, training: dict) -> pathlib.Path:
    """``NCA.save`` with the run's training metadata (``formats.read_metadata`` shows it)."""
    return model.save(path, metadata={TRAINING_KEY: json.dumps(training)})


def write_loss_outputs(losses: Sequence[float], run_dir: pathlib.Path, *,
                       lr_drop_at: Optional[int] = None, levels: int = 1) -> None:
    """``loss.csv`` (step, loss) and ``loss.png`` (log-scale curve with a running mean)."""
    buf = _pyio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss"])
    for i, v in enumerate(losses, 1):
        w.writerow([i, repr(float(v))])
    text = buf.getvalue()
    atomic_write(run_dir / "loss.csv", lambda tmp: tmp.write_text(text))

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="loss")
    win = max(1, len(losses) // 50)
    if win > 1:
        t = torch.tensor(losses, dtype=torch.float64)
        smooth = torch.nn.functional.avg_pool1d(t.view(1, 1, -1), win, 1).view(-1).tolist()
        ax.plot(steps[win - 1:], smooth, lw=1.5, label=f"mean of {win}")
    if lr_drop_at and 0 < lr_drop_at < len(losses):
        ax.axvline(lr_drop_at, color="grey", ls=":", lw=1, label="lr drop")
    finite = [v for v in losses if math.isfinite(v)]     # a step the guard skipped may be NaN
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (RGBA)" if levels == 1 else f"MSE (RGBA), mean of {levels} levels")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(run_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))


def default_out(o: TrainOptions) -> str:
    return os.path.join("runs", f"{o.experiment}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def write_config(run_dir: pathlib.Path, options: TrainOptions, model: NCAConfig, world: int,
                 grid: int) -> None:
    """``config.json``: the run's options (what ``--resume`` reads back), the model's config, the
    world size, the grid and the versions."""
    doc = {"train": options.to_dict(), "model": model.to_dict(), "world_size": world,
           "grid": grid,
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(text))


def append_text(path: pathlib.Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing), atomically."""
    old = path.read_text() if path.exists() else ""
    atomic_write(path, lambda tmp: tmp.write_text(old + text))


def read_run_options(run_dir) -> TrainOptions:
    """The ``TrainOptions`` recorded in ``run_dir/config.json``."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; --resume expects a run folder written "
                                "by nca-fast train")
    try:
        doc = parse_json(path.read_bytes(), "content")
        return TrainOptions.from_dict(doc["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid run config ({e})") from None
