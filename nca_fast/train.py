"""Training: the Growing-NCA article's recipe, resumable checkpoints, and multi-GPU DDP.

The recipe (shared/docs/NCA_SPEC.md, "Training recipe"): a target image fitted in ``size`` cells
and padded by ``pad`` on each side; every batch starts from the seed ("grow") or is drawn from a
pool of states ("persist": the highest-loss sample is replaced by the seed and the final states
are written back; "regenerate": also damages the lowest-loss samples with a random circle);
rollouts of a random length; MSE over RGBA; Adam with a step drop of the learning rate; each
parameter's gradient divided by its own L2 norm before the optimizer step.

Reproducibility: every random choice (rollout length, pool samples, damage circles, the update
mask seeds given to ``NCA.forward``) comes from one ``torch.Generator`` seeded with ``--seed``,
drawn identically on every rank. A checkpoint holds the weights, the Adam state, the generator
state, the pool and the loss history, so a run resumed from it ends bitwise equal to one that
was never interrupted (same device, same thread count).

Shards: the global batch is split into ``world_size * accumulate`` shards; shard ``s`` owns the
``s``-th contiguous part of the pool, samples its ``batch / shards`` states from it and runs its
rollout with its own mask seed. A single process with ``--accumulate 2`` therefore computes the
same thing as two DDP ranks (up to float summation order), and each rank stores only its part
of the pool.

Run ``nca-fast train --help`` (or ``python -m nca_fast.train --help``); multi-GPU:
``torchrun --nproc_per_node=N -m nca_fast.train ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import io as _pyio
import json
import math
import os
import pathlib
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import io as nio
from .config import PRECISIONS, NCAConfig
from .model import NCA, BACKENDS, resolve_checkpoint, triton_usable
from .resources import DEVICE as ON_DEVICE, HOST, Term, check as check_memory, rollout_bytes

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
DEFAULT_TARGET = ASSETS / "default_target.png"

EXPERIMENTS = ("grow", "persist", "regenerate")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = "nca_fast.train/1"
CHECKPOINT_KEY = "nca_fast_train_checkpoint"
TRAINING_KEY = "nca_fast_training"
# The article's grid is 72 cells (40 + 2 * 16) with rollouts in [64, 96): about one to one and a
# third steps per cell of grid width, so that growth from the centre can reach the corners.
ARTICLE_GRID = 72
ARTICLE_ROLLOUT = (64, 96)
ARTICLE_LR_DROP_AT = 2000
ARTICLE_STEPS = 8000


# =========================================================================== options
@dataclass(frozen=True)
class TrainOptions:
    """Everything that defines a training run (``None`` fields are derived by ``resolved``).

    target: image path (None: the project's ``assets/default_target.png``). size: cells the
    image is fitted in; pad: empty cells on each side (None: ``round(0.4 * size)``, the article's
    16 for 40). rollout_min / rollout_max: rollout length, uniform in [min, max) steps (None:
    the article's [64, 96) scaled by grid / 72). curriculum: fraction of the steps over which the
    rollout range ramps from a quarter to its full length. lr_drop_at: step at which the learning
    rate is multiplied by lr_drop_factor (None: 2000, scaled by steps / 8000 when fewer steps).
    replace / damage: samples of each pooled batch reset to the seed / damaged. loss_levels:
    1 = plain MSE; L > 1 averages the MSE over L 2x-downsampled levels (helps large grids).
    checkpoint: activation checkpointing of the rollout (None, "sqrt" or a segment length).
    accumulate: micro-batches per step per process (gradient accumulation). save_every: steps
    between checkpoints. video_steps: length of the output videos (None: 2 * rollout_max).
    init: a model file (nca_fast .safetensors or a Distill JSON) whose weights start the run
    instead of a fresh initialisation (a size curriculum: train small, then larger from it); its
    channels, hidden units and fire rate must equal the run's.
    """

    target: Optional[str] = None
    size: int = 40
    pad: Optional[int] = None
    experiment: str = "persist"
    steps: int = ARTICLE_STEPS
    batch: int = 8
    pool_size: int = 1024
    rollout_min: Optional[int] = None
    rollout_max: Optional[int] = None
    curriculum: float = 0.0
    lr: float = 2e-3
    lr_drop_at: Optional[int] = None
    lr_drop_factor: float = 0.1
    replace: int = 1
    damage: int = 3
    loss_levels: int = 1
    channels: int = 16
    hidden: int = 128
    fire_rate: float = 0.5
    precision: str = "tf32"
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    checkpoint: Union[None, str, int] = None
    accumulate: int = 1
    save_every: int = 500
    video_steps: Optional[int] = None
    mp4: bool = False
    threads: Optional[int] = None
    out: Optional[str] = None
    init: Optional[str] = None

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        def pos_int(name, minimum=1, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                bad(name, f"an integer >= {minimum}" + (" or None" if optional else ""))

        for name in ("size", "steps", "batch", "pool_size", "loss_levels", "channels", "hidden",
                     "accumulate", "save_every"):
            pos_int(name)
        for name in ("replace", "damage"):
            pos_int(name, 0)
        pos_int("pad", 0, optional=True)
        pos_int("rollout_min", 1, optional=True)
        pos_int("rollout_max", 2, optional=True)
        pos_int("lr_drop_at", 0, optional=True)
        pos_int("video_steps", 1, optional=True)
        pos_int("threads", 1, optional=True)
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            bad("seed", "an integer in [0, 2**63)")
        if self.experiment not in EXPERIMENTS:
            bad("experiment", f"one of {EXPERIMENTS}")
        if self.backend not in BACKENDS:
            bad("backend", f"one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {PRECISIONS}")
        if self.device not in DEVICES:
            bad("device", f"one of {DEVICES}")
        # lr and its drop factor must be finite: lr = inf passed a check of (0, inf] and the
        # first step made every weight NaN.
        for name, lo, hi, text in (("lr", 0.0, math.inf, "a finite number > 0"),
                                   ("lr_drop_factor", 0.0, math.inf, "a finite number >= 0"),
                                   ("curriculum", 0.0, 1.0, "a number in [0, 1]"),
                                   ("fire_rate", 0.0, 1.0, "a number in [0, 1]")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi \
                    or not math.isfinite(v) or (name == "lr" and v == 0):
                bad(name, text)
        if (self.rollout_min is not None and self.rollout_max is not None
                and self.rollout_max <= self.rollout_min):
            raise ValueError(f"rollout: expected rollout_min < rollout_max, got "
                             f"[{self.rollout_min}, {self.rollout_max})")
        # damage only applies to "regenerate"; "persist" only resets samples.
        damaged = self.damage if self.experiment == "regenerate" else 0
        if self.experiment != "grow" and self.replace + damaged > self.batch:
            raise ValueError(f"replace + damage: expected at most batch={self.batch} samples, "
                             f"got {self.replace} + {damaged}")
        try:
            resolve_checkpoint(self.checkpoint, 2)
        except ValueError as e:
            raise ValueError(f"checkpoint: {e}") from None
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            bad("init", "a model file path or None")
        if self.loss_levels > 1 and self.grid >> (self.loss_levels - 1) < 1:
            raise ValueError(f"loss_levels: {self.loss_levels} levels halve a {self.grid}-cell "
                             f"grid below one cell; use at most {self.grid.bit_length()}")

    @property
    def grid(self) -> int:
        """Side of the square training grid in cells: size + 2 * pad."""
        pad = self.pad if self.pad is not None else round(0.4 * self.size)
        return self.size + 2 * pad

    def resolved(self) -> "TrainOptions":
        """A copy with every ``None`` default replaced by its derived value."""
        pad = self.pad if self.pad is not None else round(0.4 * self.size)
        grid = self.size + 2 * pad
        lo, hi = self.rollout_min, self.rollout_max
        if lo is None and hi is None:
            lo = max(1, round(ARTICLE_ROLLOUT[0] * grid / ARTICLE_GRID))
            hi = max(lo + 1, round(ARTICLE_ROLLOUT[1] * grid / ARTICLE_GRID))
        elif lo is None:
            lo = max(1, round(hi * ARTICLE_ROLLOUT[0] / ARTICLE_ROLLOUT[1]))
            lo = min(lo, hi - 1)
        elif hi is None:
            hi = max(lo + 1, round(lo * ARTICLE_ROLLOUT[1] / ARTICLE_ROLLOUT[0]))
        drop = self.lr_drop_at
        if drop is None:
            drop = min(ARTICLE_LR_DROP_AT, round(ARTICLE_LR_DROP_AT * self.steps / ARTICLE_STEPS))
        video = self.video_steps if self.video_steps is not None else 2 * hi
        return dataclasses.replace(self, pad=pad, rollout_min=lo, rollout_max=hi,
                                   lr_drop_at=drop, video_steps=video)

    def model_config(self) -> NCAConfig:
        return NCAConfig(channels=self.channels, hidden=self.hidden, fire_rate=self.fire_rate,
                         precision=self.precision)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        if not isinstance(d, dict):
            raise ValueError(f"options: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"options: unknown fields {unknown}")
        return cls(**d)


# Presets set defaults; options given explicitly override them.
PRESETS: Dict[str, dict] = {
    # The article: 40x40 target on a 72x72 grid, rollouts [64, 96), 8000 steps.
    "article": {},
    # A recognisable small target on a 2-core CPU in under 10 minutes (docs/TRAINING.md).
    # A 32x32 grid (rollouts [28, 43) by the grid rule); the lr drop comes late because the
    # loss is still falling fast at a few hundred steps.
    "quick": dict(size=24, pad=4, hidden=64, steps=1800, pool_size=256, lr_drop_at=1400,
                  save_every=200),
    # Large grids: memory-light rollouts, a loss that also sees the coarse shape, a rollout
    # curriculum so early training is not wasted on long rollouts of an untrained model.
    "hires": dict(size=128, batch=4, pool_size=256, checkpoint="sqrt", loss_levels=3,
                  curriculum=0.3, save_every=250),
}


def train_memory(o: TrainOptions, shards: int, device: torch.device) -> List[Term]:
    """The large buffers of one training process (resources.Term; ``o`` resolved): the pool,
    the parameters with their gradients and Adam moments, the target and the batch's states,
    a micro-batch's rollout kept for backward, the checkpoint's copy of the pool, the videos."""
    cfg = o.model_config()
    grid = o.size + 2 * o.pad
    cells = grid * grid
    state = o.channels * cells * 4
    where = f"{o.channels} x {grid} x {grid}"
    sized = f"--size {o.size} --pad {o.pad}"
    pool_states = 0 if o.experiment == "grow" else o.pool_size // shards * o.accumulate
    n_params = (cfg.num_filters * o.channels + o.channels + 1) * o.hidden + o.channels
    micro = o.batch // shards
    steps = o.rollout_max - 1
    backend = o.backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    rollout = rollout_bytes(backend, micro * cells, o.channels, o.hidden, cfg.num_filters,
                            steps, resolve_checkpoint(o.checkpoint, steps), True, grad=True)
    frames = min(o.video_steps, 96) + 2                     # write_outputs keeps about 97
    frames *= 2 if o.experiment == "regenerate" else 1
    side = grid * max(1, 256 // grid)
    ckpt = f" --checkpoint {o.checkpoint}" if o.checkpoint is not None else ""
    return [
        Term(f"--pool-size {o.pool_size} {sized}", f"the pool of {pool_states} states of {where}",
             pool_states * state, ON_DEVICE),
        Term(f"--pool-size {o.pool_size} {sized}", "the checkpoint's copy of the pool",
             pool_states * state, HOST),
        Term(f"--hidden {o.hidden} --channels {o.channels}",
             f"{n_params} parameters with their gradients and Adam moments", 4 * 4 * n_params,
             ON_DEVICE),
        Term(sized, f"the target and the seed on a {grid} x {grid} grid", 4 * 4 * cells + state,
             ON_DEVICE),
        Term(f"--batch {o.batch} {sized}", f"the batch's {o.batch * o.accumulate // shards} "
             f"states (start, final and the pool's rows)", 3 * micro * o.accumulate * state,
             ON_DEVICE),
        Term(f"--batch {o.batch} --rollout {o.rollout_min} {o.rollout_max} {sized}{ckpt}",
             f"a rollout of {steps} steps on {micro} x {grid} x {grid} cells",
             rollout, ON_DEVICE),
        Term(f"--video-steps {o.video_steps} {sized}",
             f"the {frames} video frames ({where} states and {side} x {side} pictures)",
             frames * (state + 2 * side * side * 3), HOST),
    ]


def _warm_start(model: NCA, path: str) -> None:
    """Copy the weights of the model file ``path`` into ``model`` (same architecture)."""
    init = nio.load_any(path, backend="torch")
    a, b = dataclasses.asdict(init.config), dataclasses.asdict(model.config)
    a.pop("precision", None)
    b.pop("precision", None)
    diff = {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}
    if diff:
        shown = ", ".join(f"{k}={v[0]!r} (run: {v[1]!r})" for k, v in diff.items())
        raise ValueError(f"init: {path} has a different architecture: {shown}; give the run the "
                         "same --channels / --hidden / --fire-rate")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(dict(init.named_parameters())[name])


# =========================================================================== distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor of equal length from every rank, in rank order."""
        if not self.enabled:
            return t
        import torch.distributed as dist
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (one all-reduce)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _resolve_device(name: str, dist_info: _Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
        return torch.device("cuda", dist_info.local_rank if dist_info.enabled else
                            torch.cuda.current_device())
    return torch.device("cpu")


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    info = _Dist(rank=rank, world=world, local_rank=local)
    device = _resolve_device(device_name, info)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        info.owns_group = True
    return info


# =========================================================================== losses, damage
def per_sample_loss(x: torch.Tensor, target: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """MSE between the RGBA channels of ``x`` (B x C x H x W) and ``target`` (4 x H x W): (B,).

    With ``levels`` > 1, the mean of the MSEs at ``levels`` resolutions, each one a 2x2 average
    pooling of the previous (premultiplied RGBA averages correctly).
    """
    d, t = x[:, :4], target.unsqueeze(0)
    total = ((d - t) ** 2).mean(dim=(1, 2, 3))
    for _ in range(levels - 1):
        d, t = F.avg_pool2d(d, 2), F.avg_pool2d(t, 2)
        total = total + ((d - t) ** 2).mean(dim=(1, 2, 3))
    return total / levels


def circle_keep_mask(height: int, width: int, centre: Sequence[float], radius: float,
                     device=None) -> torch.Tensor:
    """H x W float mask, 0 inside a circle and 1 outside.

    Coordinates run over [-1, 1] across the grid (so ``radius`` is a fraction of the half-width),
    ``centre`` = (cx, cy) with x along W and y along H.
    """
    ys = torch.linspace(-1.0, 1.0, height, device=device).view(-1, 1)
    xs = torch.linspace(-1.0, 1.0, width, device=device).view(1, -1)
    inside = (xs - float(centre[0])) ** 2 + (ys - float(centre[1])) ** 2 < float(radius) ** 2
    return (~inside).to(torch.float32)


# =========================================================================== checkpoint files
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


class TrainingInterrupted(Exception):
    """Training stopped on a signal (Ctrl-C, SIGTERM) after a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum


class GracefulStop:
    """SIGINT and SIGTERM handlers for a training loop: the first signal asks the loop to stop
    after the step in progress (``Trainer.run`` then writes a checkpoint); a second Ctrl-C
    stops at once (KeyboardInterrupt; the last checkpoint stays as it was). A SIGTERM after
    the request changes nothing: torchrun answers a Ctrl-C by sending SIGTERM to its workers,
    and schedulers repeat SIGTERM; neither should cut the checkpoint short. Main thread only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():   # else signal.signal fails
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        # os.write: print() could find sys.stderr's buffer in use by the progress bar.
        os.write(2, f"\nnca-fast train: {signal.Signals(signum).name}: stopping after this step "
                    "and saving a checkpoint (press Ctrl-C again to stop at once, without "
                    "one)\n".encode())


def _checkpoint_path(run_dir: pathlib.Path, rank: int) -> pathlib.Path:
    name = "checkpoint.safetensors" if rank == 0 else f"checkpoint.rank{rank}.safetensors"
    return run_dir / name


def _write_safetensors(path: pathlib.Path, tensors: Dict[str, torch.Tensor], metadata: dict):
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: pathlib.Path):
        mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)         # safetensors recreates the file as 0600; keep umask's mode

    nio.atomic_write(path, write)


def _read_checkpoint(path: pathlib.Path):
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
        info = nio.parse_json(meta[CHECKPOINT_KEY], "metadata")
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{info.get('format') if isinstance(info, dict) else info!r}; "
                              f"expected {CHECKPOINT_FORMAT!r}")
    return tensors, info


# =========================================================================== the trainer
@dataclass
class TrainResult:
    """What ``train`` returns: the run folder, the trained model (on the CPU), the loss per step."""

    run_dir: pathlib.Path
    model: NCA
    losses: List[float]
    steps: int


class Trainer:
    """One training run: model, optimizer, generator, pool; see the module docstring."""

    def __init__(self, options: TrainOptions, run_dir: pathlib.Path, *,
                 dist_info: Optional[_Dist] = None, progress: bool = True, log_every: int = 0):
        self.opts = o = options.resolved()
        self.run_dir = pathlib.Path(run_dir)
        self.dist = dist_info or _Dist()
        self.progress = progress
        self.log_every = log_every
        self.device = _resolve_device(o.device, self.dist)
        self.shards = self.dist.world * o.accumulate
        if o.batch % self.shards:
            raise ValueError(f"batch: {o.batch} does not split into {self.shards} equal shards "
                             f"(world size {self.dist.world} x accumulate {o.accumulate})")
        if o.experiment != "grow" and o.pool_size % self.shards:
            raise ValueError(f"pool_size: {o.pool_size} does not split into {self.shards} equal "
                             f"parts (world size {self.dist.world} x accumulate {o.accumulate})")
        self.shard_batch = o.batch // self.shards
        self.part = o.pool_size // self.shards
        if o.backend == "triton" and not triton_usable(self.device):
            raise ValueError(f"--backend triton cannot run on {self.device.type} here: use "
                             "--device cuda on a machine with CUDA, --backend torch, or set "
                             "TRITON_INTERPRET=1 (Triton's slow CPU interpreter)")
        check_memory(train_memory(o, self.shards, self.device), self.device, "training")

        target = o.target if o.target is not None else DEFAULT_TARGET
        self.target = nio.load_target(target, o.size, o.pad).to(self.device)
        self.grid = self.target.shape[-1]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            model = NCA(o.model_config(), backend=o.backend)
        if o.init is not None:
            _warm_start(model, o.init)
        self.model = model.to(self.device)
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The filter bank is a constant buffer: nothing to broadcast each forward.
            self.net = DDP(self.model, device_ids=ids, broadcast_buffers=False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(o.seed)
        self.seed_state = self.model.seed_state(1, self.grid, self.grid)
        self.pool = None
        if o.experiment != "grow":
            self.pool = self.seed_state.repeat(o.accumulate * self.part, 1, 1, 1)
        self.step = 0
        self.losses: List[float] = []
        self.elapsed = 0.0
        self.cpu_time = 0.0
        self.stop: Optional[GracefulStop] = None      # set by cli_main: signals stop the loop

    # ------------------------------------------------------------------ schedule
    def lr_at(self, step: int) -> float:
        o = self.opts
        return o.lr * (o.lr_drop_factor if step >= o.lr_drop_at else 1.0)

    def rollout_range(self, step: int):
        """[lo, hi) rollout lengths at ``step``, after the curriculum's ramp."""
        o = self.opts
        lo, hi = o.rollout_min, o.rollout_max
        ramp = o.curriculum * o.steps
        if ramp > 0 and step < ramp:
            f = 0.25 + 0.75 * step / ramp
            lo = max(1, round(lo * f))
            hi = max(lo + 1, round(hi * f))
        return lo, hi

    # ------------------------------------------------------------------ one step
    def train_step(self) -> float:
        """One optimizer step on the global batch; returns its mean loss (before the update)."""
        o, g = self.opts, self.generator
        K, S, bs = o.accumulate, self.shards, self.shard_batch
        first = self.dist.rank * K                      # this process's first shard
        lo, hi = self.rollout_range(self.step)
        n = int(torch.randint(lo, hi, (1,), generator=g))
        seeds = torch.randint(0, 2**62, (S,), generator=g).tolist()

        if self.pool is None:
            x0 = self.seed_state.expand(K * bs, -1, -1, -1).clone()
            rows = None
        else:
            picks = [torch.randperm(self.part, generator=g)[:bs] for _ in range(S)]
            rows = torch.cat([picks[first + k] + k * self.part for k in range(K)]).to(self.device)
            if o.experiment == "regenerate":
                centres = (torch.rand(o.damage, 2, generator=g) - 0.5).tolist()
                radii = (0.1 + 0.3 * torch.rand(o.damage, generator=g)).tolist()
            x0 = self.pool[rows].clone()
            with torch.no_grad():
                pre = self.dist.gather(per_sample_loss(x0, self.target, o.loss_levels))
            # Stable sort: ties (a pool full of seeds) break by sample order on every rank.
            order = torch.sort(pre.cpu(), descending=True, stable=True).indices.tolist()
            mine = range(first * bs, (first + K) * bs)
            for gi in order[:o.replace]:
                if gi in mine:
                    x0[gi - mine.start] = self.seed_state[0]
            if o.experiment == "regenerate":
                lowest = order[::-1][:o.damage]
                for j, gi in enumerate(lowest):
                    if gi in mine:
                        x0[gi - mine.start] *= circle_keep_mask(
                            self.grid, self.grid, centres[j], radii[j], device=self.device)

        self.optimizer.zero_grad(set_to_none=True)
        finals, losses = [], []
        for k in range(K):
            sync = self.net is self.model or k == K - 1
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx:
                y = self.net(x0[k * bs:(k + 1) * bs], n, seed=seeds[first + k],
                             checkpoint=o.checkpoint)
                per = per_sample_loss(y, self.target, o.loss_levels)
                (per.mean() / K).backward()
            finals.append(y.detach())
            losses.append(per.detach())
        # After DDP's all-reduce: normalise the averaged gradients, identically on every rank.
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad /= p.grad.norm() + 1e-8
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.step()
        if rows is not None:
            self.pool[rows] = torch.cat(finals)
        loss = float(self.dist.gather(torch.cat(losses)).double().mean())
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {self.step + 1}; lower --lr "
                                     "or check the target image")
        self.losses.append(loss)
        self.step += 1
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _info(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "world_size": self.dist.world,
                "rank": self.dist.rank, "shards": self.shards,
                "options": self.opts.to_dict(), "model": self.model.config.to_dict(),
                "elapsed_s": self.elapsed, "cpu_s": self.cpu_time}

    def save_checkpoint(self) -> pathlib.Path:
        """Write this rank's checkpoint atomically (rank 0's file also holds the shared state)."""
        path = _checkpoint_path(self.run_dir, self.dist.rank)
        tensors: Dict[str, torch.Tensor] = {}
        info = self._info()
        if self.pool is not None:
            K = self.opts.accumulate
            for k in range(K):
                s = self.dist.rank * K + k
                tensors[f"pool.{s}"] = self.pool[k * self.part:(k + 1) * self.part]
        if self.dist.rank == 0:
            for name, t in self.model.state_dict().items():
                tensors[f"model.{name}"] = t
            sd = self.optimizer.state_dict()
            plain = {}
            for pid, st in sd["state"].items():
                for key, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"optim.{pid}.{key}"] = v
                    else:
                        plain.setdefault(str(pid), {})[key] = v
            info["optimizer"] = {
                "param_groups": sd["param_groups"], "plain_state": plain,
                "tensor_state": sorted(k for k in tensors if k.startswith("optim."))}
            info["lr"] = self.lr_at(self.step)
            tensors["rng.generator"] = self.generator.get_state()
            tensors["history.loss"] = torch.tensor(self.losses, dtype=torch.float64)
        _write_safetensors(path, tensors, {CHECKPOINT_KEY: json.dumps(info)})
        self.dist.barrier()
        return path

    def load_checkpoint(self) -> None:
        """Restore the state saved in ``run_dir`` (this rank's file and rank 0's shared state)."""
        own_path = _checkpoint_path(self.run_dir, self.dist.rank)
        main_path = _checkpoint_path(self.run_dir, 0)
        own, own_info = _read_checkpoint(own_path)
        main, info = (own, own_info) if self.dist.rank == 0 else _read_checkpoint(main_path)
        if info.get("world_size") != self.dist.world:
            raise CheckpointError(f"{main_path}: the run was saved with world size "
                                  f"{info.get('world_size')}, this process group has "
                                  f"{self.dist.world}; resume with the same number of processes")
        if own_info.get("step") != info.get("step"):
            raise CheckpointError(f"{own_path}: at step {own_info.get('step')} but {main_path} is "
                                  f"at step {info.get('step')} (interrupted while saving?)")
        saved = TrainOptions.from_dict(info["options"]).resolved()
        mine = dataclasses.replace(self.opts, steps=saved.steps, save_every=saved.save_every,
                                   video_steps=saved.video_steps, mp4=saved.mp4,
                                   threads=saved.threads, out=saved.out, device=saved.device,
                                   backend=saved.backend)
        if mine != saved:
            diff = [f.name for f in dataclasses.fields(saved)
                    if getattr(saved, f.name) != getattr(mine, f.name)]
            raise CheckpointError(f"{main_path}: saved with different training options {diff}")
        try:
            self.model.load_state_dict(
                {k[len("model."):]: v for k, v in main.items() if k.startswith("model.")})
            opt = info["optimizer"]
            state: Dict[int, dict] = {}
            for key in opt["tensor_state"]:
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = main[key]
            for pid, extra in opt["plain_state"].items():
                state.setdefault(int(pid), {}).update(extra)
            self.optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
            self.generator.set_state(main["rng.generator"])
            self.losses = [float(v) for v in main["history.loss"].tolist()]
            if self.pool is not None:
                K = self.opts.accumulate
                for k in range(K):
                    part = own[f"pool.{self.dist.rank * K + k}"]
                    if tuple(part.shape) != tuple(self.pool[:self.part].shape):
                        raise ValueError(f"pool part {self.dist.rank * K + k} has shape "
                                         f"{tuple(part.shape)}")
                    self.pool[k * self.part:(k + 1) * self.part] = part.to(self.device)
            self.step = int(info["step"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{main_path}: incomplete or inconsistent checkpoint "
                                  f"({type(e).__name__}: {e})") from None
        if len(self.losses) != self.step:
            raise CheckpointError(f"{main_path}: holds {len(self.losses)} losses for step "
                                  f"{self.step}")
        self.elapsed = float(info.get("elapsed_s", 0.0))
        self.cpu_time = float(info.get("cpu_s", 0.0))

    # ------------------------------------------------------------------ the loop
    def run(self, on_step: Optional[Callable[["Trainer"], None]] = None) -> None:
        """Train up to ``opts.steps``, checkpointing every ``save_every`` steps and at the end."""
        from tqdm.auto import tqdm

        o = self.opts
        show = self.progress and self.dist.rank == 0
        bar = tqdm(total=o.steps, initial=self.step, disable=not show, dynamic_ncols=True,
                   desc=f"{o.experiment} {self.grid}x{self.grid}")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            while self.step < o.steps:
                loss = self.train_step()
                now, cnow = time.perf_counter(), time.process_time()
                self.elapsed += now - t0
                self.cpu_time += cnow - c0
                t0, c0 = now, cnow
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{self.lr_at(self.step - 1):.0e}")
                if (self.log_every and self.dist.rank == 0
                        and (self.step % self.log_every == 0 or self.step == o.steps)):
                    print(f"step {self.step}/{o.steps} loss {loss:.6f} "
                          f"lr {self.lr_at(self.step - 1):.1e} elapsed {self.elapsed:.0f}s "
                          f"(process cpu {self.cpu_time:.0f}s)",
                          flush=True)
                saved = self.step % o.save_every == 0 or self.step == o.steps
                if saved:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self)
                signum = self.stop.signum if self.stop is not None else None
                if self.dist.any(signum is not None, self.device):
                    if not saved:
                        self.save_checkpoint()
                    raise TrainingInterrupted(self.step, signum or signal.SIGTERM)
        finally:
            bar.close()

    # ------------------------------------------------------------------ outputs
    def training_metadata(self) -> dict:
        """What a user of the final model needs to grow it as it was trained."""
        o = self.opts
        return {"experiment": o.experiment, "grid": self.grid, "size": o.size, "pad": o.pad,
                "rollout": [o.rollout_min, o.rollout_max], "steps": self.step, "seed": o.seed,
                "final_loss": self.losses[-1] if self.losses else None,
                "train_wall_s": round(self.elapsed, 1), "train_cpu_s": round(self.cpu_time, 1),
                "target": str(o.target) if o.target is not None else "default_target.png",
                "init": o.init}

    def write_outputs(self) -> None:
        """Final model, loss curve, videos (rank 0 only)."""
        if self.dist.rank != 0:
            return
        o = self.opts
        model = self.model
        save_model(model, self.run_dir / "model.safetensors", self.training_metadata())
        write_loss_outputs(self.losses, self.run_dir, lr_drop_at=o.lr_drop_at,
                           levels=o.loss_levels)
        ext = ".mp4" if o.mp4 else ".gif"
        every = max(1, o.video_steps // 96)
        scale = max(1, 256 // self.grid)
        video_seed = (o.seed * 2654435761 + 1) % 2**62
        with torch.no_grad():
            x = self.seed_state.clone()
            x, frames = model(x, o.video_steps, seed=video_seed, frames=every)
            nio.write_video(frames, self.run_dir / f"growth{ext}", fps=20, scale=scale)
            nio.write_png(x[0], self.run_dir / "final.png", scale=scale)
            if o.experiment == "regenerate":
                # Cut out the lower-right part of the grown pattern, then let it regrow.
                damaged = x * circle_keep_mask(self.grid, self.grid, (0.3, 0.3), 0.4,
                                               device=x.device)
                _, regrow = model(damaged, o.video_steps, seed=video_seed + 1, frames=every)
                nio.write_video(frames[-10:] + regrow, self.run_dir / f"regenerate{ext}",
                                fps=20, scale=scale)


def save_model(model: NCA, path: pathlib.Path, training: dict) -> pathlib.Path:
    """``io.save`` the model with the run's training metadata (``io.read_metadata`` shows it)."""
    return nio.save(model, path, metadata={TRAINING_KEY: json.dumps(training)})


def write_loss_outputs(losses: Sequence[float], run_dir: pathlib.Path, *,
                       lr_drop_at: Optional[int] = None, levels: int = 1) -> None:
    """``loss.csv`` (step, loss) and ``loss.png`` (log-scale curve with a running mean)."""
    buf = _pyio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss"])
    for i, v in enumerate(losses, 1):
        w.writerow([i, repr(float(v))])
    text = buf.getvalue()
    nio.atomic_write(run_dir / "loss.csv", lambda tmp: tmp.write_text(text))

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
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (RGBA)" if levels == 1 else f"MSE (RGBA), mean of {levels} levels")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    nio.atomic_write(run_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))


# =========================================================================== Python API
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
        run_dir = options.out or _default_out(options)
    run_dir = pathlib.Path(run_dir)
    runner = _Runner(options, run_dir, resume, progress, log_every, command)
    runner.setup()
    return runner.finish(on_step)


def _default_out(o: TrainOptions) -> str:
    return os.path.join("runs", f"{o.experiment}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def _write_config(trainer: Trainer, run_dir: pathlib.Path) -> None:
    doc = {"train": trainer.opts.to_dict(), "model": trainer.model.config.to_dict(),
           "world_size": trainer.dist.world, "grid": trainer.grid,
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    nio.atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(text))


def _append_text(path: pathlib.Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    nio.atomic_write(path, lambda tmp: tmp.write_text(old + text))


def read_run_options(run_dir) -> TrainOptions:
    """The ``TrainOptions`` recorded in ``run_dir/config.json``."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; --resume expects a run folder written "
                                "by nca-fast train")
    try:
        doc = nio.parse_json(path.read_bytes(), "content")
        return TrainOptions.from_dict(doc["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid run config ({e})") from None


# =========================================================================== command line
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


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
    p = _Parser(prog=prog, argument_default=argparse.SUPPRESS,
                description="Train a Growing-NCA on a target image (the Distill article's "
                            "recipe). Outputs go to one run folder: model.safetensors, "
                            "checkpoint.safetensors, config.json, command.txt, loss.png, "
                            "loss.csv, growth.gif (regenerate.gif), final.png.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="defaults for: article (8000 steps, 72x72), quick "
      "(2-core CPU, < 10 min), hires (large grids: --size 128 and up)")
    a("--target", help="target image (PNG with alpha); default: the project's own drawing")
    a("--size", type=int, help="cells the target is fitted in (default 40)")
    a("--pad", type=int, help="empty cells around the target (default 0.4 * size)")
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
    a("--init", metavar="MODEL", help="start from this model's weights (.safetensors or a "
      "Distill JSON) instead of a fresh initialisation: train small, then larger from it")
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
    a("--no-progress", action="store_true", help="no progress bar; log a line every "
      "--log-every steps instead")
    a("--log-every", type=int, help="steps between log lines (default 50 without a progress bar)")
    return p


# Options a resumed run may change: they do not alter the maths of a step (a different device or
# backend still gives a valid continuation, though not a bitwise equal one).
_RESUMABLE = {"steps", "save_every", "video_steps", "mp4", "threads", "device", "backend"}


def options_from_args(ns: argparse.Namespace) -> TrainOptions:
    """Merge defaults <- preset <- explicit options (or the resumed run's config)."""
    given = dict(vars(ns))
    for k in ("resume", "no_progress", "log_every", "preset"):
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
        fixed = sorted(k for k in given if k not in _RESUMABLE and k != "out")
        changed = [k for k in fixed if given[k] != getattr(saved, k)]
        if changed:
            raise ValueError(f"--resume: options {changed} differ from {resume}/config.json; "
                             "only --steps and output options may change")
        merged = saved.to_dict()
        merged.update({k: v for k, v in given.items() if k in _RESUMABLE})
        merged["out"] = str(resume)
        return TrainOptions.from_dict(merged)
    merged = dict(PRESETS[ns.preset]) if getattr(ns, "preset", None) else {}
    merged.update(given)
    if merged.get("target") is not None:
        # config.json must still find the image when the run is resumed from another folder.
        merged["target"] = str(pathlib.Path(merged["target"]).expanduser().absolute())
    if merged.get("init") is not None:
        merged["init"] = str(pathlib.Path(merged["init"]).expanduser().absolute())
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
    except _UsageError as e:
        print(f"nca-fast train: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:            # --help
        return int(e.code or 0)
    resume = getattr(ns, "resume", None)
    try:
        options = options_from_args(ns)
        if options.mp4:
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise ValueError("--mp4: needs the imageio-ffmpeg package (pip install "
                                 "nca-fast[video]); or leave --mp4 out for GIF videos") from None
        progress = not getattr(ns, "no_progress", False)
        log_every = getattr(ns, "log_every", 0 if progress else 50)
        if isinstance(log_every, int) and log_every < 0:
            raise ValueError(f"--log-every: expected an integer >= 0, got {log_every}")
        run_dir = pathlib.Path(resume) if resume is not None else \
            pathlib.Path(options.out or _default_out(options))
        if resume is None and (run_dir / "checkpoint.safetensors").exists():
            raise ValueError(f"--out: {run_dir} already holds a run; continue it with --resume "
                             f"{run_dir} or choose another folder")
        runner = _Runner(options, run_dir, resume is not None, progress, log_every, _command(argv))
        runner.setup()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"nca-fast train: error: {_as_flag(str(e))}", file=sys.stderr)
        return 2
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
        self.dist_info = _init_distributed(o.device)
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
                nio.writable_folder(self.run_dir)
                self.lock = RunFolderLock(self.run_dir, flag).acquire()
                nio.remove_stale_temporaries(self.run_dir)
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
                    _write_config(t, self.run_dir)
                if self.command is not None:
                    line = (f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                            f"in {os.getcwd()}\n")
                    _append_text(self.run_dir / "command.txt", line + self.command + "\n")
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
