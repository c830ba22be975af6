"""Growth that holds: the long-horizon score, the divergence guard, the options that keep a
pattern from overgrowing, and ``nca-fast grow``'s printed score.

Runs are tiny (8-cell targets on 12-cell grids, torch backend): the point is what the trainer
does with a bad step, not the quality of the model.
"""
import csv
import math
import pathlib

import pytest
import torch

from nca_fast.cli import main as cli_main
from nca_fast.train import TrainOptions, Trainer, cli_main as train_cli, train
from nca_fast.training import options as O, stability
from nca_fast.training import trainer as TR

from cases import TINY


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(tr):
    return ({k: v.detach().clone() for k, v in tr.model.state_dict().items()},
            tr.pool.clone() if tr.pool is not None else None)


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- score
def test_long_horizon_rows_and_multiples():
    from nca_fast import NCA

    torch.manual_seed(0)
    model = NCA(backend="torch")
    target = torch.zeros(4, 12, 12)
    target[:, 4:8, 4:8] = 1.0
    rows = stability.long_horizon(model, target, 3)
    assert [r.grow_steps for r in rows] == [3, 6, 15, 30]
    assert [r.multiple for r in rows] == [1, 2, 5, 10]
    assert all(r.target_live_cells == 16 for r in rows)
    # The rows are those of one uninterrupted rollout with the same update-mask key.
    with torch.no_grad():
        x = model(model.seed_state(1, 12, 12), 30, seed=stability.SEED)
    assert rows[-1].mse == pytest.approx(float(((x[0, :4] - target) ** 2).mean()), rel=1e-6)
    assert rows[-1].live_cells == int((x[0, 3] > 0.1).sum())


def test_holds_criterion():
    P = stability.HorizonPoint
    good = [P(1, 10, 0.010, 100, 100), P(10, 100, 0.014, 110, 100)]
    assert stability.holds(good)
    assert not stability.holds([P(1, 10, 0.010, 100, 100), P(10, 100, 0.016, 100, 100)])
    assert not stability.holds([P(1, 10, 0.010, 100, 100), P(10, 100, 0.010, 125, 100)])
    assert stability.holds([P(1, 10, 0.010, 125, 100), P(10, 100, 0.010, 119, 100)])
    assert not stability.holds([P(1, 10, math.nan, 100, 100), P(10, 100, 0.01, 100, 100)])


def test_verdicts_and_their_order():
    P = stability.HorizonPoint
    rows = {"holds": [P(1, 10, 0.010, 100, 100), P(10, 100, 0.014, 110, 100)],
            "drifts": [P(1, 10, 0.010, 100, 100), P(10, 100, 0.020, 100, 100)],
            "overgrows": [P(1, 10, 0.010, 100, 100), P(10, 100, 0.011, 130, 100)],
            "decays": [P(1, 10, 0.010, 100, 100), P(10, 100, 0.011, 70, 100)],
            "dies": [P(1, 10, 0.010, 100, 100), P(10, 100, 0.050, 0, 100)],
            "diverges": [P(1, 10, 0.010, 100, 100), P(10, 100, math.nan, 0, 100)]}
    for want, r in rows.items():
        assert stability.verdict(r) == want
    order = sorted(rows, key=lambda k: stability.rank(rows[k]))
    assert order[0] == "holds" and set(order[-2:]) == {"dies", "diverges"}
    # Within a class, the lower worst MSE ranks first; a dead model never beats a growing one
    # even with a lower MSE (an empty grid can score well against a small target).
    dead_but_close = [P(1, 10, 0.001, 0, 100), P(10, 100, 0.001, 0, 100)]
    assert stability.rank(dead_but_close) > stability.rank(rows["drifts"])
    with pytest.raises(ValueError, match="rows"):
        stability.verdict([])


def test_a_run_pushed_to_die_keeps_and_names_the_model_that_grew(tmp_path, capsys):
    """The shipped model, trained 2 steps at a small rate (it still holds), then at an absurd
    one (lr 0.3: its growth diverges or dies): best.safetensors keeps the step-2 model, the
    warnings name the steps, the summary names the file, and --stop-after-dead ends the run."""
    from nca_fast import load
    from nca_fast.training.options import DEFAULT_TARGET

    out = tmp_path / "run"
    rc = train_cli(["--target", str(DEFAULT_TARGET), "--size", "24", "--pad", "4", "--hidden",
                    "64", "--batch", "2", "--pool-size", "8", "--rollout", "28", "43",
                    "--steps", "12", "--save-every", "2", "--lr", "1e-4", "--lr-drop-at", "2",
                    "--lr-drop-factor", "3e3", "--stop-after-dead", "2",
                    "--init", str(O.ASSETS / "default_model.safetensors"),
                    "--backend", "torch", "--device", "cpu", "--no-progress", "--log-every", "0",
                    "--out", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    warnings = [ln for ln in cap.err.splitlines() if "WARNING: growth from the seed" in ln]
    assert [ln.split(":")[1].strip() for ln in warnings] == ["step 4", "step 6"]
    assert all("best.safetensors keeps step 2 (holds" in ln for ln in warnings)
    assert "stopped at step 6 of 12" in cap.err
    use = [ln for ln in cap.out.splitlines() if ln.startswith("use ")]
    assert use == [use[0]] and use[0].startswith("use best.safetensors: the model of step 2")
    best = stability.model_facts(out / "best.safetensors")
    assert best["best"]["step"] == 2 and best["best"]["verdict"] == "holds"
    assert best["steps"] == 2 and best["verdict"] == "holds"
    final = stability.model_facts(out / "model.safetensors")
    assert final["steps"] == 6 and final["verdict"] in ("dies", "diverges")
    # The kept file grows the pattern again, as its record says.
    target = TR.load_target(DEFAULT_TARGET, 24, 4)
    rows = stability.long_horizon(load(out / "best.safetensors", backend="torch"), target, 42)
    assert stability.verdict(rows) == "holds"
    assert rows[0].mse == pytest.approx(best["best"]["mse_1x"], rel=1e-5)


def test_the_best_model_survives_a_resume(tmp_path):
    o = TrainOptions(**TINY, steps=2, save_every=2, lr_drop_at=100)
    train(o, run_dir=tmp_path)
    first = stability.model_facts(tmp_path / "best.safetensors")["best"]
    res = train(TrainOptions(**{**o.to_dict(), "steps": 4}), run_dir=tmp_path, resume=True)
    assert res.steps == 4
    from nca_fast.training.run_folder import read_checkpoint
    _, info = read_checkpoint(tmp_path / "checkpoint.safetensors")
    # The resumed run compared its step-4 model with the step-2 record, not with nothing.
    P = stability.HorizonPoint
    rows = [P(float(r["multiple"]), int(r["grow_steps"]), float(r["mse"]), int(r["live_cells"]),
              int(r["target_live_cells"]))
            for r in csv.DictReader(open(tmp_path / "stability.csv")) if r["train_step"] == "4"]
    later = stability.rank(rows)
    expect = first if (first["class"], first["worst_mse"]) <= later else None
    if expect is not None:
        assert info["best"] == expect
    else:
        assert info["best"]["step"] == 4 and info["best"]["worst_mse"] == later[1]


def test_overflow_and_state_faults():
    x = torch.zeros(3, 2, 2, 2)
    x[1, 0, 0, 0] = 3.0                       # 2 beyond the bound 1 -> 4 / 8 values
    x[2, 1, 1, 1] = float("nan")
    pen = stability.overflow(x)
    assert pen[0] == 0 and pen[1] == pytest.approx(0.5)
    assert stability.state_faults(x, 1e3).tolist() == [False, False, True]
    assert stability.state_faults(x, 2.0).tolist() == [False, True, True]


# ----------------------------------------------------------------------------- the guard
def test_nan_pool_state_skips_the_step_and_is_reseeded(tmp_path):
    # replace=0: the pool's usual "worst sample back to the seed" must not hide the fault.
    o = TrainOptions(**{**TINY, "batch": 2, "pool_size": 2}, replace=0, steps=3, stability=False)
    tr = Trainer(o, tmp_path)
    tr.train_step()                                       # a normal step first: Adam has state
    tr.pool[0] = float("nan")
    weights, pool = _snapshot(tr)
    adam = {k: v.clone() for k, v in tr.optimizer.state[next(tr.model.parameters())].items()
            if torch.is_tensor(v)}
    loss = tr.train_step()
    assert tr.counts == {"skipped": 1}
    assert _same_weights(weights, _snapshot(tr)[0])         # no optimizer step
    after = tr.optimizer.state[next(tr.model.parameters())]
    assert all(torch.equal(adam[k], after[k]) for k in adam)
    assert torch.equal(tr.pool[0], tr.seed_state[0])         # the faulty state reseeded
    assert torch.equal(tr.pool[1], pool[1])                  # the good one not written back
    assert math.isfinite(loss)                               # the finite sample's loss
    assert tr.events[-1]["step"] == 2 and tr.events[-1]["event"] == "skipped"
    tr.train_step()                                          # and training goes on
    assert not _same_weights(weights, _snapshot(tr)[0])
    assert tr.counts == {"skipped": 1} and tr.skipped_in_a_row == 0


def test_nan_gradient_skips_the_step(tmp_path):
    o = TrainOptions(**TINY, steps=2, stability=False)
    tr = Trainer(o, tmp_path)
    weights, pool = _snapshot(tr)
    p = next(tr.model.parameters())
    handle = p.register_hook(lambda g: torch.full_like(g, float("nan")))
    tr.train_step()
    handle.remove()
    assert tr.counts == {"skipped": 1}
    assert "non-finite gradients" in tr.events[0]["detail"]
    assert _same_weights(weights, _snapshot(tr)[0])
    assert torch.equal(pool, tr.pool)            # nothing written back, nothing reseeded
    assert not tr.optimizer.state                # Adam never stepped


def test_states_beyond_the_bound_are_not_applied(tmp_path, monkeypatch):
    # The seed's hidden channels are 1: a bound of 0.5 fails every step.
    monkeypatch.setattr(TR, "MAX_SKIPPED_IN_A_ROW", 3)
    o = TrainOptions(**TINY, steps=10, state_bound=0.5, experiment="grow", stability=False)
    tr = Trainer(o, tmp_path)
    weights, _ = _snapshot(tr)
    tr.train_step()
    tr.train_step()
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        tr.train_step()
    assert _same_weights(weights, _snapshot(tr)[0])
    assert tr.counts == {"skipped": 3}


def test_checkpoint_is_never_non_finite(tmp_path):
    from safetensors.torch import load_file

    o = TrainOptions(**TINY, steps=2, save_every=1, stability=False)
    tr = Trainer(o, tmp_path)
    tr.run_dir.mkdir(exist_ok=True)
    tr.train_step()
    tr.pool[5] = float("inf")                    # a pool state no step has sampled
    path = tr.save_checkpoint()
    saved = load_file(str(path))
    assert all(torch.isfinite(v).all() for k, v in saved.items() if v.is_floating_point())
    assert torch.equal(tr.pool[5], tr.seed_state[0])
    before = path.read_bytes()
    with torch.no_grad():
        next(tr.model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not written"):
        tr.save_checkpoint()
    assert path.read_bytes() == before           # the good checkpoint is kept


def test_training_with_a_nan_injected_writes_finite_outputs(tmp_path):
    # End to end: a NaN in one pool state and one gradient; the run finishes, logs both events
    # and writes only finite files.
    from safetensors.torch import load_file

    calls = {"n": 0}

    def inject(tr):
        calls["n"] += 1
        if calls["n"] == 1:
            tr.pool[1, 3, 2, 2] = float("nan")   # one value of one state (every row is sampled)
        if calls["n"] == 2:
            p = next(tr.model.parameters())
            tr._hook = p.register_hook(lambda g: g * float("nan"))
        if calls["n"] == 3:
            tr._hook.remove()

    o = TrainOptions(**{**TINY, "pool_size": 4}, steps=5, save_every=5, replace=0)
    result = train(o, run_dir=tmp_path, on_step=inject)
    events = list(csv.DictReader(open(tmp_path / "events.csv")))
    assert [(int(e["step"]), e["event"], e["samples"]) for e in events] == [
        (2, "skipped", "1"), (3, "skipped", "0")]
    assert "non-finite gradients" in events[1]["detail"]
    for name in ("model.safetensors", "checkpoint.safetensors"):
        tensors = load_file(str(tmp_path / name))
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert all(math.isfinite(v) for v in result.losses)      # the other samples' losses
    assert stability.model_facts(tmp_path / "model.safetensors")["guard_events"] == {
        "skipped": 2}


# ----------------------------------------------------------------------------- options
def test_late_loss_continues_the_same_rollout(tmp_path):
    assert O.late_length(10, 0) == 10 and O.late_length(10, 2) == 20 and O.late_length(1, 1.5) == 2
    o = TrainOptions(**TINY, late_loss=2.0, steps=1, stability=False).resolved()
    assert o.longest_rollout == 9 and o.longest_trained == 18
    tr = Trainer(o, tmp_path)
    seen = []
    real = tr.model.forward

    def spy(x, steps=1, **kw):
        seen.append((steps, kw.get("first_step", 0), kw.get("seed")))
        return real(x, steps, **kw)

    tr.model.forward = spy
    tr.train_step()
    (n, f0, s0), (m, f1, s1) = seen
    assert f0 == 0 and f1 == n and s1 == s0 and 1 <= m <= n


def test_options_are_checked_and_named():
    for field, value, flag in (("late_loss", 0.5, "late_loss"), ("reseed_runaway", 1.0,
                                                                  "reseed_runaway"),
                               ("overflow_loss", -1.0, "overflow_loss"),
                               ("state_bound", 0.0, "state_bound"),
                               ("state_bound", math.inf, "state_bound")):
        with pytest.raises(ValueError, match=flag):
            TrainOptions(**{**TINY, field: value})


def test_runaway_states_are_reseeded(tmp_path):
    o = TrainOptions(**TINY, reseed_runaway=1.01, steps=1, stability=False)
    tr = Trainer(o, tmp_path)
    tr.pool[:] = 1.0                             # every cell alive: far more than the target
    tr.train_step()
    assert tr.counts.get("runaway", 0) == 1
    rows_seed = [bool(torch.equal(r, tr.seed_state[0])) for r in tr.pool]
    assert sum(rows_seed) == o.batch             # the batch's rows reseeded, the rest as was


def test_defaults_leave_the_recipe_unchanged(tmp_path):
    # The guard and the options off by default must not change a run: no extra random draws.
    a = Trainer(TrainOptions(**TINY, steps=2, stability=False), tmp_path / "a")
    b = Trainer(TrainOptions(**TINY, steps=2, stability=False, state_bound=1e9), tmp_path / "b")
    for _ in range(2):
        assert a.train_step() == b.train_step()
    assert torch.equal(a.pool, b.pool)


# ----------------------------------------------------------------------------- run folder, grow
def test_run_folder_has_the_score(tmp_path):
    o = TrainOptions(**TINY, steps=4, save_every=2, lr_drop_at=100)
    train(o, run_dir=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "stability.csv")))
    assert [int(r["train_step"]) for r in rows] == [2] * 4 + [4] * 4
    assert [int(r["grow_steps"]) for r in rows[:4]] == [9, 18, 45, 90]
    assert (tmp_path / "stability.png").stat().st_size > 1000
    meta = stability.model_facts(tmp_path / "model.safetensors")
    assert meta["longest_rollout"] == 9 and len(meta["stability"]) == 4
    # Resumed runs replace the rows of the steps they redo and keep the earlier ones.
    train(o.__class__(**{**o.to_dict(), "steps": 6}), run_dir=tmp_path, resume=True)
    rows = list(csv.DictReader(open(tmp_path / "stability.csv")))
    assert sorted({int(r["train_step"]) for r in rows}) == [2, 4, 6]


def test_grow_prints_the_score(tmp_path, capsys):
    o = TrainOptions(**TINY, steps=1, save_every=1, stability=False)
    train(o, run_dir=tmp_path)
    rc = cli_main(["grow", "--model", str(tmp_path / "model.safetensors"), "--steps", "20",
                   "--out", str(tmp_path / "g.gif"), "--backend", "torch"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if ln.strip().endswith("x)")]
    assert [ln[0] for ln in lines] == ["1x", "2x", "2.22x"]
    assert [int(ln[1]) for ln in lines] == [9, 18, 20]
    assert all(int(ln[4]) > 0 for ln in lines)         # the target's live cells are known


def test_grow_names_shipped_models_and_rejects_unknown(tmp_path, capsys):
    rc = cli_main(["grow", "--model", "flower", "--steps", "4", "--out", str(tmp_path / "g.gif"),
                   "--quiet"])
    assert rc == 0
    rc = cli_main(["grow", "--model", "no-such-flower", "--out", str(tmp_path / "g.gif")])
    err = capsys.readouterr().err
    assert rc == 2 and "--model no-such-flower" in err and "flower" in err


# ----------------------------------------------------------------------------- GPU recipe
@pytest.mark.parametrize("preset", ["hires512", "hires1024"])
def test_gpu_presets_fit_an_80_gb_gpu(preset):
    import dataclasses

    o = TrainOptions(**O.PRESETS[preset]).resolved()
    assert o.size in (512, 1024) and o.checkpoint == "sqrt"
    cuda = torch.device("cuda")

    def device_bytes(opts):
        opts = dataclasses.replace(opts, backend="triton")
        return sum(t.nbytes for t in O.train_memory(opts, 1, cuda) if t.where == "device")

    assert device_bytes(o) < 80e9 * 0.9
    if preset == "hires1024":     # the checkpointing is what makes it fit
        assert device_bytes(dataclasses.replace(o, checkpoint=None)) > 80e9


def test_dry_run_prints_the_estimates_and_trains_nothing(tmp_path, capsys):
    rc = train_cli(["--preset", "hires1024", "--device", "cuda", "--dry-run",
                     "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "run").exists()
    assert "memory estimate, cuda device:" in out and "GiB" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("time estimate"))
    assert "an estimate, not a measurement" in line
    flops, nbytes = O.training_cost(TrainOptions(**O.PRESETS["hires1024"]).resolved())
    floor = min(O.H200_FLOPS["tf32"] / flops, O.H200_BYTES_PER_S / nbytes)
    assert f"{floor:.2e}" in line


def test_calibration_times_the_run_and_touches_nothing(tmp_path):
    from nca_fast.resources import format_seconds

    tr = Trainer(TrainOptions(**TINY, steps=2, stability=False), tmp_path)
    before, g = _snapshot(tr), tr.generator.get_state()
    cal = tr.calibrate(steps=4)
    assert cal["steps"] == 4 and cal["samples"] == TINY["batch"]
    assert 0 < cal["step_s"] < 60 and cal["cpu_step_s"] > 0
    assert _same_weights(before[0], _snapshot(tr)[0]) and torch.equal(g, tr.generator.get_state())
    assert all(p.grad is None for p in tr.model.parameters())
    line = O.run_plan(tr.opts, 1, torch.device("cpu"), cal)[-1]
    assert line.startswith("time estimate: about ") and "Calibrated on this machine" in line
    assert [format_seconds(s) for s in (4.25, 40, 444, 3000, 9000)] == \
        ["4.2 s", "40 s", "7.4 minutes", "50 minutes", "2.5 hours"]


def test_photo_preset_grows_the_shipped_photo_on_the_whole_grid():
    from nca_fast.media import load_target

    o = TrainOptions(**O.PRESETS["photo"]).resolved()
    assert pathlib.Path(o.target).name == "astronaut64.png" and pathlib.Path(o.target).is_file()
    assert (o.grid, o.pad, o.rollout_min, o.rollout_max) == (64, 0, 64, 96)
    t = load_target(o.target, o.size, o.pad)
    assert t.shape == (4, 64, 64) and (t[3] == 1).all()     # opaque: every cell is live


def test_training_cost_matches_the_kernel_notes():
    # bench/NOTES.md, section 1: 49,152 MACs and 776 B (+ partial sums) per training cell-step
    # at C = 16, hidden = 128, the Sobel bank.
    flops, nbytes = O.training_cost(TrainOptions(hidden=128).resolved())
    assert flops == 2 * 49152 and nbytes == 776


@pytest.mark.parametrize("name", ["flower48", "flower96", "photo64"])
def test_shipped_curriculum_models_hold(name):
    """The shipped stages hold by the project's criterion, grown as their metadata says."""
    from nca_fast.media import load_target
    from nca_fast.model import load_any, shipped_models

    path = shipped_models()[name]
    facts = stability.model_facts(path)
    model = load_any(path, backend="torch")
    target = load_target(stability.resolve_target(facts["target"], path), facts["size"],
                         facts["pad"])
    rows = stability.long_horizon(model, target, facts["longest_rollout"])
    assert [r.grow_steps for r in rows] == [m * facts["longest_rollout"] for m in (1, 2, 5, 10)]
    assert stability.holds(rows), stability.format_rows(rows)
    recorded = facts["score"]["rows"]
    for r, (m, steps, mse, live) in zip(rows, recorded):
        assert r.grow_steps == steps and r.mse == pytest.approx(mse, rel=0.02), (r, mse)


def test_shipped_photo_model_scores_as_recorded():
    """photo64 grown from the seed: its RGB MSE at 1x and 10x as its record says, above the
    photo's mean colour (docs/TRAINING.md, "A photograph")."""
    import importlib.util

    from nca_fast.media import load_target
    from nca_fast.model import load_any, shipped_models

    spec = importlib.util.spec_from_file_location(
        "photo_figure", pathlib.Path(__file__).resolve().parents[1] / "docs" / "photo_figure.py")
    pf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pf)
    path = shipped_models()["photo64"]
    facts = stability.model_facts(path)
    target = load_target(O.ASSETS / facts["target"], facts["size"], facts["pad"])
    rows, baseline = pf.score(load_any(path, backend="torch"), target, facts["longest_rollout"])
    recorded = facts["rgb_score"]
    assert baseline == pytest.approx(recorded["baseline_mse"], rel=1e-3)
    for (m, steps, mse, _), (rm, rsteps, rmse, _) in zip(rows, recorded["rows"]):
        assert (m, steps) == (rm, rsteps) and mse == pytest.approx(rmse, rel=0.02)
    assert rows[0][2] < 0.5 * baseline and rows[-1][2] <= 1.5 * rows[0][2]
