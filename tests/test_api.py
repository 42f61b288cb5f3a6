"""Tests for vaezip.api: exact round trips in every mode and size, input kinds, measure,
damaged files, model checks and thread-count independence. Uses the shipped models."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import kodak_crop, random_image, random_pixels
from PIL import Image as PILImage

from vaezip import api
from vaezip.errors import (
    CorruptFileError,
    DecodeMismatchError,
    ModelError,
    UnsupportedImageError,
    VaezipError,
)
from vaezip.format import container
from vaezip.imaging.images import Image, encode_transparency, from_pil, pixels_equal, write_png
from vaezip.network import registry

SIZES = [(1, 1), (1, 97), (61, 1), (17, 23), (300, 7)]  # (height, width)
LARGE = (129, 257)  # 15 tiles of the shipped model: RGB and L only (time), plus the plane-coded modes
ICC = b"fake ICC profile bytes \x00\x01\xff" * 4

# (case id, mode, transparency)
MODES = [
    ("L", "L", b""),
    ("LA", "LA", b""),
    ("RGB", "RGB", b""),
    ("RGBA", "RGBA", b""),
    ("P", "P", b""),
    ("P-tRNS-table", "P", encode_transparency(bytes([0, 128, 255, 7]))),
    ("P-tRNS-index", "P", encode_transparency(3)),
    ("1", "1", b""),
]
CASES = [pytest.param(mode, transparency, size, id=f"{case}-{size[0]}x{size[1]}")
         for case, mode, transparency in MODES for size in SIZES]
CASES += [pytest.param(mode, transparency, LARGE, id=f"{case}-{LARGE[0]}x{LARGE[1]}")
          for case, mode, transparency in MODES if case in ("L", "RGB", "P-tRNS-table", "1")]
MODEL_FOR_MODE = {mode: registry.default_model(base) for mode, base in
                  (("RGB", "RGB"), ("RGBA", "RGB"), ("L", "L"), ("LA", "L"))}


@pytest.fixture
def loaded_for(tiny_model, tiny_gray_model):
    """The model a test passes as `loaded=`: the shipped models (None: from the registry)
    for L and RGB; the tiny ones for LA and RGBA, whose point is the alpha plane (time)."""
    return lambda mode: {"LA": tiny_gray_model, "RGBA": tiny_model}.get(mode)


def _image(mode: str, transparency: bytes, size: tuple[int, int]) -> Image:
    height, width = size
    return random_image(mode, height, width, seed=height * 7 + width, smooth=height * width > 500,
                        transparency=transparency, icc_profile=ICC if mode in ("RGB", "L", "P") else b"")


def _assert_same(back: Image, image: Image) -> None:
    assert pixels_equal(back, image), (back.mode, image.mode)
    assert back.palette == image.palette
    assert back.transparency == image.transparency
    assert back.icc_profile == image.icc_profile


@pytest.mark.parametrize("mode,transparency,size", CASES)
def test_round_trip_every_mode_and_size(mode, transparency, size, loaded_for):
    image = _image(mode, transparency, size)
    loaded = loaded_for(mode)
    data = api.compress(image, loaded=loaded)
    expected = loaded.spec.name if loaded else MODEL_FOR_MODE.get(mode, "")
    assert container.unpack(data)[0].model_name == expected
    _assert_same(api.decompress_image(data, loaded=loaded), image)


@pytest.mark.parametrize("case,mode,transparency", MODES, ids=[m[0] for m in MODES])
def test_decompress_and_decompress_pil_forms(case, mode, transparency, loaded_for):
    height, width = 17, 23
    image = _image(mode, transparency, (height, width))
    loaded = loaded_for(mode)
    data = api.compress(image, loaded=loaded)
    array = api.decompress(data, loaded=loaded)
    if mode == "1":
        assert array.dtype == bool and array.shape == (height, width)
        np.testing.assert_array_equal(array, image.pixels[:, :, 0].astype(bool))
    elif image.channels == 1:
        assert array.dtype == np.uint8 and array.shape == (height, width)
        np.testing.assert_array_equal(array, image.pixels[:, :, 0])
    else:
        assert array.dtype == np.uint8
        np.testing.assert_array_equal(array, image.pixels)
    pil = api.decompress_pil(data, loaded=loaded)
    assert pil.mode == mode and pil.size == (width, height)
    _assert_same(from_pil(pil), image)


def test_rgb_colour_and_l_grey_transparency_survive(tiny_model, tiny_gray_model):
    rgb = random_image("RGB", 5, 9, transparency=encode_transparency((1, 2, 300)))
    grey = random_image("L", 9, 5, transparency=encode_transparency(513))
    for image, loaded in ((rgb, tiny_model), (grey, tiny_gray_model)):
        _assert_same(api.decompress_image(api.compress(image, loaded=loaded), loaded=loaded), image)


def test_numpy_pil_and_path_inputs_agree(tmp_path, tiny_model):
    image = random_image("RGB", 19, 33, seed=4, smooth=True)
    path = tmp_path / "in.png"
    write_png(image, path)
    from_numpy = api.compress(image.pixels, loaded=tiny_model)
    assert api.compress(PILImage.open(path), loaded=tiny_model) == from_numpy
    assert api.compress(path, loaded=tiny_model) == from_numpy
    assert api.compress(str(path), loaded=tiny_model) == from_numpy
    assert api.compress(image, loaded=tiny_model) == from_numpy
    np.testing.assert_array_equal(api.decompress(from_numpy, loaded=tiny_model), image.pixels)


@pytest.mark.parametrize("array,mode", [
    (random_pixels("L", 6, 7)[:, :, 0], "L"),  # (H, W) uint8 -> L
    (random_pixels("LA", 6, 7), "LA"),
    (random_pixels("RGB", 6, 7), "RGB"),
    (random_pixels("1", 6, 7)[:, :, 0].astype(bool), "1"),  # bool -> 1
])
def test_numpy_shapes_map_to_modes(array, mode, tiny_model, tiny_gray_model):
    loaded = {"L": tiny_gray_model, "LA": tiny_gray_model, "RGB": tiny_model}.get(mode)
    data = api.compress(array, loaded=loaded)
    assert container.unpack(data)[0].mode == mode
    back = api.decompress(data, loaded=loaded)
    np.testing.assert_array_equal(back.reshape(array.shape), array)


def test_bad_inputs_are_typed_errors():
    with pytest.raises(UnsupportedImageError):
        api.compress(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(UnsupportedImageError):
        api.compress(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(VaezipError):
        api.compress(12345)
    with pytest.raises(ModelError, match="no-such-model"):
        api.compress(random_pixels("RGB", 4, 4), "no-such-model")
    with pytest.raises(ModelError):  # a gray model for a colour image
        api.compress(random_pixels("RGB", 4, 4), "photo-gray-1")


def test_explicit_model_and_progress():
    pixels = random_pixels("RGB", 20, 100, seed=9, smooth=True)
    done = []
    data = api.compress(pixels, "photo-rgb-1", progress=done.append)
    header, _ = container.unpack(data)
    assert sum(done) == 2 == sum(e & 0x7FFF for e in header.schedule)  # 1 x 2 tiles of 64
    seen = []
    np.testing.assert_array_equal(api.decompress(data, progress=seen.append), pixels)
    assert sum(seen) == 2


@pytest.mark.parametrize("mode", ["RGB", "LA"])
def test_measure_reports_finite_rates(mode, loaded_for):
    image = random_image(mode, 32, 48, seed=2, smooth=True)
    loaded = loaded_for(mode)
    report = api.measure(image, samples=2, loaded=loaded)
    for value in (report.nelbo_bpd, report.coded_bpd, report.file_bpd, report.iwae_bpd, report.gap):
        assert math.isfinite(value)
    assert report.model == (loaded.spec.name if loaded else MODEL_FOR_MODE[mode]) and report.samples == 2
    assert report.subpixels == 32 * 48 * image.channels
    assert 0 < report.nelbo_bpd and 0 < report.coded_bpd < report.file_bpd
    assert report.file_bytes == len(api.compress(image, loaded=loaded))
    assert report.header_bytes < report.file_bytes
    # IWAE (K=2) is a tighter bound than the ELBO, up to sampling noise.
    assert report.iwae_bpd <= report.nelbo_bpd + 0.05
    no_iwae = api.measure(image, loaded=loaded)
    assert no_iwae.iwae_bpd is None and no_iwae.samples == 0


def test_measure_plane_coded_image():
    image = random_image("P", 32, 48, seed=2, smooth=True)
    report = api.measure(image)
    assert report.model == "planes"
    for value in (report.nelbo_bpd, report.coded_bpd, report.file_bpd):
        assert math.isfinite(value) and value > 0
    # The plane coder's estimate is its exact code length: the payload is within a word or two.
    assert abs(report.coded_bpd - report.nelbo_bpd) * report.subpixels <= 64


# ------------------------------------------------------------- damaged files


def _damaged_payloads(data: bytes, count: int, seed: int):
    """Files whose payload has one flipped bit, with a valid CRC (so the container accepts them)."""
    header, words = container.unpack(data)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        damaged = words.copy()
        i = int(rng.integers(0, len(words)))
        damaged[i] ^= np.uint32(1 << int(rng.integers(0, 32)))
        yield container.pack(header, damaged)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "1"])
def test_corrupted_payload_word_never_gives_a_wrong_image(mode, loaded_for):
    image = random_image(mode, 24, 40, seed=3, smooth=True)
    loaded = loaded_for(mode)
    data = api.compress(image, loaded=loaded)
    for damaged in _damaged_payloads(data, 4 if mode == "RGB" else 8, seed=len(mode)):
        try:
            back = api.decompress_image(damaged, loaded=loaded)
        except (CorruptFileError, DecodeMismatchError):
            continue
        assert pixels_equal(back, image)  # decoding may only succeed with the true image


def test_dropped_and_extra_payload_words_are_refused(tiny_model):
    image = random_image("RGBA", 20, 30, seed=8, smooth=True)
    header, words = container.unpack(api.compress(image, loaded=tiny_model))
    for damaged in (words[:-1], words[1:], np.append(words, np.uint32(12345)), words[:0]):
        with pytest.raises((CorruptFileError, DecodeMismatchError)):
            api.decompress_image(container.pack(header, damaged), loaded=tiny_model)


def _with_header(data: bytes, **changes) -> bytes:
    import dataclasses

    header, words = container.unpack(data)
    return container.pack(dataclasses.replace(header, **changes), words)


def test_wrong_model_hash_is_model_error():
    data = api.compress(random_pixels("RGB", 9, 9))
    with pytest.raises(ModelError, match=registry.default_model("RGB")):
        api.decompress(_with_header(data, model_hash=bytes(8)))


def test_unknown_or_mismatched_model_name_is_model_error():
    data = api.compress(random_pixels("RGB", 9, 9))
    with pytest.raises(ModelError):
        api.decompress(_with_header(data, model_name="photo-rgb-999"))
    with pytest.raises(ModelError):
        api.decompress(data, loaded=registry.load_model("photo-gray-1"))


def test_header_field_damage_is_a_typed_error(tiny_model):
    data = api.compress(random_pixels("RGB", 20, 30, seed=1, smooth=True), loaded=tiny_model)
    header = container.unpack(data)[0]
    assert header.schedule == (0x8001,)  # one 32x32 tile, coded without bits-back
    for changes in [dict(tile_size=16), dict(schedule=(1,)), dict(schedule=header.schedule + (1,)),
                    dict(width=31), dict(height=19), dict(mode="RGBA"), dict(pixel_checksum=bytes(16))]:
        with pytest.raises((CorruptFileError, DecodeMismatchError)):
            api.decompress_image(_with_header(data, **changes), loaded=tiny_model)


def test_plane_coded_file_with_a_model_name_is_corrupt():
    data = api.compress(random_image("P", 5, 5))
    spec = registry.get_spec("photo-rgb-1")
    with pytest.raises(CorruptFileError):
        api.decompress(_with_header(data, model_name=spec.name, model_hash=spec.hash_prefix))


# ------------------------------------------------------------- thread counts

_ENCODE = """
import sys, numpy as np, torch
torch.set_num_threads(2)
from vaezip import api
pixels = np.load(sys.argv[1])
open(sys.argv[2], "wb").write(api.compress(pixels))
print(torch.get_num_threads())
"""

_DECODE = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from vaezip import api
np.save(sys.argv[2], api.decompress(open(sys.argv[1], "rb").read()))
print(torch.get_num_threads())
"""


def test_decode_with_another_thread_count(tmp_path):
    """A file encoded with 2 threads decodes with 1, in separate processes."""
    pixels = kodak_crop("kodim23.png", 200, 300, 64, 96)
    np.save(tmp_path / "in.npy", pixels)
    enc = subprocess.run([sys.executable, "-c", textwrap.dedent(_ENCODE), str(tmp_path / "in.npy"), str(tmp_path / "a.vz")],
                         capture_output=True, text=True, timeout=300)
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout.strip() == "2"
    dec = subprocess.run([sys.executable, "-c", textwrap.dedent(_DECODE), str(tmp_path / "a.vz"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, timeout=300)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout.strip() == "1"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), pixels)


def test_plane_only_modes_ignore_a_passed_model(tiny_model):
    """P and 1 never use the VAE, even when a loaded model is passed in."""
    for mode, levels in (("P", 4), ("1", 2)):
        pixels = np.random.default_rng(3).integers(0, levels, (9, 6, 1), dtype=np.uint8)
        image = Image(mode, pixels, palette=bytes(range(12)) if mode == "P" else b"")
        back = api.decompress_image(api.compress(image, loaded=tiny_model))
        assert back.mode == mode and np.array_equal(back.pixels, pixels)


def test_pack_and_unpack_are_exported():
    import vaezip

    assert vaezip.pack is api.pack and vaezip.unpack is api.unpack


def test_a_failure_names_both_builds_when_another_build_wrote_the_file(tiny_model):
    """A file from another build (library versions, instruction sets) that fails to decode
    says so: the likely cause is that build's arithmetic, not damage."""
    data = api.compress(random_pixels("RGB", 20, 30, seed=2, smooth=True), loaded=tiny_model)
    assert "cpu=" in container.unpack(data)[0].runtime
    foreign = "torch=0.0 numpy=0.0 constriction=0.0 cpu=AVX512/X86_V4"
    for damaged in [_with_header(data, pixel_checksum=bytes(16), runtime=foreign),
                    *(_with_header(d, runtime=foreign) for d in _damaged_payloads(data, 8, seed=5))]:
        with pytest.raises((CorruptFileError, DecodeMismatchError), match="written by torch=0.0 .* this is torch="):
            api.decompress_image(damaged, loaded=tiny_model)


def test_a_float_format_failure_says_what_a_float_network_means(tiny_model, tiny_fixed_model):
    """A float-network file (versions 1 to 5) decodes only where the arithmetic matches; its
    failure says so even when the runtime strings agree. A fixed-point file's does not."""
    pixels = random_pixels("RGB", 20, 30, seed=2, smooth=True)
    float_file = api.compress(pixels, loaded=tiny_model)
    assert not container.unpack(float_file)[0].fmt.numerics.exact
    with pytest.raises(DecodeMismatchError, match=r"format version \d runs a float network") as caught:
        api.decompress_image(_with_header(float_file, pixel_checksum=bytes(16)), loaded=tiny_model)
    assert "written by" not in str(caught.value)  # same build: only the float note
    fixed_file = api.compress(pixels, loaded=tiny_fixed_model)
    with pytest.raises(DecodeMismatchError) as caught:
        api.decompress_image(_with_header(fixed_file, pixel_checksum=bytes(16)), loaded=tiny_fixed_model)
    assert "float network" not in str(caught.value)
