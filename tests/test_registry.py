"""Tests for vaezip.network.registry: every shipped entry present, hashed and strictly loadable; tampering refused."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KODAK, make_tiny_model, random_pixels

from vaezip import api
from vaezip.coding import imagecodec
from vaezip.errors import ModelError
from vaezip.network import packing, registry
from vaezip.network.config import ModelConfig

NAMES = sorted(registry.specs())


def test_registry_is_not_empty_and_names_files_are_unique():
    raw = json.loads((registry._models_dir() / registry.REGISTRY_FILE).read_text())
    names = [e["name"] for e in raw["models"]]
    files = [e["file"] for e in raw["models"]]
    assert names and len(set(names)) == len(names)
    assert len(set(files)) == len(files)
    assert {"photo-rgb-1", "photo-gray-1"} <= set(names)
    for mode in ("RGB", "L"):  # the registry's named default, a fixed-point model (format version 6)
        assert registry.default_model(mode) == raw["defaults"][mode]
        assert registry.get_spec(registry.default_model(mode)).config.fixed_bits is not None
    assert registry.default_model("CMYK") is None


@pytest.mark.parametrize("name", NAMES)
def test_entry_file_hash_and_strict_load(name):
    spec = registry.get_spec(name)
    assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert len(spec.hash_prefix) == 8
    assert ModelConfig.from_dict(spec.config.to_dict()) == spec.config
    path = Path(str(registry._models_dir() / spec.file))
    assert path.is_file(), path
    assert path.suffix == packing.SUFFIX  # stored packed; the sha256 is that of the unpacked bytes
    packed = path.read_bytes()
    if spec.delta_base:  # stored as the difference from its successor's bytes (`registry delta`)
        base = registry.stored_weights(spec.delta_base)
        assert packing.delta_base(packed) == hashlib.sha256(base).hexdigest()
        raw = packing.unpack(packed, base)
    else:
        assert packing.delta_base(packed) is None
        raw = packing.unpack(packed)
    assert raw == registry.stored_weights(name)
    # Re-stored on the integer grid (`registry snap`): the stored bytes have their own hash,
    # the registered one stays the identity in the model's files.
    assert hashlib.sha256(raw).hexdigest() == (spec.stored_sha256 or spec.sha256)
    assert spec.stored_sha256 != spec.sha256
    loaded = registry.load_model(name)
    assert loaded.spec == spec
    assert not loaded.net.training
    # Strict: the file holds exactly the network's parameters, nothing more or less.
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    assert set(state) == set(loaded.net.state_dict())
    for key, value in state.items():
        assert torch.equal(loaded.net.state_dict()[key], value)
    assert registry.load_model(name) is loaded  # loaded once per process


def test_unknown_name_is_model_error():
    with pytest.raises(ModelError, match="photo-rgb-1"):  # the message lists what exists
        registry.get_spec("photo-rgb-0")
    with pytest.raises(ModelError):
        registry.load_model("no-such-model")


def _copy_models_dir(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(Path(str(registry._models_dir() / registry.REGISTRY_FILE)), folder / registry.REGISTRY_FILE)
    monkeypatch.setattr(registry, "_models_dir", lambda: folder)
    return folder


def test_tampered_weights_fail_the_hash_check(tmp_path, monkeypatch):
    spec = registry.get_spec("photo-gray-1")
    source = Path(str(registry._models_dir() / spec.file))
    folder = _copy_models_dir(tmp_path, monkeypatch)
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the packed weights: zlib's check fails
    (folder / spec.file).write_bytes(bytes(data))
    load = registry.load_model.__wrapped__  # past the per-process cache
    with pytest.raises(ModelError, match="corrupt"):
        load("photo-gray-1")
    raw = bytearray(packing.read_weights(source))
    raw[len(raw) // 2] ^= 1  # one bit of the weights themselves, packed again: the sha256 fails
    (folder / spec.file).write_bytes(packing.pack(bytes(raw)))
    with pytest.raises(ModelError, match="sha256"):
        load("photo-gray-1")
    (folder / spec.file).unlink()
    with pytest.raises(ModelError, match="missing"):
        load("photo-gray-1")


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_load_refuses_mismatched_state(tiny_model, change):
    state = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    first = next(iter(state))
    if change == "missing":
        del state[first]
    elif change == "extra":
        state["unexpected.weight"] = torch.zeros(3)
    else:
        state[first] = torch.zeros(tuple(s + 1 for s in state[first].shape))
    with pytest.raises(ModelError, match=tiny_model.spec.name):
        registry.model_from_weights(tiny_model.spec, state)


def test_model_from_weights_accepts_a_path(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model.net.state_dict(), path)
    loaded = registry.model_from_weights(tiny_model.spec, path)
    for key, value in tiny_model.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value)


def test_config_change_under_the_same_name_and_weights_is_a_model_error():
    before = make_tiny_model(3, "tiny-test")
    cfg = dataclasses.replace(before.spec.config, active_latents=((0, 2), (1,)))
    after = registry.model_from_weights(dataclasses.replace(before.spec, config=cfg), before.net.state_dict())
    assert after.spec.hash_prefix != before.spec.hash_prefix  # the identity covers the config
    data = api.compress(random_pixels("RGB", 20, 20, seed=1, smooth=True), loaded=before)
    with pytest.raises(ModelError):
        api.decompress(data, loaded=after)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_stated_bpd_is_reproduced(name):
    """Each entry's stated bpd on a named set (only Kodak can be checked here)."""
    spec = registry.get_spec(name)
    if not spec.bpd:
        pytest.skip(f"{name} states no bpd")
    sets = {k: v for k, v in spec.bpd.items() if "kodak" in k.lower()}
    if not sets or not KODAK.is_dir():
        pytest.skip(f"{name}: no checkable bpd in {sorted(spec.bpd)}")
    from PIL import Image as PILImage

    loaded = registry.load_model(name)
    bits = subpixels = 0.0
    for path in sorted(KODAK.glob("kodim*.png")):
        with PILImage.open(path) as im:
            pixels = np.asarray(im.convert("RGB" if spec.config.channels == 3 else "L"))
        pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], spec.config.channels)
        tile = imagecodec.tile_size(*pixels.shape[:2], spec.config.downsampling)
        bits += api.model_bits(loaded, np.ascontiguousarray(pixels), tile)[0]
        subpixels += pixels.size
    for key, stated in sets.items():
        value = stated if isinstance(stated, (int, float)) else stated.get("nelbo_bpd", stated.get("bpd"))
        assert bits / subpixels == pytest.approx(float(value), rel=0.01), key


def test_source_models_dir_is_the_checkouts_models_folder():
    folder = registry.source_models_dir()
    assert (folder / registry.REGISTRY_FILE).is_file() and (folder / "__init__.py").is_file()
