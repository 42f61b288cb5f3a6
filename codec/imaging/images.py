"""Reading and writing images: the lossless pixel model vaezip codes, modes, palettes, alpha.

An `Image` is what "lossless" is measured against: mode, sample depth, pixel array,
palette and transparency must come back exactly. Files are read at their real sample
depth (`readers`), never rotated by EXIF orientation, and written as PNG so that
`read_image(write_png(x))` gives `x` again.

Modes are Pillow's 8-bit ones plus the depths Pillow cannot hold without loss:
"L;2" and "L;4" (2- and 4-bit gray, samples 0..3 / 0..15) and "L;16", "LA;16",
"RGB;16", "RGBA;16" (16-bit samples, uint16).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image as PILImage

from vaezip.errors import InputError, UnsupportedImageError
from vaezip.imaging import imagefiles

SUPPORTED_MODES: tuple[str, ...] = (
    "L", "LA", "RGB", "RGBA", "P", "1", "L;2", "L;4", "L;16", "LA;16", "RGB;16", "RGBA;16")
"""Modes coded losslessly; anything else is refused with `UnsupportedImageError`."""

CHANNELS: dict[str, int] = {mode: {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 1, "1": 1}[mode.split(";")[0]]
                            for mode in SUPPORTED_MODES}
"""Channels per pixel of each supported mode."""


def bit_depth(mode: str) -> int:
    """Bits per sample of a supported mode: 1 for "1", 2, 4 or 16 as its suffix says, else 8."""
    return 1 if mode == "1" else int(mode.split(";")[1]) if ";" in mode else 8


def colour_mode(mode: str) -> str:
    """The mode without its depth suffix: "RGB;16" -> "RGB"."""
    return mode.split(";")[0]

_MAX_PALETTE_BYTES = 256 * 3

# Serialised transparency: one ASCII tag byte, then the value.
_TAG_INDEX = b"I"  # + u16: transparent grey level (L, 1) or palette index (P)
_TAG_TABLE = b"T"  # + raw bytes: one alpha value per palette entry (P)
_TAG_COLOUR = b"C"  # + 3 x u16: transparent RGB colour (RGB)
_TAG_MODES = {_TAG_INDEX: ("L", "P", "1", "L;2", "L;4", "L;16"), _TAG_TABLE: ("P",),
              _TAG_COLOUR: ("RGB", "RGB;16")}

# Pillow's PNG reader turns a tRNS table with one 0 and every other entry 255 into an int.
_SIMPLE_TABLE = re.compile(b"^\xff*\x00\xff*$")

Transparency = Union[int, bytes, tuple[int, int, int], None]


@dataclass(frozen=True, eq=False)
class Image:
    """One image as vaezip codes it.

    Attributes:
        mode: One of `SUPPORTED_MODES`.
        pixels: array of shape (height, width, channels): uint8, or uint16 for the 16-bit
            modes; channels is 1 for L, P and 1, 2 for LA, 3 for RGB and 4 for RGBA. Mode
            "1" holds 0 or 1, "L;2" 0..3, "L;4" 0..15, mode "P" palette indices.
        palette: Mode P only: raw RGB triples, 3 bytes per entry, at most 256 entries, exactly
            as long as the source palette.
        transparency: Serialised transparency (see `encode_transparency`), b"" for none.
        icc_profile: Raw ICC profile bytes, b"" for none.
        source: What the pixels were decoded from when that was lossy ("JPEG", "lossy
            WebP"), else "". Not stored; a summary line mentions it.

    Raises:
        UnsupportedImageError: If the fields do not describe a supported image.
    """

    mode: str
    pixels: np.ndarray
    palette: bytes = b""
    transparency: bytes = b""
    icc_profile: bytes = b""
    source: str = ""

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
    def bit_depth(self) -> int:
        """Bits per sample (1, 2, 4, 8 or 16)."""
        return bit_depth(self.mode)

    @property
    def num_subpixels(self) -> int:
        """height * width * channels: the denominator of bits per subpixel."""
        return self.height * self.width * self.channels


def _image_problem(image: Image) -> str:
    """Returns why `image` is invalid, or "" if it is fine."""
    if image.mode not in SUPPORTED_MODES:
        return f"unsupported image mode {image.mode!r} (supported: {', '.join(SUPPORTED_MODES)})"
    pixels = image.pixels
    depth = bit_depth(image.mode)
    dtype = np.uint16 if depth == 16 else np.uint8
    if not isinstance(pixels, np.ndarray) or pixels.dtype != dtype:
        return f"mode {image.mode} pixels must be a {np.dtype(dtype).name} numpy array"
    if pixels.ndim != 3 or pixels.shape[2] != CHANNELS[image.mode]:
        channels = CHANNELS[image.mode]
        return f"mode {image.mode} needs pixels of shape (H, W, {channels}), got {pixels.shape}"
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        return f"image must be at least 1x1, got {pixels.shape[1]}x{pixels.shape[0]}"
    if depth < 8 and pixels.size and int(pixels.max()) >= 1 << depth:
        return f"mode {image.mode} pixels must be below {1 << depth}"
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
    if value is None or colour_mode(mode) in ("LA", "RGBA"):
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
    if mode in ("L", "L;2", "L;4", "L;16") and isinstance(value, (int, np.integer)):
        return max(0, min(0xFFFF, int(value)))
    if mode in ("RGB", "RGB;16") and isinstance(value, (tuple, list)) and len(value) == 3:
        return tuple(max(0, min(0xFFFF, int(c))) for c in value)
    raise UnsupportedImageError(f"cannot keep transparency {value!r} of a mode {mode} image")


PIL_MODES: tuple[str, ...] = ("L", "LA", "RGB", "RGBA", "P", "1", "I;16", "I;16L", "I;16B")
"""Pillow modes `from_pil` takes; I;16 (16-bit gray) becomes L;16."""


def from_pil(pil_image: PILImage.Image, gray_depth: int = 8) -> Image:
    """Converts a loaded Pillow image to an `Image`.

    Args:
        pil_image: A single-frame Pillow image in one of `PIL_MODES`.
        gray_depth: For a mode L image read from a 2- or 4-bit gray file (Pillow scales
            its samples to 0..255): that depth, so the image keeps the file's samples.

    Returns:
        The `Image`, with palette, transparency (in the form a PNG round trip keeps) and
        ICC profile.

    Raises:
        UnsupportedImageError: If the mode is not supported.
    """
    mode = pil_image.mode
    if mode not in PIL_MODES:
        raise UnsupportedImageError(
            f"unsupported image mode {mode!r} (supported: {', '.join(SUPPORTED_MODES)})"
        )
    width, height = pil_image.size
    pixels = np.asarray(pil_image)
    if mode.startswith("I;16"):
        mode, pixels = "L;16", pixels.astype(np.uint16)
    elif mode == "L" and gray_depth in (2, 4):
        mode, pixels = f"L;{gray_depth}", pixels // (255 // ((1 << gray_depth) - 1))
    dtype = np.uint16 if mode == "L;16" else np.uint8
    pixels = np.ascontiguousarray(pixels, dtype=dtype).reshape(height, width, CHANNELS[mode])
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
        A Pillow image of the same size and mode, except: L;16 becomes I;16, and L;2 and
        L;4 become L with the samples scaled to 0..255 (as Pillow reads such files);
        `info` holds "transparency" and "icc_profile" when the image has them.

    Raises:
        UnsupportedImageError: For LA;16, RGB;16 and RGBA;16, which Pillow cannot hold.
    """
    size = (image.width, image.height)
    mode = image.mode
    if mode == "1":
        # Mode 1 raw data is one bit per pixel, rows padded to whole bytes, MSB first.
        data = np.packbits(image.pixels[:, :, 0].astype(bool), axis=1).tobytes()
    elif mode in ("L;2", "L;4"):
        mode, data = "L", (image.pixels * (255 // ((1 << image.bit_depth) - 1))).astype(np.uint8).tobytes()
    elif mode == "L;16":
        mode, data = "I;16", np.ascontiguousarray(image.pixels, dtype="<u2").tobytes()
    elif image.bit_depth == 16:
        raise UnsupportedImageError(f"Pillow has no mode for {image.mode} images; use write_png or the pixels")
    else:
        data = np.ascontiguousarray(image.pixels).tobytes()
    pil_image = PILImage.frombytes(mode, size, data)
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
        array: uint8 or uint16 array of shape (H, W) or (H, W, C) with C in 1..4, or a bool
            array of shape (H, W) or (H, W, 1) for a bilevel image.
        mode: The mode; by default L for 1 channel, LA for 2, RGB for 3, RGBA for 4 (with
            ";16" for uint16) and 1 for bool arrays.

    Returns:
        The `Image`.

    Raises:
        UnsupportedImageError: If the dtype is not uint8, uint16 (either byte order) or
            bool, the shape fits no mode, or the values do not fit `mode`.
    """
    array = np.asarray(array)
    suffix = ""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
        mode = mode or "1"
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:
        array, suffix = array.astype(np.uint16), ";16"
    elif array.dtype != np.uint8:
        raise UnsupportedImageError(f"pixel arrays must be uint8 or uint16, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise UnsupportedImageError(f"cannot make an image from an array of shape {array.shape}")
    if mode is None:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]] + suffix
    return Image(mode, np.ascontiguousarray(array))


ImageLike = Union[Image, np.ndarray, "os.PathLike", str, PILImage.Image]
"""What the library codes: an `Image`, a pixel array (`from_array`), a Pillow image or a path."""


def as_image(image: ImageLike) -> Image:
    """The `Image` of an `ImageLike`.

    Raises:
        InputError: an object of another type; as `read_image`, `from_array`, `from_pil`.
    """
    if isinstance(image, Image):
        return image
    if isinstance(image, np.ndarray):
        return from_array(image)
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, PILImage.Image):
        return from_pil(image)
    raise InputError(f"cannot compress an object of type {type(image).__name__}")


READABLE_FORMATS: dict[str, str] = {
    "PNG": "PNG", "TIFF": "TIFF", "PPM": "PNM", "BMP": "BMP", "DIB": "BMP", "GIF": "GIF",
    "JPEG": "JPEG", "WEBP": "WebP"}
"""Pillow's format names of the files `read_image` takes, and how messages name them."""

_DEEP_PNG_MODES = {0: "L;16", 2: "RGB;16", 4: "LA;16", 6: "RGBA;16"}
_DEEP_MODES = {(1, False): "L;16", (1, True): "LA;16", (3, False): "RGB;16", (3, True): "RGBA;16"}


def read_image(path: str | os.PathLike) -> Image:
    """Reads an image file at its real sample depth, without applying EXIF orientation.

    Args:
        path: A PNG (any bit depth and colour type), TIFF (1-, 8- or 16-bit gray or RGB,
            one page), PBM/PGM/PPM (maxval 1, 255 or 65535), BMP, GIF (one frame),
            JPEG or WebP (one frame).

    Returns:
        The file's samples, palette, transparency and ICC profile; `source` names a lossy
        format (JPEG, lossy WebP) whose decoded pixels these are.

    Raises:
        InputError: If the file is missing, unreadable, damaged, not an image, or too large
            (Pillow's decompression-bomb limit).
        UnsupportedImageError: If vaezip cannot keep every sample exactly (another format,
            mode or depth, several frames): the message names what the file is.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not an image file") from None
    except OSError as error:
        raise InputError(f"{name}: cannot read ({error.strerror or error})") from None
    return decode_image(data, name)


def decode_image(data: bytes, name: str = "image") -> Image:
    """`read_image` of a file's bytes; `name` starts every error message."""
    with warnings.catch_warnings():
        # A warning-size bomb must stop here, not print and decode gigapixels.
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            deep = _read_deep(data, name)
            if deep is not None:
                return deep
            with PILImage.open(io.BytesIO(data)) as pil_image:
                return _read_pillow(pil_image, data, name)
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as error:
            raise InputError(f"{name}: image too large to read safely ({error})") from None
        except PILImage.UnidentifiedImageError:
            raise InputError(f"{name}: not an image file vaezip can read") from None
        except imagefiles.FormatError as error:
            raise InputError(f"{name}: {error}") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
            raise InputError(f"{name}: cannot read image ({error})") from None


def _read_deep(data: bytes, name: str) -> Optional[Image]:
    """The image of a TIFF or PNM file with samples above 8 bits (Pillow would cut them),
    None for any other file; refuses depths that cannot be kept."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        tiff = imagefiles.read_tiff(data, name)
        if tiff is None:
            return None
        mode = _DEEP_MODES[(tiff.pixels.shape[2] - tiff.alpha, tiff.alpha)]
        return Image(mode, tiff.pixels, icc_profile=tiff.icc_profile)
    if data[:2] in (b"P2", b"P3", b"P5", b"P6"):
        header = imagefiles.pnm_header(data)
        kind = "PPM" if header.channels == 3 else "PGM"
        if header.maxval == 65535:
            return Image(_DEEP_MODES[(header.channels, False)], imagefiles.read_pnm16(data, header))
        if header.maxval != 255:
            raise UnsupportedImageError(
                f"{name}: {kind} with maxval {header.maxval}: not supported (vaezip keeps maxval 255 and 65535)")
    return None


def _read_pillow(pil_image: PILImage.Image, data: bytes, name: str) -> Image:
    """The image of a file Pillow opened; PNG depths Pillow would change are read here."""
    kind = READABLE_FORMATS.get(pil_image.format or "")
    if kind is None:
        readable = ", ".join(dict.fromkeys(READABLE_FORMATS.values()))
        raise UnsupportedImageError(f"{name}: {pil_image.format} files are not supported (vaezip reads {readable})")
    if getattr(pil_image, "n_frames", 1) > 1:
        raise UnsupportedImageError(f"{name}: {kind} with {pil_image.n_frames} frames; vaezip codes single images")
    if pil_image.mode not in PIL_MODES:
        raise UnsupportedImageError(f"{name}: {kind} of mode {pil_image.mode!r}: not supported "
                                    f"(supported: {', '.join(SUPPORTED_MODES)})")
    gray_depth = 8
    if kind == "PNG":
        header = imagefiles.png_header(data)
        if header.bit_depth == 16:
            pixels = imagefiles.read_png16(data, header)
            mode = _DEEP_PNG_MODES[header.colour_type]
            transparency = _canonical_transparency(mode, pil_image.info.get("transparency"), b"")
            icc_profile = bytes(pil_image.info.get("icc_profile") or b"")
            return Image(mode, pixels, b"", encode_transparency(transparency), icc_profile)
        if header.colour_type == 0:
            gray_depth = header.bit_depth
    pil_image.load()
    image = from_pil(pil_image, gray_depth)
    lossy = kind == "JPEG" or (kind == "WebP" and imagefiles.webp_is_lossy(data))
    return dataclasses.replace(image, source=f"lossy {kind}" if kind == "WebP" else kind) if lossy else image


PNG_LEVEL = 3
"""zlib level of `write_png` and of the PNGs `vaezip decompress` / `unpack` write: a working
copy of the pixels, written fast (a few percent larger than Pillow's default of 6)."""


def write_png(image: Image, path: str | os.PathLike, level: int = PNG_LEVEL) -> None:
    """Writes `image` as a PNG that `read_image` reads back as the same image (`png_bytes`).

    Args:
        image: The image.
        path: Output file; overwritten if it exists.
        level: zlib compression level 0-9 (the pixels are the same at every level).

    Raises:
        InputError: If the file cannot be written.
    """
    data = png_bytes(image, level)
    try:
        with open(os.fspath(path), "wb") as file:
            file.write(data)
    except OSError as error:
        raise InputError(f"{os.fspath(path)}: cannot write PNG ({error})") from None


def png_bytes(image: Image, level: int = PNG_LEVEL, optimize: bool = False) -> bytes:
    """The PNG of `image`, which `decode_image` reads back as the same image.

    Samples keep their depth: 2-, 4- and 16-bit images are written at that depth. Exact
    for every image `read_image` or `from_pil` produces. The one exception: a P image whose
    indices exceed its palette gets the palette padded with black up to the largest index,
    because PNG has no other way to store such indices.

    Args:
        image: The image.
        level: zlib compression level 0-9 (the pixels are the same at every level).
        optimize: Pillow's filter search at level 9 (not for LA;16, RGB;16, RGBA;16,
            which libpng writes with its adaptive filters).
    """
    if image.bit_depth == 16 and image.mode != "L;16":  # Pillow cannot hold these
        transparency = decode_transparency(image.transparency, image.mode) or ()
        return imagefiles.write_png16(image.pixels, 9 if optimize else level, image.icc_profile, transparency)
    pil_image = to_pil(image)
    options = {"compress_level": level, "optimize": optimize}
    if image.mode in ("L;2", "L;4"):
        options["bits"] = image.bit_depth
    if image.mode == "P":
        # Pillow writes few-colour palettes with 1, 2 or 4 bits per index.
        largest = int(image.pixels.max())
        colours = _png_colours(image.palette)
        index_bits = 8 if colours > 16 else 4 if colours > 4 else 2 if colours > 2 else 1
        if largest >= 1 << index_bits:
            padded = image.palette.ljust(3 * (largest + 1), b"\x00")
            pil_image.putpalette(padded, rawmode="RGB")
    if "transparency" in pil_image.info:
        options["transparency"] = pil_image.info["transparency"]
    if image.icc_profile:
        options["icc_profile"] = image.icc_profile
    buffer = io.BytesIO()
    pil_image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pixels_equal(a: Image, b: Image) -> bool:
    """True if mode, size, pixels, palette and transparency are all equal (ICC ignored)."""
    return (
        a.mode == b.mode
        and a.pixels.shape == b.pixels.shape
        and bool(np.array_equal(a.pixels, b.pixels))
        and a.palette == b.palette
        and a.transparency == b.transparency
    )
