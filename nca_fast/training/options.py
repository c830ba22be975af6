"""A training run's options: ``TrainOptions`` (every one validated, derived ones resolved), the
presets, which options a resumed run may change, and the run's memory estimate.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

from ..backends import BACKENDS, resolve as resolve_backend
from ..backends.interface import resolve_checkpoint
from ..config import (ARTICLE_GRID, FILTER_BANKS, LEARN_FILTERS, PADDINGS, PRECISIONS, NCAConfig,
                      from_fields)
from ..formats import param_shapes
from ..media import ASSETS
from ..resources import DEVICE as ON_DEVICE, HOST, Term, format_bytes, format_seconds, rollout_bytes

DEFAULT_TARGET = ASSETS / "default_target.png"

EXPERIMENTS = ("grow", "persist", "regenerate")
DEVICES = ("auto", "cpu", "cuda")
# The article's rollouts are [64, 96) steps on its 72-cell grid: about one to one and a third
# steps per cell of grid width, so that growth from the centre can reach the corners.
ARTICLE_ROLLOUT = (64, 96)
ARTICLE_LR_DROP_AT = 2000
ARTICLE_STEPS = 8000


@dataclass(frozen=True)
class TrainOptions:
    """Everything that defines a training run; ``None`` fields are derived by ``resolved``.

    The options of growth that holds (docs/TRAINING.md, "Growth that holds") are off by default,
    except the guard (``state_bound``).
    """

    # -- the target and the grid
    target: Optional[str] = None        # image path; None: assets/default_target.png
    size: int = 40                      # cells the image is fitted in
    pad: Optional[int] = None           # empty cells on each side; None: round(0.4 * size)
    # -- the recipe
    experiment: str = "persist"         # one of EXPERIMENTS: grow, persist (pool), regenerate
    steps: int = ARTICLE_STEPS          # optimizer steps
    batch: int = 8                      # global batch
    pool_size: int = 1024
    rollout_min: Optional[int] = None   # rollout length uniform in [min, max) steps; None: the
    rollout_max: Optional[int] = None   # article's [64, 96) scaled by grid / 72
    curriculum: float = 0.0             # fraction of the steps over which the rollout range
                                        # ramps from a quarter to its full length
    lr: float = 2e-3
    lr_drop_at: Optional[int] = None    # step of the drop; None: 2000, scaled by steps / 8000
    lr_drop_factor: float = 0.1         # the learning rate is multiplied by it at lr_drop_at
    replace: int = 1                    # samples of each pooled batch reset to the seed
    damage: int = 3                     # samples of each pooled batch damaged (regenerate)
    loss_levels: int = 1                # 1: plain MSE; L > 1: mean MSE over L 2x-downsampled
                                        # levels (helps large grids)
    # -- the model (NCAConfig)
    channels: int = 16
    hidden: int = 128
    fire_rate: float = 0.5
    precision: str = "tf32"
    filters: str = "sobel"              # a perception bank, a name from nca_fast.FILTER_BANKS
                                        # (with learn_filters, the learned filters' start)
    learn_filters: Optional[str] = None     # None (a fixed bank), "shared" or "depthwise"
    filter_bias: bool = False           # a learned bias per depthwise perception value
    padding: str = "zeros"              # one of nca_fast.PADDINGS: "zeros", "circular",
                                        # "replicate" or "reflect"
    last_bias: bool = True              # a bias on the second dense layer (--no-last-bias: none)
    # -- how it runs
    seed: int = 0                       # every random choice of the run
    backend: str = "auto"
    device: str = "auto"
    checkpoint: Union[None, str, int] = None    # activation checkpointing of the rollout:
                                                # None, "sqrt" or a segment length
    accumulate: int = 1                 # micro-batches per step per process
    save_every: int = 500               # steps between checkpoints
    video_steps: Optional[int] = None   # length of the output videos; None: 2 * rollout_max
    mp4: bool = False                   # MP4 videos instead of GIF
    threads: Optional[int] = None       # torch CPU threads
    out: Optional[str] = None           # the run folder
    init: Optional[str] = None          # a model file (nca_fast .safetensors or a Distill JSON)
                                        # whose weights start the run; same architecture
    # -- growth that holds
    state_bound: float = 1e3            # the guard: a step whose states exceed this magnitude
                                        # (or are not finite), or whose loss or gradients are
                                        # not finite, is not applied; its pool states reseeded
    overflow_loss: float = 0.0          # weight of a penalty on state values outside [-1, 1]
    late_loss: float = 0.0              # F > 1: each n-step rollout also continues to a length
                                        # uniform in [n + 1, F n]; the losses at both averaged
    reseed_runaway: float = 0.0         # R > 1: pool states with more than R times the
                                        # target's live cells are reseeded, not written back
    stability: bool = True              # the long-horizon score at every checkpoint
                                        # (stability.csv, .png), best.safetensors, warnings
    stop_after_dead: int = 0            # N > 0: end the run after N checkpoints in a row whose
                                        # growth from the seed died; 0: never

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
        for name in ("replace", "damage", "stop_after_dead"):
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
        for name, allowed in (("experiment", EXPERIMENTS), ("backend", BACKENDS),
                              ("precision", PRECISIONS), ("filters", tuple(FILTER_BANKS)),
                              ("padding", PADDINGS), ("device", DEVICES),
                              ("learn_filters", LEARN_FILTERS)):
            if getattr(self, name) not in allowed:
                bad(name, f"one of {allowed}")
        # Rates must be finite: an infinite lr makes every weight NaN at the first step.
        for name, lo, hi, text in (("lr", 0.0, math.inf, "a finite number > 0"),
                                   ("lr_drop_factor", 0.0, math.inf, "a finite number >= 0"),
                                   ("curriculum", 0.0, 1.0, "a number in [0, 1]"),
                                   ("fire_rate", 0.0, 1.0, "a number in [0, 1]"),
                                   ("state_bound", 0.0, math.inf, "a finite number > 0"),
                                   ("overflow_loss", 0.0, math.inf, "a finite number >= 0"),
                                   ("late_loss", 0.0, 100.0, "0 (off) or a number in (1, 100]"),
                                   ("reseed_runaway", 0.0, math.inf,
                                    "0 (off) or a finite number > 1")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi \
                    or not math.isfinite(v) or (name in ("lr", "state_bound") and v == 0) \
                    or (name in ("late_loss", "reseed_runaway") and 0 < v <= 1):
                bad(name, text)
        if not isinstance(self.stability, bool):
            bad("stability", "True or False")
        if not isinstance(self.last_bias, bool):
            bad("last_bias", "True or False")
        if not isinstance(self.filter_bias, bool):
            bad("filter_bias", "True or False")
        if self.filter_bias and self.learn_filters != "depthwise":
            bad("filter_bias", "False unless learn_filters is 'depthwise' (a bias on each "
                "depthwise perception value)")
        if self.padding == "reflect" and self.grid < 2:
            raise ValueError(f"padding: 'reflect' needs a grid of at least 2 x 2 cells, got "
                             f"{self.grid} x {self.grid}")
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
    def longest_rollout(self) -> int:
        """The longest rollout of the range (resolved options): the unit of the long-horizon
        score. ``late_loss`` trains beyond it (``longest_trained``)."""
        return self.rollout_max - 1

    @property
    def longest_trained(self) -> int:
        """The most steps a training rollout runs, ``late_loss``'s continuation included."""
        return late_length(self.rollout_max - 1, self.late_loss)

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
                         precision=self.precision, filters=self.filters, padding=self.padding,
                         last_bias=self.last_bias, learn_filters=self.learn_filters,
                         filter_bias=self.filter_bias)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        return from_fields(cls, d, "options")


# Options a resumed run may change: they do not alter the maths of a step (a different device or
# backend still gives a valid continuation, though not a bitwise equal one). A resumed run also
# keeps writing to its own folder, whatever ``out`` its options hold.
RESUMABLE = ("steps", "save_every", "video_steps", "mp4", "threads", "device", "backend",
             "stability", "stop_after_dead")

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
    # One GPU, 512 and 1024 cells: start from a grown smaller flower (--init MODEL), a padding of
    # 1/16 of the size, activation checkpointing (the rollouts are 500-1500 steps: their saved
    # states would not fit 80 GB otherwise), a loss pyramid down to ~32 cells, and the loss past
    # the rollout's end that made the CPU curriculum hold its pattern (docs/TRAINING.md).
    "hires512": dict(size=512, pad=32, hidden=128, batch=2, pool_size=64, steps=3000,
                     lr=1e-3, lr_drop_at=2400, checkpoint="sqrt", loss_levels=5,
                     curriculum=0.3, save_every=100, late_loss=3.0),
    # A photograph grown from one cell on a 64-cell grid (docs/TRAINING.md, "A photograph"): the
    # opaque photo is the whole grid (no padding), Sobel + Laplacian perception, a 3-level loss
    # pyramid; rollouts [64, 96). Fire rate 1: every cell updates every step, so growth spreads
    # a cell a step and the whole grid is alive by step 32 (the corners are 32 cells from the
    # centre), half the shortest rollout, which leaves the rest to refine. Defaults to the
    # shipped public-domain photo; --target replaces it.
    "photo": dict(target=str(ASSETS / "astronaut64.png"), size=64, pad=0, hidden=64,
                  filters="sobel_laplacian", loss_levels=3, rollout_min=64, rollout_max=96,
                  fire_rate=1.0, batch=4, pool_size=64, steps=500, lr_drop_at=400,
                  save_every=100),
    "hires1024": dict(size=1024, pad=64, hidden=128, batch=1, pool_size=32, steps=3000,
                      lr=1e-3, lr_drop_at=2400, checkpoint="sqrt", loss_levels=6,
                      curriculum=0.3, save_every=100, late_loss=3.0),
}

# What the time estimate of ``run_plan`` is scaled from (the measurements: bench/RESULTS.md): the
# H200's dense tf32 / bf16 matmul rates and device copy bandwidth; the CPU path's training rate
# (train 8 x 72 x 72, nca_fast-torch) as a fraction of its own compute floor. The fused kernels
# have not been timed on a GPU: the estimate assumes they reach the same fraction of their floor
# as the CPU path does of its own.
H200_FLOPS = {"tf32": 360e12, "bf16": 686e12, "ieee": 51e12}
H200_BYTES_PER_S = 4.24e12
CPU_TRAIN_FRACTION_OF_FLOOR = 0.742
CPU_TRAIN_CELL_STEPS_PER_S = 2.59e5      # the same run, one thread of the 2-core CPU


def late_length(n: int, factor: float) -> int:
    """The longest continuation of an n-step rollout under ``--late-loss factor`` (n if off)."""
    if not factor:
        return n
    return n + max(1, math.ceil((factor - 1) * n))


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
    n_params = (cfg.num_filters * o.channels + o.channels + 1) * o.hidden + o.channels + sum(
        math.prod(shape) for name, shape in param_shapes(cfg).items()
        if name in ("filters", "filter_bias"))
    micro = o.batch // shards
    steps = o.longest_trained
    rollout = rollout_bytes(resolve_backend(o.backend, device), micro * cells, o.channels,
                            o.hidden, cfg.num_filters, steps,
                            resolve_checkpoint(o.checkpoint, steps), True, grad=True)
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


def training_cost(o: TrainOptions):
    """(tensor FLOPs, HBM bytes) of one training cell-step of the fused kernels (``o``
    resolved): forward, perception-gradient and weight-gradient kernels (bench/NOTES.md,
    section 1), plus one more forward per cell-step when the rollout is checkpointed."""
    c, h, f = o.channels, o.hidden, o.model_config().num_filters
    k1 = -(-(f * c + 1) // 16) * 16              # perception columns + the bias column, padded
    fwd = k1 * h + h * c
    macs = fwd + (fwd + h * k1) + (fwd + k1 * h + h * c)
    nbytes = 24 * c + 8 * f * c + 8
    if o.checkpoint is not None:
        macs += fwd
        nbytes += 8 * c + 2
    return 2 * macs, nbytes


def mean_rollout(o: TrainOptions) -> float:
    """The mean number of steps a training rollout runs (``o`` resolved), ``late_loss``'s
    continuation included."""
    mean = (o.rollout_min + o.rollout_max - 1) / 2
    if o.late_loss:                    # continued to a length uniform in [n + 1, F n]
        mean *= 1 + (o.late_loss - 1) / 2
    return mean


def run_plan(o: TrainOptions, shards: int, device: torch.device,
             calibrated: Optional[dict] = None) -> List[str]:
    """Lines printed before a run starts: the memory estimate (the large buffers of
    ``train_memory``, device and host) and, labelled as an estimate, the time per step:
    ``calibrated`` (``Trainer.calibrate``: a short rollout timed on this machine) when given,
    else a model of the device's rate."""
    o = o.resolved()
    if device.type == "cuda" and o.backend == "auto":
        o = dataclasses.replace(o, backend="triton")     # what a GPU runs (a dry run here)
    terms = train_memory(o, shards, device)
    lines = []
    for where, name in ((ON_DEVICE, "cuda device"), (HOST, "host")):
        mine = [t for t in terms if (t.where == ON_DEVICE and device.type == "cuda")
                == (where == ON_DEVICE)]
        if not mine:
            continue
        total = sum(t.nbytes for t in mine)
        parts = ", ".join(f"{t.what} {format_bytes(t.nbytes)}"
                          for t in sorted(mine, key=lambda t: -t.nbytes)[:3])
        label = name if device.type == "cuda" else "host (the CPU path)"
        lines.append(f"memory estimate, {label}: {format_bytes(total)} per process ({parts})")
    cell_steps = o.batch * o.grid * o.grid * mean_rollout(o)
    if calibrated is not None:
        threads = max(1, torch.get_num_threads())
        idle = calibrated["cpu_step_s"] / threads      # the wall time with the cores to itself
        now = calibrated["step_s"]
        lines.append(
            f"time estimate: about {format_seconds(idle * o.steps)} for {o.steps} steps on an "
            f"otherwise idle machine ({calibrated['cpu_step_s']:.2g} CPU-seconds a step on "
            f"{threads} thread(s); at this moment's load, {format_seconds(now * o.steps)}). "
            f"Calibrated on this machine before the run: a {calibrated['steps']}-step rollout "
            f"and its backward on {calibrated['samples']} state(s) alive where the target is "
            f"(the CPU path skips dead cells), scaled to the mean rollout of "
            f"{mean_rollout(o):.3g} steps; the first steps, grown from seeds, run faster")
        return lines
    if device.type == "cuda":
        flops, nbytes = training_cost(o)
        floor = min(H200_FLOPS[o.precision] / flops, H200_BYTES_PER_S / nbytes)
        rate = CPU_TRAIN_FRACTION_OF_FLOOR * floor
        where = ("one H200 (the fused kernels, not yet timed on a GPU: the CPU path's measured "
                 f"{CPU_TRAIN_FRACTION_OF_FLOOR:.0%} of its floor applied to the H200 floor of "
                 f"{floor:.2e} cell-steps/s)")
    else:
        rate = CPU_TRAIN_CELL_STEPS_PER_S * 128 / o.hidden
        where = ("one thread of this project's 2-core CPU (its rate measured at hidden 128, "
                 "scaled by 128 / hidden; dead cells, which the CPU path skips, make it faster)")
    sec = cell_steps / rate
    lines.append(f"time estimate: about {format_seconds(sec * o.steps)} for {o.steps} steps "
                 f"({format_seconds(sec)} a step; {cell_steps:.3g} cell-steps a step at "
                 f"{rate:.3g} cell-steps/s on {where}; an estimate, not a measurement)")
    return lines
