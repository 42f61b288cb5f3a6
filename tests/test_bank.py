"""Tests for vaezip.training.bank and bankfile: photo banks are deterministic, lossless, fit a byte budget
and refuse what they cannot read."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from vaezip.errors import InputError
from vaezip.training import bank, bankfile, data


def _photos(root, rng, count=3, name="train"):
    (root / name).mkdir()
    for i in range(count):
        size = (60 + 7 * i, 81)
        smooth = np.cumsum(rng.integers(-3, 4, size + (3,)), axis=1)  # some structure, so WebP has work
        Image.fromarray((smooth % 256).astype(np.uint8)).save(root / name / f"{i}.png")


def _recipe(root, window=48):
    return bank.BankRecipe(
        parts=(bank.BankPart(data.PhotoSource(root / "train"), window=window),
               bank.BankPart(data.PhotoSource(root / "train", downscale=2))),
        heldout=(data.PhotoSource(root / "held"),), heldout_crops=5, crop=16)


@pytest.fixture
def photo_root(tmp_path):
    rng = np.random.default_rng(0)
    _photos(tmp_path, rng)
    _photos(tmp_path, rng, count=2, name="held")
    return tmp_path


def test_photo_bank_is_deterministic_and_round_trips(photo_root):
    tmp_path = photo_root
    recipe = _recipe(tmp_path)
    manifest = bank.build_photo_bank(tmp_path / "a.npz", recipe)
    again = bank.build_photo_bank(tmp_path / "b.npz", recipe)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert manifest["sha256"] == again["sha256"] and manifest["training_images"] == 6
    assert manifest["format"] == bankfile.PHOTO_BANK_FORMAT and manifest["window_scale"] == 1.0
    assert json.loads((tmp_path / "a.npz.json").read_text())["sha256"] == manifest["sha256"]
    loaded = bankfile.read_photo_bank(tmp_path / "a.npz")
    assert loaded.sha256 == manifest["sha256"] and loaded.heldout.shape == (5, 16, 16, 3)
    originals = data.read_folder(tmp_path / "train")
    for im, original in zip(loaded.images[:3], originals):  # exact windows of the originals
        assert im.shape == (48, 48, 3)
        assert any(np.array_equal(original[t : t + 48, l : l + 48], im)
                   for t in range(original.shape[0] - 47) for l in range(original.shape[1] - 47))
    for im, original in zip(loaded.images[3:], originals):
        np.testing.assert_array_equal(im, data.reduce_image(original, 2))
    assert bankfile.is_photo_bank(tmp_path / "a.npz") and not bankfile.is_photo_bank(tmp_path / "train" / "0.png")
    assert "6 training images" in bankfile.describe_photo_bank(tmp_path / "a.npz") == loaded.describe()
    through_specs = data.load_dataset(str(tmp_path / "a.npz"), None, 3)
    assert len(through_specs) == 6 and all(np.array_equal(a, b) for a, b in zip(through_specs, loaded.images))
    heldout = data.load_dataset(f"{tmp_path / 'a.npz'}:heldout", None, 3)
    np.testing.assert_array_equal(np.stack(heldout), loaded.heldout)
    assert data.load_dataset(str(tmp_path / "a.npz"), 2, 1)[1].shape == (48, 48, 1)


def test_gray_bank_round_trips(photo_root):
    bank.build_photo_bank(photo_root / "g.npz", _recipe(photo_root), channels=1)
    bank.build_photo_bank(photo_root / "c.npz", _recipe(photo_root))
    loaded = bankfile.read_photo_bank(photo_root / "g.npz")
    windows = [data.to_channels(im, 1) for im in bankfile.read_photo_bank(photo_root / "c.npz").images[:3]]
    reduced = [data.read_image(photo_root / "train" / f"{i}.png", 1, 2) for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(loaded.images, windows + reduced, strict=True))


def test_a_budget_shrinks_every_window_by_one_factor(photo_root):
    full = bank.build_photo_bank(photo_root / "full.npz", _recipe(photo_root))
    budget = int(full["bytes"] * 0.8)
    logged = []
    fitted = bank.build_photo_bank(photo_root / "fit.npz", _recipe(photo_root), max_bytes=budget, log=logged.append)
    assert fitted["bytes"] <= budget < full["bytes"]
    assert 0 < fitted["window_scale"] < 1 and any("over the budget" in line for line in logged)
    side = next(shape[1] for shape in (row[1:3] for row in fitted["images"]))
    assert side % bank.WINDOW_STEP == 0 and bank.WINDOW_STEP + 16 <= side < 48
    big, small = bankfile.read_photo_bank(photo_root / "full.npz"), bankfile.read_photo_bank(photo_root / "fit.npz")
    for a, b in zip(big.images[:3], small.images[:3]):  # the centre of the full recipe's window
        top = (a.shape[0] - b.shape[0]) // 2
        np.testing.assert_array_equal(a[top : top + b.shape[0], top : top + b.shape[1]], b)
    # whole images (window None) cannot shrink: a budget they do not fit is one clear error, no file
    with pytest.raises(InputError, match="does not fit"):
        bank.build_photo_bank(photo_root / "tiny.npz", _recipe(photo_root), max_bytes=2000)
    assert not (photo_root / "tiny.npz").exists()
    before = (photo_root / "fit.npz").read_bytes()  # a bank already there stays as it was
    with pytest.raises(InputError, match="does not fit"):
        bank.build_photo_bank(photo_root / "fit.npz", _recipe(photo_root), max_bytes=2000)
    assert (photo_root / "fit.npz").read_bytes() == before
    assert sorted(p.name for p in photo_root.glob(".*")) == []  # no candidate left behind


def test_other_formats_and_damage_are_refused(photo_root):
    path = photo_root / "a.npz"
    bank.build_photo_bank(path, _recipe(photo_root))
    old = photo_root / "old.npz"
    np.savez(old, format=np.array("vaezip-photo-bank-1"), shapes=np.zeros((0, 3), np.int32))
    assert bankfile.is_photo_bank(old)
    with pytest.raises(InputError, match="build it again"):
        bankfile.read_photo_bank(old)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    webp = bytearray(members["webp.npy"])
    webp[-200:-100] = bytes(100)  # zeros inside the last image
    damaged = photo_root / "damaged.npz"
    with zipfile.ZipFile(damaged, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, bytes(webp) if name == "webp.npy" else content)
    with pytest.raises(InputError, match="damaged|decodes to|checksum"):
        bankfile.read_photo_bank(damaged)
    with zipfile.ZipFile(path) as archive:  # as written, the zip's own CRC-32 guards every member
        assert archive.testzip() is None
