"""Sizes of the same pixels through standard lossless codecs (PNG, WebP, JPEG-XL).

Each encoder's output is decoded back and compared with the input pixels; a baseline
that does not give the input back is a bug (`BaselineNotLosslessError`), never a
number. A codec that is not installed (no imagecodecs, no JPEG-XL or WebP support
in the build) is reported as missing: its size is None. A mode a codec cannot hold
is also None.

Settings (fixed here so that every reported number has one meaning):
  png:    Pillow, `optimize=True` (zlib level 9 with filter search); LA;16, RGB;16 and
          RGBA;16, which Pillow cannot hold: libpng (imagecodecs) at level 9, adaptive filters.
  webp:   Pillow, `lossless=True, quality=100, method=6, exact=True`; modes RGB and
          RGBA, and L / LA stored as RGB / RGBA with equal channels (WebP has no gray
          mode; its subtract-green transform makes the copies nearly free), read back
          as the first channel. `exact=True` keeps the colour of fully transparent
          pixels, which libwebp otherwise rewrites (the file would not be lossless for RGBA).
  jpegxl: `imagecodecs.jpegxl_encode(arr, lossless=True, effort=9)` (imagecodecs'
          default thread count); modes L, LA, RGB and RGBA, 8 and 16 bits.

Must not import torch.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image as PILImage
from PIL import features

from vaezip.imaging.images import Image, decode_image, png_bytes

BASELINES: tuple[str, ...] = ("png", "webp", "jpegxl")
"""Baseline names, in the order tables print them."""

WEBP_MODES: tuple[str, ...] = ("RGB", "RGBA", "L", "LA")
_WEBP_STORED_AS = {"L": "RGB", "LA": "RGBA"}
JPEGXL_MODES: tuple[str, ...] = ("L", "LA", "RGB", "RGBA", "L;16", "LA;16", "RGB;16", "RGBA;16")
JPEGXL_EFFORT = 9


class BaselineNotLosslessError(RuntimeError):
    """A baseline encoder's output did not decode to the input pixels."""


@dataclass(frozen=True)
class BaselineResult:
    """One image through one baseline codec.

    Attributes:
        name: One of `BASELINES`.
        size_bytes: Compressed size in bytes, or None when the codec is missing or
            cannot hold the image's mode (`reason` says which).
        encode_seconds: Wall time of the encode call alone (no decode, no check).
        decode_seconds: Wall time of the decode call used for the lossless check.
        reason: Why `size_bytes` is None ("" otherwise).
    """

    name: str
    size_bytes: Optional[int]
    encode_seconds: Optional[float] = None
    decode_seconds: Optional[float] = None
    reason: str = ""


def _imagecodecs_jpegxl():
    """The imagecodecs module if it is installed with JPEG-XL support, else None."""
    try:
        import imagecodecs
    except ImportError:
        return None
    try:
        available = bool(imagecodecs.JPEGXL.available)
    except Exception:  # older imagecodecs without the availability flag, or a broken build
        available = hasattr(imagecodecs, "jpegxl_encode")
    return imagecodecs if available else None


def _webp_available() -> bool:
    return bool(features.check("webp"))


def _array(image: Image) -> np.ndarray:
    """(H, W) for one channel, else (H, W, C): the shape codecs take."""
    return image.pixels[:, :, 0] if image.channels == 1 else image.pixels


def _check_same(name: str, image: Image, decoded_mode: str, decoded: np.ndarray, palette: bytes = b"") -> None:
    expected = image.pixels
    decoded = np.asarray(decoded)
    if decoded.ndim == 2:
        decoded = decoded[:, :, np.newaxis]
    problems = []
    if decoded_mode != image.mode:
        problems.append(f"mode {decoded_mode} instead of {image.mode}")
    if decoded.shape != expected.shape:
        problems.append(f"shape {decoded.shape} instead of {expected.shape}")
    elif decoded.dtype != expected.dtype:
        problems.append(f"dtype {decoded.dtype} instead of {expected.dtype}")
    elif not np.array_equal(decoded, expected):
        problems.append(f"{int(np.count_nonzero(decoded != expected))} subpixels differ")
    if image.mode == "P" and palette[: len(image.palette)] != image.palette:
        problems.append("palette differs")
    if problems:
        raise BaselineNotLosslessError(f"{name} is not lossless on this {image.width}x{image.height} "
                                       f"{image.mode} image: {'; '.join(problems)}")


def _timed(call: Callable):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def png_result(image: Image) -> BaselineResult:
    """PNG at zlib level 9 with filter search (`images.png_bytes`); every supported mode."""
    data, encode_seconds = _timed(lambda: png_bytes(image, optimize=True))
    back, decode_seconds = _timed(lambda: decode_image(data, "png baseline"))
    _check_same("png", image, back.mode, back.pixels, back.palette)
    return BaselineResult("png", len(data), encode_seconds, decode_seconds)


def webp_result(image: Image) -> BaselineResult:
    """WebP lossless through Pillow; None for modes other than RGB and RGBA."""
    if not _webp_available():
        return BaselineResult("webp", None, reason="missing: Pillow built without WebP")
    if image.mode not in WEBP_MODES:
        return BaselineResult("webp", None, reason=f"mode {image.mode} not supported")
    pil = PILImage.frombytes(image.mode, (image.width, image.height), np.ascontiguousarray(image.pixels).tobytes())
    stored = _WEBP_STORED_AS.get(image.mode, image.mode)

    def encode() -> bytes:
        buffer = io.BytesIO()
        pil.convert(stored).save(buffer, format="WEBP", lossless=True, quality=100, method=6, exact=True)
        return buffer.getvalue()

    data, encode_seconds = _timed(encode)

    def decode():
        with PILImage.open(io.BytesIO(data)) as back:
            back.load()
            return back.mode, np.asarray(back)

    (mode, pixels), decode_seconds = _timed(decode)
    if image.mode in _WEBP_STORED_AS and mode == stored:
        pixels = np.atleast_3d(pixels)
        if np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 0], pixels[:, :, 2]):
            mode, pixels = image.mode, pixels[:, :, [0, 3]] if image.mode == "LA" else pixels[:, :, 0]
    _check_same("webp", image, mode, pixels)
    return BaselineResult("webp", len(data), encode_seconds, decode_seconds)


def jpegxl_result(image: Image) -> BaselineResult:
    """JPEG-XL lossless, effort 9, through imagecodecs; None if missing or for modes P and 1."""
    codecs = _imagecodecs_jpegxl()
    if codecs is None:
        return BaselineResult("jpegxl", None, reason="missing: imagecodecs with JPEG-XL not installed")
    if image.mode not in JPEGXL_MODES:
        return BaselineResult("jpegxl", None, reason=f"mode {image.mode} not supported")
    array = np.ascontiguousarray(_array(image))
    data, encode_seconds = _timed(lambda: bytes(codecs.jpegxl_encode(array, lossless=True, effort=JPEGXL_EFFORT)))
    pixels, decode_seconds = _timed(lambda: codecs.jpegxl_decode(data))
    _check_same("jpegxl", image, image.mode, pixels)
    return BaselineResult("jpegxl", len(data), encode_seconds, decode_seconds)


_RESULTS = {"png": png_result, "webp": webp_result, "jpegxl": jpegxl_result}


def baseline_results(image: Image, names: tuple[str, ...] = BASELINES) -> dict[str, BaselineResult]:
    """Sizes and times of `image` through each named baseline, each checked lossless.

    Raises:
        BaselineNotLosslessError: If a codec's output does not decode to the input.
    """
    return {name: _RESULTS[name](image) for name in names}


def baseline_sizes(image: Image) -> dict[str, Optional[int]]:
    """Compressed size in bytes of `image` through each of `BASELINES` (None: missing
    codec or unsupported mode). Each output is decoded and checked pixel-exact.

    Raises:
        BaselineNotLosslessError: If a codec's output does not decode to the input.
    """
    return {name: result.size_bytes for name, result in baseline_results(image).items()}


def versions() -> dict[str, Optional[str]]:
    """Library versions behind the baselines (None where missing or not exposed)."""
    import PIL

    out: dict[str, Optional[str]] = {
        "pillow": PIL.__version__,
        "zlib": features.version("zlib"),
        "libwebp": features.version("webp") if _webp_available() else None,
        "imagecodecs": None,
        "libjxl": None,
    }
    try:
        import imagecodecs

        out["imagecodecs"] = imagecodecs.__version__
    except ImportError:
        return out
    if _imagecodecs_jpegxl() is not None:
        try:
            out["libjxl"] = str(imagecodecs.jpegxl_version())
        except Exception:  # not exposed by this build
            out["libjxl"] = None
    return out
