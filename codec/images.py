"""Reading and writing images: the lossless pixel model vaezip codes, modes, palettes, alpha.

An `Image` is what "lossless" is measured against: mode, pixel array, palette and
transparency must come back exactly. Images are read with Pillow, never rotated by EXIF
orientation, and written as PNG so that `read_image(write_png(x))` gives `x` again.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image as PILImage

from .errors import InputError, UnsupportedImageError

SUPPORTED_MODES: tuple[str, ...] = ("L", "LA", "RGB", "RGBA", "P", "1")
"""Pillow modes coded losslessly; anything else is refused with `UnsupportedImageError`."""

CHANNELS: dict[str, int] = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 1, "1": 1}
"""Channels per pixel of each supported mode."""

_MAX_PALETTE_BYTES = 256 * 3

# Serialised transparency: one ASCII tag byte, then the value.
_TAG_INDEX = b"I"  # + u16: transparent grey level (L, 1) or palette index (P)
_TAG_TABLE = b"T"  # + raw bytes: one alpha value per palette entry (P)
_TAG_COLOUR = b"C"  # + 3 x u16: transparent RGB colour (RGB)
_TAG_MODES = {_TAG_INDEX: ("L", "P", "1"), _TAG_TABLE: ("P",), _TAG_COLOUR: ("RGB",)}

# Pillow's PNG reader turns a tRNS table with one 0 and every other entry 255 into an int.
_SIMPLE_TABLE = re.compile(b"^\xff*\x00\xff*$")

Transparency = Union[int, bytes, tuple[int, int, int], None]


@dataclass(frozen=True, eq=False)
class Image:
    """One image as vaezip codes it.

    Attributes:
        mode: One of `SUPPORTED_MODES`.
        pixels: uint8 array of shape (height, width, channels); channels is 1 for L, P and 1,
            2 for LA, 3 for RGB and 4 for RGBA. Mode "1" holds 0 or 1, mode "P" palette indices.
        palette: Mode P only: raw RGB triples, 3 bytes per entry, at most 256 entries, exactly
            as long as the source palette.
        transparency: Serialised transparency (see `encode_transparency`), b"" for none.
        icc_profile: Raw ICC profile bytes, b"" for none.

    Raises:
        UnsupportedImageError: If the fields do not describe a supported image.
    """

    mode: str
    pixels: np.ndarray
    palette: bytes = b""
    transparency: bytes = b""
    icc_profile: bytes = b""

    def __post_init__(self) -> None:
        problem = _image_problem(self)
        if problem:
            raise UnsupportedImageError(problem)

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        """Channels per pixel (1 to 4)."""
        return int(self.pixels.shape[2])

    @property
    def num_subpixels(self) -> int:
        """height * width * channels: the denominator of bits per subpixel."""
        return self.height * self.width * self.channels


def _image_problem(image: Image) -> str:
    """Returns why `image` is invalid, or "" if it is fine."""
    if image.mode not in SUPPORTED_MODES:
        return f"unsupported image mode {image.mode!r} (supported: {', '.join(SUPPORTED_MODES)})"
    pixels = image.pixels
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        return "pixels must be a uint8 numpy array"
    if pixels.ndim != 3 or pixels.shape[2] != CHANNELS[image.mode]:
        channels = CHANNELS[image.mode]
        return f"mode {image.mode} needs pixels of shape (H, W, {channels}), got {pixels.shape}"
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        return f"image must be at least 1x1, got {pixels.shape[1]}x{pixels.shape[0]}"
    if image.mode == "1" and pixels.size and int(pixels.max()) > 1:
        return "mode 1 pixels must be 0 or 1"
    if image.palette and image.mode != "P":
        return f"only mode P has a palette, not mode {image.mode}"
    if len(image.palette) % 3 or len(image.palette) > _MAX_PALETTE_BYTES:
        return f"palette must be whole RGB triples, at most 256, got {len(image.palette)} bytes"
    try:
        decode_transparency(image.transparency, image.mode)
    except ValueError as error:
        return str(error)
    return ""


def encode_transparency(value: Transparency) -> bytes:
    """Serialises Pillow's `info["transparency"]` to vaezip's tagged bytes.

    Args:
        value: None, an int (grey level or palette index, 0..65535), a bytes alpha table
            (one byte per palette entry), or an (r, g, b) tuple of ints 0..65535.

    Returns:
        b"" for None; b"I" + u16 LE for an int; b"T" + the table for bytes;
        b"C" + 3 x u16 LE for a colour.

    Raises:
        ValueError: If `value` is none of these.
    """
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return _TAG_TABLE + bytes(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"transparency index {value} outside 0..65535")
        return _TAG_INDEX + struct.pack("<H", int(value))
    if isinstance(value, (tuple, list)) and len(value) == 3:
        if not all(isinstance(c, (int, np.integer)) and 0 <= c <= 0xFFFF for c in value):
            raise ValueError(f"transparency colour {value!r} must be three ints 0..65535")
        return _TAG_COLOUR + struct.pack("<3H", *(int(c) for c in value))
    raise ValueError(f"cannot represent transparency {value!r}")


def decode_transparency(data: bytes, mode: str | None = None) -> Transparency:
    """Inverse of `encode_transparency`.

    Args:
        data: Serialised transparency.
        mode: If given, also check the kind of transparency fits this image mode.

    Returns:
        None, an int, a bytes alpha table or an (r, g, b) tuple, as Pillow uses them.

    Raises:
        ValueError: If `data` is malformed or does not fit `mode`.
    """
    if not data:
        return None
    tag, body = data[:1], data[1:]
    if tag not in _TAG_MODES:
        raise ValueError(f"unknown transparency tag {tag!r}")
    if mode is not None and mode not in _TAG_MODES[tag]:
        raise ValueError(f"transparency of kind {tag.decode()} does not fit mode {mode}")
    if tag == _TAG_TABLE:
        if len(body) > 256:
            raise ValueError(f"transparency table of {len(body)} entries, at most 256")
        return bytes(body)
    if tag == _TAG_INDEX:
        if len(body) != 2:
            raise ValueError("transparency index must be 2 bytes")
        return struct.unpack("<H", body)[0]
    if len(body) != 6:
        raise ValueError("transparency colour must be 6 bytes")
    return tuple(struct.unpack("<3H", body))


def _png_colours(palette: bytes) -> int:
    """Palette entries Pillow writes to a PNG PLTE chunk for this palette."""
    return max(1, min(len(palette) // 3, 256))


def _canonical_transparency(mode: str, value: Transparency, palette: bytes) -> Transparency:
    """Returns the transparency a PNG written by `write_png` reads back as.

    Pillow's PNG writer and reader change some values (a P table with a single 0 becomes an
    int, a table is cut to the palette size, mode 1 stores 0 or 255), so `from_pil` applies
    the same change once and PNG round trips are then exact.
    """
    if value is None or mode in ("LA", "RGBA"):
        return None  # PNG has no tRNS for modes with alpha; Pillow marks such info as stale
    if mode == "P":
        colours = _png_colours(palette)
        if isinstance(value, (int, np.integer)):
            index = max(0, min(255, int(value)))
            value = (b"\xff" * index + b"\x00")[:colours]
        table = bytes(value)[:colours]
        return table.find(b"\x00") if _SIMPLE_TABLE.match(table) else table
    if mode == "1" and isinstance(value, (int, np.integer)):
        return 255 if value else 0
    if mode == "L" and isinstance(value, (int, np.integer)):
        return max(0, min(0xFFFF, int(value)))
    if mode == "RGB" and isinstance(value, (tuple, list)) and len(value) == 3:
        return tuple(max(0, min(0xFFFF, int(c))) for c in value)
    raise UnsupportedImageError(f"cannot keep transparency {value!r} of a mode {mode} image")


def from_pil(pil_image: PILImage.Image) -> Image:
    """Converts a loaded Pillow image to an `Image`.

    Args:
        pil_image: A single-frame Pillow image in one of `SUPPORTED_MODES`.

    Returns:
        The `Image`, with palette, transparency (in the form a PNG round trip keeps) and
        ICC profile.

    Raises:
        UnsupportedImageError: If the mode is not supported.
    """
    mode = pil_image.mode
    if mode not in SUPPORTED_MODES:
        raise UnsupportedImageError(
            f"unsupported image mode {mode!r} (supported: {', '.join(SUPPORTED_MODES)})"
        )
    width, height = pil_image.size
    pixels = np.asarray(pil_image)
    if mode == "1":
        pixels = pixels.astype(np.uint8)
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(height, width, CHANNELS[mode])
    palette = b""
    transparency = pil_image.info.get("transparency")
    if mode == "P":
        # A P image without a palette is written to PNG with one black entry.
        palette = bytes(pil_image.getpalette(rawmode="RGB") or b"") or b"\x00\x00\x00"
        rgba_palette = pil_image.palette is not None and pil_image.palette.mode == "RGBA"
        if transparency is None and rgba_palette:
            alpha = bytes(pil_image.getpalette(rawmode="A") or b"")
            transparency = alpha if alpha.strip(b"\xff") else None
    transparency = _canonical_transparency(mode, transparency, palette)
    icc_profile = bytes(pil_image.info.get("icc_profile") or b"")
    return Image(mode, pixels, palette, encode_transparency(transparency), icc_profile)


def to_pil(image: Image) -> PILImage.Image:
    """Converts an `Image` to a Pillow image, restoring palette, transparency and ICC profile.

    Args:
        image: The image.

    Returns:
        A Pillow image of the same mode and size; `info` holds "transparency" and
        "icc_profile" when the image has them.
    """
    size = (image.width, image.height)
    if image.mode == "1":
        # Mode 1 raw data is one bit per pixel, rows padded to whole bytes, MSB first.
        data = np.packbits(image.pixels[:, :, 0].astype(bool), axis=1).tobytes()
    else:
        data = np.ascontiguousarray(image.pixels).tobytes()
    pil_image = PILImage.frombytes(image.mode, size, data)
    if image.mode == "P" and image.palette:
        pil_image.putpalette(image.palette, rawmode="RGB")
    transparency = decode_transparency(image.transparency, image.mode)
    if transparency is not None:
        pil_image.info["transparency"] = transparency
    if image.icc_profile:
        pil_image.info["icc_profile"] = image.icc_profile
    return pil_image


def from_array(array: np.ndarray, mode: str | None = None) -> Image:
    """Wraps a pixel array as an `Image` (no palette, transparency or ICC profile).

    Args:
        array: uint8 array of shape (H, W) or (H, W, C) with C in 1..4, or a bool array of
            shape (H, W) or (H, W, 1) for a bilevel image.
        mode: The mode; by default L for 1 channel, LA for 2, RGB for 3, RGBA for 4 and
            1 for bool arrays.

    Returns:
        The `Image`.

    Raises:
        UnsupportedImageError: If the dtype is not uint8 (or bool), the shape fits no mode,
            or the values do not fit `mode`.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
        mode = mode or "1"
    elif array.dtype != np.uint8:
        raise UnsupportedImageError(f"pixel arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise UnsupportedImageError(f"cannot make an image from an array of shape {array.shape}")
    if mode is None:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return Image(mode, np.ascontiguousarray(array))


def read_image(path: str | os.PathLike) -> Image:
    """Reads an image file without applying EXIF orientation.

    Args:
        path: Any format Pillow reads; a single frame in one of `SUPPORTED_MODES`.

    Returns:
        The file's pixels, palette, transparency and ICC profile.

    Raises:
        InputError: If the file is missing, unreadable, not an image, or too large
            (Pillow's decompression-bomb limit).
        UnsupportedImageError: If the mode is unsupported or the file has several frames.
    """
    name = os.fspath(path)
    with warnings.catch_warnings():
        # A warning-size bomb must stop here, not print and decode gigapixels.
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            with PILImage.open(name) as pil_image:
                if getattr(pil_image, "n_frames", 1) > 1:
                    raise UnsupportedImageError(
                        f"{name}: has {pil_image.n_frames} frames; vaezip codes single images"
                    )
                if pil_image.mode not in SUPPORTED_MODES:
                    raise UnsupportedImageError(
                        f"{name}: unsupported image mode {pil_image.mode!r} "
                        f"(supported: {', '.join(SUPPORTED_MODES)})"
                    )
                pil_image.load()
                return from_pil(pil_image)
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as error:
            raise InputError(f"{name}: image too large to read safely ({error})") from None
        except FileNotFoundError:
            raise InputError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{name}: is a directory, not an image file") from None
        except PILImage.UnidentifiedImageError:
            raise InputError(f"{name}: not an image file Pillow can read") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
            raise InputError(f"{name}: cannot read image ({error})") from None


PNG_LEVEL = 3
"""zlib level of `write_png` and of the PNGs `vaezip decompress` / `unpack` write: a working
copy of the pixels, written fast (a few percent larger than Pillow's default of 6)."""


def write_png(image: Image, path: str | os.PathLike, level: int = PNG_LEVEL) -> None:
    """Writes `image` as a PNG that `read_image` reads back as the same image.

    Exact for every image `read_image` or `from_pil` produces. The one exception: a P image
    whose indices exceed its palette gets the palette padded with black up to the largest
    index, because PNG has no other way to store such indices.

    Args:
        image: The image.
        path: Output file; overwritten if it exists.
        level: zlib compression level 0-9 (the pixels are the same at every level).

    Raises:
        InputError: If the file cannot be written.
    """
    pil_image = to_pil(image)
    if image.mode == "P":
        # Pillow writes few-colour palettes with 1, 2 or 4 bits per index.
        largest = int(image.pixels.max())
        colours = _png_colours(image.palette)
        bit_depth = 8 if colours > 16 else 4 if colours > 4 else 2 if colours > 2 else 1
        if largest >= 1 << bit_depth:
            padded = image.palette.ljust(3 * (largest + 1), b"\x00")
            pil_image.putpalette(padded, rawmode="RGB")
    options = {"compress_level": level}
    if "transparency" in pil_image.info:
        options["transparency"] = pil_image.info["transparency"]
    if image.icc_profile:
        options["icc_profile"] = image.icc_profile
    try:
        pil_image.save(os.fspath(path), format="PNG", **options)
    except OSError as error:
        raise InputError(f"{os.fspath(path)}: cannot write PNG ({error})") from None


def pixels_equal(a: Image, b: Image) -> bool:
    """True if mode, size, pixels, palette and transparency are all equal (ICC ignored)."""
    return (
        a.mode == b.mode
        and a.pixels.shape == b.pixels.shape
        and bool(np.array_equal(a.pixels, b.pixels))
        and a.palette == b.palette
        and a.transparency == b.transparency
    )
