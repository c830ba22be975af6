"""The trainer: one run of the article's recipe (docs/MODEL.md, "Training"), step by step.

The recipe: a target image fitted in ``size`` cells and padded by ``pad`` on each side; every
batch starts from the seed ("grow") or is drawn from a pool of states ("persist": the
highest-loss sample is replaced by the seed and the final states are written back;
"regenerate": also damages the lowest-loss samples with a random circle); rollouts of a random
length; MSE over RGBA; Adam with a step drop of the learning rate; each parameter's gradient
divided by its own L2 norm before the optimizer step.

Reproducibility: every random choice (rollout length, pool samples, damage circles, the update
mask seeds given to ``NCA.forward``) comes from one ``torch.Generator`` seeded with ``--seed``,
drawn identically on every rank. A checkpoint (``checkpoints``) holds the weights, the Adam
state, the generator state, the pool and the loss history, so a run resumed from it ends
bitwise equal to one that was never interrupted (same device, same thread count).

Shards: the global batch is split into ``world_size * accumulate`` shards; shard ``s`` owns the
``s``-th contiguous part of the pool, samples its ``batch / shards`` states from it and runs its
rollout with its own mask seed. A single process with ``--accumulate 2`` therefore computes the
same thing as two DDP ranks (up to float summation order), and each rank stores only its part
of the pool.

Where to extend it: ``sample_batch`` draws a step's inputs, ``optimisation_step`` is one
optimizer step on them, ``at_checkpoint`` runs every ``save_every`` steps (evaluations of the
model belong there, before the checkpoint is written).

The best model (``outputs``): at each checkpoint the long-horizon score ranks the model
(``stability.rank``: one that holds, else one that grows, else one whose growth dies; then the
lower worst MSE). The best so far is kept in ``best.safetensors`` with its score in its
record; a checkpoint whose growth dies, diverges or overgrows prints one warning line with the
step, and ``stop_after_dead`` such deaths in a row end the run early.

The guard (docs/TRAINING.md, "Divergence"): a step whose loss or gradients are not finite, or
one of whose states leaves ``|x| <= state_bound``, is not applied: no optimizer step, no pool
write-back; the pool rows whose states failed are reseeded; the event is counted, logged and
kept in events.csv. A checkpoint or model is never written with a non-finite weight or pool
state. ``MAX_SKIPPED_IN_A_ROW`` failed steps in a row end the run with an error (the weights
have not changed since the first: the model diverges from every state it is given).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backends.interface import triton_usable
from ..devices import resolve_device
from ..media import load_target
from ..model import NCA, load_any
from ..resources import check as check_memory
from . import damage, stability
from .checkpoints import Checkpoints
from .distributed import Dist
from .options import DEFAULT_TARGET, TrainOptions, late_length, train_memory
from .options import mean_rollout as options_mean_rollout
from .outputs import Outputs
from .signals import GracefulStop, TrainingInterrupted


MAX_SKIPPED_IN_A_ROW = 50


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


def warm_start(model: NCA, path: str) -> None:
    """Copy the weights of the model file ``path`` into ``model`` (same architecture)."""
    init = load_any(path, backend="torch")
    a, b = dataclasses.asdict(init.config), dataclasses.asdict(model.config)
    a.pop("precision", None)
    b.pop("precision", None)
    diff = {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}
    if diff:
        shown = ", ".join(f"{k}={v[0]!r} (run: {v[1]!r})" for k, v in diff.items())
        raise ValueError(f"init: {path} has a different architecture: {shown}; give the run the "
                         "same --channels / --hidden / --fire-rate / --filters / --padding / "
                         "--no-last-bias / --learn-filters / --filter-bias")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(dict(init.named_parameters())[name])


@dataclass
class Batch:
    """One step's inputs on this process: ``x0`` (its shards' starting states, in order),
    ``rows`` (their pool rows; None without a pool), the rollout length and its shards' mask
    seeds."""

    x0: torch.Tensor
    rows: Optional[torch.Tensor]
    steps: int
    seeds: List[int]
    late: Optional[int] = None      # --late-loss: the continued rollout's length


@dataclass
class TrainResult:
    """What ``train`` returns: the run folder, the trained model (on the CPU), the loss per step."""

    run_dir: pathlib.Path
    model: NCA
    losses: List[float]
    steps: int


class Trainer(Checkpoints, Outputs):
    """One training run: model, optimizer, generator, pool; see the module docstring. Its
    checkpoint methods are ``checkpoints.Checkpoints``, its outputs and the best-model keeping
    ``outputs.Outputs``."""

    def __init__(self, options: TrainOptions, run_dir: pathlib.Path, *,
                 dist_info: Optional[Dist] = None, progress: bool = True, log_every: int = 0):
        self.opts = o = options.resolved()
        self.run_dir = pathlib.Path(run_dir)
        self.dist = dist_info or Dist()
        self.progress = progress
        self.log_every = log_every
        try:
            self.device = resolve_device(
                o.device, index=self.dist.local_rank if self.dist.enabled else None)
        except ValueError as e:
            raise ValueError(f"device: {e}") from None
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
        try:
            self.target = load_target(target, o.size, o.pad).to(self.device)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"target: {e}") from None
        self.grid = self.target.shape[-1]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            model = NCA(o.model_config(), backend=o.backend)
        if o.init is not None:
            warm_start(model, o.init)
        self.model = model.to(self.device)
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # A fixed filter bank is a constant buffer: nothing to broadcast each forward
            # (learned filters are parameters, all-reduced with the weights).
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
        self.target_live = stability.target_live_cells(self.target)
        self.counts: Dict[str, int] = {}         # guard events by kind (see _event)
        self.events: List[dict] = []             # rank 0: the events, for events.csv
        self.skipped_in_a_row = 0
        self.last_stability: List[stability.HorizonPoint] = []
        self.best: Optional[dict] = None         # the best checkpoint's score (best.safetensors)
        self.dead_in_a_row = 0                   # checkpoints in a row whose growth died
        self.stopped_early: Optional[str] = None
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
        """One step of the run: draw the batch, one optimizer step (unless the guard rejects
        it), the pool updated; returns the batch's mean loss (before the update; over the
        samples with a finite loss, NaN if none had one)."""
        o = self.opts
        batch = self.sample_batch()
        finals, losses, faults, applied = self.optimisation_step(batch.x0, batch.steps,
                                                                 batch.seeds, batch.late)
        losses_all = self.dist.gather(torch.cat(losses))
        fault = torch.cat(faults)
        if not applied:
            self._skipped(fault, batch.rows, losses_all)
        elif batch.rows is not None:
            final = torch.cat(finals)
            if o.reseed_runaway:
                runaway = stability.live_cells(final) > o.reseed_runaway * self.target_live
                n_run = int(self.dist.gather(runaway.sum().view(1)).sum())
                if n_run:
                    final[runaway] = self.seed_state[0]
                    self._event("runaway", n_run, f"> {o.reseed_runaway:g} x "
                                f"{self.target_live} live cells: reseeded")
            self.pool[batch.rows] = final
        finite = losses_all[torch.isfinite(losses_all)]
        loss = float(finite.double().mean()) if finite.numel() else math.nan
        self.losses.append(loss)
        self.step += 1
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} steps in a row up to step {self.step} were not applied "
                f"(non-finite losses, states or gradients; events.csv): the model diverges from "
                f"every state it is given; lower --lr, or start from an earlier checkpoint")
        return loss

    def sample_batch(self) -> "Batch":
        """This step's inputs, drawn from the run's generator in a fixed order: the rollout
        length, every shard's mask seed, then (pooled experiments) the samples and the damage
        circles. The highest-loss samples are reset to the seed, the lowest-loss damaged."""
        o, g = self.opts, self.generator
        K, S, bs = o.accumulate, self.shards, self.shard_batch
        first = self.dist.rank * K                      # this process's first shard
        lo, hi = self.rollout_range(self.step)
        n = int(torch.randint(lo, hi, (1,), generator=g))
        seeds = torch.randint(0, 2**62, (S,), generator=g).tolist()
        mine = seeds[first:first + K]
        # Drawn only when asked for: runs without --late-loss keep the article's random stream.
        late = int(torch.randint(n + 1, late_length(n, o.late_loss) + 1, (1,), generator=g)) \
            if o.late_loss else None
        if self.pool is None:
            return Batch(self.seed_state.expand(K * bs, -1, -1, -1).clone(), None, n, mine, late)
        picks = [torch.randperm(self.part, generator=g)[:bs] for _ in range(S)]
        rows = torch.cat([picks[first + k] + k * self.part for k in range(K)]).to(self.device)
        if o.experiment == "regenerate":
            circles = damage.draw_circles(o.damage, g)
        x0 = self.pool[rows].clone()
        with torch.no_grad():
            pre = self.dist.gather(per_sample_loss(x0, self.target, o.loss_levels))
        # Stable sort: ties (a pool full of seeds) break by sample order on every rank.
        order = torch.sort(pre.cpu(), descending=True, stable=True).indices.tolist()
        owned = range(first * bs, (first + K) * bs)
        for gi in order[:o.replace]:
            if gi in owned:
                x0[gi - owned.start] = self.seed_state[0]
        if o.experiment == "regenerate":
            lowest = order[::-1][:o.damage]
            for (centre, radius), gi in zip(circles, lowest):
                if gi in owned:
                    x0[gi - owned.start] *= damage.keep_mask(self.grid, self.grid, centre,
                                                             radius, device=self.device)
        return Batch(x0, rows, n, mine, late)

    def optimisation_step(self, x0: torch.Tensor, steps: int, seeds: Sequence[int],
                          late: Optional[int] = None):
        """One optimizer step: this process's shards of ``x0`` (``accumulate`` micro-batches,
        shard k with mask seed ``seeds[k]``) rolled out ``steps`` steps (and on to ``late``
        with ``--late-loss``), the loss's gradients (all-reduced under DDP), each normalised,
        and Adam at this step's learning rate -- unless the guard rejects the step.

        Returns the shards' final states (detached), per-sample losses, per-sample faults
        (non-finite loss, or a state beyond ``state_bound``) and whether the step was applied
        (the same answer on every rank)."""
        o = self.opts
        K, bs = o.accumulate, self.shard_batch
        self.optimizer.zero_grad(set_to_none=True)
        finals, losses, faults = [], [], []
        for k in range(K):
            sync = self.net is self.model or k == K - 1
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx:
                y = self.net(x0[k * bs:(k + 1) * bs], steps, seed=seeds[k],
                             checkpoint=o.checkpoint)
                states = [y]
                if late is not None:
                    # The same rollout continued (its masks are those of one ``late``-step
                    # rollout), through the bare module: DDP prepares its reducer once a step.
                    states.append(self.model(y, late - steps, seed=seeds[k], first_step=steps,
                                             checkpoint=o.checkpoint))
                per = sum(per_sample_loss(z, self.target, o.loss_levels)
                          for z in states) / len(states)
                if o.overflow_loss:
                    per = per + o.overflow_loss * sum(stability.overflow(z)
                                                      for z in states) / len(states)
                (per.mean() / K).backward()
            bad = ~torch.isfinite(per.detach())
            for z in states:
                bad |= stability.state_faults(z, o.state_bound)
            finals.append(states[-1].detach())
            losses.append(per.detach())
            faults.append(bad)
        self.grads_finite = all(bool(torch.isfinite(p.grad).all())
                                for p in self.model.parameters() if p.grad is not None)
        # Gradients are all-reduced (equal on every rank); faulty states are per rank.
        if self.dist.any(any(bool(f.any()) for f in faults) or not self.grads_finite,
                         self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return finals, losses, faults, False
        # After DDP's all-reduce: normalise the averaged gradients, identically on every rank.
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad /= p.grad.norm() + 1e-8
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.step()
        return finals, losses, faults, True

    # ------------------------------------------------------------------ the guard
    def _event(self, kind: str, samples: int, detail: str, step: Optional[int] = None) -> None:
        """Count an event of the guards (at ``step``, default: the step in progress); rank 0
        keeps it for events.csv and prints it (runaway reseeds are routine once asked for:
        they are counted in the log lines instead)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        step = self.step + 1 if step is None else step
        if self.dist.rank == 0:
            self.events.append({"step": step, "event": kind, "samples": samples,
                                "detail": detail})
            if kind != "runaway":
                print(f"nca-fast train: step {step}: {kind}: {detail}", file=sys.stderr,
                      flush=True)

    def _skipped(self, fault: torch.Tensor, rows, losses_all: torch.Tensor) -> None:
        """A step that is not applied: reseed the pool rows whose states failed."""
        n_fault = int(self.dist.gather(fault.sum().view(1)).sum())
        if rows is not None and bool(fault.any()):
            self.pool[rows[fault.to(rows.device)]] = self.seed_state[0]
        why = []
        if n_fault:
            why.append(f"{n_fault} sample(s) with a non-finite loss or a state beyond "
                       f"|x| <= {self.opts.state_bound:g}" +
                       (" (their pool states reseeded)" if rows is not None else ""))
        if not self.grads_finite:
            why.append("non-finite gradients")
        self._event("skipped", n_fault, "step not applied: " + "; ".join(why))

    def sanitize_pool(self) -> None:
        """Reseed pool states that are not finite (a checkpoint never holds one)."""
        if self.pool is None:
            return
        bad = ~torch.isfinite(self.pool).flatten(1).all(dim=1)
        if bool(bad.any()):
            self.pool[bad] = self.seed_state[0]
            self._event("pool", int(bad.sum()), "non-finite pool states reseeded before "
                        "the checkpoint", step=self.step)

    # ------------------------------------------------------------------ at each checkpoint
    def at_checkpoint(self) -> None:
        """What the run does every ``save_every`` steps and after its last step: write the
        checkpoint. Evaluations of the model at checkpoints belong here, before the save, so
        that a run resumed from any checkpoint repeats none of them and misses none: the
        long-horizon score (stability.csv) and the guard's events (events.csv)."""
        self.write_stability()
        self.save_checkpoint()


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
                    events = "".join(f", {k} {v}" for k, v in sorted(self.counts.items()))
                    print(f"step {self.step}/{o.steps} loss {loss:.6f} "
                          f"lr {self.lr_at(self.step - 1):.1e} elapsed {self.elapsed:.0f}s "
                          f"(process cpu {self.cpu_time:.0f}s){events}",
                          flush=True)
                saved = self.step % o.save_every == 0 or self.step == o.steps
                if saved:
                    self.at_checkpoint()
                    n = o.stop_after_dead
                    if n and self.dead_in_a_row >= n and self.step < o.steps:
                        self.stopped_early = (f"stopped at step {self.step} of {o.steps}: growth "
                                              f"from the seed died at {n} checkpoint(s) in a row "
                                              f"(--stop-after-dead {n})")
                        if self.dist.rank == 0:
                            print(f"nca-fast train: {self.stopped_early}", file=sys.stderr,
                                  flush=True)
                        break
                if on_step is not None:
                    on_step(self)
                signum = self.stop.signum if self.stop is not None else None
                if self.dist.any(signum is not None, self.device):
                    if not saved:
                        self.save_checkpoint()
                    raise TrainingInterrupted(self.step, signum or signal.SIGTERM)
        finally:
            bar.close()

    # ------------------------------------------------------------------ the time estimate
    def calibrate(self, steps: int = 8, warmup: int = 2, repeats: int = 3) -> Optional[dict]:
        """Time one training step's work on this machine (CPU only; None elsewhere): a copy of
        the model rolls this process's micro-batches out ``steps`` steps from states alive
        where the target is (the CPU path skips dead cells; docs/TRAINING.md, "Time estimates",
        has the estimates against measured runs), with the loss's backward, ``repeats`` times
        (the fastest counts: a timing on a shared machine is only ever slowed); scaled to the
        mean rollout length. Touches nothing of the run (weights, generator, pool). Returns
        {"step_s", "cpu_step_s", "steps", "samples"}."""
        import copy

        if self.device.type != "cpu":
            return None
        o = self.opts
        model = copy.deepcopy(self.model)
        x = torch.zeros(self.shard_batch, o.channels, self.grid, self.grid, device=self.device)
        x[:, :4] = self.target
        x[:, 3:] = (self.target[3:4] > 0.1).to(x.dtype)     # alive where the target is
        scale = options_mean_rollout(o) / steps * o.accumulate
        walls, cpus = float("inf"), float("inf")
        for n, timed in ((warmup, False),) + ((steps, True),) * repeats:
            t0, c0 = time.perf_counter(), time.process_time()
            y = model(x, n, seed=1, checkpoint=o.checkpoint)
            per_sample_loss(y, self.target, o.loss_levels).mean().backward()
            if timed:
                walls = min(walls, time.perf_counter() - t0)
                cpus = min(cpus, time.process_time() - c0)
        return {"step_s": walls * scale, "cpu_step_s": cpus * scale, "steps": steps,
                "samples": self.shard_batch * o.accumulate}
