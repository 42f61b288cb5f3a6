"""Golden files: committed .vz files must decode to their PNGs, and re-encoding the PNGs
must give the same bytes, so any change to the bitstream is a visible diff.

Regenerate (after a deliberate bitstream change, never to make a failure go away):
    VAEZIP_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import kodak_crop, random_image, to_gray

from vaezip import api, container
from vaezip.images import Image, encode_transparency, pixels_equal, read_image, write_png

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("VAEZIP_REGEN_GOLDEN") == "1"
FAKE_ICC = b"vaezip golden test: ICC bytes kept verbatim \x00\x01\xfe\xff"


def _kodak_48x40() -> np.ndarray:
    return kodak_crop("kodim23.png", 180, 300, 40, 48)  # (H, W) = (40, 48)


def _rgba_20x13() -> Image:
    rgb = kodak_crop("kodim03.png", 300, 200, 13, 20)
    alpha = np.full((13, 20, 1), 255, np.uint8)
    alpha[4:9, 5:15] = 0  # a transparent hole and a soft edge
    alpha[3, 5:15] = 128
    return Image("RGBA", np.concatenate([rgb, alpha], axis=2))


def _p_33x17() -> Image:
    return random_image("P", 17, 33, seed=7, smooth=True, transparency=encode_transparency(bytes([255, 0, 128, 64])))


# name -> (builder, model the header must name)
CASES = {
    "rgb_kodim23_48x40": (lambda: Image("RGB", _kodak_48x40()), "photo-rgb-1"),
    "gray_kodim23_48x40": (lambda: Image("L", to_gray(_kodak_48x40())[:, :, None], icc_profile=FAKE_ICC),
                           "photo-gray-1"),
    "rgba_kodim03_20x13": (_rgba_20x13, "photo-rgb-1"),
    # Three 64x64 tiles, mostly padding: the schedule has bits-back batches after the first.
    "rgb_strip_kodim23_150x20": (lambda: Image("RGB", kodak_crop("kodim23.png", 100, 400, 20, 150)), "photo-rgb-1"),
    "p_trns_33x17": (_p_33x17, ""),
    "bilevel_25x9": (lambda: random_image("1", 9, 25, seed=3, smooth=True), ""),
}


def regenerate() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, (build, _) in CASES.items():
        image = build()
        write_png(image, GOLDEN / f"{name}.png")
        # Encode what the PNG reads back as, exactly as the re-encoding test does.
        (GOLDEN / f"{name}.vz").write_bytes(api.compress(read_image(GOLDEN / f"{name}.png")))


@pytest.fixture(scope="module", autouse=True)
def _maybe_regenerate():
    if REGEN:
        regenerate()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_file_decodes_to_its_png(name):
    expected = read_image(GOLDEN / f"{name}.png")
    data = (GOLDEN / f"{name}.vz").read_bytes()
    header, _ = container.unpack(data)
    assert header.model_name == CASES[name][1]
    back = api.decompress_image(data)
    assert pixels_equal(back, expected)
    if name.startswith("rgb_strip"):
        assert len(header.schedule) > 1 and not all(e & 0x8000 for e in header.schedule), header.schedule
    assert back.icc_profile == expected.icc_profile


def _assert_same_code(golden: bytes, fresh: bytes) -> None:
    """Byte-identical, or identical up to the `runtime` header field (and so the CRC)."""
    if fresh == golden:
        return
    old_header, old_words = container.unpack(golden)
    new_header, new_words = container.unpack(fresh)
    written_by = old_header.runtime
    # `runtime` records the library versions that wrote the file (torch, numpy,
    # constriction); it is informational and changes with any upgrade, and with it the
    # CRC. What must not change is the code itself: the payload words and every other
    # header field.
    old_header = dataclasses.replace(old_header, runtime=new_header.runtime)
    assert new_header == old_header, f"header changed (golden written by {written_by})"
    np.testing.assert_array_equal(new_words, old_words, err_msg=(
        f"payload changed; golden written by {written_by}, this is {new_header.runtime}. "
        "If the bitstream change is deliberate: VAEZIP_REGEN_GOLDEN=1 pytest tests/test_golden.py"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reencoding_gives_identical_bytes(name):
    golden = (GOLDEN / f"{name}.vz").read_bytes()
    _assert_same_code(golden, api.compress(read_image(GOLDEN / f"{name}.png")))


def test_comparison_ignores_only_the_runtime():
    golden = (GOLDEN / "p_trns_33x17.vz").read_bytes()
    header, words = container.unpack(golden)
    _assert_same_code(golden, container.pack(dataclasses.replace(header, runtime="torch=0.0 numpy=0.0"), words))
    changed = words.copy()
    changed[-1] ^= np.uint32(1)
    with pytest.raises(AssertionError, match="payload changed"):
        _assert_same_code(golden, container.pack(header, changed))
    with pytest.raises(AssertionError, match="header changed"):
        _assert_same_code(golden, container.pack(dataclasses.replace(header, runtime="x", tile_size=8), words))


def test_golden_files_are_small():
    files = sorted(GOLDEN.glob("*"))
    assert {p.name for p in files} >= {f"{n}.{ext}" for n in CASES for ext in ("png", "vz")}
    assert sum(p.stat().st_size for p in files) < 50_000


if __name__ == "__main__":
    if not REGEN:
        raise SystemExit("set VAEZIP_REGEN_GOLDEN=1 to rewrite tests/golden/")
    regenerate()
