"""Model files (ours and Distill's), atomic writes, target images, PNG and video output."""
import base64
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nca_fast import NCA, NCAConfig
from nca_fast import files, formats, media
from nca_fast.model import load, load_any, load_distill
from nca_fast.rng import update_mask


def _random_model(config=None, seed=0, backend="torch"):
    torch.manual_seed(seed)
    model = NCA(config, backend=backend)
    with torch.no_grad():
        # A new model's w2 is zero (identity map): give it weights that change the state.
        model.w2.weight.normal_(0, 0.05)
        model.w2.bias.normal_(0, 0.01)
    return model


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("config", [
    NCAConfig(),
    NCAConfig(channels=12, hidden=40, fire_rate=0.3, alive_threshold=None, filters="sobel_laplacian",
              padding="circular", precision="ieee"),
], ids=["default", "texture"])
def test_round_trip_is_bitwise(tmp_path, config):
    model = _random_model(config)
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = load(path, backend="torch")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = model.seed_state(2, 20, 23)
    with torch.no_grad():
        assert torch.equal(model(x, 12, seed=5), loaded(x, 12, seed=5))
    assert list(tmp_path.iterdir()) == [path]        # no temporary file left behind


def test_file_is_plain_safetensors_with_config_metadata(tmp_path):
    from safetensors import safe_open

    model = _random_model()
    path = tmp_path / "m.safetensors"
    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(formats.PARAM_NAMES)
        assert tuple(f.get_tensor("w1.weight").shape) == (128, 48, 1, 1)
    assert meta["format_version"] == "1"
    assert NCAConfig.from_dict(json.loads(meta["nca_fast_config"])) == model.config


def test_extra_metadata_round_trips_and_reserved_keys_are_refused(tmp_path):
    model = _random_model()
    path = tmp_path / "m.safetensors"
    model.save(path, metadata={"trained_by": "test", "steps": "12"})
    meta = formats.read_metadata(path)
    assert meta["trained_by"] == "test" and meta["steps"] == "12"
    assert NCAConfig.from_dict(json.loads(meta["nca_fast_config"])) == model.config
    assert torch.equal(load(path).w1.weight, model.w1.weight)
    with pytest.raises(ValueError, match="metadata: 'format_version' is reserved"):
        model.save(tmp_path / "x.safetensors", metadata={"format_version": "9"})
    with pytest.raises(TypeError, match="metadata: expected str"):
        model.save(tmp_path / "y.safetensors", metadata={"steps": 12})
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_load_any_dispatches(tmp_path, distill_dir):
    model = _random_model()
    ours = tmp_path / "weights.bin"                  # extension says nothing: content decides
    model.save(ours)
    assert torch.equal(load_any(ours).w1.weight, model.w1.weight)
    theirs = tmp_path / "export.txt"
    theirs.write_bytes((distill_dir / "ex1_lizard.json").read_bytes())
    a, b = load_any(theirs), load_distill(distill_dir / "ex1_lizard.json")
    assert torch.equal(a.w1.weight, b.w1.weight)


class PlainPort(nn.Module):
    """A PyTorch port as people write them: two 1x1 convolutions named w1 and w2."""

    def __init__(self, channels=16, hidden=128):
        super().__init__()
        self.channels = channels
        self.w1 = nn.Conv2d(3 * channels, hidden, 1)
        self.w2 = nn.Conv2d(hidden, channels, 1)
        ident = np.zeros((3, 3))
        ident[1, 1] = 1
        sobel_x = np.outer([1, 2, 1], [-1, 0, 1]) / 8.0
        bank = np.stack([ident, sobel_x, sobel_x.T])                       # 3 x 3 x 3
        kernel = np.concatenate([bank] * channels)[:, None]                # c*3 + k
        # Not persistent: ports keep fixed filters out of the state_dict.
        self.register_buffer("kernel", torch.tensor(kernel, dtype=torch.float32),
                             persistent=False)

    def living(self, x):
        return F.max_pool2d(x[:, 3:4], 3, stride=1, padding=1) > 0.1

    def forward(self, x, mask):
        pre = self.living(x)
        y = F.conv2d(x, self.kernel, padding=1, groups=self.channels)
        x = x + self.w2(torch.relu(self.w1(y))) * mask
        return x * (pre & self.living(x)).float()


def test_plain_port_state_dict_loads_as_is():
    torch.manual_seed(3)
    port = PlainPort()
    model = NCA(backend="torch")
    assert sorted(port.state_dict()) == sorted(formats.PARAM_NAMES)
    model.load_state_dict(port.state_dict())                        # strict
    x = torch.rand(2, 16, 11, 13) * (torch.rand(2, 1, 11, 13) < 0.4)
    seed, steps = 99, 4
    want = x
    with torch.no_grad():
        for t in range(steps):
            want = port(want, update_mask(2, 11, 13, fire_rate=0.5, seed=seed, step=t))
        got = model(x, steps, seed=seed)
    assert (want != x).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad model files
def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_distill(tmp_path / "nope.json")


@pytest.mark.parametrize("cut", [0, 5, 0.3, 0.9, -1])
def test_truncated_file_names_it(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    _random_model().save(path)
    data = path.read_bytes()
    n = cut if isinstance(cut, int) and cut >= 0 else (len(data) - 1 if cut == -1
                                                        else int(len(data) * cut))
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match="m.safetensors") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_garbage_file_names_it(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="m.safetensors"):
        load(path)


def _write_safetensors(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)


def _meta(config=None):
    return {"nca_fast_config": (config or NCAConfig()).to_json(), "format_version": "1"}


def test_missing_tensor_is_named(tmp_path):
    sd = {k: v.contiguous() for k, v in _random_model().state_dict().items()}
    del sd["w2.bias"]
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, sd, _meta())
    with pytest.raises(ValueError, match=r"m\.safetensors.*w2\.bias"):
        load(path)


def test_wrong_shape_is_named(tmp_path):
    sd = _random_model().state_dict()                                  # hidden 128
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, dict(sd), _meta(NCAConfig(hidden=64)))
    with pytest.raises(ValueError, match=r"m\.safetensors.*w1\.weight.*shape"):
        load(path)


@pytest.mark.parametrize("meta,match", [
    ({}, "nca_fast_config"),
    ({"nca_fast_config": "{not json", "format_version": "1"}, "config"),
    ({"nca_fast_config": json.dumps({"channels": 0}), "format_version": "1"}, "channels"),
    ({"nca_fast_config": NCAConfig().to_json(), "format_version": "99"}, "format_version"),
])
def test_bad_metadata_is_explained(tmp_path, meta, match):
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, dict(_random_model().state_dict()), meta)
    with pytest.raises(ValueError, match=match) as e:
        load(path)
    assert "m.safetensors" in str(e.value)


def test_non_finite_weights_are_refused(tmp_path):
    sd = dict(_random_model().state_dict())
    sd["w1.bias"] = sd["w1.bias"].clone()
    sd["w1.bias"][3] = math.nan
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, sd, _meta())
    with pytest.raises(ValueError, match="w1.bias"):
        load(path)


# --------------------------------------------------------------------------- Distill exports
def test_distill_decoding_follows_the_documented_format(distill_dir):
    """Weights equal the README's formula applied by hand to the raw bytes."""
    path = distill_dir / "ex2_fish.json"
    layers = json.loads(path.read_text())
    model = load_distill(path)
    assert model.config == NCAConfig(channels=16, hidden=128)
    raw0 = np.frombuffer(base64.b64decode(layers[0]["data_b64"]), np.uint8).reshape(49, 128)
    raw1 = np.frombuffer(base64.b64decode(layers[1]["data_b64"]), np.uint8).reshape(129, 16)
    s0, s1 = layers[0]["weight_scale"], layers[1]["weight_scale"]
    w1 = model.w1.weight.detach().double().numpy()[:, :, 0, 0]
    w2 = model.w2.weight.detach().double().numpy()[:, :, 0, 0]
    for h, c, k in [(0, 0, 0), (5, 3, 1), (127, 15, 2), (64, 9, 2), (17, 12, 0)]:
        byte = raw0[k * 16 + c, h]                                    # band-major input row
        assert w1[h, c * 3 + k] == pytest.approx((byte / 255 - 0.5) * s0, rel=1e-6)
    assert model.w1.bias[7].item() == pytest.approx(
        (raw0[48, 7] / 255 - 0.5) * layers[0]["bias_scale"], rel=1e-6)
    assert w2[4, 100] == pytest.approx((raw1[100, 4] / 255 - 0.5) * s1, rel=1e-6)
    assert model.w2.bias[15].item() == pytest.approx(
        (raw1[128, 15] / 255 - 0.5) * layers[1]["bias_scale"], rel=1e-6)


def _layers(distill_dir):
    return json.loads((distill_dir / "ex1_lizard.json").read_text())


@pytest.mark.parametrize("mutate,match", [
    (lambda L: "not a list", "2 dense layers"),
    (lambda L: L[:1], "2 dense layers"),
    (lambda L: [L[0], 5], "layer 1"),
    (lambda L: [{k: v for k, v in L[0].items() if k != "weight_scale"}, L[1]], "weight_scale"),
    (lambda L: [dict(L[0], data_b64=base64.b64encode(b"\x00" * 100).decode()), L[1]],
     "100 bytes, expected"),
    (lambda L: [dict(L[0], data_b64="!!!not base64"), L[1]], "base64"),
    (lambda L: [dict(L[0], type="float16"), L[1]], "float16"),
    (lambda L: [dict(L[0], in_ch=-3), L[1]], "in_ch"),
    (lambda L: [L[1], L[0]], "in_ch"),
])
def test_bad_distill_export_is_explained(tmp_path, distill_dir, mutate, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mutate(_layers(distill_dir))))
    with pytest.raises(ValueError, match=match) as e:
        load_distill(path)
    assert "bad.json" in str(e.value)


def test_distill_export_that_is_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b"\x89PNG not json")
    with pytest.raises(ValueError, match=r"bad\.json.*JSON"):
        load_distill(path)


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old content")

    def failing(tmp):
        tmp.write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, failing)
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_write_replaces_and_keeps_extension(tmp_path):
    path = tmp_path / "clip.gif"
    path.write_bytes(b"old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.suffix == ".gif" and tmp != path
        tmp.write_bytes(b"new")

    assert files.atomic_write(path, write) == path
    assert path.read_bytes() == b"new" and not seen[0].exists()


def test_save_failure_keeps_previous_model(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    good = _random_model(seed=1)
    good.save(path)
    before = path.read_bytes()

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError("no space left on device")
    monkeypatch.setattr(files.pathlib.Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError):
        _random_model(seed=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load(path).w2.weight, good.w2.weight)


def test_atomic_write_into_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.atomic_write(tmp_path / "no" / "x.bin", lambda t: t.write_bytes(b""))


# --------------------------------------------------------------------------- targets
def test_load_target_fits_premultiplies_and_pads():
    # 80 x 40 (W x H): left half opaque red, right half half-transparent white.
    arr = np.zeros((40, 80, 4), np.uint8)
    arr[:, :40] = (255, 0, 0, 255)
    arr[:, 40:] = (255, 255, 255, 128)
    t = media.load_target(Image.fromarray(arr), size=20, pad=3)
    assert t.shape == (4, 26, 26) and t.dtype == torch.float32
    # 80 x 40 -> 20 x 10, centred vertically: rows 5..14 of the 20 x 20 square, +3 padding.
    inside = t[:, 3 + 5:3 + 15, 3:23]
    assert (t[3].sum(1) > 0).nonzero().flatten().tolist() == list(range(8, 18))
    torch.testing.assert_close(inside[:, 2, 3], torch.tensor([1.0, 0, 0, 1]))
    a = 128 / 255
    torch.testing.assert_close(inside[:, 2, 16], torch.tensor([a, a, a, a]), atol=2e-2, rtol=0)
    assert (t[:, :3] == 0).all() and (t[:, -3:] == 0).all() and (t[:, :, :3] == 0).all()
    assert (t[:3] <= t[3:4] + 1e-6).all()


def test_load_target_from_file_and_errors(tmp_path):
    p = tmp_path / "e.png"
    Image.new("RGBA", (128, 128), (0, 255, 0, 255)).save(p)
    t = media.load_target(p, size=40, pad=16)
    assert t.shape == (4, 72, 72) and t[1, 16:56, 16:56].min() == 1
    with pytest.raises(FileNotFoundError, match="missing.png"):
        media.load_target(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        media.load_target(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="size"):
        media.load_target(p, size=0)


# ----------------------------------------------------------------------------- image modes
def test_16_bit_grayscale_png_is_read_by_its_range(tmp_path):
    """40000 of 65535 is 61% gray; Pillow's convert("RGBA") alone would clip it to white."""
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    t = media.load_target(p, size=10, pad=2)
    inside = t[:, 2:12, 2:12]
    torch.testing.assert_close(inside[:3], torch.full((3, 10, 10), 40000 / 65535))
    assert (inside[3] == 1).all() and (t[:, :2] == 0).all()


def test_16_bit_grayscale_tiff_is_resized_in_its_range(tmp_path):
    p = tmp_path / "g16.tiff"
    Image.fromarray(np.full((20, 40), 65535 // 4, np.uint16)).save(p)
    t = media.load_target(p, size=10, pad=0)               # 40 x 20 -> 10 x 5, centred
    rows = (t[3] > 0).any(1).nonzero().flatten().tolist()
    assert rows == [2, 3, 4, 5, 6]
    torch.testing.assert_close(t[0, 2:7], torch.full((5, 10), (65535 // 4) / 65535),
                               atol=1e-4, rtol=0)


def test_float_tiff_is_taken_as_it_is(tmp_path):
    """A float TIFF of 0.5 became black."""
    p = tmp_path / "f.tiff"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(p)
    t = media.load_target(p, size=8, pad=0)
    torch.testing.assert_close(t, torch.cat([torch.full((3, 8, 8), 0.5), torch.ones(1, 8, 8)]))


@pytest.mark.parametrize("values,needle", [
    (np.full((8, 8), 2.5, np.float32), r"float pixels must lie in \[0, 1\], found values "
                                       r"from 2.5 to 2.5"),
    (np.array([[0.5, np.nan]] * 2, np.float32), "NaN"),
    (np.full((8, 8), 70000, np.int32), "32-bit integer pixels"),
])
def test_pixels_of_unknown_range_are_refused_with_the_reason(tmp_path, values, needle):
    p = tmp_path / "odd.tiff"
    Image.fromarray(values).save(p)
    with pytest.raises(ValueError, match=needle):
        media.load_target(p, size=8, pad=0)


def test_fully_transparent_target_is_refused(tmp_path, capsys):
    p = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(p)
    with pytest.raises(ValueError, match="clear.png: the image is fully transparent"):
        media.load_target(p, size=16, pad=2)
    from nca_fast.train import cli_main
    assert cli_main(["--target", str(p), "--size", "8", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fully transparent" in err and len(err.splitlines()) == 1


def test_opaque_photo_is_a_full_square_of_live_cells(tmp_path):
    """An RGB photo: alpha 1 wherever the photo lies; with pad 0 a square photo is the grid."""
    rng = np.random.default_rng(0)
    square = tmp_path / "square.png"
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(square)
    t = media.load_target(square, size=16, pad=0)
    assert t.shape == (4, 16, 16) and (t[3] == 1).all()
    t = media.load_target(square, size=16, pad=3)
    assert (t[3, 3:19, 3:19] == 1).all() and t[3].sum() == 16 * 16
    wide = tmp_path / "wide.jpg"                          # 60 x 40: 16 x 11 cells, centred
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(wide)
    t = media.load_target(wide, size=16, pad=0)
    rows = (t[3] > 0).any(1).nonzero().flatten().tolist()
    assert rows == list(range(2, 13)) and (t[3, 2:13] == 1).all()


def test_one_pixel_and_gray_photos_are_targets(tmp_path):
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (255, 128, 0)).save(one)
    t = media.load_target(one, size=8, pad=1)              # one colour, upscaled to 8 x 8
    torch.testing.assert_close(t[:, 1:9, 1:9], torch.tensor([1.0, 128 / 255, 0, 1])
                               .view(4, 1, 1).expand(4, 8, 8))
    gray = tmp_path / "gray.png"
    Image.new("L", (20, 20), 51).save(gray)
    t = media.load_target(gray, size=10, pad=0)
    torch.testing.assert_close(t, torch.tensor([0.2, 0.2, 0.2, 1.0]).view(4, 1, 1)
                               .expand(4, 10, 10))


def test_a_large_jpeg_is_decoded_reduced(tmp_path):
    """A 3000 x 2000 JPEG fitted in 64 cells is decoded at 1/8 scale (375 x 250), not at full
    size, and gives the same picture within JPEG's and the reduction's error."""
    yy, xx = np.mgrid[:2000, :3000]
    rgb = np.stack([xx * 255 // 2999, yy * 255 // 1999, np.full_like(xx, 90)], -1)
    p = tmp_path / "big.jpg"
    Image.fromarray(rgb.astype(np.uint8)).save(p, quality=95)
    im, _, fmt = media._open_image(p, 64)
    assert fmt == "JPEG" and im.size == (375, 250)
    t = media.load_target(p, size=64, pad=0)
    small = Image.fromarray(rgb.astype(np.uint8)).resize((64, 43), Image.LANCZOS)
    ref = torch.from_numpy(np.asarray(small).astype(np.float32) / 255).permute(2, 0, 1)
    assert (t[:3, 10:53] - ref).abs().max() < 0.05


@pytest.mark.parametrize("make,needle", [
    (lambda p: Image.new("RGBA", (4, 4), (9, 9, 9, 0)).save(p), "fully transparent"),
    (lambda p: p.write_bytes(b"not an image"), "not a readable image"),
    (lambda p: None, "no such image file"),
])
def test_bad_targets_are_one_line_errors_naming_the_flag(tmp_path, capsys, make, needle):
    from nca_fast.train import cli_main
    p = tmp_path / "t.png"
    make(p)
    assert cli_main(["--target", str(p), "--size", "8", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nca-fast train: error: --target:") and needle in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_8_bit_targets_are_unchanged():
    """The shipped target reads as before: Pillow's RGBA, Lanczos-fitted, scaled by 255."""
    from nca_fast.training.options import DEFAULT_TARGET
    with Image.open(DEFAULT_TARGET) as im:
        rgba = im.convert("RGBA")
    fitted = rgba.resize((24, 24), Image.LANCZOS) if rgba.size != (24, 24) else rgba
    a = np.asarray(fitted).astype(np.float32) / 255.0
    a[..., :3] *= a[..., 3:4]
    expected = torch.from_numpy(np.pad(a, ((4, 4), (4, 4), (0, 0))).transpose(2, 0, 1).copy())
    assert torch.equal(media.load_target(DEFAULT_TARGET, size=24, pad=4), expected)


def test_distill_target_tiles(distill_dir):
    sprite = distill_dir / "emoji_targets.png"
    raw = np.asarray(Image.open(sprite).convert("RGBA")).astype(np.float64) / 255
    for i, name in enumerate(media.DISTILL_TARGETS):
        t = media.load_distill_target(name, sprite)
        assert torch.equal(t, media.load_distill_target(i, sprite))
        assert t.shape == (4, 72, 72)
        tile = raw[:, 40 * i:40 * (i + 1)]
        np.testing.assert_allclose(t[3, 16:56, 16:56].numpy(), tile[..., 3], atol=1e-6)
        np.testing.assert_allclose(t[0, 16:56, 16:56].numpy(), tile[..., 0] * tile[..., 3],
                                   atol=1e-6)
        assert t[:, :16].abs().sum() == 0 and t[:, :, 56:].abs().sum() == 0
        assert t[3].sum() > 50                         # every tile holds an emoji
    with pytest.raises(ValueError, match="which"):
        media.load_distill_target("unicorn", sprite)
    with pytest.raises(ValueError, match="which"):
        media.load_distill_target(10, sprite)


# --------------------------------------------------------------------------- frames, videos
def _frame():
    x = torch.zeros(16, 4, 5)
    x[:, 1, 2] = torch.tensor([1.0, 0, 0, 1] + [0.5] * 12)          # opaque red
    x[:4, 2, 2] = torch.tensor([0.0, 0, 0.5, 0.5])                   # half-transparent blue
    x[:4, 3, 4] = torch.tensor([3.0, -2, 0, 7])                      # out of range: clipped
    return x


def test_png_on_white(tmp_path):
    path = tmp_path / "f.png"
    media.write_png(_frame(), path, scale=3)
    img = np.asarray(Image.open(path))
    assert img.shape == (12, 15, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all()                                  # empty cell: white
    assert img[3 * 1, 3 * 2].tolist() == [255, 0, 0]
    assert img[3 * 2 + 2, 3 * 2 + 2].tolist() == [128, 128, 255]    # 0.5 blue over white
    assert img[3 * 3, 3 * 4].tolist() == [255, 0, 0]
    assert (img[3:6, 6:9] == img[3, 6]).all()                        # nearest neighbour


@pytest.mark.parametrize("bad", [torch.zeros(3, 4, 4), torch.zeros(4, 4), torch.zeros(2, 16, 4, 4)])
def test_png_rejects_bad_frames(tmp_path, bad):
    with pytest.raises(ValueError, match="frame"):
        media.write_png(bad, tmp_path / "f.png")
    assert not list(tmp_path.iterdir())


def test_gif_frames_and_size(tmp_path):
    frames = [_frame() * (i / 4) for i in range(5)]
    path = tmp_path / "v.gif"
    media.write_video(frames, path, fps=10, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (10, 8)
        im.seek(4)
        last = np.asarray(im.convert("RGB"))
    assert last[2, 4].tolist() == [255, 0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["v.gif"]


def test_mp4_without_ffmpeg_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)       # import now fails
    with pytest.raises(ImportError, match=r"nca-fast\[video\]"):
        media.write_video([_frame()], tmp_path / "v.mp4")
    assert not list(tmp_path.iterdir())


def test_video_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        media.write_video([_frame()], tmp_path / "v.avi")
    with pytest.raises(ValueError, match="frames"):
        media.write_video([], tmp_path / "v.gif")
    with pytest.raises(ValueError, match="fps"):
        media.write_video([_frame()], tmp_path / "v.gif", fps=0)
    assert not list(tmp_path.iterdir())


def test_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="MP4 needs imageio-ffmpeg "
                                                 "(pip install -e '.[video]')")
    import imageio.v2 as imageio

    frames = [_frame() * (i / 5) for i in range(6)]
    path = tmp_path / "v.mp4"
    media.write_video(frames, path, fps=12, scale=3)          # 15 x 12 pixels: odd width
    reader = imageio.get_reader(path)
    try:
        images = [im for im in reader.iter_data()]          # len(reader) is inf for MP4
        assert reader.get_meta_data()["fps"] == pytest.approx(12)
    finally:
        reader.close()
    assert len(images) == 6 and images[0].shape == (12, 16, 3)     # padded to an even width
    # Lossy codec: compare the last frame with the PNG rendering loosely.
    want = media.to_rgb(frames[-1], scale=3).astype(int)
    assert np.abs(images[-1][:, :15].astype(int) - want).mean() < 12
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
