"""The benchmarks' rows shown: text and Markdown tables of the suite, and its figures.

Rows are ``bench.harness.Recorder`` rows (or ``read_csv``'s): ``format_table`` prints the suite,
``markdown_table`` gives bench/RESULTS.md its tables, ``plot_throughput`` draws cell-steps per
second per size and ``plot_sweeps`` memory and speed against T and grid size.
"""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

from bench.harness import save_figure
from bench.providers import PROVIDER_NAMES


def _fmt(v: float) -> str:
    return "-" if v != v else f"{v:.3g}"


def _by_case(rows: Sequence[dict], keep=lambda r: True) -> dict:
    """{(mode, size, steps, provider): {metric: row}} of the rows ``keep`` accepts, in order."""
    by = {}
    for r in rows:
        if keep(r):
            key = (r["mode"], r["size"], str(r["steps"]), r["provider"])
            by.setdefault(key, {})[r["metric"]] = r
    return by


def format_table(rows: Sequence[dict]) -> str:
    """The suite as a text table: one line per (mode, size, provider)."""
    by = _by_case(rows)
    head = (f"{'mode':8s} {'size':>14s} {'T':>5s} {'provider':16s} {'cell-steps/s':>12s} "
            f"{'p20..p80':>19s} {'vs eager':>8s} {'compile s':>9s} {'memory MiB':>10s}  note")
    lines = [head, "-" * len(head)]
    for (mode, size, steps, prov), m in by.items():
        if mode not in ("forward", "train", "train-ckpt") and "unavailable" not in m \
                and "rejected" not in m:
            continue
        cs = m.get("cell_steps_per_s")
        ratio = m.get("ratio_vs_eager")
        comp = m.get("compile_s")
        mem = m.get("peak_bytes") or m.get("saved_bytes")
        note = next((m[k]["note"] for k in ("unavailable", "rejected", "error", "skipped")
                     if k in m), "")
        lines.append(
            f"{mode:8s} {size:>14s} {steps:>5s} {prov:16s} "
            f"{_fmt(cs['median']) if cs else '-':>12s} "
            f"{(_fmt(cs['p20']) + '..' + _fmt(cs['p80'])) if cs else '-':>19s} "
            f"{(_fmt(ratio['median']) + 'x') if ratio else '-':>8s} "
            f"{_fmt(comp['median']) if comp else '-':>9s} "
            f"{_fmt(mem['median'] / 2**20) if mem else '-':>10s}  {note}")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], modes: Optional[Sequence[str]] = None) -> str:
    """The suite as a Markdown table (for bench/RESULTS.md), with the ratio to the floor.

    ratio to floor: measured cell-steps/s over the run's own compute floor for that mode (the
    ``floor`` rows: matmul rate / FLOPs per cell-step; see bench/NOTES.md); 1.0 would be the
    dense layers running at the matmul rate with everything else free.
    """
    floors = {r["mode"]: r["median"] for r in rows if r["provider"] == "floor"}
    by = _by_case(rows, lambda r: (r["mode"] in modes if modes else r["mode"] != "check")
                  and r["provider"] in PROVIDER_NAMES)
    per_cpu = any(r["metric"] == "cell_steps_per_cpu_s" for r in rows)
    out = ["| mode | size (BxHxW) | T | provider | cell-steps/s median [p20, p80] | vs eager "
           "| compile s | memory MiB | ratio to floor |" + (" cell-steps per CPU-s |" if per_cpu
                                                              else ""),
           "| --- " * (10 if per_cpu else 9) + "|"]
    for (mode, size, steps, prov), m in by.items():
        cs, ratio = m.get("cell_steps_per_s"), m.get("ratio_vs_eager")
        comp, mem = m.get("compile_s"), m.get("peak_bytes") or m.get("saved_bytes")
        note = next((m[k]["note"] for k in ("error", "skipped") if k in m), "")
        if cs is None and not note:
            continue
        speed = (f"{cs['median']:.3g} [{cs['p20']:.3g}, {cs['p80']:.3g}]" if cs else note)
        floor = floors.get(mode)
        out.append(f"| {mode} | {size} | {steps} | {prov} | {speed} | "
                   f"{(format(ratio['median'], '.2f') + 'x') if ratio else '-'} | "
                   f"{format(comp['median'], '.2g') if comp else '-'} | "
                   f"{format(mem['median'] / 2**20, '.3g') if mem else '-'} | "
                   f"{format(cs['median'] / floor, '.3f') if cs and floor else '-'} |"
                   + (f" {format(m['cell_steps_per_cpu_s']['median'], '.3g')} |"
                      if per_cpu and "cell_steps_per_cpu_s" in m else (" - |" if per_cpu else "")))
    return "\n".join(out)


def plot_throughput(rows: Sequence[dict], path) -> pathlib.Path:
    """Bar chart of cell-steps/s per size (log scale), one panel per mode, p20..p80 whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("forward", "train") if any(
        r["mode"] == m and r["metric"] == "cell_steps_per_s" for r in rows)]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6.5 * max(len(modes), 1), 4.2),
                             squeeze=False)
    env = rows[0] if rows else {}
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode and r["metric"] == "cell_steps_per_s"
               and r["provider"] in PROVIDER_NAMES]
        sizes = list(dict.fromkeys(f"{r['size']}\nT={r['steps']}" for r in sel))
        provs = [p for p in PROVIDER_NAMES if any(r["provider"] == p for r in sel)]
        width = 0.8 / max(len(provs), 1)
        for j, p in enumerate(provs):
            xs, ys, lo, hi = [], [], [], []
            for i, s in enumerate(sizes):
                r = next((r for r in sel if r["provider"] == p
                          and f"{r['size']}\nT={r['steps']}" == s), None)
                if r is not None:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(r["median"])
                    lo.append(r["median"] - r["p20"])
                    hi.append(r["p80"] - r["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=p, capsize=2)
        floor = next((r["median"] for r in rows if r["provider"] == "floor"
                      and r["mode"] == mode), None)
        if floor:
            ax.axhline(floor, color="k", ls="--", lw=1, label="compute floor (matmul rate)")
        ax.set_xticks(range(len(sizes)), sizes, fontsize=8)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.set_yscale("log")
        ax.set_ylabel("cell-steps / s (median)")
        ax.set_title(f"{mode}")
        ax.legend(fontsize=7)
    return save_figure(fig, path, env)



def plot_sweeps(rows: Sequence[dict], path) -> pathlib.Path:
    """2 x 2 panels: memory and cell-steps/s against T and against grid side, per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    env = rows[0] if rows else {}
    for col, (sweep, xlabel) in enumerate((("t", "rollout length T (steps)"),
                                          ("grid", "grid side (cells), batch 1"))):
        label = f"train:{sweep}-sweep"
        for row, metrics in enumerate((("peak_bytes", "saved_bytes"), ("cell_steps_per_s",))):
            ax = axes[row][col]
            for prov in PROVIDER_NAMES:
                pts = []
                for r in rows:
                    if r["mode"] == label and r["provider"] == prov and r["metric"] in metrics:
                        b, h, _ = (int(v) for v in r["size"].split("x"))
                        pts.append((int(r["steps"]) if sweep == "t" else h, r["median"],
                                    r["metric"]))
                if not pts:
                    continue
                pts.sort()
                scale = 2**20 if row == 0 else 1.0
                ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], "o-", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            if row == 0:
                kind = next((r["metric"] for r in rows if r["metric"] in metrics), "memory")
                ax.set_ylabel(f"{kind} of one training iteration (MiB)")
            else:
                ax.set_ylabel("training cell-steps / s (median)")
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center",
                        transform=ax.transAxes)
    return save_figure(fig, path, env)
