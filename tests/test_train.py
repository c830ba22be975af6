"""The trainer: the article's recipe, pool logic, bitwise resume, corrupt checkpoints, CLI outputs.

Every run here is tiny (grids of 6 to 12 cells, a few steps): the point is the bookkeeping, not
the quality of the model. The DDP check lives in test_ddp.py.
"""
import dataclasses
import json
import os
import pathlib

import pytest
import torch
from PIL import Image

import nca_fast
from nca_fast import train as T
from nca_fast.formats import read_metadata
from nca_fast.media import load_target
from nca_fast.train import cli_main, train
from nca_fast.training import damage, run_folder
from nca_fast.training.options import PRESETS, TrainOptions
from nca_fast.training.trainer import Trainer, per_sample_loss

from cases import TINY


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- recipe defaults
def test_defaults_are_the_articles():
    o = TrainOptions().resolved()
    assert (o.size, o.pad, o.size + 2 * o.pad) == (40, 16, 72)
    assert (o.rollout_min, o.rollout_max) == (64, 96)
    assert (o.batch, o.pool_size, o.steps, o.lr, o.lr_drop_at) == (8, 1024, 8000, 2e-3, 2000)
    assert (o.replace, o.damage, o.lr_drop_factor) == (1, 3, 0.1)
    # Fewer steps: the drop moves with them (2000 of 8000 -> a quarter of the run).
    assert TrainOptions(steps=800).resolved().lr_drop_at == 200
    assert TrainOptions(steps=20000).resolved().lr_drop_at == 2000
    # A 4x larger grid needs 4x longer rollouts to cross it.
    big = TrainOptions(size=160).resolved()
    assert big.size + 2 * big.pad == 288 and (big.rollout_min, big.rollout_max) == (256, 384)


def test_schedule_and_curriculum(tmp_path):
    o = TrainOptions(**{**TINY, "rollout_min": 40, "rollout_max": 60}, steps=100, lr_drop_at=30,
                     curriculum=0.5, experiment="grow")
    tr = Trainer(o, tmp_path)
    assert tr.lr_at(0) == 2e-3 and tr.lr_at(29) == 2e-3
    assert tr.lr_at(30) == pytest.approx(2e-4) and tr.lr_at(99) == pytest.approx(2e-4)
    assert tr.rollout_range(0) == (10, 15)              # a quarter at the start of the ramp
    lo, hi = tr.rollout_range(25)
    assert 10 < lo < 40 and 15 < hi < 60
    assert tr.rollout_range(50) == (40, 60) == tr.rollout_range(99)


@pytest.mark.parametrize("bad, needle", [
    (dict(batch=6, accumulate=4), "batch"),
    (dict(pool_size=10, accumulate=4, batch=8), "pool_size"),
])
def test_shards_must_divide(tmp_path, bad, needle):
    o = TrainOptions(**{**TINY, **bad})
    with pytest.raises(ValueError, match=needle):
        Trainer(o, tmp_path)


@pytest.mark.parametrize("field, value", [
    ("experiment", "explode"), ("batch", 0), ("lr", 0.0), ("lr", -1.0), ("curriculum", 1.5),
    ("checkpoint", "cube"), ("seed", -1), ("loss_levels", 9), ("backend", "cuda"),
])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainOptions(**{**TINY, field: value})


def test_damage_counts_against_the_batch_only_when_regenerating():
    small = {**TINY, "batch": 2}
    with pytest.raises(ValueError, match=r"replace \+ damage.*1 \+ 3"):
        TrainOptions(**small, experiment="regenerate")
    assert TrainOptions(**small, experiment="persist").damage == 3     # unused: no error
    TrainOptions(**small, experiment="regenerate", damage=1)


def test_circle_damage_mask():
    m = damage.keep_mask(9, 9, (0.0, 0.0), 0.3)
    assert m[4, 4] == 0 and m[0, 0] == 1 and m[0, 8] == 1 and m[8, 8] == 1
    assert m.dtype == torch.float32 and int((m == 0).sum()) == 5     # the centre and its 4
    # x runs along W: a circle on the right half leaves the left column whole.
    right = damage.keep_mask(9, 9, (0.75, 0.0), 0.4)
    assert right[:, 0].eq(1).all() and right[4, 7] == 0 and right[4, 1] == 1


def test_loss_pyramid_matches_hand_computation():
    x = torch.rand(2, 16, 8, 8)
    t = torch.rand(4, 8, 8)
    plain = ((x[:, :4] - t) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample_loss(x, t), plain)
    coarse = x[:, :4].reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5))
    tc = t.reshape(4, 4, 2, 4, 2).mean(dim=(2, 4))
    two = (plain + ((coarse - tc) ** 2).mean(dim=(1, 2, 3))) / 2
    assert torch.allclose(per_sample_loss(x, t, levels=2), two)


# ----------------------------------------------------------------------------- pool logic
def test_pool_replace_damage_and_write_back(tmp_path):
    """The highest-loss sample becomes the seed, the lowest-loss ones are damaged, and the
    final states go back to the pool rows they came from."""
    # A 24-cell grid: grid points are close enough that every damage circle covers some.
    o = TrainOptions(**{**TINY, "size": 16, "pad": 4}, experiment="regenerate", replace=1,
                     damage=2, steps=1)
    tr = Trainer(o, tmp_path)
    n = o.pool_size
    # Constant, distinct states above the target's mean: the loss grows with the row index.
    levels = float(tr.target.mean()) + 0.05 + 0.02 * torch.arange(n, dtype=torch.float32)
    assert float(levels[-1]) < 1.0
    tr.pool = levels.view(n, 1, 1, 1).expand(-1, 16, tr.grid, tr.grid).clone()
    original = tr.pool.clone()
    seen = {}

    def fake_net(x, steps, *, seed, checkpoint):
        seen["x"] = x.clone()
        # Differentiable in the parameters (so backward runs) but a recognisable result.
        return x * 0.5 + 0.0 * sum(p.sum() for p in tr.model.parameters())

    tr.net = fake_net
    tr.train_step()
    xs = seen["x"]
    assert xs.shape[0] == o.batch
    rows = [i for i in range(n) if not torch.equal(tr.pool[i], original[i])]
    assert len(rows) == o.batch                        # every sampled row was written back
    rows.sort()                                        # by level, i.e. by loss
    highest, lowest, rest = rows[-1], rows[:2], rows[2:-1]
    seed = tr.seed_state[0]
    assert sum(torch.equal(x, seed) for x in xs) == 1
    assert torch.equal(tr.pool[highest], 0.5 * seed)
    by_level = {}
    for x in xs:
        if not torch.equal(x, seed):
            by_level[round(float(x.max()), 5)] = x
    for i in lowest:
        x = by_level[round(float(levels[i]), 5)]
        assert (x == 0).any() and (x == levels[i]).any()   # a hole cut in the state
        assert torch.equal(tr.pool[i], 0.5 * x)
    for i in rest:
        x = by_level[round(float(levels[i]), 5)]
        assert torch.equal(x, original[i])
        assert torch.equal(tr.pool[i], 0.5 * x)


# ----------------------------------------------------------------------------- training works
def test_a_few_steps_reduce_the_loss(tmp_path):
    o = TrainOptions(**{**TINY, "rollout_min": 8, "rollout_max": 12}, experiment="grow",
                     steps=14, lr_drop_at=100, save_every=100)
    r = train(o, run_dir=tmp_path)
    first, last = r.losses[0], sum(r.losses[-3:]) / 3
    assert last < 0.8 * first, r.losses


def _triton_unavailable_reason():
    try:
        m = nca_fast.NCA(nca_fast.NCAConfig(hidden=32), backend="triton")
        m(m.seed_state(1, 4, 4), 1, seed=0)
    except (NotImplementedError, ImportError) as e:
        return f"the triton backend is not available yet: {type(e).__name__}: {e}"
    except RuntimeError as e:
        if "TRITON_INTERPRET" in str(e) or "cannot run" in str(e):
            return f"the triton backend cannot run here: {e}"
        raise
    return None


def test_torch_and_triton_backends_give_the_same_loss_curve(tmp_path):
    reason = _triton_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # The Triton interpreter is slow on the CPU: a 6x6 grid, short rollouts, two steps.
    common = dict(size=2, pad=2, hidden=32, batch=2, pool_size=4, damage=0, rollout_min=3,
                  rollout_max=4, experiment="persist", steps=2, device="cpu",
                  precision="ieee", save_every=100)
    curves, weights = {}, {}
    for backend in ("torch", "triton"):
        tr = Trainer(TrainOptions(**common, backend=backend), tmp_path / backend)
        for _ in range(common["steps"]):
            tr.train_step()
        curves[backend], weights[backend] = tr.losses, _weights(tr.model)
    assert curves["torch"] == pytest.approx(curves["triton"], rel=1e-5, abs=1e-7)
    for k in weights["torch"]:
        torch.testing.assert_close(weights["triton"][k], weights["torch"][k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- resume
class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_and_resumed_run_is_bitwise_equal(tmp_path):
    o = TrainOptions(**TINY, experiment="regenerate", damage=2, steps=6, save_every=2,
                     curriculum=0.5, checkpoint="sqrt")
    whole = train(o, run_dir=tmp_path / "whole")

    def stop_at_5(trainer):
        # Step 5 ran but was never checkpointed: resuming must redo it from step 4's state.
        if trainer.step == 5:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        train(o, run_dir=tmp_path / "cut", on_step=stop_at_5)
    info = json.loads(__import__("safetensors").safe_open(
        str(tmp_path / "cut" / "checkpoint.safetensors"), "pt").metadata()[run_folder.CHECKPOINT_KEY])
    assert info["step"] == 4
    resumed = train(o, run_dir=tmp_path / "cut", resume=True)

    assert resumed.steps == whole.steps == 6
    assert resumed.losses == whole.losses
    a, b = _weights(whole.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file
    ca = load_file(str(tmp_path / "whole" / "checkpoint.safetensors"))
    cb = load_file(str(tmp_path / "cut" / "checkpoint.safetensors"))
    assert ca.keys() == cb.keys()
    for k in ca:                          # pool, Adam moments, generator state, history
        assert torch.equal(ca[k], cb[k]), k


def test_resume_refuses_changed_options(tmp_path):
    o = TrainOptions(**TINY, experiment="grow", steps=2, save_every=1)
    train(o, run_dir=tmp_path)
    rc_ok = cli_main(["--resume", str(tmp_path), "--steps", "3", "--no-progress"])
    assert rc_ok == 0
    assert len((tmp_path / "loss.csv").read_text().strip().splitlines()) == 1 + 3


def test_resume_cli_rejects_other_options(tmp_path, capsys):
    o = TrainOptions(**TINY, experiment="grow", steps=1, save_every=1)
    train(o, run_dir=tmp_path)
    rc = cli_main(["--resume", str(tmp_path), "--hidden", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "hidden" in err and len(err.splitlines()) == 1
    rc = cli_main(["--resume", str(tmp_path), "--out", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--out" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys, damage):
    o = TrainOptions(**TINY, experiment="persist", steps=2, save_every=1)
    train(o, run_dir=tmp_path)
    ck = tmp_path / "checkpoint.safetensors"
    data = ck.read_bytes()
    if damage == "truncate":
        ck.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        ck.write_bytes(b"\x00" * 8 + os.urandom(200))
    else:
        ck.write_bytes(b"")
    tr = Trainer(o, tmp_path)
    with pytest.raises(run_folder.CheckpointError, match="checkpoint.safetensors"):
        tr.load_checkpoint()
    rc = cli_main(["--resume", str(tmp_path), "--steps", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(ck) in err and "Traceback" not in err


def test_checkpoint_of_another_run_is_refused(tmp_path):
    train(TrainOptions(**TINY, experiment="grow", steps=1, save_every=1), run_dir=tmp_path)
    other = Trainer(TrainOptions(**{**TINY, "hidden": 16}, experiment="grow", steps=1), tmp_path)
    with pytest.raises(run_folder.CheckpointError, match="hidden"):
        other.load_checkpoint()


# ----------------------------------------------------------------------------- CLI outputs
def test_cli_writes_every_promised_file(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--size", "8", "--pad", "2", "--hidden", "32", "--batch", "4", "--pool-size", "8",
            "--rollout", "4", "6", "--steps", "3", "--experiment", "regenerate", "--damage", "2",
            "--save-every", "2", "--video-steps", "12", "--device", "cpu", "--backend", "torch",
            "--seed", "7", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    names = {p.name for p in out.iterdir()}
    promised = {"model.safetensors", "checkpoint.safetensors", "config.json", "command.txt",
                "loss.png", "loss.csv", "growth.gif", "regenerate.gif", "final.png"}
    assert promised <= names, promised - names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    cmd = (out / "command.txt").read_text()
    assert "--seed 7" in cmd and "--experiment regenerate" in cmd
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["seed"] == 7 and cfg["train"]["rollout_max"] == 6
    assert cfg["model"]["hidden"] == 32 and cfg["grid"] == 12
    rows = (out / "loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 4
    model = nca_fast.load(out / "model.safetensors")
    assert model.config.hidden == 32
    training = json.loads(read_metadata(out / "model.safetensors")[run_folder.TRAINING_KEY])
    assert training["steps"] == 3 and training["grid"] == 12
    assert training["final_loss"] == pytest.approx(float(rows[-1].split(",")[1]))
    with Image.open(out / "growth.gif") as im:
        assert im.n_frames > 2 and im.size[0] >= 12
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG"
    assert "final loss" in capsys.readouterr().out


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    cases = [["--experiment", "fly"], ["--batch", "0", "--out", str(tmp_path / "a")],
             ["--target", str(tmp_path / "missing.png"), "--out", str(tmp_path / "b")],
             ["--resume", str(tmp_path / "nowhere")], ["--checkpoint", "cube"]]
    for argv in cases:
        rc = cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, argv
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    train(TrainOptions(**TINY, experiment="grow", steps=1, save_every=1), run_dir=tmp_path)
    rc = cli_main(["--out", str(tmp_path), "--size", "8", "--steps", "1"])
    assert rc == 2 and "--resume" in capsys.readouterr().err


def test_init_starts_from_the_given_weights_and_trains_on(tmp_path):
    """--init: a size curriculum. The run starts at the file's weights (not a fresh draw) and a
    resumed run does not re-apply them over the checkpoint."""
    small = train(TrainOptions(**TINY, experiment="grow", steps=2, seed=3), run_dir=tmp_path / "a")
    path = str(tmp_path / "a" / "model.safetensors")
    start = _weights(nca_fast.load(path))
    opts = TrainOptions(**dict(TINY, size=12, pad=2), experiment="grow", steps=2, seed=4,
                        init=path, save_every=1)
    tr = Trainer(opts, tmp_path / "b", progress=False)
    assert all(torch.equal(v, start[k]) for k, v in _weights(tr.model).items())
    fresh = Trainer(dataclasses.replace(opts, init=None), tmp_path / "c", progress=False)
    assert not torch.equal(_weights(fresh.model)["w1.weight"], start["w1.weight"])
    done = train(opts, run_dir=tmp_path / "b")
    assert not torch.equal(_weights(done.model)["w1.weight"], start["w1.weight"])   # trained on
    again = Trainer(opts, tmp_path / "b", progress=False)
    again.load_checkpoint()
    assert again.step == 2
    assert all(torch.equal(v, w) for (k, v), w in
               zip(_weights(again.model).items(), _weights(done.model).values()))
    assert small.model.config.hidden == 32


def test_init_with_another_architecture_names_the_argument(tmp_path, capsys):
    train(TrainOptions(**TINY, experiment="grow", steps=1), run_dir=tmp_path / "a")
    path = str(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match=r"init: .*hidden=32 \(run: 64\)"):
        Trainer(TrainOptions(**dict(TINY, hidden=64), init=path), tmp_path / "b")
    rc = cli_main(["--init", str(tmp_path / "missing.safetensors"), "--size", "8",
                   "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "missing.safetensors" in err and len(err.splitlines()) == 1


def test_presets_fill_defaults_and_explicit_options_win():
    ns = T.build_parser().parse_args(["--preset", "quick", "--steps", "5"])
    o = T.options_from_args(ns)
    assert o.steps == 5 and o.hidden == PRESETS["quick"]["hidden"]
    ns = T.build_parser().parse_args(["--preset", "hires", "--size", "64"])
    o = T.options_from_args(ns).resolved()
    assert o.size == 64 and o.checkpoint == "sqrt" and o.loss_levels > 1
    assert o.rollout_max > o.rollout_min > 64 * (o.size + 2 * o.pad) / 72 - 2


def test_default_assets_exist_and_load():
    assets = pathlib.Path(T.__file__).parent / "assets"
    target = load_target(assets / "default_target.png", 40, 16)
    assert target.shape == (4, 72, 72)
    alpha = target[3]
    assert 0.1 < float((alpha > 0.5).float().mean()) < 0.6     # an opaque figure on clear ground
    assert float(alpha[:16].abs().max()) == 0.0                 # the padding is empty


def test_default_model_grows_its_target():
    """The shipped model, grown as it was trained, is far closer to the target than nothing."""
    assets = pathlib.Path(T.__file__).parent / "assets"
    meta = json.loads((assets / "default_model.json").read_text())
    model = nca_fast.load(assets / "default_model.safetensors", backend="torch")
    target = load_target(assets / "default_target.png", meta["size"], meta["pad"])
    g = target.shape[-1]
    assert g == meta["grid"]
    with torch.no_grad():
        x = model(model.seed_state(4, g, g), meta["rollout"][1], seed=11)
        later = model(x, 200, seed=12)          # persist: the shape must hold on
    empty = float((target ** 2).mean())
    for state in (x, later):
        loss = float(per_sample_loss(state, target).mean())
        assert loss < 0.1 * empty, (loss, empty)


# ----------------------------------------------------------------------------- rates
@pytest.mark.parametrize("flag", ["--lr", "--lr-drop-factor"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_rates_are_one_line_errors(tmp_path, capsys, flag, value):
    """An infinite or NaN rate is one line on stderr, not a FloatingPointError traceback at the
    first step (lr = inf lies in (0, inf])."""
    rc = cli_main([flag, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"nca-fast train: error: {flag}: expected a finite number")


def test_triton_backend_where_it_cannot_run_is_refused_up_front(tmp_path, capsys, monkeypatch):
    # As on a CPU without TRITON_INTERPRET=1 (the tests set it, so the check is stubbed).
    monkeypatch.setattr("nca_fast.training.trainer.triton_usable", lambda device: False)
    rc = cli_main([*"--size 8 --pad 2 --hidden 32 --steps 1 --device cpu".split(),
                   "--backend", "triton", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--backend triton cannot run on cpu" in err
    assert not (tmp_path / "run").exists()


def test_trains_two_steps_with_another_filter_bank_padding_and_no_last_bias(tmp_path):
    """--filters, --padding and --no-last-bias reach the model; its perception has 4 filters."""
    run = tmp_path / "lap"
    rc = cli_main([*"--size 8 --pad 2 --hidden 32 --batch 2 --pool-size 4 --rollout 4 6".split(),
                   *"--steps 2 --save-every 2 --video-steps 2 --device cpu --backend torch".split(),
                   "--filters", "sobel_laplacian16", "--padding", "circular", "--no-last-bias",
                   "--no-progress", "--out", str(run)])
    assert rc == 0
    model = nca_fast.load(run / "model.safetensors")
    assert model.config.filters == nca_fast.FILTER_BANKS["sobel_laplacian16"]
    assert model.config.padding == "circular"
    assert model.config.last_bias is False and model.w2.bias is None
    assert tuple(model.w1.weight.shape) == (32, 4 * 16, 1, 1)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["filters"] == "sobel_laplacian16"
    losses = [float(r.split(",")[1]) for r in (run / "loss.csv").read_text().split()[1:]]
    assert len(losses) == 2 and all(v == v and v > 0 for v in losses)
    assert model.w2.weight.abs().max() > 0          # a new model's w2 is zero: it trained


def test_filters_and_padding_are_validated():
    with pytest.raises(ValueError, match="^filters: expected one of"):
        TrainOptions(filters="prewitt")
    with pytest.raises(ValueError, match="^padding: expected one of"):
        TrainOptions(padding="mirror")
    with pytest.raises(ValueError, match="^last_bias: expected True or False"):
        TrainOptions(last_bias="no")
