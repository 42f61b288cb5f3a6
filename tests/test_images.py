"""Tests for vaezip.imaging.images: modes, palettes, transparency, ICC, refusals, exact PNG round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from vaezip.errors import InputError, UnsupportedImageError
from vaezip.imaging.images import (
    CHANNELS,
    SUPPORTED_MODES,
    Image,
    bit_depth,
    decode_transparency,
    encode_transparency,
    from_array,
    from_pil,
    pixels_equal,
    read_image,
    to_pil,
    write_png,
)

SIZES = [(1, 1), (1, 97), (61, 1), (17, 23)]  # (height, width)
ICC = b"not a real profile, but bytes that must survive\x00\xff" * 3


def _random_image(mode: str, height: int, width: int, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    high = 40 if mode == "P" else 1 << bit_depth(mode)
    dtype = np.uint16 if bit_depth(mode) == 16 else np.uint8
    pixels = rng.integers(0, high, size=(height, width, CHANNELS[mode]), dtype=dtype)
    palette = rng.integers(0, 256, size=40 * 3, dtype=np.uint8).tobytes() if mode == "P" else b""
    return Image(mode, pixels, palette)


def _assert_png_round_trip(image: Image, tmp_path) -> Image:
    path = tmp_path / "out.png"
    write_png(image, path)
    back = read_image(path)
    assert pixels_equal(back, image)
    assert back.icc_profile == image.icc_profile
    return back


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@pytest.mark.parametrize("height,width", SIZES)
def test_png_and_pil_round_trip_every_mode_and_size(mode, height, width, tmp_path):
    image = _random_image(mode, height, width, seed=height * 1000 + width)
    _assert_png_round_trip(image, tmp_path)
    if mode in ("LA;16", "RGB;16", "RGBA;16"):
        with pytest.raises(UnsupportedImageError, match="Pillow has no mode"):
            to_pil(image)
    else:
        back = from_pil(to_pil(image), gray_depth=bit_depth(mode) if mode in ("L;2", "L;4") else 8)
        assert pixels_equal(back, image)
    assert (image.height, image.width, image.num_subpixels) == (
        height,
        width,
        height * width * image.channels,
    )


def test_mode_1_values_are_0_and_1(tmp_path):
    pil = PILImage.new("1", (9, 3), 0)
    pil.putpixel((4, 1), 1)
    image = from_pil(pil)
    assert image.pixels.dtype == np.uint8
    assert sorted(np.unique(image.pixels)) == [0, 1]
    assert image.pixels[1, 4, 0] == 1
    _assert_png_round_trip(image, tmp_path)


def test_palette_with_transparency_table(tmp_path):
    base = _random_image("P", 17, 23)
    table = encode_transparency(b"\x00\x80\xff\x10")
    image = Image("P", np.minimum(base.pixels, 14), base.palette[: 15 * 3], table)
    back = _assert_png_round_trip(image, tmp_path)
    assert decode_transparency(back.transparency) == b"\x00\x80\xff\x10"
    assert len(back.palette) == 15 * 3  # exact palette length, not padded to 16 or 256


def test_palette_single_transparent_index_from_pil(tmp_path):
    image = _random_image("P", 5, 7)
    pil = to_pil(image)
    pil.info["transparency"] = 3
    converted = from_pil(pil)
    assert decode_transparency(converted.transparency) == 3
    _assert_png_round_trip(converted, tmp_path)
    # A table with one zero and the rest opaque is what PNG reads back as an index.
    pil.info["transparency"] = b"\xff\xff\x00\xff"
    assert decode_transparency(from_pil(pil).transparency) == 2


def test_png_file_read_is_exact(tmp_path):
    pixels = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) % 7
    pil = PILImage.frombytes("P", (6, 4), pixels.tobytes())
    pil.putpalette(bytes(range(21)), rawmode="RGB")
    pil.save(tmp_path / "p.png", transparency=b"\x10\x20")
    image = read_image(tmp_path / "p.png")
    assert image.mode == "P" and image.palette == bytes(range(21))
    assert np.array_equal(image.pixels[:, :, 0], pixels)
    assert decode_transparency(image.transparency) == b"\x10\x20"
    _assert_png_round_trip(image, tmp_path)


def test_l_with_int_transparency(tmp_path):
    image = Image("L", _random_image("L", 17, 23).pixels, transparency=encode_transparency(77))
    back = _assert_png_round_trip(image, tmp_path)
    assert decode_transparency(back.transparency) == 77


def test_rgb_with_colour_transparency_and_icc(tmp_path):
    base = _random_image("RGB", 17, 23)
    image = Image("RGB", base.pixels, transparency=encode_transparency((1, 2, 3)), icc_profile=ICC)
    back = _assert_png_round_trip(image, tmp_path)
    assert decode_transparency(back.transparency) == (1, 2, 3)
    assert back.icc_profile == ICC
    assert to_pil(image).info["icc_profile"] == ICC


@given(
    st.one_of(
        st.none(),
        st.integers(0, 65535),
        st.binary(max_size=256),
        st.tuples(*[st.integers(0, 65535)] * 3),
    )
)
def test_transparency_serialisation_inverts(value):
    assert decode_transparency(encode_transparency(value)) == value


@pytest.mark.parametrize(
    "data", [b"X", b"I\x01", b"I\x01\x02\x03", b"C\x00" * 2, b"T" + b"\x00" * 257]
)
def test_malformed_transparency_refused(data):
    with pytest.raises(ValueError):
        decode_transparency(data)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["L", "LA", "RGB", "RGBA"]),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
)
def test_from_array_round_trip(mode, height, width, seed):
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = from_array(array)
    assert image.mode == mode
    assert np.array_equal(np.asarray(to_pil(image)).reshape(array.shape), array)


def test_from_array_shapes_and_dtypes():
    assert from_array(np.zeros((3, 4), np.uint8)).mode == "L"
    assert from_array(np.zeros((3, 4, 1), np.uint8)).pixels.shape == (3, 4, 1)
    bilevel = from_array(np.eye(3, dtype=bool))
    assert bilevel.mode == "1" and bilevel.pixels.dtype == np.uint8
    assert from_array(np.zeros((3, 4), np.uint8), mode="P").mode == "P"
    assert from_array(np.zeros((3, 4, 3), np.uint16)).mode == "RGB;16"
    assert from_array(np.zeros((3, 4), ">u2")).pixels.dtype == np.uint16
    with pytest.raises(UnsupportedImageError, match="uint8 or uint16"):
        from_array(np.zeros((3, 4), np.int32))
    with pytest.raises(UnsupportedImageError):
        from_array(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(UnsupportedImageError):
        from_array(np.full((3, 4), 2, np.uint8), mode="1")
    with pytest.raises(UnsupportedImageError):
        Image("CMYK", np.zeros((1, 1, 4), np.uint8))


def _save_refused(kind: str, path):
    if kind == "F":
        PILImage.fromarray(np.zeros((3, 4), np.float32)).save(path / "a.tif")
        return path / "a.tif"
    if kind == "I":
        PILImage.fromarray(np.zeros((3, 4), np.int32)).save(path / "a.tif")
        return path / "a.tif"
    PILImage.new("CMYK", (4, 3), (1, 2, 3, 4)).save(path / "a.tif")
    return path / "a.tif"


@pytest.mark.parametrize("mode,says", [("F", "float or signed"), ("I", "float or signed"), ("CMYK", "'CMYK'")])
def test_unsupported_modes_refused_naming_the_mode(mode, says, tmp_path):
    path = _save_refused(mode, tmp_path)
    assert PILImage.open(path).mode == mode
    with pytest.raises(UnsupportedImageError, match=says):
        read_image(path)
    with pytest.raises(UnsupportedImageError, match=f"'{mode}'"):
        from_pil(PILImage.open(path))


def test_multi_frame_gif_refused(tmp_path):
    frames = [PILImage.new("P", (4, 4), i) for i in range(3)]
    for frame in frames:
        frame.putpalette(bytes(range(12)))
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageError, match="frames"):
        read_image(tmp_path / "a.gif")


def test_exif_orientation_not_applied(tmp_path):
    pixels = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    pil = PILImage.fromarray(pixels)
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    pil.save(tmp_path / "rot.png", exif=exif)
    assert PILImage.open(tmp_path / "rot.png").getexif()[0x0112] == 6
    image = read_image(tmp_path / "rot.png")
    assert image.pixels.shape == (2, 5, 3)
    assert np.array_equal(image.pixels, pixels)


def test_missing_file_and_text_file_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello, not an image\n")
    with pytest.raises(InputError, match="notes.txt"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError):
        read_image(tmp_path)


def test_truncated_png_is_input_error(tmp_path):
    write_png(_random_image("RGB", 40, 40), tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="b.png"):
        read_image(tmp_path / "b.png")


def test_decompression_bomb_is_input_error(tmp_path, monkeypatch):
    write_png(_random_image("L", 20, 20), tmp_path / "a.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 150)  # 400 px: warning range
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "a.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50)  # 400 px: error range
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "a.png")


def test_pixels_equal_notices_every_field():
    image = _random_image("P", 3, 4)
    assert pixels_equal(image, Image("P", image.pixels.copy(), image.palette))
    other = image.pixels.copy()
    other[0, 0, 0] ^= 1
    assert not pixels_equal(image, Image("P", other, image.palette))
    assert not pixels_equal(image, Image("P", image.pixels, image.palette[:-3]))
    assert not pixels_equal(image, Image("P", image.pixels, image.palette, encode_transparency(0)))
    assert not pixels_equal(image, from_array(image.pixels))
