"""The .vzp archive format: many images, one chained bits-back payload (no torch here).

Every integer little-endian, strings UTF-8 with a u16 length prefix ("text"):

    magic         8 bytes   b"VZPK\\r\\n\\x1a\\n"  (differs from .vz's b"VZIP\\r\\n\\x1a\\n")
    version       u16       1 to 10 (`versions`)
    count         u32       number of images, >= 1
    table_size    u32       bytes of the image table, uncompressed
    table_zsize   u32       bytes of the zlib stream that follows
    table         zlib (RFC 1950) stream of the image table (below)
    payload       u32 count + count x u32   ANS words of all images, chained
    crc32         u32       zlib.crc32 of every byte before it

Versions with `archive_columns` (2 on) store the table column by column, so
that fields repeating from image to image deflate to almost nothing:

    runtime       text      library versions that wrote it (not in versions with
                            `compact_header`, 10 on)
    checksum      16 bytes  `set_checksum` of every image's `container.pixel_checksum`
    names         u8 kind, then kind 0: count x text;
                            kind 1 (numbered): prefix text, first u32, digits u8,
                            suffix text; name i is prefix + str(first + i) zero-padded
                            to at least digits + suffix
    then count values of each column in turn:
      flags u8 (bit 0 JOINED); mode u8 length + ASCII; width u32, height u32;
      model name text + model hash 8 bytes; tile size u16;
      schedule u16 count + count x u16; palette u16 length + bytes;
      transparency u16 length + bytes; ICC profile u32 length + bytes

Archives of versions with `adaptation` (5) are written at the default encoder effort
(`versions.DEFAULT_EFFORT`), which the table does not store: a run of one image carries
the 1-bit adaptation flag that `imagecodec.push_image` codes (clear), a joined tile set
carries none.

Version 1 table: `count` records, each: name text, flags u8, and the header
fields of a .vz file (`container.header_fields`, with the image's own pixel
checksum and runtime; num_initial_words 0). 21 bytes an image after deflate,
0.3% of the set's size for MNIST digits, hence version 2.

The images are pushed onto one ANS stack in order, so only the first pays a
start-up cost; the decoder pops them in reverse.

Tile sets: a run of images that share model and tile side may be coded as one
tile sequence (`bitsback.encode_tile_sets`: batches straddle image boundaries).
The first image of a run has JOINED clear, the others set. A batch's schedule
entry is stored with the image its first tile belongs to, so the run's schedule
is the concatenation of its images' schedules. A run of one image is coded
exactly as `imagecodec.push_image` codes it.

Any change to this layout is a new row in `versions`; `unpack` refuses versions not
in `versions.KNOWN_VERSIONS`. Everything read is validated and reported as
`CorruptFileError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vaezip.errors import CorruptFileError
from vaezip.format import container, versions
from vaezip.format.container import Header, Reader

MAGIC = b"VZPK\r\n\x1a\n"

JOINED = 0x01
BATCH_SIZE_MASK = container.DETERMINISTIC_FLAG - 1
"""Tile count of a schedule entry; the top bit is `container.DETERMINISTIC_FLAG`."""
MAX_NAME_BYTES = 4096
MIN_RECORD_BYTES = 2 + 1 + 1 + 54
"""Smallest table bytes an image takes as a record: a 1-byte name, flags and header fields
with empty strings."""
MIN_COLUMNS_BYTES = 1 + 1 + 8 + 2 + 8 + 2 + 2 + 2 + 2 + 4
"""Smallest table bytes an image takes in columns (names may be numbered)."""
NO_CHECKSUM = bytes(container.CHECKSUM_BYTES)
"""`pixel_checksum` of an entry read from columns: images are checked as a set."""
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
    numbers = {e.header.version for e in entries}
    if len(numbers) > 1:
        return f"images of format versions {sorted(numbers)} in one archive"
    if numbers - set(versions.FORMATS):
        return f"unknown format version {min(numbers - set(versions.FORMATS))}"
    if entries[0].header.fmt.archive_columns and len({e.header.runtime for e in entries}) > 1:
        return "images written by different runtimes in one archive"
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
        if entry.header.effort not in (0, versions.DEFAULT_EFFORT):
            return f"image {i}: archives are written at the default effort {versions.DEFAULT_EFFORT}"
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


def set_checksum(checksums: Sequence[bytes]) -> bytes:
    """16-byte BLAKE2b over the images' `container.pixel_checksum`s, in order."""
    digest = hashlib.blake2b(digest_size=container.CHECKSUM_BYTES, person=b"vaezip-set-v2")
    for checksum in checksums:
        digest.update(checksum)
    return digest.digest()


@dataclass(frozen=True)
class Contents:
    """A parsed archive. `checksum` is the version 2 `set_checksum` (version 1
    entries carry their own pixel checksums; it is None then)."""

    entries: list[Entry]
    words: np.ndarray
    version: int
    checksum: Optional[bytes]


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return struct.pack("<H", len(encoded)) + encoded


def _bytes16(value: bytes) -> bytes:
    return struct.pack("<H", len(value)) + value


def numbered_names(names: Sequence[str]) -> Optional[tuple[str, int, int, str]]:
    """(prefix, first, digits, suffix) if name i is prefix + zero-padded (first + i) + suffix."""
    match = re.fullmatch(r"(.*?)(\d+)(\D*)", names[0], flags=re.DOTALL)
    if not match or len(match.group(2)) > 10 or int(match.group(2)) + len(names) > _U32:
        return None
    prefix, number, suffix = match.groups()
    first, digits = int(number), len(number)
    if any(name != f"{prefix}{first + i:0{digits}d}{suffix}" for i, name in enumerate(names)):
        return None
    return prefix, first, digits, suffix


def _names_block(names: Sequence[str]) -> bytes:
    numbered = numbered_names(names)
    if numbered is None:
        return b"\x00" + b"".join(_text(n) for n in names)
    prefix, first, digits, suffix = numbered
    return b"\x01" + _text(prefix) + struct.pack("<IB", first, digits) + _text(suffix)


def _columns_table(entries: Sequence[Entry]) -> bytes:
    headers = [e.header for e in entries]
    columns = [
        [struct.pack("<B", JOINED if e.joined else 0) for e in entries],
        [struct.pack("<B", len(h.mode)) + h.mode.encode("ascii") for h in headers],
        [struct.pack("<II", h.width, h.height) for h in headers],
        [_text(h.model_name) + h.model_hash for h in headers],
        [struct.pack("<H", h.tile_size) for h in headers],
        [struct.pack("<H", len(h.schedule)) + np.asarray(h.schedule, dtype="<u2").tobytes() for h in headers],
        [_bytes16(h.palette) for h in headers],
        [_bytes16(h.transparency) for h in headers],
        [struct.pack("<I", len(h.icc_profile)) + h.icc_profile for h in headers],
    ]
    runtime = b"" if headers[0].fmt.compact_header else _text(headers[0].runtime)
    head = runtime + set_checksum([h.pixel_checksum for h in headers])
    return head + _names_block([e.name for e in entries]) + b"".join(b"".join(c) for c in columns)


def _record(entry: Entry) -> bytes:
    name = entry.name.encode("utf-8")
    flags = JOINED if entry.joined else 0
    return struct.pack("<H", len(name)) + name + struct.pack("<B", flags) + container.header_fields(entry.header)


def pack(entries: Sequence[Entry], words: np.ndarray) -> bytes:
    """Serialises entries and the chained payload into .vzp bytes of the entries'
    format version (all the same; version 2 also needs one shared runtime).

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
    version = entries[0].header.version
    table = _columns_table(entries) if entries[0].header.fmt.archive_columns else b"".join(_record(e) for e in entries)
    if len(table) > _U32:
        raise ValueError("image table longer than 2**32-1 bytes")
    packed_table = zlib.compress(table, 9)
    return container.with_crc([
        MAGIC,
        struct.pack("<H", version),
        struct.pack("<III", len(entries), len(table), len(packed_table)),
        packed_table,
        struct.pack("<I", words.size),
        memoryview(np.ascontiguousarray(words, dtype="<u4")).cast("B"),
    ])


def _check_preamble(data: bytes) -> None:
    if data[: len(container.MAGIC)] == container.MAGIC:
        raise CorruptFileError("this is a .vz file, not a .vzp archive (use vaezip decompress)")
    container.check_preamble(data, MAGIC, versions.KNOWN_VERSIONS, "archive")


def _inflate(packed: bytes, size: int) -> bytes:
    """The image table, exactly `size` bytes, from its zlib stream."""
    try:
        inflater = zlib.decompressobj()
        table = inflater.decompress(packed, size + 1)  # bounded: never more than claimed
    except zlib.error:
        raise CorruptFileError("corrupt vaezip archive: image table does not inflate") from None
    if len(table) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise CorruptFileError("corrupt vaezip archive: image table has the wrong length")
    return table


def _read_records(records: Reader, count: int) -> list[Entry]:
    entries = []
    for _ in range(count):
        name = records.text("image name", records.u16("image name length"))
        flags = records.u8("image flags")
        if flags & ~JOINED:
            raise CorruptFileError(f"corrupt vaezip archive: unknown image flags {flags:#x}")
        entries.append(Entry(name, container.read_header_fields(records, 1), bool(flags & JOINED)))
    return entries


def _read_names(table: Reader, count: int) -> list[str]:
    kind = table.u8("name kind")
    if kind == 0:
        return [table.text("image name", table.u16("image name length")) for _ in range(count)]
    if kind != 1:
        raise CorruptFileError(f"corrupt vaezip archive: unknown name kind {kind}")
    prefix = table.text("name prefix", table.u16("name prefix length"))
    first, digits = struct.unpack("<IB", table.take(5, "name numbering"))
    suffix = table.text("name suffix", table.u16("name suffix length"))
    if digits > 10 or first + count > _U32:
        raise CorruptFileError("corrupt vaezip archive: bad name numbering")
    return [f"{prefix}{first + i:0{digits}d}{suffix}" for i in range(count)]


def _read_columns(table: Reader, count: int, version: int) -> tuple[list[Entry], bytes]:
    runtime = "" if versions.get(version).compact_header else table.text("runtime", table.u16("runtime length"))
    checksum = table.take(container.CHECKSUM_BYTES, "set checksum")
    names = _read_names(table, count)
    flags = [table.u8("image flags") for _ in range(count)]
    if any(f & ~JOINED for f in flags):
        raise CorruptFileError("corrupt vaezip archive: unknown image flags")
    modes = [table.take(table.u8("mode length"), "mode").decode("latin-1") for _ in range(count)]
    sizes = [(table.u32("width"), table.u32("height")) for _ in range(count)]
    models = [(table.text("model name", table.u16("model name length")),
               table.take(container.MODEL_HASH_BYTES, "model hash")) for _ in range(count)]
    tiles = [table.u16("tile size") for _ in range(count)]
    schedules = [tuple(int(n) for n in table.array(table.u16("schedule length"), "<u2", "schedule"))
                 for _ in range(count)]
    palettes = [table.take(table.u16("palette length"), "palette") for _ in range(count)]
    transparencies = [table.take(table.u16("transparency length"), "transparency") for _ in range(count)]
    profiles = [table.take(table.u32("ICC profile length"), "ICC profile") for _ in range(count)]
    entries = []
    for i in range(count):
        header = Header(
            mode=modes[i], width=sizes[i][0], height=sizes[i][1], model_name=models[i][0],
            model_hash=models[i][1], tile_size=tiles[i], schedule=schedules[i], num_initial_words=0,
            pixel_checksum=NO_CHECKSUM, palette=palettes[i], transparency=transparencies[i],
            icc_profile=profiles[i], runtime=runtime, version=version,
        )
        problem = container.header_problem(header)
        if problem:
            raise CorruptFileError(f"corrupt vaezip archive: image {i}: {problem}")
        entries.append(Entry(names[i], header, bool(flags[i] & JOINED)))
    return entries, checksum


def read(data: bytes) -> Contents:
    """Parses and validates .vzp bytes.

    Raises:
        UnsupportedVersionError: format version not in `versions.KNOWN_VERSIONS`.
        CorruptFileError: anything else wrong: magic, truncation, CRC, counts,
            names, header fields, tile schedules, trailing bytes.
    """
    data = bytes(data)
    _check_preamble(data)
    (version,) = struct.unpack_from("<H", data, len(MAGIC))
    columns = versions.get(version).archive_columns
    reader = Reader(data[:-4], len(MAGIC) + 2)
    count = reader.u32("image count")
    table_size = reader.u32("image table size")
    table_zsize = reader.u32("compressed image table size")
    if count < 1:
        raise CorruptFileError("corrupt vaezip archive: no images")
    if table_zsize > reader.remaining or table_size > MAX_DEFLATE_RATIO * table_zsize + 64:
        raise CorruptFileError("corrupt vaezip archive: image table sizes do not fit the file")
    if count > table_size // (MIN_COLUMNS_BYTES if columns else MIN_RECORD_BYTES):
        raise CorruptFileError(f"corrupt vaezip archive: {count} images cannot fit a {table_size}-byte table")
    table = _inflate(reader.take(table_zsize, "image table"), table_size)
    words = reader.array(reader.u32("payload word count"), "<u4", "payload")
    if reader.remaining:
        raise CorruptFileError(f"corrupt vaezip archive: {reader.remaining} unexpected trailing bytes")
    records = Reader(table, 0)
    checksum = None
    if columns:
        entries, checksum = _read_columns(records, count, version)
    else:
        entries = _read_records(records, count)
    if records.remaining:
        raise CorruptFileError(f"corrupt vaezip archive: {records.remaining} unexpected bytes in the image table")
    problem = entries_problem(entries)
    if problem:
        raise CorruptFileError(f"corrupt vaezip archive: {problem}")
    return Contents(entries, words, version, checksum)


def unpack(data: bytes) -> tuple[list[Entry], np.ndarray]:
    """`read`, as (entries in push order, payload as a 1-D uint32 array)."""
    contents = read(data)
    return contents.entries, contents.words
