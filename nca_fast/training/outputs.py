"""What a training run writes besides its checkpoint, and how it ranks its models: the
long-horizon score at each checkpoint (stability.csv, stability.png) and the best model so far
(best.safetensors, ranked by ``stability.rank``), events.csv, the final model with its training
record, the loss curve and the videos, and the summary printed at the end. Rank 0 writes them.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import List, Sequence

import torch

from ..files import atomic_write
from ..media import write_png, write_video
from . import damage, stability
from .run_folder import save_model, write_loss_outputs


def _best_key(score: dict):
    worst = score.get("worst_mse")
    return (int(score["class"]), math.inf if worst is None else float(worst))


def describe_score(score: dict) -> str:
    """A best-model record in words: "holds, MSE 0.0123 at 1x, 0.0128 at 10x"."""
    parts = [score["verdict"]]
    if score.get("mse_1x") is not None:
        parts.append(f"MSE {score['mse_1x']:.4g} at 1x")
    if score.get("mse_10x") is not None:
        parts.append(f"{score['mse_10x']:.4g} at 10x")
    return ", ".join(parts)


class Outputs:
    """The output methods of ``Trainer`` (a mixin): they read its ``opts``, ``dist``,
    ``run_dir``, ``model``, ``seed_state``, ``grid``, ``target``, ``step``, ``losses``, timings
    and guard events, and keep ``last_stability``, ``best`` and ``dead_in_a_row``."""

    def write_stability(self) -> None:
        """Rank 0: events.csv with the guard's events so far and, with ``opts.stability``, the
        long-horizon score of the model as it is now, added to stability.csv / .png."""
        if self.dist.rank != 0:
            return
        self.write_events()
        if not self.opts.stability:
            return
        was = self.model.training
        self.model.eval()
        try:
            rows = stability.long_horizon(self.model, self.target, self.opts.longest_rollout)
        finally:
            self.model.train(was)
        self.last_stability = rows
        stability.write_files(self.run_dir, self.step, rows)
        self.keep_best(rows)
        if self.log_every:
            first, last = rows[0], rows[-1]
            print(f"step {self.step}: long-horizon score: MSE {first.mse:.5f} at "
                  f"{first.grow_steps} steps, {last.mse:.5f} at {last.grow_steps}; live cells "
                  f"{last.live_cells} (target {last.target_live_cells})", flush=True)

    def keep_best(self, rows: Sequence[stability.HorizonPoint]) -> None:
        """Rank 0, at a checkpoint: write ``best.safetensors`` when this model ranks above the
        best so far (``stability.rank``); a warning line when its growth dies, diverges or
        overgrows; count the deaths in a row (``stop_after_dead``)."""
        v = stability.verdict(rows)
        cls, worst = stability.rank(rows)
        first, last = rows[0], rows[-1]
        score = {"step": self.step, "verdict": v, "class": cls,
                 "worst_mse": worst if math.isfinite(worst) else None,
                 "mse_1x": first.mse, "mse_10x": last.mse,
                 "live_ratio_10x": last.live_ratio,
                 "criterion": stability.CRITERION}
        if score["mse_1x"] is not None and not math.isfinite(score["mse_1x"]):
            score["mse_1x"] = None
        if score["mse_10x"] is not None and not math.isfinite(score["mse_10x"]):
            score["mse_10x"] = None
        if self.best is None or (cls, worst) < _best_key(self.best):
            self.best = score
            save_model(self.model, self.run_dir / "best.safetensors",
                       {**self.training_metadata(), "best": score})
        dead = v in ("dies", "diverges")
        self.dead_in_a_row = self.dead_in_a_row + 1 if dead else 0
        if v in ("dies", "diverges", "overgrows"):
            what = {"dies": next((f"0 live cells after {r.grow_steps} steps" for r in rows
                                  if r.live_cells == 0), ""),
                    "diverges": "non-finite states",
                    "overgrows": f"{last.live_ratio:.2f}x the target's live cells after "
                                 f"{last.grow_steps} steps" if last.live_ratio else ""}[v]
            b = self.best
            keep = ("this model is still the best so far" if b["step"] == self.step else
                    f"best.safetensors keeps step {b['step']} ({describe_score(b)})")
            print(f"nca-fast train: step {self.step}: WARNING: growth from the seed "
                  f"{v.upper()} ({what}); {keep}", file=sys.stderr, flush=True)

    def summary(self) -> List[str]:
        """The end of a run in words: the last score's verdict, then which file to use and why."""
        lines = []
        if self.stopped_early:
            lines.append(self.stopped_early)
        if self.last_stability:
            v = stability.verdict(self.last_stability)
            said = "holds" if v == "holds" else f"does not hold: its growth {v}"
            lines.append(f"final model (step {self.step}): {said} (the criterion of holding: "
                         f"{stability.CRITERION})")
        b = self.best
        if b is None:
            lines.append("use model.safetensors (no long-horizon score was taken: "
                         "--no-stability)")
        elif b["step"] == self.step:
            lines.append(f"use model.safetensors: the final model is the best checkpoint "
                         f"({describe_score(b)}); best.safetensors holds the same weights")
        else:
            lines.append(f"use best.safetensors: the model of step {b['step']}, the best "
                         f"checkpoint ({describe_score(b)}); the final model.safetensors ranks "
                         f"below it")
        if b is not None and b["class"] > 0:
            lines.append("no checkpoint held its pattern" if b["class"] == 1 else
                         "no checkpoint grew from the seed: lower --lr or start from an earlier "
                         "model (--init)")
        return lines

    def write_events(self) -> None:
        """events.csv: every step the guard skipped, or reseeded states in (rank 0)."""
        import csv
        import io

        if self.dist.rank != 0:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["step", "event", "samples", "detail"], lineterminator="\n")
        w.writeheader()
        w.writerows(self.events)
        text = buf.getvalue()
        atomic_write(self.run_dir / "events.csv", lambda tmp: tmp.write_text(text))

    def training_metadata(self) -> dict:
        """What a user of the final model needs to grow it as it was trained."""
        o = self.opts
        return {"experiment": o.experiment, "grid": self.grid, "size": o.size, "pad": o.pad,
                "rollout": [o.rollout_min, o.rollout_max], "steps": self.step, "seed": o.seed,
                "final_loss": next((v for v in reversed(self.losses) if math.isfinite(v)), None),
                "train_wall_s": round(self.elapsed, 1), "train_cpu_s": round(self.cpu_time, 1),
                "target": str(o.target) if o.target is not None else "default_target.png",
                "init": o.init, "longest_rollout": o.longest_rollout,
                "longest_trained": o.longest_trained, "guard_events": dict(self.counts),
                "stability": [dataclasses.asdict(r) for r in self.last_stability],
                "verdict": stability.verdict(self.last_stability) if self.last_stability
                else None}

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
            write_video(frames, self.run_dir / f"growth{ext}", fps=20, scale=scale)
            write_png(x[0], self.run_dir / "final.png", scale=scale)
            if o.experiment == "regenerate":
                # Cut out the lower-right part of the grown pattern, then let it regrow.
                damaged = x * damage.keep_mask(self.grid, self.grid, (0.3, 0.3), 0.4,
                                               device=x.device)
                _, regrow = model(damaged, o.video_steps, seed=video_seed + 1, frames=every)
                write_video(frames[-10:] + regrow, self.run_dir / f"regenerate{ext}",
                                fps=20, scale=scale)
