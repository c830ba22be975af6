"""Sizes from untrusted files and from flags: refused up front with one line, never allocated.

A model file's config is checked against its safetensors header before anything is built; the
sizes a file may ask for are capped; ``grow`` and ``train`` estimate their memory from the
flags (nca_fast/resources.py) and refuse what exceeds the machine's, naming the flags and the
estimate; JSON nested deeper than Python's recursion limit is a ValueError, not a
RecursionError.
"""
import json

import pytest
import torch
from safetensors.torch import save as st_save

import nca_fast
from nca_fast import NCA, NCAConfig, cli, formats, model as nca_model, resources
from nca_fast.train import cli_main
from nca_fast.training.options import TrainOptions, train_memory

GIB = 2**30


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _model_file(path, config_dict, tensors=None):
    """A .safetensors with ``config_dict`` as its nca_fast config and small real tensors."""
    if tensors is None:
        tensors = {k: v.contiguous() for k, v in NCA(NCAConfig(hidden=8)).state_dict().items()}
    meta = {formats.CONFIG_KEY: json.dumps(config_dict), formats.VERSION_KEY: formats.FORMAT_VERSION}
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if an NCA is built (its parameters allocated) from the file."""
    def refuse(*args, **kwargs):
        raise AssertionError("an NCA was built from a file that should have been refused")
    monkeypatch.setattr(nca_model, "NCA", refuse)


# ----------------------------------------------------------------------------- model files
def test_config_asking_for_millions_of_channels_is_refused_before_allocating(
        tmp_path, no_model_built):
    """A 17 KB file whose config says channels=4_000_000 would allocate 4.2 GB at once."""
    path = _model_file(tmp_path / "bomb.safetensors",
                       {**NCAConfig(hidden=8).to_dict(), "channels": 4_000_000})
    assert path.stat().st_size < 20_000
    with pytest.raises(ValueError, match=r"bomb.safetensors: channels=4000000 is more than"):
        nca_fast.load(path)


def test_header_shapes_must_match_the_config_before_allocating(tmp_path, no_model_built):
    # Under the caps, but 1000 channels x 10000 hidden units (1.2 GB of weights) that the file
    # does not hold: the header's shapes say so before anything is built.
    path = _model_file(tmp_path / "liar.safetensors",
                       {**NCAConfig().to_dict(), "channels": 1000, "hidden": 10000})
    with pytest.raises(ValueError, match=r"'w1.weight' has shape \(8, 48, 1, 1\), but the "
                                         r"stored config needs \(10000, 3000, 1, 1\)"):
        nca_fast.load(path)


def test_header_dtype_must_be_floating_point(tmp_path, no_model_built):
    tensors = {k: v.to(torch.int32) for k, v in NCA(NCAConfig(hidden=8)).state_dict().items()}
    path = _model_file(tmp_path / "ints.safetensors", NCAConfig(hidden=8).to_dict(), tensors)
    with pytest.raises(ValueError, match=r"dtype 'I32', expected floating point"):
        nca_fast.load(path)


def test_a_valid_file_still_loads(tmp_path):
    model = NCA(NCAConfig(hidden=8))
    model.save(tmp_path / "ok.safetensors")
    assert nca_fast.load(tmp_path / "ok.safetensors").config == model.config


DEEP = 100_000


def test_deeply_nested_distill_json_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(ValueError, match="nested too deeply"):
        nca_fast.load_distill(path)
    assert cli.main(["grow", "--model", str(path), "--out", str(tmp_path / "g.gif")]) == 2
    assert "deep.json" in _one_line(capsys)


def test_deeply_nested_config_in_a_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    tensors = {k: v.contiguous() for k, v in NCA(NCAConfig(hidden=8)).state_dict().items()}
    meta = {formats.CONFIG_KEY: "[" * DEEP + "]" * DEEP, formats.VERSION_KEY: formats.FORMAT_VERSION}
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="nested too deeply"):
        nca_fast.load(path)


def test_deeply_nested_run_config_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"train": ' + "[" * DEEP + "]" * DEEP + "}")
    assert cli_main(["--resume", str(tmp_path)]) == 2
    assert "config.json" in _one_line(capsys)


# ----------------------------------------------------------------------------- grow's flags
def test_grow_scale_beyond_memory_is_refused(tmp_path, capsys, monkeypatch):
    """--scale 1000 would hold 97 frames of 40000^2 pixels: past the OOM killer's line."""
    monkeypatch.setattr(resources, "host_memory_bytes", lambda: 16 * GIB)
    out = tmp_path / "g.gif"
    assert cli.main(["grow", "--scale", "1000", "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert line.startswith("nca-fast: error: --scale 1000 --size 40 --steps 96: growing needs")
    assert "16.0 GiB" in line and "97 rendered frames of 40000 x 40000 pixels" in line
    assert not out.exists()


def test_grow_size_beyond_memory_is_refused(tmp_path, capsys):
    # No machine holds 97 states of 16 x 100000 x 100000 floats (62 TB): no patch needed.
    assert cli.main(["grow", "--size", "100000", "--out", str(tmp_path / "g.gif")]) == 2
    line = _one_line(capsys)
    assert "--size 100000" in line and "TiB" in line


def test_grow_within_memory_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "host_memory_bytes", lambda: 16 * GIB)
    assert cli.main(["grow", "--steps", "2", "--quiet", "--out", str(tmp_path / "g.gif")]) == 0


# ----------------------------------------------------------------------------- train's flags
@pytest.mark.parametrize("flags,needle", [
    (["--hidden", "1000000000"], "--hidden 1000000000"),
    (["--pool-size", "100000000"], "--pool-size 100000000"),
    (["--size", "100000"], "--size 100000"),
    (["--batch", "10000000"], "--batch 10000000"),
    (["--rollout", "2", "1000000000"], "--rollout 2 1000000000"),
])
def test_train_sizes_beyond_memory_are_refused(tmp_path, capsys, flags, needle):
    """Sizes beyond the machine are one line naming the flags, not an allocator's traceback."""
    run = tmp_path / "run"
    assert cli_main([*flags, "--device", "cpu", "--out", str(run)]) == 2
    line = _one_line(capsys)
    assert needle in line and "training needs about" in line and "memory" in line
    assert not run.exists()                     # refused before the folder was made


def test_train_estimate_against_a_small_machine(monkeypatch):
    monkeypatch.setattr(resources, "host_memory_bytes", lambda: 1 * GIB)
    o = TrainOptions(pool_size=4096, device="cpu").resolved()  # 4096 x 16 x 72 x 72 floats
    with pytest.raises(resources.MemoryLimitError, match=r"--pool-size 4096 --size 40 --pad 16"):
        resources.check(train_memory(o, 1, torch.device("cpu")), torch.device("cpu"), "training")


def test_readme_training_commands_are_within_the_estimate():
    """The README's largest run (the 256-cell stage) ran on a 23 GiB, 2-core machine: the
    estimate, a lower bound of the peak, must stay well below that."""
    o = TrainOptions(size=256, pad=8, hidden=64, batch=2, pool_size=32, steps=300,
                     rollout_min=208, rollout_max=312, loss_levels=4, device="cpu").resolved()
    total = sum(t.nbytes for t in train_memory(o, 1, torch.device("cpu")))
    assert 0.1 * GIB < total < 4 * GIB, total / GIB
