"""Tests for vaezip.network.packing: packed weights unpack to the exact bytes; damage is refused."""

from __future__ import annotations

import hashlib
import io
import struct

import numpy as np
import pytest
import torch

from vaezip.network import packing


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 4097])
def test_round_trip_any_length(length):
    raw = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    packed = packing.pack(raw)
    assert packed[:8] == packing.MAGIC
    assert packing.unpack(packed) == raw


def test_float_weights_shrink_and_load_exactly(tmp_path):
    state = {"w": torch.randn(64, 64, 3, 3) * 0.05, "b": torch.zeros(64), "n": torch.tensor(7)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    raw = buffer.getvalue()
    path = tmp_path / f"w{packing.SUFFIX}"
    path.write_bytes(packing.pack(raw))
    assert path.stat().st_size < 0.95 * len(raw)  # the exponent bytes compress once gathered
    assert packing.read_weights(path) == raw
    loaded = torch.load(io.BytesIO(packing.read_weights(path)), weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    plain = tmp_path / "w.pt"  # any other name is read as it is
    plain.write_bytes(raw)
    assert packing.read_weights(plain) == raw


def test_damage_is_refused():
    packed = packing.pack(b"weights" * 100)
    with pytest.raises(packing.PackError, match="too short"):
        packing.unpack(packed[:5])
    with pytest.raises(packing.PackError, match="not a packed"):
        packing.unpack(b"X" + packed[1:])
    with pytest.raises(packing.PackError, match="zlib"):
        packing.unpack(packed[:-3])
    wrong_length = struct.pack("<8sQ", packing.MAGIC, 8) + packed[16:]
    with pytest.raises(packing.PackError, match="header says 8"):
        packing.unpack(wrong_length)


@pytest.mark.parametrize("base_length", [0, 4000, 4097, 5000])
def test_delta_round_trip_against_any_base(base_length):
    rng = np.random.default_rng(base_length)
    raw = rng.integers(0, 256, 4097, dtype=np.uint8).tobytes()
    base = bytearray(raw[:base_length] + bytes(max(0, base_length - len(raw))))
    for i in range(0, len(base), 97):  # a few changed bytes: a successor's weights
        base[i] ^= 1
    base = bytes(base)
    packed = packing.pack_delta(raw, base)
    assert packed[:8] == packing.DELTA_MAGIC
    assert packing.delta_base(packed) == hashlib.sha256(base).hexdigest()
    assert packing.delta_base(packing.pack(raw)) is None
    assert packing.unpack(packed, base) == raw
    if base_length >= 4000:  # mostly equal bytes: the difference packs far smaller than the whole
        assert len(packed) < len(packing.pack(raw)) / 4


def test_delta_needs_its_own_base(tmp_path):
    raw, base = b"weights, after" * 50, b"weights before" * 50
    packed = packing.pack_delta(raw, base)
    with pytest.raises(packing.PackError, match="without them"):
        packing.unpack(packed)
    with pytest.raises(packing.PackError, match="other weights"):
        packing.unpack(packed, base[:-1] + b"!")
    with pytest.raises(packing.PackError, match="too short"):
        packing.unpack(packed[:30], base)
    with pytest.raises(packing.PackError, match="zlib"):
        packing.unpack(packed[:-3], base)
    path = tmp_path / f"w{packing.SUFFIX}"
    path.write_bytes(packed)
    assert packing.read_weights(path, base) == raw
    assert packing.unpack(packing.pack(raw), base) == raw  # a whole file ignores a base
