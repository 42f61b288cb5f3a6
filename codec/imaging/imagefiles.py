"""File-format facts that Pillow hides: real sample depths, and 16-bit samples read and written exactly.

Pillow reads 16-bit RGB and gray+alpha PNGs, 16-bit RGB TIFFs and 16-bit PPMs as 8-bit
images, dropping the low byte; it scales 2- and 4-bit gray to 0..255. `images.read_image`
asks this module for each file's real depth first. PNG samples of 16 bits come from
imagecodecs (libpng), TIFF from tifffile, PNM from its few header lines; 16-bit PNGs
are written by imagecodecs with the iCCP and tRNS chunks added here.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vaezip.errors import UnsupportedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type."""


class FormatError(ValueError):
    """The file does not hold what its format promises (bad header, short data)."""


@dataclass(frozen=True)
class PngHeader:
    """The IHDR fields that matter here."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool


def png_header(data: bytes) -> PngHeader:
    """IHDR of PNG bytes, after checking the CRC of every chunk (Pillow skips IDAT's).

    Raises:
        FormatError: not a PNG, no valid IHDR first, or a chunk fails its CRC.
    """
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 29:
        raise FormatError("not a PNG file with an IHDR chunk")
    for kind, start, end in _png_chunks(data):
        if end + 4 <= len(data) and zlib.crc32(data[start - 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            raise FormatError(f"damaged PNG: chunk {kind.decode('latin-1')!r} fails its CRC")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return PngHeader(width, height, depth, colour, interlace == 1)


def read_png16(data: bytes, header: PngHeader) -> np.ndarray:
    """The samples of a 16-bit PNG, (H, W, C) uint16, tRNS not applied.

    Raises:
        FormatError: the file does not decode to its header's size and channels.
    """
    import imagecodecs

    try:
        with _quiet_stderr(header.interlaced):
            pixels = imagecodecs.png_decode(_without_chunk(data, b"tRNS"))  # tRNS would add alpha
    except Exception as error:  # imagecodecs raises its own PngError, or RuntimeError
        raise FormatError(f"damaged PNG ({error})") from None
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    channels = PNG_CHANNELS.get(header.colour_type)
    if pixels.dtype != np.uint16 or pixels.shape != (header.height, header.width, channels):
        raise FormatError(f"PNG decodes to {pixels.dtype} {pixels.shape}, not its header's size")
    return np.ascontiguousarray(pixels)


@contextlib.contextmanager
def _quiet_stderr(quiet: bool):
    """Silence file descriptor 2 while `quiet`: libpng warns there on every interlaced file
    that imagecodecs reads (it de-interlaces them correctly all the same)."""
    if not quiet:
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _png_chunks(data: bytes):
    """Yield (type, body start, body end) of each chunk; the CRC follows the body."""
    position = 8
    while position + 8 <= len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        yield data[position + 4:position + 8], position + 8, min(position + 8 + length, len(data))
        position += 12 + length


def _without_chunk(data: bytes, kind: bytes) -> bytes:
    """PNG bytes with every chunk of type `kind` left out (the rest unchanged)."""
    parts, position = [data[:8]], 8
    for chunk, start, end in _png_chunks(data):
        if chunk == kind:
            parts.append(data[position:start - 8])
            position = end + 4
    parts.append(data[position:])
    return b"".join(parts)


def write_png16(pixels: np.ndarray, level: int, icc_profile: bytes = b"",
                transparency: tuple[int, ...] = ()) -> bytes:
    """PNG bytes of (H, W, C) uint16 samples, C in 1..4, with an iCCP chunk for a
    profile and a tRNS chunk holding `transparency` (one u16 per channel, gray or RGB)."""
    import imagecodecs

    data = imagecodecs.png_encode(np.ascontiguousarray(pixels), level=level)
    chunks = b""
    if icc_profile:
        chunks += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile))
    if transparency:
        chunks += _png_chunk(b"tRNS", struct.pack(f">{len(transparency)}H", *transparency))
    end_of_ihdr = 8 + 8 + 13 + 4
    return data[:end_of_ihdr] + chunks + data[end_of_ihdr:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# ---------------------------------------------------------------- TIFF


@dataclass(frozen=True)
class TiffSamples:
    """The first page of a TIFF read by tifffile.

    Attributes:
        pixels: (H, W, C) samples as stored.
        alpha: the last channel is alpha (an extra sample).
        icc_profile: the InterColorProfile tag, b"" when absent.
    """

    pixels: np.ndarray
    alpha: bool
    icc_profile: bytes


def read_tiff(data: bytes, path: str) -> Optional[TiffSamples]:
    """Samples of a TIFF whose samples exceed 8 bits; None when none do (Pillow reads those).

    Raises:
        UnsupportedImageError: several pages, float or signed samples, other than 1, 8 or
            16 bits per sample, or a layout other than gray / RGB with at most one extra
            sample (the message names it).
        FormatError: a damaged file.
    """
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            if len(tif.pages) > 1:
                raise UnsupportedImageError(f"{path}: TIFF with {len(tif.pages)} pages; vaezip codes single images")
            if page.sampleformat != 1:
                raise UnsupportedImageError(f"{path}: TIFF with float or signed samples: not supported")
            if page.bitspersample not in (1, 8, 16):  # 12-bit data would change meaning as 16-bit PNG
                raise UnsupportedImageError(f"{path}: {page.bitspersample}-bit TIFF: not supported (1, 8 and 16 bits are)")
            if page.bitspersample <= 8:
                return None
            photometric = int(page.photometric)
            if photometric not in (1, 2):
                kind = {0: "white-is-zero", 3: "palette", 5: "CMYK", 6: "YCbCr"}.get(
                    photometric, f"photometric {photometric}")
                raise UnsupportedImageError(f"{path}: {page.bitspersample}-bit {kind} TIFF: not supported")
            extra = len(page.extrasamples)
            pixels = page.asarray()
            icc = page.tags.get(34675)
            icc_profile = bytes(icc.value) if icc is not None else b""
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as error:
        raise FormatError(f"damaged TIFF ({error})") from None
    if page.planarconfig == 2 and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)
    pixels = pixels.reshape(page.imagelength, page.imagewidth, -1)
    colour = 1 if photometric == 1 else 3
    if extra > 1 or pixels.shape[2] != colour + extra:
        raise UnsupportedImageError(f"{path}: TIFF with {pixels.shape[2]} samples per pixel: not supported")
    return TiffSamples(np.ascontiguousarray(pixels), extra == 1, icc_profile)


# ---------------------------------------------------------------- PNM

_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n\r]*[\n\r])*(\S+)")


@dataclass(frozen=True)
class PnmHeader:
    """A PBM/PGM/PPM header: magic b"P1".."P6", size, maxval (1 for bitmaps), and
    where the samples start."""

    magic: bytes
    width: int
    height: int
    maxval: int
    data_start: int

    @property
    def channels(self) -> int:
        return 3 if self.magic in (b"P3", b"P6") else 1


def pnm_header(data: bytes) -> PnmHeader:
    """Header of PBM/PGM/PPM bytes (P1-P6; PAM's P7 is not read here).

    Raises:
        FormatError: not such a file, or a malformed header.
    """
    magic = data[:2]
    if magic not in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"):
        raise FormatError(f"not a PBM/PGM/PPM file (magic {magic!r})")
    fields, position = [], 2
    for _ in range(2 if magic in (b"P1", b"P4") else 3):
        match = _PNM_TOKEN.match(data, position)
        if not match or not match.group(1).isdigit():
            raise FormatError("malformed PNM header")
        fields.append(int(match.group(1)))
        position = match.end()
    maxval = fields[2] if len(fields) == 3 else 1
    return PnmHeader(magic, fields[0], fields[1], maxval, position + 1)


def read_pnm16(data: bytes, header: PnmHeader) -> np.ndarray:
    """Samples of a PGM/PPM with maxval above 255, (H, W, C) uint16.

    Raises:
        FormatError: short or malformed sample data, or a sample above maxval.
    """
    count = header.width * header.height * header.channels
    if header.magic in (b"P5", b"P6"):
        raw = data[header.data_start: header.data_start + 2 * count]
        if len(raw) != 2 * count:
            raise FormatError(f"PNM data holds {len(raw) // 2} of {count} samples")
        samples = np.frombuffer(raw, ">u2").astype(np.uint16)
    else:
        try:
            samples = np.array(data[header.data_start - 1:].split()[:count], dtype=np.int64)
        except ValueError:
            raise FormatError("malformed plain PNM samples") from None
        if samples.size != count:
            raise FormatError(f"PNM data holds {samples.size} of {count} samples")
    if samples.size and int(samples.max()) > header.maxval:
        raise FormatError(f"PNM sample above its maxval {header.maxval}")
    return samples.astype(np.uint16).reshape(header.height, header.width, header.channels)


# ---------------------------------------------------------------- WebP


def webp_is_lossy(data: bytes) -> bool:
    """True if a RIFF WebP file holds a lossy (VP8) bitstream rather than VP8L."""
    position = 12
    while position + 8 <= len(data):
        kind, size = data[position:position + 4], struct.unpack("<I", data[position + 4:position + 8])[0]
        if kind in (b"VP8 ", b"VP8L"):
            return kind == b"VP8 "
        position += 8 + size + (size & 1)
    return False
