"""The nca-fast command: grow writes a video and a PNG; mistakes give one line and exit status 2."""
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from nca_fast import cli
from nca_fast.training import damage


def _grow(tmp_path, model, *extra, name="x.gif"):
    out = tmp_path / "out" / name                       # the folder does not exist yet
    rc = cli.main(["grow", "--model", str(model), "--size", "40", "--steps", "8",
                   "--out", str(out), *extra])
    return rc, out


def _frames(path):
    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return frames


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_grow_writes_gif_and_png(tmp_path, distill_dir, capsys):
    rc, gif = _grow(tmp_path, distill_dir / "ex1_lizard.json")
    assert rc == 0
    png = gif.with_suffix(".png")
    frames = _frames(gif)
    last = np.asarray(Image.open(png))
    scale = 288 // 40
    assert len(frames) == 9                               # the seed and 8 steps
    assert frames[0].shape == last.shape == (40 * scale, 40 * scale, 3)
    # Frame 0 is the seed: one black cell (alpha 1, RGB 0) in the centre of a white grid.
    dark = np.argwhere(frames[0].min(axis=2) < 128)
    assert len(dark) == scale * scale and (dark // scale == 20).all()
    # Something grew, and the PNG is the last frame.
    assert (last < 250).any(axis=2).sum() > 4 * scale * scale
    assert np.abs(frames[-1].astype(int) - last).max() <= 16   # GIF palette rounding only
    assert "wrote" in capsys.readouterr().err


def test_grow_is_deterministic_per_seed(tmp_path, distill_dir):
    model = distill_dir / "ex2_eye.json"
    outs = []
    for i, seed in enumerate(("3", "3", "4")):
        rc, gif = _grow(tmp_path, model, "--seed", seed, "--quiet", "--scale", "1",
                        name=f"g{i}.gif")
        assert rc == 0
        outs.append(np.asarray(Image.open(gif.with_suffix(".png"))))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def _erased(size, seed):
    """The cells ``grow --damage --seed SEED`` erases on a size x size grid (1 = erased)."""
    centre, radius = damage.seeded_circle(seed)
    return 1.0 - damage.keep_mask(size, size, centre, radius)


def test_damage_mask():
    masks = [_erased(48, s) for s in range(40)]
    assert all(tuple(m.shape) == (48, 48) for m in masks)
    # Radius 0.1..0.4 of the half-width: area fraction pi r^2 / 4.
    fractions = [m.mean().item() for m in masks]
    assert min(fractions) > 0.5 * np.pi * 0.1 ** 2 / 4
    assert max(fractions) < 1.2 * np.pi * 0.4 ** 2 / 4
    assert _erased(48, 7).equal(_erased(48, 7))
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 40


def test_grow_with_damage_erases_a_circle(tmp_path, distill_dir):
    # After 4 steps the growth lies within 4 cells of the centre (one ring per step), so a damage
    # circle covering that square (applied at step 8 // 2 = 4) must erase it all for good.
    seed = next(s for s in range(5000) if _erased(40, s)[16:25, 16:25].all())
    model = distill_dir / "ex1_lizard.json"
    rc, gif = _grow(tmp_path, model, "--seed", str(seed), "--damage", "--quiet", "--scale", "1")
    assert rc == 0
    frames = _frames(gif)
    assert (frames[4] < 250).any() and (frames[5] == 255).all() and (frames[-1] == 255).all()
    rc, gif = _grow(tmp_path, model, "--seed", str(seed), "--quiet", "--scale", "1",
                    name="intact.gif")
    assert rc == 0 and (_frames(gif)[-1] < 250).any()


# --------------------------------------------------------------------------- user mistakes
def test_missing_model(tmp_path, capsys):
    rc, out = _grow(tmp_path, tmp_path / "nowhere.safetensors")
    assert rc == 2
    assert "nowhere.safetensors" in _error_line(capsys)
    assert not out.parent.exists()


@pytest.mark.parametrize("name,content", [
    ("m.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w1\": garbage"),
    ("m.safetensors", b""),
    ("m.json", b"[{\"in_ch\": 48}]"),
    ("m.json", b"{{{ not json"),
])
def test_corrupt_model(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    rc, _ = _grow(tmp_path, path)
    assert rc == 2
    line = _error_line(capsys)
    assert line.startswith("nca-fast: error:") and name in line


def test_bad_out_extension(tmp_path, distill_dir, capsys):
    rc, _ = _grow(tmp_path, distill_dir / "ex1_lizard.json", name="x.png")
    assert rc == 2 and ".gif or .mp4" in _error_line(capsys)


def test_mp4_without_ffmpeg(tmp_path, distill_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    rc, out = _grow(tmp_path, distill_dir / "ex1_lizard.json", name="x.mp4")
    assert rc == 2 and "nca-fast[video]" in _error_line(capsys)
    assert not out.exists()


def test_default_model_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "assets" / "default_model.safetensors")
    rc = cli.main(["grow", "--out", str(tmp_path / "g.gif")])
    assert rc == 2 and "default model" in _error_line(capsys)


def test_default_model_grows(tmp_path):
    if not cli.DEFAULT_MODEL.exists():
        pytest.skip(f"the default model is not shipped yet ({cli.DEFAULT_MODEL})")
    out = tmp_path / "d.gif"
    assert cli.main(["grow", "--size", "32", "--steps", "4", "--quiet", "--out", str(out)]) == 0
    assert out.exists() and out.with_suffix(".png").exists()
    # No --size: the grid the shipped model is drawn for (40 cells x 7 pixels).
    assert cli.main(["grow", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    from PIL import Image
    assert Image.open(out.with_suffix(".png")).size == (cli.DEFAULT_GROW_SIZE * 7,) * 2 == (280, 280)


@pytest.mark.parametrize("args,needle", [
    (["grow", "--size", "0"], "--size"), (["grow", "--steps", "-1"], "--steps"),
    (["grow", "--backend", "cuda"], "--backend"), (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
    (["grow", "--seed", "99999999999999999999999"], "--seed"),
    (["grow", "--device", "meta"], "--device meta"),
    (["grow", "--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_arguments(args, needle, capsys, tmp_path):
    assert cli.main(args + (["--out", str(tmp_path / "g.gif")] if args[:1] == ["grow"] else [])
                    ) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "g.gif").exists()


def test_both_command_lines_share_one_usage_error(capsys):
    from nca_fast import train, usage

    for parser, argv in ((cli.build_parser(), ["grow", "--no-such-flag"]),
                         (train.build_parser(), ["--no-such-flag"])):
        assert isinstance(parser, usage.Parser)
        with pytest.raises(usage.UsageError, match="--no-such-flag"):
            parser.parse_args(argv)
    assert train.cli_main(["--no-such-flag"]) == cli.USAGE_ERROR == usage.USAGE_ERROR
    assert "--no-such-flag" in _error_line(capsys)


def test_grow_and_export_list_the_shipped_models(capsys):
    from nca_fast.model import shipped_models

    names = ", ".join(sorted(shipped_models()))
    for command in ("grow", "export"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        assert f"({names})" in " ".join(capsys.readouterr().out.split())


def test_output_folder_that_cannot_be_created(tmp_path, capsys):
    """The output folder is made before the rollout; failing to make it is one line."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "sub" / "g.gif"
    assert cli.main(["grow", "--steps", "2", "--quiet", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert f"--out {out}" in line and "cannot create the folder" in line


def test_output_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    import os
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root writes into a read-only folder anyway: make the write check itself fail
        import tempfile
        monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        rc = cli.main(["grow", "--steps", "2", "--quiet", "--out", str(folder / "g.gif")])
    finally:
        folder.chmod(0o700)
    assert rc == 2
    line = _error_line(capsys)
    assert "cannot write in the folder" in line and str(folder) in line


def test_triton_backend_unavailable(tmp_path, distill_dir, capsys, monkeypatch):
    monkeypatch.setattr("nca_fast.backends.interface.triton_usable", lambda device: False)
    rc, _ = _grow(tmp_path, distill_dir / "ex1_lizard.json", "--backend", "triton")
    assert rc == 2 and "--backend triton" in _error_line(capsys)


# --------------------------------------------------------------------------- forwarding
def test_train_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("nca_fast.train")
    fake.cli_main = lambda argv: seen.append(argv) or 5
    monkeypatch.setitem(sys.modules, "nca_fast.train", fake)
    assert cli.main(["train", "--steps", "3", "--grow", "x"]) == 5
    assert seen == [["--steps", "3", "--grow", "x"]]


def test_train_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nca_fast.train", None)
    assert cli.main(["train"]) == 2
    assert "nca_fast.train" in _error_line(capsys)


def test_bench_forwards_or_explains(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("bench", "bench.throughput"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    assert cli.main(["bench", "--quick"]) == 2
    assert "source checkout" in _error_line(capsys)

    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "throughput.py").write_text(
        "SEEN = []\ndef main(argv):\n    SEEN.append(argv)\n    return 3\n")
    assert cli.main(["bench", "--quick", "--size", "64"]) == 3
    assert sys.modules["bench.throughput"].SEEN == [["--quick", "--size", "64"]]


def test_python_m_help():
    r = subprocess.run([sys.executable, "-m", "nca_fast", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("grow", "train", "bench"):
        assert command in r.stdout
