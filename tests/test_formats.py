"""Input conformance: every file is coded at its real sample depth or refused, never reduced.

The PngSuite (every PNG colour type, bit depth, interlacing and ancillary chunk, plus
corrupt files) through the library and the CLI; generated 16-bit TIFF, PNM and PNG files;
BMP, GIF, JPEG and WebP; 16-bit images in archives; what the low bits cost.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import kodak_crop, require_data
from PIL import Image as PILImage

import vaezip
from vaezip import api
from vaezip.cli.main import main
from vaezip.errors import InputError, UnsupportedImageError, VaezipError
from vaezip.format import container
from vaezip.imaging.images import Image, bit_depth, decode_image, pixels_equal, png_bytes, read_image, write_png

ICC = b"a profile that must survive \x00\xff" * 2


def _suite():
    folder = require_data("pngsuite")
    files = sorted(folder.glob("*.png"))
    return [p for p in files if not p.name.startswith("x")], [p for p in files if p.name.startswith("x")]


def _ihdr_depth_and_colour(data: bytes) -> tuple[int, int]:
    return data[24], data[25]


def _assert_round_trip(image: Image, **kwargs) -> Image:
    back = vaezip.decompress_image(vaezip.compress(image, **kwargs), **{k: v for k, v in kwargs.items() if k == "loaded"})
    assert pixels_equal(back, image)
    assert back.icc_profile == image.icc_profile
    return back


def test_pngsuite_every_valid_file_round_trips_at_its_depth():
    valid, _ = _suite()
    assert len(valid) == 161
    deep = 0
    for path in valid:
        image = read_image(path)
        back = _assert_round_trip(image)
        written = png_bytes(back)
        assert pixels_equal(decode_image(written), image), path.name
        source = path.read_bytes()
        assert _ihdr_depth_and_colour(written) == _ihdr_depth_and_colour(source), path.name
        if source[24] == 16:
            assert image.bit_depth == 16 and image.pixels.dtype == np.uint16, path.name
            deep += 1
    assert deep == 33  # every 16-bit file of the suite, gray ones included


def test_pngsuite_corrupt_files_are_refused_with_a_reason():
    _, corrupt = _suite()
    assert len(corrupt) == 14
    for path in corrupt:
        with pytest.raises(VaezipError) as caught:
            read_image(path)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_pngsuite_interlaced_files_decode_like_their_twins():
    folder = require_data("pngsuite")
    pairs = [(p, folder / p.name.replace("basi", "basn")) for p in folder.glob("basi*.png")]
    pairs += [(p, folder / f"basn{p.name[4:]}") for p in folder.glob("oi[1249]n*.png")]
    assert len(pairs) == 23
    for one, twin in pairs:
        assert pixels_equal(read_image(one), read_image(twin)), one.name


def test_pngsuite_through_the_cli(tmp_path):
    valid, corrupt = _suite()
    originals = tmp_path / "suite"
    originals.mkdir()
    for path in valid:
        shutil.copy(path, originals / path.name)
    runner = CliRunner()
    result = runner.invoke(main, ["compress", str(originals), "-o", str(tmp_path / "vz"), "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert len(records) == len(valid)
    assert {r["mode"] for r in records} >= {"L;2", "L;4", "L;16", "LA;16", "RGB;16", "RGBA;16", "P", "1"}
    files = sorted((tmp_path / "vz").glob("*.vz"))
    (tmp_path / "out").mkdir()
    result = runner.invoke(main, ["decompress", *map(str, files), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for path in valid:
        back = tmp_path / "out" / path.name
        assert back.exists(), path.name
        assert pixels_equal(read_image(back), read_image(path)), path.name
        assert _ihdr_depth_and_colour(back.read_bytes()) == _ihdr_depth_and_colour(path.read_bytes()), path.name
    result = runner.invoke(main, ["pack", str(originals), "-o", str(tmp_path / "suite.vzp")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["unpack", str(tmp_path / "suite.vzp"), "-o", str(tmp_path / "unpacked")])
    assert result.exit_code == 0, result.output
    for path in valid:
        back = tmp_path / "unpacked" / path.name
        assert pixels_equal(read_image(back), read_image(path)), path.name
        assert _ihdr_depth_and_colour(back.read_bytes()) == _ihdr_depth_and_colour(path.read_bytes()), path.name
    for path in corrupt:
        result = runner.invoke(main, ["compress", str(path), "-o", str(tmp_path / "bad.vz")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith("vaezip: error: ") and path.name in result.stderr
        assert not (tmp_path / "bad.vz").exists()


# ---------------------------------------------------------------- generated 16-bit files


def _photo16(height: int = 40, width: int = 48, channels: int = 3) -> np.ndarray:
    """A 16-bit photo with real low bits: 2x2 means of a Kodak crop, times 64."""
    big = kodak_crop("kodim23.png", 180, 300, 2 * height, 2 * width).astype(np.uint32)
    means = big.reshape(height, 2, width, 2, 3).sum(axis=(1, 3)) * 64 + np.arange(3) * 7
    return means[:, :, :channels].astype(np.uint16)


@pytest.mark.parametrize("channels,alpha,mode", [(1, False, "L;16"), (2, True, "LA;16"), (3, False, "RGB;16"),
                                                 (4, True, "RGBA;16")])
@pytest.mark.parametrize("planar", [False, True])
def test_16_bit_tiff_is_read_exactly(tmp_path, channels, alpha, mode, planar):
    import tifffile

    pixels = _photo16(channels=1 if channels <= 2 else 3)
    if alpha:
        pixels = np.concatenate([pixels, (np.arange(pixels.shape[1]) * 1000 % 65536 + np.zeros(pixels.shape[:2], int))
                                 [:, :, None].astype(np.uint16)], axis=2)
    photometric = "minisblack" if channels <= 2 else "rgb"
    array = np.moveaxis(pixels, 2, 0) if planar else pixels
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, array if channels > 1 else pixels[:, :, 0], photometric=photometric,
                     planarconfig=("separate" if planar else "contig") if channels > 1 else None,
                     extrasamples=("unassalpha",) if alpha else None, iccprofile=ICC, compression="zlib")
    image = read_image(path)
    assert image.mode == mode and image.icc_profile == ICC
    np.testing.assert_array_equal(image.pixels, pixels)


def test_tiff_refusals(tmp_path):
    import tifffile

    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for _ in range(3):
            tif.write(np.zeros((8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(UnsupportedImageError, match="3 pages"):
        read_image(tmp_path / "pages.tif")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(UnsupportedImageError, match="float"):
        read_image(tmp_path / "float.tif")
    tifffile.imwrite(tmp_path / "deep.tif", np.zeros((8, 8), np.uint32))
    with pytest.raises(UnsupportedImageError, match="32-bit"):
        read_image(tmp_path / "deep.tif")
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((8, 8, 4), np.uint16), photometric="separated")
    with pytest.raises(UnsupportedImageError, match="CMYK"):
        read_image(tmp_path / "cmyk.tif")
    eight = kodak_crop("kodim23.png", 0, 0, 9, 11)
    tifffile.imwrite(tmp_path / "eight.tif", eight, photometric="rgb")
    assert read_image(tmp_path / "eight.tif").mode == "RGB"


def _pnm(magic: bytes, pixels: np.ndarray, maxval: int) -> bytes:
    height, width = pixels.shape[:2]
    header = magic + b"\n# a comment\n" + f"{width} {height}\n{maxval}\n".encode()
    if magic in (b"P2", b"P3"):
        return header + " ".join(str(int(v)) for v in pixels.ravel()).encode() + b"\n"
    return header + pixels.astype(">u2" if maxval > 255 else np.uint8).tobytes()


@pytest.mark.parametrize("magic,channels", [(b"P5", 1), (b"P6", 3), (b"P2", 1), (b"P3", 3)])
def test_16_bit_pnm_is_read_exactly(tmp_path, magic, channels):
    pixels = _photo16(12, 10, channels)
    path = tmp_path / "photo.pnm"
    path.write_bytes(_pnm(magic, pixels, 65535))
    image = read_image(path)
    assert image.mode == ("L;16" if channels == 1 else "RGB;16")
    np.testing.assert_array_equal(image.pixels, pixels)


def test_pnm_refusals_and_8_bit(tmp_path):
    path = tmp_path / "ten.pgm"
    path.write_bytes(_pnm(b"P5", np.zeros((4, 5), np.uint16) + 1000, 1023))
    with pytest.raises(UnsupportedImageError, match="PGM with maxval 1023"):
        read_image(path)
    path.write_bytes(_pnm(b"P5", np.zeros((4, 5), np.uint8), 15))
    with pytest.raises(UnsupportedImageError, match="maxval 15"):
        read_image(path)
    path.write_bytes(_pnm(b"P5", np.zeros((4, 5), np.uint16), 65535)[:-3])
    with pytest.raises(InputError, match="19 of 20 samples|holds"):
        read_image(path)
    rgb = kodak_crop("kodim23.png", 0, 0, 5, 6)
    path.write_bytes(_pnm(b"P6", rgb, 255))
    assert read_image(path).mode == "RGB" and np.array_equal(read_image(path).pixels, rgb)
    PILImage.fromarray(rgb[:, :, 0] > 100).save(tmp_path / "bits.pbm")
    assert read_image(tmp_path / "bits.pbm").mode == "1"


@pytest.mark.parametrize("mode", ["L;16", "LA;16", "RGB;16", "RGBA;16"])
def test_16_bit_png_keeps_icc_and_transparency(tmp_path, mode):
    channels = {"L;16": 1, "LA;16": 2, "RGB;16": 3, "RGBA;16": 4}[mode]
    pixels = np.concatenate([_photo16(), _photo16()[:, :, :1]], axis=2)[:, :, :channels]
    transparency = {"L;16": b"I\x34\x12", "RGB;16": b"C" + struct.pack("<3H", 1, 2, 60000)}.get(mode, b"")
    image = Image(mode, np.ascontiguousarray(pixels), transparency=transparency, icc_profile=ICC)
    write_png(image, tmp_path / "a.png")
    back = read_image(tmp_path / "a.png")
    assert pixels_equal(back, image) and back.icc_profile == ICC
    assert _ihdr_depth_and_colour((tmp_path / "a.png").read_bytes())[0] == 16


# ---------------------------------------------------------------- other containers


def test_bmp_gif_webp_and_jpeg(tmp_path):
    rgb = kodak_crop("kodim23.png", 180, 300, 21, 27)
    PILImage.fromarray(rgb).save(tmp_path / "a.bmp")
    assert np.array_equal(read_image(tmp_path / "a.bmp").pixels, rgb)
    PILImage.fromarray(rgb).quantize(17).save(tmp_path / "a.gif")
    assert read_image(tmp_path / "a.gif").mode == "P"
    frames = [PILImage.fromarray(rgb).quantize(8), PILImage.fromarray(255 - rgb).quantize(8)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageError, match="GIF with 2 frames"):
        read_image(tmp_path / "anim.gif")
    PILImage.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    lossless = read_image(tmp_path / "a.webp")
    assert np.array_equal(lossless.pixels, rgb) and lossless.source == ""
    PILImage.fromarray(rgb).save(tmp_path / "b.webp", quality=50)
    assert read_image(tmp_path / "b.webp").source == "lossy WebP"
    PILImage.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    jpeg = read_image(tmp_path / "a.jpg")
    assert jpeg.source == "JPEG" and np.array_equal(jpeg.pixels, np.asarray(PILImage.open(tmp_path / "a.jpg")))
    PILImage.fromarray(rgb).save(tmp_path / "a.tga")
    with pytest.raises(UnsupportedImageError, match="TGA files are not supported"):
        read_image(tmp_path / "a.tga")


def test_cli_says_when_it_codes_decoded_jpeg_pixels(tmp_path, tiny_model):
    rgb = kodak_crop("kodim23.png", 180, 300, 16, 16)
    PILImage.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    PILImage.fromarray(rgb).save(tmp_path / "b.png")
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "a.jpg"), str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert "the decoded JPEG pixels, not the JPEG file" in lines[0]
    assert "decoded" not in lines[1]


# ---------------------------------------------------------------- coding 16-bit images


@pytest.mark.parametrize("mode", ["L;16", "LA;16", "RGB;16", "RGBA;16", "L;2", "L;4"])
def test_every_depth_round_trips_with_tiny_models(mode, tiny_model, tiny_gray_model):
    rng = np.random.default_rng(4)
    channels = {"L;16": 1, "LA;16": 2, "RGB;16": 3, "RGBA;16": 4, "L;2": 1, "L;4": 1}[mode]
    if bit_depth(mode) == 16:
        pixels = np.concatenate([_photo16(23, 37), _photo16(23, 37)[:, :, :1]], axis=2)[:, :, :channels]
    else:
        pixels = rng.integers(0, 1 << bit_depth(mode), (23, 37, 1)).astype(np.uint8)
    image = Image(mode, np.ascontiguousarray(pixels))
    loaded = tiny_gray_model if mode.startswith("L") else tiny_model
    data = vaezip.compress(image, loaded=loaded)
    assert container.unpack(data)[0].mode == mode
    assert pixels_equal(vaezip.decompress_image(data, loaded=loaded), image)
    array = vaezip.decompress(data, loaded=loaded)
    assert array.dtype == pixels.dtype


def test_8_bit_data_stored_as_16_bits_costs_almost_nothing(tiny_model):
    rgb = kodak_crop("kodim23.png", 100, 100, 48, 64)
    eight = len(vaezip.compress(rgb, loaded=tiny_model))
    scaled = len(vaezip.compress(rgb.astype(np.uint16) * 257, loaded=tiny_model))
    zero_filled = len(vaezip.compress(rgb.astype(np.uint16) << 8, loaded=tiny_model))
    assert scaled <= eight + 16 and zero_filled <= eight + 16
    ten_bits = (rgb.astype(np.uint16) << 8) | (np.arange(64, dtype=np.uint16) % 4 << 6)[None, :, None]
    assert len(vaezip.compress(ten_bits, loaded=tiny_model)) < eight + rgb.size * 2 / 8 + 64


def test_16_bit_images_in_an_archive(tiny_model, tiny_gray_model):
    items = [("a.png", Image("RGB;16", _photo16(16, 16))), ("b.png", Image("RGB", kodak_crop("kodim23.png", 0, 0, 16, 16))),
             ("c.png", Image("RGB;16", _photo16(16, 16)[::-1].copy())), ("d.png", Image("L;4", np.ones((5, 7, 1), np.uint8))),
             ("e.png", Image("LA;16", _photo16(16, 16, 2)))]
    data = api.pack(items, loaded=[tiny_model, tiny_gray_model])
    back = api.unpack(data, loaded=[tiny_model, tiny_gray_model])
    assert [name for name, _ in back] == [name for name, _ in items]
    for (_, image), (_, expected) in zip(back, items):
        assert pixels_equal(image, expected)


def test_measure_and_info_of_a_16_bit_image(tmp_path, tiny_model):
    from vaezip.entropy import depth
    from vaezip.evaluation.rates import measure

    image = Image("RGB;16", _photo16(24, 32))
    report = measure(image, loaded=tiny_model, samples=2, breakdown=False)
    assert report.mode == "RGB;16" and report.subpixels == image.num_subpixels
    assert np.isfinite([report.nelbo_bpd, report.iwae_bpd, report.coded_bpd]).all()
    high = measure(Image("RGB", depth.split(image.pixels)), loaded=tiny_model, samples=2, breakdown=False)
    low_bits = depth.estimate_low_bits(image.pixels)
    n = image.num_subpixels
    assert report.nelbo_bpd * n == pytest.approx(high.nelbo_bpd * n + low_bits)
    assert report.iwae_bpd * n == pytest.approx(high.iwae_bpd * n + low_bits)
    path = tmp_path / "a.vz"
    path.write_bytes(vaezip.compress(image, loaded=tiny_model))
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["mode"] == "RGB;16"


def test_older_versions_refuse_other_depths(tiny_model):
    with pytest.raises(ValueError, match="version 3 cannot hold mode RGB;16"):
        vaezip.compress(_photo16(8, 8), loaded=tiny_model, version=3)
