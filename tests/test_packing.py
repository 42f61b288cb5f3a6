"""Tests for vaezip.network.packing: packed weights unpack to the exact bytes; damage is refused."""

from __future__ import annotations

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
