"""Does a grown pattern stay? The long-horizon score of a model, and the trainer's guards.

A Growing-NCA is trained on rollouts of at most R steps, but it is used for many more: the
pattern should grow within R steps and then hold. ``long_horizon`` grows the model from the
seed for 10 R steps and records, at 1x, 2x, 5x and 10x R, the MSE to the target (plain MSE over
premultiplied RGBA at full resolution) and the number of live cells (alpha > the model's alive
threshold, 0.1 by default) next to the target's. A model that holds its pattern keeps both
flat; one that overgrows shows the live count climbing past the target's; one that decays
shows it falling. The trainer writes these rows to ``stability.csv`` (and ``stability.png``)
in the run folder at every checkpoint; ``nca-fast grow --steps N`` prints them for any model.

The guards (``state_faults``, ``overflow``) are the per-sample tests the trainer applies to a
step before it is allowed to change the weights or the pool (docs/TRAINING.md, "Divergence").
"""
from __future__ import annotations

import csv
import io as _pyio
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch

from ..files import atomic_write
from ..formats import read_metadata
from ..media import ASSETS
from .run_folder import TRAINING_KEY

MULTIPLES = (1, 2, 5, 10)
# The update-mask key of every long-horizon growth: fixed, so that scores of two checkpoints or
# two models differ by the model alone.
SEED = 7
LIVE_THRESHOLD = 0.1
CSV_FIELDS = ("train_step", "multiple", "grow_steps", "mse", "live_cells", "target_live_cells",
              "live_ratio")


@dataclass(frozen=True)
class HorizonPoint:
    """One row of the score: after ``grow_steps`` steps from the seed (``multiple`` x R)."""

    multiple: Optional[float]
    grow_steps: int
    mse: Optional[float]
    live_cells: int
    target_live_cells: Optional[int]

    @property
    def live_ratio(self) -> Optional[float]:
        if not self.target_live_cells:
            return None
        return self.live_cells / self.target_live_cells


def live_cells(x: torch.Tensor, threshold: float = LIVE_THRESHOLD) -> torch.Tensor:
    """Cells with alpha (channel 3) above ``threshold``, per sample of a B x C x H x W state
    (non-finite alpha counts as not live)."""
    return (x[:, 3] > threshold).flatten(1).sum(dim=1)


def target_live_cells(target: torch.Tensor, threshold: float = LIVE_THRESHOLD) -> int:
    """Live cells of a 4 x H x W premultiplied RGBA target."""
    return int((target[3] > threshold).sum())


def mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain MSE over RGBA of each sample of ``x`` against ``target`` (4 x H x W): (B,)."""
    return ((x[:, :4] - target.unsqueeze(0)) ** 2).mean(dim=(1, 2, 3))


def state_faults(x: torch.Tensor, bound: float) -> torch.Tensor:
    """(B,) bool: samples with a non-finite value or one whose magnitude exceeds ``bound``."""
    peak = x.detach().abs().flatten(1).amax(dim=1)
    return ~(peak <= bound)            # NaN compares false: a NaN sample is a fault


def overflow(x: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared excess of the state beyond [-1, 1], every channel: the penalty that
    keeps hidden channels from drifting to large values over long rollouts."""
    return ((x - x.clamp(-1.0, 1.0)) ** 2).flatten(1).mean(dim=1)


def horizon_steps(longest: int, multiples: Sequence[float] = MULTIPLES) -> List[int]:
    return [max(1, round(m * longest)) for m in multiples]


@torch.no_grad()
def grow_and_score(model, size: int, steps: Sequence[int], target: Optional[torch.Tensor] = None,
                   *, seed: int = SEED, device=None, multiples: Optional[Sequence[float]] = None
                   ) -> List[HorizonPoint]:
    """Grow ``model`` from the seed on a ``size`` x ``size`` grid, scoring at each of ``steps``.

    target: 4 x size x size premultiplied RGBA, or None (live cells only). The rollout is run in
    pieces with ``first_step`` so that its masks are those of one uninterrupted rollout.
    """
    if device is None:
        device = next(model.parameters()).device
    threshold = getattr(model.config, "alive_threshold", None) or LIVE_THRESHOLD
    order = sorted(set(int(s) for s in steps))
    if target is not None:
        target = target.to(device)
        if tuple(target.shape[-2:]) != (size, size):
            raise ValueError(f"target: expected a 4 x {size} x {size} image, got "
                             f"{tuple(target.shape)}")
        t_live = target_live_cells(target, threshold)
    else:
        t_live = None
    mult = dict(zip([int(s) for s in steps], multiples)) if multiples is not None else {}
    x = model.seed_state(1, size, size, device=device)
    done, rows = 0, []
    for s in order:
        if s > done:
            x = model(x, s - done, seed=seed, first_step=done)
            done = s
        err = float(mse(x, target)[0]) if target is not None else None
        rows.append(HorizonPoint(mult.get(s), s, err, int(live_cells(x, threshold)[0]), t_live))
    return rows


def long_horizon(model, target: torch.Tensor, longest: int, *,
                 multiples: Sequence[float] = MULTIPLES, seed: int = SEED, device=None
                 ) -> List[HorizonPoint]:
    """The score: grow on the target's grid, rows at ``multiples`` x ``longest`` steps."""
    steps = horizon_steps(longest, multiples)
    return grow_and_score(model, int(target.shape[-1]), steps, target, seed=seed, device=device,
                          multiples=multiples)


def holds(rows: Sequence[HorizonPoint], mse_factor: float = 1.5,
          live_tolerance: float = 0.2) -> bool:
    """The project's criterion for a pattern that stays (docs/TRAINING.md): at the last row
    (10x the longest rollout), MSE within ``mse_factor`` x the first row's (1x) and live cells
    within ``live_tolerance`` of the target's."""
    if not rows or rows[0].mse is None:
        return False
    first, last = rows[0], rows[-1]
    if not (last.mse <= mse_factor * first.mse):
        return False
    return last.live_ratio is not None and abs(last.live_ratio - 1) <= live_tolerance


# A score's verdict, best first: the order in which the trainer ranks its checkpoints.
VERDICTS = ("holds", "drifts", "overgrows", "decays", "dies", "diverges")
CRITERION = ("MSE at 10x within 1.5x of 1x and live cells within 20 % of the target's")


def verdict(rows: Sequence[HorizonPoint], mse_factor: float = 1.5,
            live_tolerance: float = 0.2) -> str:
    """One word for a score: ``holds`` (``holds``), else ``diverges`` (a non-finite MSE),
    ``dies`` (0 live cells at some horizon: growth from the seed died), ``overgrows`` / ``decays``
    (live cells at 10x more / less than ``live_tolerance`` off the target's), ``drifts`` (the
    live count holds but the MSE at 10x exceeds ``mse_factor`` x the 1x figure)."""
    if not rows:
        raise ValueError("rows: expected at least one score row")
    if any(r.mse is not None and not math.isfinite(r.mse) for r in rows):
        return "diverges"
    if any(r.live_cells == 0 for r in rows):
        return "dies"
    if holds(rows, mse_factor, live_tolerance):
        return "holds"
    ratio = rows[-1].live_ratio
    if ratio is not None and ratio > 1 + live_tolerance:
        return "overgrows"
    if ratio is not None and ratio < 1 - live_tolerance:
        return "decays"
    return "drifts"


def rank(rows: Sequence[HorizonPoint]) -> tuple:
    """Sort key of a score, smaller is better: a model that holds before one that grows but
    does not hold (drifts, overgrows, decays) before one whose growth dies or diverges; within a
    class, the lower worst MSE over the horizons."""
    v = verdict(rows)
    cls = 0 if v == "holds" else 2 if v in ("dies", "diverges") else 1
    errs = [r.mse for r in rows if r.mse is not None]
    worst = max(errs) if errs and all(math.isfinite(e) for e in errs) else math.inf
    return (cls, worst)


def format_rows(rows: Iterable[HorizonPoint]) -> str:
    """The score as a small text table (what ``nca-fast grow`` prints)."""
    lines = ["  horizon  steps        MSE   live cells  / target"]
    for r in rows:
        h = f"{r.multiple:g}x" if r.multiple is not None else "-"
        m = f"{r.mse:10.5f}" if r.mse is not None else "         -"
        t = f"{r.target_live_cells:>8d} ({r.live_ratio:.2f}x)" if r.target_live_cells else "       -"
        lines.append(f"  {h:>7} {r.grow_steps:>6d} {m} {r.live_cells:>12d}  {t}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run-folder files
def read_csv(path: pathlib.Path) -> List[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_files(run_dir: pathlib.Path, train_step: int, rows: Sequence[HorizonPoint]) -> None:
    """Add this checkpoint's rows to ``stability.csv`` (replacing any of the same or a later
    training step: a resumed run recomputes them) and redraw ``stability.png``; atomic."""
    path = run_dir / "stability.csv"
    kept = [r for r in read_csv(path) if int(r["train_step"]) < train_step]
    for p in rows:
        kept.append({"train_step": train_step, "multiple": p.multiple, "grow_steps": p.grow_steps,
                     "mse": repr(p.mse), "live_cells": p.live_cells,
                     "target_live_cells": p.target_live_cells,
                     "live_ratio": "" if p.live_ratio is None else repr(p.live_ratio)})
    buf = _pyio.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    text = buf.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text))
    _plot(kept, run_dir / "stability.png")


def _plot(rows: List[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    by_step: dict = {}
    for r in rows:
        by_step.setdefault(int(r["train_step"]), []).append(r)
    fig = Figure(figsize=(8, 3.5), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = sorted(by_step)
    for i, s in enumerate(steps):
        pts = sorted(by_step[s], key=lambda r: int(r["grow_steps"]))
        last = i == len(steps) - 1
        style = dict(lw=2.0 if last else 0.8, alpha=1.0 if last else 0.25 + 0.5 * i / len(steps),
                     marker="o" if last else None, color="C0" if last else "grey",
                     label=f"training step {s}" if last else None)
        xs = [int(r["grow_steps"]) for r in pts]
        errs = [float(r["mse"]) for r in pts]
        ax1.plot(xs, errs, **style)
        ratios = [float(r["live_ratio"]) if r["live_ratio"] else math.nan for r in pts]
        ax2.plot(xs, ratios, **style)
    ax1.set_xscale("log")
    ax1.set_xlabel("steps grown from the seed")
    ax1.set_ylabel("MSE to the target (RGBA)")
    if rows and all(float(r["mse"]) > 0 for r in rows):
        ax1.set_yscale("log")
    ax2.axhspan(0.8, 1.2, color="green", alpha=0.08, label="within 20 %")
    ax2.axhline(1.0, color="green", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_xlabel("steps grown from the seed")
    ax2.set_ylabel("live cells / target's")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(loc="best", fontsize=8)
    fig.suptitle("long-horizon score (1x, 2x, 5x, 10x the longest training rollout)",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# --------------------------------------------------------------------------- model files
def model_facts(path) -> dict:
    """What a model file says about its training: grid, size, pad, rollout, longest_rollout,
    target, grow_hint. From ``NAME.json`` beside the file when it exists (the shipped models),
    else from the trainer's metadata inside a .safetensors; {} when neither is there."""
    path = pathlib.Path(path)
    side = path.with_suffix(".json")
    facts: dict = {}
    if path.suffix == ".safetensors":
        try:
            meta = read_metadata(path)
            if TRAINING_KEY in meta:
                facts = json.loads(meta[TRAINING_KEY])
        except (ValueError, OSError):
            facts = {}
        if side.is_file():
            try:
                extra = json.loads(side.read_text())
            except (ValueError, OSError):
                extra = {}
            if isinstance(extra, dict):
                facts = {**facts, **extra}
    if not isinstance(facts, dict):
        return {}
    if "longest_rollout" not in facts and isinstance(facts.get("rollout"), list):
        facts["longest_rollout"] = int(facts["rollout"][1]) - 1
    return facts


def resolve_target(name, model_path) -> Optional[pathlib.Path]:
    """The target image a model's metadata names: an existing path, or a file of that name in
    the package's assets or beside the model; None when it cannot be found."""
    if not name:
        return None
    p = pathlib.Path(name)
    for cand in (p, ASSETS / p.name, pathlib.Path(model_path).parent / p.name):
        if cand.is_file():
            return cand
    return None
