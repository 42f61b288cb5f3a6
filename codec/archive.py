"""The .vzp archive format: many images, one chained bits-back payload (no torch here).

Format version 1, every integer little-endian:

    magic         8 bytes   b"VZPK\\r\\n\\x1a\\n"  (differs from .vz's b"VZIP\\r\\n\\x1a\\n")
    version       u16       1
    count         u32       number of images, >= 1
    table_size    u32       bytes of the record table, uncompressed
    table_zsize   u32       bytes of the zlib stream that follows
    table         zlib (RFC 1950) stream of `count` records, each:
        name          u16 length + UTF-8   relative path, "/"-separated (`name_problem`)
        flags         u8        bit 0 JOINED: the image's tiles continue the tile
                                sequence of the image before it (`tile_sets`)
        header fields exactly as a .vz file holds them, mode through runtime
                                (`container.header_fields`); num_initial_words is 0
    payload       u32 count + count x u32   ANS words of all images, chained
    crc32         u32       zlib.crc32 of every byte before it

The images are pushed onto one ANS stack in order, so only the first pays a
start-up cost; the decoder pops them in reverse. The per-image fields repeat
from image to image (mode, size, model, runtime), which is why the table is
deflated: what remains per image is mostly the 16-byte pixel checksum and the name.

Tile sets: a run of images that share model and tile side may be coded as one
tile sequence (`bitsback.encode_tile_sets`: batches straddle image boundaries).
The first image of a run has JOINED clear, the others set. A batch's schedule
entry is stored with the image its first tile belongs to, so the run's schedule
is the concatenation of its images' schedules. A run of one image is coded
exactly as `api.push_image` codes it.

Any change to this layout bumps `FORMAT_VERSION`; `unpack` refuses versions not
in `KNOWN_VERSIONS`. Everything read is validated and reported as
`CorruptFileError` with a one-line message.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import container
from .container import Header, Reader
from .errors import CorruptFileError, UnsupportedVersionError

MAGIC = b"VZPK\r\n\x1a\n"
FORMAT_VERSION = 1
KNOWN_VERSIONS: tuple[int, ...] = (1,)

JOINED = 0x01
BATCH_SIZE_MASK = 0x7FFF
"""Tile count of a schedule entry; the top bit is `bitsback.DETERMINISTIC_FLAG`."""
MAX_NAME_BYTES = 4096
MIN_RECORD_BYTES = 2 + 1 + 1 + 54
"""Smallest record: a 1-byte name, flags, header fields with empty strings."""
MAX_DEFLATE_RATIO = 1100
"""Deflate cannot expand more than 1032:1; a larger claimed table size is corrupt."""
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Entry:
    """One image of an archive: its stored name, its .vz header fields, and
    whether its tiles continue the previous image's tile sequence."""

    name: str
    header: Header
    joined: bool = False


def name_problem(name: str) -> str:
    """Why `name` cannot be an archive member name, or "" if it can.

    A name is a relative "/"-separated path: not empty, no leading "/", no
    backslash or NUL, no empty, "." or ".." component, at most 4096 UTF-8 bytes.
    """
    if not isinstance(name, str) or not name:
        return "empty name"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"name {name!r} is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} bytes"
    if "\\" in name or "\x00" in name:
        return f"name {name!r} contains a backslash or NUL"
    if name.startswith("/"):
        return f"name {name!r} is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"name {name!r} has an empty, '.' or '..' component"
    if ":" in name.split("/")[0]:
        return f"name {name!r} starts with a drive or scheme"
    return ""


def tile_count(header: Header) -> int:
    """Tiles of a model-coded image (0 for an image without a model)."""
    if not header.model_name or header.tile_size <= 0:
        return 0
    return -(-header.height // header.tile_size) * -(-header.width // header.tile_size)


def tile_sets(entries: Sequence[Entry]) -> list[range]:
    """Index ranges of the images coded together: a first image and the JOINED ones after it."""
    sets: list[range] = []
    for i, entry in enumerate(entries):
        if entry.joined:
            sets[-1] = range(sets[-1].start, i + 1)
        else:
            sets.append(range(i, i + 1))
    return sets


def entries_problem(entries: Sequence[Entry]) -> str:
    """Why these entries cannot form an archive, or "" if they can.

    Checks names (valid, no duplicates), headers, and that JOINED images share
    their run's model and tile side and that each run's schedule covers its
    tiles with every batch stored at the image holding its first tile.
    """
    if not entries:
        return "an archive holds at least one image"
    if len(entries) > _U32:
        return "more than 2**32-1 images"
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        problem = name_problem(entry.name) or container.header_problem(entry.header)
        if problem:
            return f"image {i}: {problem}"
        if entry.name in seen:
            return f"duplicate name {entry.name!r}"
        seen.add(entry.name)
        if entry.header.num_initial_words:
            return f"image {i}: initial words are not used in archives"
        if entry.joined:
            before = entries[i - 1].header if i else None
            h = entry.header
            if before is None or not h.model_name or (h.model_name, h.model_hash, h.tile_size) != (
                    before.model_name, before.model_hash, before.tile_size):
                return f"image {i}: joined to an image with another model or tile size"
    for run in tile_sets(entries):
        first = entries[run.start].header
        if not first.model_name:
            if first.schedule or first.tile_size:
                return f"image {run.start}: tile schedule without a model"
            continue
        if first.tile_size <= 0:
            return f"image {run.start}: model-coded image with tile size 0"
        position = begin = 0  # tile positions within the run's sequence
        for i in run:
            end = begin + tile_count(entries[i].header)
            for entry in entries[i].header.schedule:
                size = entry & BATCH_SIZE_MASK
                if size < 1 or not begin <= position < end:  # a batch starts among this image's tiles
                    return f"image {i}: tile schedule does not match its tiles"
                position += size
            begin = end
        if position != begin:
            return f"images {run.start}..{run.stop - 1}: tile schedule does not cover their tiles"
    return ""


def _record(entry: Entry) -> bytes:
    name = entry.name.encode("utf-8")
    flags = JOINED if entry.joined else 0
    return struct.pack("<H", len(name)) + name + struct.pack("<B", flags) + container.header_fields(entry.header)


def pack(entries: Sequence[Entry], words: np.ndarray) -> bytes:
    """Serialises entries and the chained payload into .vzp bytes.

    Args:
        entries: The images in push order (valid: `entries_problem` is "").
        words: 1-D payload of ANS words, values 0..2**32-1.

    Raises:
        ValueError: invalid entries or payload.
    """
    problem = entries_problem(entries)
    if problem:
        raise ValueError(f"cannot pack archive: {problem}")
    words = container.checked_payload(words)
    table = b"".join(_record(e) for e in entries)
    if len(table) > _U32:
        raise ValueError("record table longer than 2**32-1 bytes")
    packed_table = zlib.compress(table, 9)
    body = b"".join([
        MAGIC,
        struct.pack("<H", FORMAT_VERSION),
        struct.pack("<III", len(entries), len(table), len(packed_table)),
        packed_table,
        struct.pack("<I", words.size),
        np.asarray(words, dtype="<u4").tobytes(),
    ])
    return body + struct.pack("<I", zlib.crc32(body))


def _check_preamble(data: bytes) -> None:
    if data[: len(container.MAGIC)] == container.MAGIC:
        raise CorruptFileError("this is a .vz file, not a .vzp archive (use vaezip decompress)")
    container.check_preamble(data, MAGIC, KNOWN_VERSIONS, "archive")


def _inflate(packed: bytes, size: int) -> bytes:
    """The record table, exactly `size` bytes, from its zlib stream."""
    try:
        inflater = zlib.decompressobj()
        table = inflater.decompress(packed, size + 1)  # bounded: never more than claimed
    except zlib.error:
        raise CorruptFileError("corrupt vaezip archive: record table does not inflate") from None
    if len(table) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise CorruptFileError("corrupt vaezip archive: record table has the wrong length")
    return table


def unpack(data: bytes) -> tuple[list[Entry], np.ndarray]:
    """Parses and validates .vzp bytes.

    Returns:
        The entries in push order and the payload as a 1-D uint32 array.

    Raises:
        UnsupportedVersionError: format version not in `KNOWN_VERSIONS`.
        CorruptFileError: anything else wrong: magic, truncation, CRC, counts,
            names, header fields, tile schedules, trailing bytes.
    """
    data = bytes(data)
    _check_preamble(data)
    reader = Reader(data[:-4], len(MAGIC) + 2)
    count = reader.u32("image count")
    table_size = reader.u32("record table size")
    table_zsize = reader.u32("compressed record table size")
    if count < 1:
        raise CorruptFileError("corrupt vaezip archive: no images")
    if table_zsize > reader.remaining or table_size > MAX_DEFLATE_RATIO * table_zsize + 64:
        raise CorruptFileError("corrupt vaezip archive: record table sizes do not fit the file")
    if count > table_size // MIN_RECORD_BYTES:
        raise CorruptFileError(f"corrupt vaezip archive: {count} images cannot fit a {table_size}-byte table")
    table = _inflate(reader.take(table_zsize, "record table"), table_size)
    words = reader.array(reader.u32("payload word count"), "<u4", "payload")
    if reader.remaining:
        raise CorruptFileError(f"corrupt vaezip archive: {reader.remaining} unexpected trailing bytes")
    records = Reader(table, 0)
    entries = []
    for _ in range(count):
        name = records.text("image name", records.u16("image name length"))
        flags = records.u8("image flags")
        if flags & ~JOINED:
            raise CorruptFileError(f"corrupt vaezip archive: unknown image flags {flags:#x}")
        entries.append(Entry(name, container.read_header_fields(records), bool(flags & JOINED)))
    if records.remaining:
        raise CorruptFileError(f"corrupt vaezip archive: {records.remaining} unexpected bytes in the record table")
    problem = entries_problem(entries)
    if problem:
        raise CorruptFileError(f"corrupt vaezip archive: {problem}")
    return entries, words
