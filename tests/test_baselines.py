"""Baseline codecs: positive sizes, lossless checks, missing codecs reported as None."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vaezip.evaluation import baselines
from vaezip.imaging.images import Image, from_array


def _image(mode: str, height: int = 13, width: int = 11, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    # a smooth ramp plus noise, so codecs have something to predict
    ramp = (np.arange(height)[:, None, None] * 7 + np.arange(width)[None, :, None] * 3) % 256
    noise = rng.integers(0, 16, (height, width, channels))
    return from_array(((ramp + noise) % 256).astype(np.uint8), mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_sizes_positive(mode):
    sizes = baselines.baseline_sizes(_image(mode))
    assert set(sizes) == set(baselines.BASELINES)
    assert sizes["png"] > 0
    assert sizes["jpegxl"] > 0
    if mode in baselines.WEBP_MODES:
        assert sizes["webp"] > 0
    else:
        assert sizes["webp"] is None


def test_gray_webp_is_stored_as_rgb_and_read_back_exactly():
    """Gray through WebP (RGB with equal channels) is checked lossless like any baseline."""
    result = baselines.webp_result(_image("L", 24, 40, seed=4))
    assert result.size_bytes and result.size_bytes > 0
    assert baselines.webp_result(_image("LA", 24, 40, seed=5)).size_bytes > 0


def test_transparent_pixels_keep_their_colour():
    # libwebp rewrites the colour under alpha 0 unless told `exact`; this must stay lossless.
    image = _image("RGBA", 16, 16, seed=3)
    pixels = image.pixels.copy()
    pixels[::2, :, 3] = 0
    sizes = baselines.baseline_sizes(from_array(pixels, "RGBA"))
    assert all(size and size > 0 for size in sizes.values())


def test_one_by_one_and_palette_modes():
    assert baselines.baseline_sizes(from_array(np.array([[[7, 8, 9]]], dtype=np.uint8)))["png"] > 0
    palette = Image("P", np.array([[[0], [1]], [[2], [1]]], dtype=np.uint8), bytes(range(9)))
    sizes = baselines.baseline_sizes(palette)
    assert sizes["png"] > 0 and sizes["webp"] is None and sizes["jpegxl"] is None


def test_lossy_output_is_an_error(monkeypatch):
    image = _image("RGB")

    class Lossy:
        @staticmethod
        def jpegxl_encode(array, **kwargs):
            return b"x" * 10

        @staticmethod
        def jpegxl_decode(data):
            return np.zeros(image.pixels.shape, dtype=np.uint8)

    monkeypatch.setattr(baselines, "_imagecodecs_jpegxl", lambda: Lossy)
    with pytest.raises(baselines.BaselineNotLosslessError, match="jpegxl"):
        baselines.baseline_sizes(image)


def test_missing_imagecodecs_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # makes `import imagecodecs` fail
    sizes = baselines.baseline_sizes(_image("RGB"))
    assert sizes["jpegxl"] is None and sizes["png"] > 0
    result = baselines.baseline_results(_image("RGB"))["jpegxl"]
    assert "missing" in result.reason
    v = baselines.versions()
    assert v["imagecodecs"] is None and v["libjxl"] is None and v["pillow"]


def test_missing_webp_is_none(monkeypatch):
    monkeypatch.setattr(baselines, "_webp_available", lambda: False)
    assert baselines.baseline_sizes(_image("RGB"))["webp"] is None
    assert baselines.versions()["libwebp"] is None


def test_versions():
    v = baselines.versions()
    assert v["pillow"] and v["zlib"]
    assert set(v) >= {"pillow", "imagecodecs", "libjxl"}


def test_no_torch_import():
    code = "import sys, vaezip.evaluation.baselines; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
