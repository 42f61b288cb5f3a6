"""The .vz file format: header dataclass, `pack`/`unpack`, checksums.

Format versions 1 to 9 share one layout, every integer little-endian, strings
UTF-8 with a length prefix; the version says how the payload was coded (`versions`):

    magic              8 bytes   b"VZIP\\r\\n\\x1a\\n"
    version            u16       1 to 9
    mode               u8 length + ASCII
    width, height      u32, u32  pixels, each 1..65535, width * height <= 2**28
    model_name         u16 length + UTF-8   ("" when no neural model was used)
    model_hash         8 bytes   weight-hash prefix, zeros when no model
    tile_size          u16       pixels
    schedule           u16 count + count x u16   tile-batch schedule
    num_initial_words  u32
    pixel_checksum     16 bytes  `pixel_checksum` of the decoded image
    palette            u16 length + bytes   (mode P only, RGB triples)
    transparency       u16 length + bytes   (`images.encode_transparency`)
    icc_profile        u32 length + bytes
    runtime            u16 length + UTF-8   library versions that affect the numbers
    effort             u8        versions with `adaptation` (5 on): the encoder effort, 1..9 (informational)
    payload            u32 count + count x u32   ANS words
    crc32              u32       zlib.crc32 of every byte before it

Versions with `compact_header` (10 on) leave out the runtime and write every u16 and u32
above except the payload words as an unsigned LEB128 varint (7 bits a byte, low bits first,
the high bit set on all but the last byte; the shortest form only, at most the field's
range): about 100 bytes less a file, which small images feel.

Any change to this layout or to how payloads are coded is a new row in `versions`; `unpack`
refuses versions not in `versions.KNOWN_VERSIONS`. Everything read is validated and reported
as `CorruptFileError`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from vaezip.errors import CorruptFileError, UnsupportedVersionError
from vaezip.format import versions
from vaezip.imaging.images import SUPPORTED_MODES, Image, decode_transparency

MAGIC = b"VZIP\r\n\x1a\n"
"""8 bytes; the CR LF, ^Z and LF catch text-mode mangling, as in PNG."""


MAX_SIDE = 65535
"""Largest width or height, pixels."""
MAX_PIXELS = 2**28
"""Largest width * height, pixels."""
MODEL_HASH_BYTES = 8
CHECKSUM_BYTES = 16
DETERMINISTIC_FLAG = 0x8000
"""Set on a schedule entry (tile count | flag) whose batch is coded without bits-back."""
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Header:
    """Everything in a .vz file except the payload words.

    Attributes:
        mode: Image mode, one of `images.SUPPORTED_MODES`.
        width: Image width, pixels.
        height: Image height, pixels.
        model_name: Registry name of the model, "" when no neural model was used.
        model_hash: First 8 bytes of the weights' sha256, zeros when no model.
        tile_size: Tile side, pixels (u16).
        schedule: Tile-batch schedule, u16 each, at most 65535 entries.
        num_initial_words: u32 count of initial ANS words (bits-back seed).
        pixel_checksum: 16-byte `pixel_checksum` of the image.
        palette: Mode P only: RGB triples.
        transparency: Serialised transparency (`images.encode_transparency`).
        icc_profile: Raw ICC profile.
        runtime: Library versions and instruction sets that wrote the file (diagnostics
            shown when a checksum fails); always "" in versions with `compact_header`,
            which do not record it.
        version: Format version the payload is coded with.
        effort: The encoder effort it was written with (1..9; the decoder does not need
            it), in versions with `adaptation`; always 0 in the others, which do not record it.
    """

    mode: str
    width: int
    height: int
    model_name: str
    model_hash: bytes
    tile_size: int
    schedule: tuple[int, ...]
    num_initial_words: int
    pixel_checksum: bytes
    palette: bytes = b""
    transparency: bytes = b""
    icc_profile: bytes = b""
    runtime: str = ""
    version: int = versions.CURRENT.version
    effort: int = versions.DEFAULT_EFFORT

    def __post_init__(self) -> None:
        known = versions.FORMATS.get(self.version)
        # Fields a version does not record are blank, so headers compare equal after a round trip.
        if known is None or not known.adaptation:
            object.__setattr__(self, "effort", 0)
        if known is not None and known.compact_header:
            object.__setattr__(self, "runtime", "")

    @property
    def fmt(self) -> versions.Format:
        """The record of `version` (`versions.get`)."""
        return versions.get(self.version)


def header_problem(header: Header) -> str:
    """Returns why `header` cannot be stored or used, or "" if it is valid."""
    if header.version not in versions.FORMATS:
        return f"unknown format version {header.version}"
    if header.mode not in header.fmt.modes:
        return f"unknown image mode {header.mode!r} for format version {header.version}"
    if not (1 <= header.width <= MAX_SIDE and 1 <= header.height <= MAX_SIDE):
        return f"image size {header.width}x{header.height} outside 1..{MAX_SIDE}"
    if header.width * header.height > MAX_PIXELS:
        return f"image of {header.width}x{header.height} pixels exceeds {MAX_PIXELS} pixels"
    if not 0 <= _utf8_length(header.model_name) <= _U16:
        return "model name must be UTF-8 of at most 65535 bytes"
    if len(header.model_hash) != MODEL_HASH_BYTES:
        return f"model hash must be {MODEL_HASH_BYTES} bytes, got {len(header.model_hash)}"
    if not 0 <= header.tile_size <= _U16:
        return f"tile size {header.tile_size} outside 0..65535"
    if len(header.schedule) > _U16 or not all(0 <= n <= _U16 for n in header.schedule):
        return "schedule must be at most 65535 entries of 0..65535"
    if not 0 <= header.num_initial_words <= _U32:
        return f"initial word count {header.num_initial_words} outside u32"
    if len(header.pixel_checksum) != CHECKSUM_BYTES:
        return f"pixel checksum must be {CHECKSUM_BYTES} bytes, got {len(header.pixel_checksum)}"
    if header.palette and header.mode != "P":
        return f"mode {header.mode} cannot have a palette"
    if len(header.palette) % 3 or len(header.palette) > 256 * 3:
        return f"palette of {len(header.palette)} bytes is not at most 256 RGB triples"
    if len(header.transparency) > _U16 or len(header.icc_profile) > _U32:
        return "transparency or ICC profile too long"
    try:
        decode_transparency(header.transparency, header.mode)
    except ValueError as error:
        return f"bad transparency: {error}"
    if not 0 <= _utf8_length(header.runtime) <= _U16:
        return "runtime string must be UTF-8 of at most 65535 bytes"
    if header.fmt.adaptation and header.effort not in versions.EFFORTS:
        efforts = versions.EFFORTS
        return f"effort {header.effort} outside {efforts.start}..{efforts.stop - 1}"
    return ""


def _utf8_length(value: str) -> int:
    """Encoded length in bytes, or -1 if `value` cannot be UTF-8 encoded (lone surrogates)."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return struct.pack("<H", len(encoded)) + encoded


def varint(value: int) -> bytes:
    """`value` (>= 0) as an unsigned LEB128 varint, the shortest form."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uint(value: int, size: int, compact: bool) -> bytes:
    """An unsigned field of `size` bytes (2 or 4), little-endian, or a varint when `compact`."""
    return varint(value) if compact else value.to_bytes(size, "little")


def checked_payload(words: np.ndarray) -> np.ndarray:
    """The payload as a 1-D array of u32 values.

    Raises:
        ValueError: not 1-D integers in 0..2**32-1, or longer than 2**32-1 words.
    """
    words = np.asarray(words)
    if words.ndim != 1 or (words.size and words.dtype.kind not in "ui"):
        raise ValueError(f"payload must be a 1-D integer array, got {words.dtype} {words.shape}")
    if words.size and (int(words.min()) < 0 or int(words.max()) > _U32):
        raise ValueError("payload words must be in 0..2**32-1")
    if words.size > _U32:
        raise ValueError("payload longer than 2**32-1 words")
    return words


def pack(header: Header, words: np.ndarray) -> bytes:
    """Serialises a header and payload into .vz bytes.

    Args:
        header: A valid header.
        words: 1-D payload of ANS words, values 0..2**32-1 (any integer dtype).

    Returns:
        The file contents, CRC-32 last.

    Raises:
        ValueError: If the header is invalid, or the words are not 1-D u32 values.
    """
    problem = header_problem(header)
    if problem:
        raise ValueError(f"cannot pack header: {problem}")
    words = checked_payload(words)
    parts = [
        MAGIC,
        struct.pack("<H", header.version),
        header_fields(header),
        _uint(words.size, 4, header.fmt.compact_header),
        memoryview(np.ascontiguousarray(words, dtype="<u4")).cast("B"),
    ]
    return with_crc(parts)


def with_crc(parts: list) -> bytes:
    """The parts (bytes-like) joined, then the CRC-32 of all of them: one copy of the payload."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([*parts, struct.pack("<I", crc)])


class _Reader:
    """Reads fields from a byte string, checking each length before slicing."""

    def __init__(self, data: bytes, start: int) -> None:
        self._data = data
        self._pos = start

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.remaining:
            raise CorruptFileError(
                f"corrupt vaezip file: {what} needs {count} bytes, only {self.remaining} left"
            )
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def varint(self, what: str, limit: int) -> int:
        """An unsigned LEB128 varint in its shortest form, at most `limit`."""
        value = shift = 0
        while True:
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= limit.bit_length():
                raise CorruptFileError(f"corrupt vaezip file: {what} is a varint of too many bytes")
        if shift and not byte:
            raise CorruptFileError(f"corrupt vaezip file: {what} is a varint not in its shortest form")
        if value > limit:
            raise CorruptFileError(f"corrupt vaezip file: {what} {value} exceeds {limit}")
        return value

    def uint(self, size: int, what: str, compact: bool) -> int:
        """What `_uint(value, size, compact)` wrote."""
        if compact:
            return self.varint(what, (1 << 8 * size) - 1)
        return int.from_bytes(self.take(size, what), "little")

    def text(self, what: str, length: int) -> str:
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(f"corrupt vaezip file: {what} is not valid UTF-8") from None

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        """`count` items of little-endian `dtype`, length checked before anything is allocated."""
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * size, what), dtype=dtype).astype(dtype[1:])


PREAMBLE_BYTES = len(MAGIC) + 2
"""Magic and format version: the first bytes of a .vz file."""


def named_version(head: bytes, magic: bytes = MAGIC) -> int | None:
    """The format version the first bytes of a file (`PREAMBLE_BYTES` for a .vz file) name,
    without validating the rest (`check_preamble`, `unpack` do); None if they do not start
    with `magic` and a version."""
    if len(head) < len(magic) + 2 or head[: len(magic)] != magic:
        return None
    return struct.unpack_from("<H", head, len(magic))[0]


def check_preamble(data: bytes, magic: bytes = MAGIC, known: tuple[int, ...] = versions.KNOWN_VERSIONS,
                   kind: str = "file") -> None:
    """Magic, version and CRC-32 of a vaezip file (`kind` "file") or archive ("archive").

    Raises:
        UnsupportedVersionError: unknown version; CorruptFileError: anything else.
    """
    if not data or data[: len(magic)] != magic[: len(data)]:
        raise CorruptFileError(f"not a vaezip {kind} (wrong magic bytes)")
    version = named_version(data, magic)
    if version is None:
        raise CorruptFileError(f"truncated vaezip {kind}: only {len(data)} bytes")
    if version not in known:
        versions = ", ".join(str(v) for v in known)
        raise UnsupportedVersionError(
            f"vaezip {kind} format version {version} is not supported (this build reads: {versions})"
        )
    if len(data) < len(magic) + 2 + 4:
        raise CorruptFileError(f"truncated vaezip {kind}: only {len(data)} bytes")
    (stored_crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != stored_crc:
        raise CorruptFileError(f"vaezip {kind} is truncated or damaged (CRC-32 mismatch)")


def unpack(data: bytes) -> tuple[Header, np.ndarray]:
    """Parses and validates .vz bytes.

    Args:
        data: The whole file.

    Returns:
        The header and the payload as a 1-D uint32 array.

    Raises:
        UnsupportedVersionError: If the format version is not in `versions.KNOWN_VERSIONS`.
        CorruptFileError: If the bytes are not a vaezip file, are truncated, have trailing
            bytes, fail the CRC, or hold an invalid field.
    """
    data = bytes(data)
    check_preamble(data)
    reader = _Reader(data[:-4], len(MAGIC) + 2)
    header = read_header_fields(reader, struct.unpack_from("<H", data, len(MAGIC))[0])
    words = reader.array(reader.uint(4, "payload word count", header.fmt.compact_header), "<u4", "payload")
    if reader.remaining:
        raise CorruptFileError(f"corrupt vaezip file: {reader.remaining} unexpected trailing bytes")
    return header, words


def read_header(data: bytes) -> Header:
    """Validates .vz bytes like `unpack` and returns only the header (for `vaezip info`)."""
    return unpack(data)[0]


def pixel_checksum(image: Image) -> bytes:
    """16-byte BLAKE2b of everything lossless means: mode, size, pixels, palette, transparency.

    Each variable-length part is length-prefixed so no two images hash the same bytes.
    The ICC profile is metadata and not included.

    Args:
        image: The image.

    Returns:
        16 bytes.
    """
    digest = hashlib.blake2b(digest_size=CHECKSUM_BYTES, person=b"vaezip-pixels-v1")
    mode = image.mode.encode("ascii")
    digest.update(struct.pack("<B", len(mode)) + mode)
    digest.update(struct.pack("<III", image.width, image.height, image.channels))
    pixels = image.pixels if image.pixels.dtype == np.uint8 else image.pixels.astype("<u2")
    digest.update(memoryview(np.ascontiguousarray(pixels)).cast("B"))  # no copy of 8-bit pixels
    digest.update(struct.pack("<I", len(image.palette)) + image.palette)
    digest.update(struct.pack("<I", len(image.transparency)) + image.transparency)
    return digest.digest()


# ---- header fields on their own, for formats that embed them (.vzp archives) ----

Reader = _Reader
"""Public name of the bounds-checked field reader (`archive.py` reads with it)."""


def header_fields(header: Header) -> bytes:
    """The header's fields exactly as `pack` writes them between the version and the
    payload count (mode through runtime, and the effort from version 5 on).

    Raises:
        ValueError: If the header is invalid.
    """
    problem = header_problem(header)
    if problem:
        raise ValueError(f"cannot pack header: {problem}")
    compact = header.fmt.compact_header

    def u16(value: int) -> bytes:
        return _uint(value, 2, compact)

    def u32(value: int) -> bytes:
        return _uint(value, 4, compact)

    mode = header.mode.encode("ascii")
    model_name = header.model_name.encode("utf-8")
    return b"".join([
        struct.pack("<B", len(mode)) + mode,
        u32(header.width) + u32(header.height),
        u16(len(model_name)) + model_name,
        header.model_hash,
        u16(header.tile_size),
        u16(len(header.schedule)),
        b"".join(u16(n) for n in header.schedule),
        u32(header.num_initial_words),
        header.pixel_checksum,
        u16(len(header.palette)) + header.palette,
        u16(len(header.transparency)) + header.transparency,
        u32(len(header.icc_profile)) + header.icc_profile,
        b"" if compact else _text(header.runtime),
        struct.pack("<B", header.effort) if header.fmt.adaptation else b"",
    ])


def read_header_fields(reader: Reader, version: int) -> Header:
    """Reads what `header_fields` wrote and validates it like `unpack`; `version`
    comes from the file's preamble.

    Raises:
        CorruptFileError: truncated or invalid fields.
    """
    fmt = versions.get(version)
    compact = fmt.compact_header

    def u16(what: str) -> int:
        return reader.uint(2, what, compact)

    def u32(what: str) -> int:
        return reader.uint(4, what, compact)

    mode = reader.take(reader.u8("mode length"), "mode").decode("latin-1")
    if mode not in SUPPORTED_MODES:
        raise CorruptFileError(f"corrupt vaezip file: unknown image mode {mode!r}")
    width = u32("width")
    height = u32("height")
    model_name = reader.text("model name", u16("model name length"))
    model_hash = reader.take(MODEL_HASH_BYTES, "model hash")
    tile_size = u16("tile size")
    schedule = tuple(u16("schedule entry") for _ in range(u16("schedule length")))
    num_initial_words = u32("initial word count")
    checksum = reader.take(CHECKSUM_BYTES, "pixel checksum")
    palette = reader.take(u16("palette length"), "palette")
    transparency = reader.take(u16("transparency length"), "transparency")
    icc_profile = reader.take(u32("ICC profile length"), "ICC profile")
    runtime = "" if compact else reader.text("runtime", reader.u16("runtime length"))
    effort = reader.u8("effort") if fmt.adaptation else 0
    header = Header(
        mode=mode, width=width, height=height, model_name=model_name, model_hash=model_hash,
        tile_size=tile_size, schedule=schedule, num_initial_words=num_initial_words,
        pixel_checksum=checksum, palette=palette, transparency=transparency,
        icc_profile=icc_profile, runtime=runtime, version=version, effort=effort,
    )
    problem = header_problem(header)
    if problem:
        raise CorruptFileError(f"corrupt vaezip file: {problem}")
    return header
