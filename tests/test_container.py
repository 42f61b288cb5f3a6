"""Tests for vaezip.format.container: exact layout, round trips, and every kind of damaged file."""

from __future__ import annotations

import dataclasses
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaezip.errors import CorruptFileError, UnsupportedVersionError
from vaezip.format.container import (
    MAGIC,
    Header,
    pack,
    pixel_checksum,
    read_header,
    unpack,
    varint,
)
from vaezip.format.versions import CURRENT, KNOWN_VERSIONS, get
from vaezip.imaging.images import SUPPORTED_MODES, Image, encode_transparency

HEADER = Header(
    mode="P",
    width=3,
    height=2,
    model_name="tiny-v1",
    model_hash=bytes(range(8)),
    tile_size=32,
    schedule=(1, 4),
    num_initial_words=2,
    pixel_checksum=bytes(range(100, 116)),
    palette=b"\x01\x02\x03\x04\x05\x06",
    transparency=encode_transparency(1),
    icc_profile=b"icc",
    runtime="torch=2.13.0",
    version=9,  # the fixed-width layout of versions 1 to 9
)
COMPACT = dataclasses.replace(HEADER, version=10)
"""HEADER in version 10's compact layout (varints, no runtime)."""
WORDS = np.array([0, 1, 0xDEADBEEF, 0xFFFFFFFF], dtype=np.uint32)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_layout_is_pinned():
    expected_body = b"".join(
        [
            MAGIC,
            b"\x09\x00",  # version (6 to 9 have 5's layout)
            b"\x01P",
            b"\x03\x00\x00\x00\x02\x00\x00\x00",  # width, height
            b"\x07\x00tiny-v1",
            bytes(range(8)),
            b"\x20\x00",  # tile size
            b"\x02\x00\x01\x00\x04\x00",  # schedule
            b"\x02\x00\x00\x00",  # initial words
            bytes(range(100, 116)),
            b"\x06\x00\x01\x02\x03\x04\x05\x06",
            b"\x03\x00I\x01\x00",
            b"\x03\x00\x00\x00icc",
            b"\x0c\x00torch=2.13.0",
            b"\x03",  # effort (version 5)
            b"\x04\x00\x00\x00",
            b"\x00\x00\x00\x00\x01\x00\x00\x00\xef\xbe\xad\xde\xff\xff\xff\xff",
        ]
    )
    assert MAGIC[:2] == b"VZ" and len(MAGIC) == 8
    assert CURRENT.version in KNOWN_VERSIONS
    assert pack(HEADER, WORDS) == _with_crc(expected_body)


def _compact_body(width=b"\x03", tile=b"\x20", schedule=b"\x02\x01\x04", count=b"\x04", words=WORDS) -> bytes:
    """COMPACT's body (no CRC) as the container docstring spells it, with raw field bytes swappable."""
    return b"".join([
        MAGIC,
        b"\x0a\x00",  # version 10
        b"\x01P",
        width, b"\x02",  # width, height
        b"\x07tiny-v1",
        bytes(range(8)),
        tile,
        schedule,  # count, then the entries
        b"\x02",  # initial words
        bytes(range(100, 116)),
        b"\x06\x01\x02\x03\x04\x05\x06",
        b"\x03I\x01\x00",
        b"\x03icc",
        b"\x03",  # effort; no runtime
        count,
        np.asarray(words, "<u4").tobytes(),
    ])


def test_compact_layout_is_pinned():
    assert CURRENT.compact_header and COMPACT.runtime == ""
    assert pack(COMPACT, WORDS) == _with_crc(_compact_body())
    assert [varint(v) for v in (0, 127, 128, 300, 0x8011, 2**32 - 1)] == [
        b"\x00", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x91\x80\x02", b"\xff\xff\xff\xff\x0f"]
    wide = dataclasses.replace(COMPACT, width=300, schedule=(0x8011,))
    expected = _compact_body(width=b"\xac\x02", schedule=b"\x01\x91\x80\x02")
    assert pack(wide, WORDS) == _with_crc(expected)
    assert unpack(pack(wide, WORDS))[0] == wide
    assert len(pack(HEADER, WORDS)) - len(pack(COMPACT, WORDS)) == 14 + 22  # runtime; 11 varints


@pytest.mark.parametrize("fields,message", [
    ({"width": b"\x83\x00"}, "shortest form"),
    ({"tile": b"\x80\x80\x80\x01"}, "too many bytes"),
    ({"tile": b"\x80\x80\x04"}, "65536 exceeds 65535"),
    ({"schedule": b"\x01\xff\xff\x04"}, "exceeds 65535"),
    ({"width": b"\x80\x80\x04"}, "size"),  # a valid u32, a width over 65535
    ({"count": b"\x05"}, "payload"),
    ({"count": b"\xff\xff\xff\xff\x1f"}, "payload word count"),
])
def test_compact_fields_refused(fields, message):
    with pytest.raises(CorruptFileError, match=message):
        unpack(_with_crc(_compact_body(**fields)))


def test_modes_of_other_depths_need_version_4():
    deep = dataclasses.replace(HEADER, mode="RGB;16", palette=b"", transparency=encode_transparency((1, 2, 65535)))
    assert unpack(pack(deep, WORDS))[0] == deep
    for mode in ("L;2", "L;4", "L;16", "LA;16", "RGBA;16"):
        header = dataclasses.replace(deep, mode=mode, transparency=b"")
        assert unpack(pack(header, WORDS))[0] == header
        with pytest.raises(ValueError, match="for format version 3"):
            pack(dataclasses.replace(header, version=3), WORDS)


def test_pixel_checksum_covers_both_bytes_of_16_bit_samples():
    pixels = np.full((2, 3, 1), 0x0102, np.uint16)
    checksum = pixel_checksum(Image("L;16", pixels))
    swapped = np.full((2, 3, 1), 0x0201, np.uint16)
    assert checksum != pixel_checksum(Image("L;16", swapped))
    assert checksum != pixel_checksum(Image("L", np.full((2, 3, 1), 2, np.uint8)))


@pytest.mark.parametrize("header", [HEADER, COMPACT], ids=["fixed", "compact"])
def test_round_trip_small(header):
    back, words = unpack(pack(header, WORDS))
    assert back == header
    assert words.dtype == np.uint32 and np.array_equal(words, WORDS)
    assert read_header(pack(header, WORDS)) == header


@st.composite
def headers(draw):
    mode = draw(st.sampled_from(SUPPORTED_MODES))
    width = draw(st.integers(1, 65535))
    height = draw(st.integers(1, min(65535, 2**28 // width)))
    transparency = {
        "L": st.one_of(st.none(), st.integers(0, 65535)),
        "1": st.one_of(st.none(), st.integers(0, 65535)),
        "P": st.one_of(st.none(), st.integers(0, 65535), st.binary(max_size=256)),
        "RGB": st.one_of(st.none(), st.tuples(*[st.integers(0, 65535)] * 3)),
    }.get(mode, st.none())
    triples = st.binary(max_size=256).map(lambda b: b[: len(b) // 3 * 3])
    palette = draw(triples) if mode == "P" else b""
    return Header(
        mode=mode,
        width=width,
        height=height,
        model_name=draw(st.text(max_size=20)),
        model_hash=draw(st.binary(min_size=8, max_size=8)),
        tile_size=draw(st.integers(0, 65535)),
        schedule=tuple(draw(st.lists(st.integers(0, 65535), max_size=30))),
        num_initial_words=draw(st.integers(0, 2**32 - 1)),
        pixel_checksum=draw(st.binary(min_size=16, max_size=16)),
        palette=palette,
        transparency=encode_transparency(draw(transparency)),
        icc_profile=draw(st.binary(max_size=100)),
        runtime=draw(st.text(max_size=40)),
        version=draw(st.sampled_from([v for v in KNOWN_VERSIONS if mode in get(v).modes])),
    )


@settings(max_examples=150, deadline=None)
@given(headers(), st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_round_trip_any_header(header, word_list):
    words = np.array(word_list, dtype=np.uint32)
    data = pack(header, words)
    back, back_words = unpack(data)
    assert back == header
    assert back_words.dtype == np.uint32 and np.array_equal(back_words, words)


@pytest.mark.parametrize("header", [HEADER, COMPACT], ids=["fixed", "compact"])
def test_every_truncation_is_refused(header):
    data = pack(header, WORDS)
    for length in range(len(data)):
        with pytest.raises(CorruptFileError):
            unpack(data[:length])


@pytest.mark.parametrize("header", [HEADER, COMPACT], ids=["fixed", "compact"])
def test_every_truncation_with_recomputed_crc_is_refused(header):
    """The field parser itself must catch short data, not only the CRC."""
    body = pack(header, WORDS)[:-4]
    for length in range(len(MAGIC) + 2, len(body)):
        with pytest.raises(CorruptFileError):
            unpack(_with_crc(body[:length]))


@pytest.mark.parametrize("header", [HEADER, COMPACT], ids=["fixed", "compact"])
def test_random_bit_flips_are_refused(header):
    data = pack(header, WORDS)
    rng = np.random.default_rng(1234)
    for bit in rng.integers(0, 8 * len(data), size=300):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptFileError):
            unpack(bytes(damaged))


@pytest.mark.parametrize("header", [HEADER, COMPACT], ids=["fixed", "compact"])
def test_bit_flips_with_recomputed_crc_never_escape_as_other_errors(header):
    """Every bit flip, and random byte changes, behind a valid CRC: a CorruptFileError, or a
    header and payload that `pack` writes back to exactly the damaged bytes (a valid file)."""
    body = pack(header, WORDS)[:-4]
    rng = np.random.default_rng(99)
    damaged_bodies = []
    for bit in range(8 * len(MAGIC) + 16, 8 * len(body)):
        damaged = bytearray(body)
        damaged[bit // 8] ^= 1 << (bit % 8)
        damaged_bodies.append(bytes(damaged))
    for _ in range(200):
        damaged = bytearray(body)
        damaged[rng.integers(len(MAGIC) + 2, len(body))] = rng.integers(0, 256)
        damaged_bodies.append(bytes(damaged))
    refused = parsed = 0
    for damaged in damaged_bodies:
        data = _with_crc(damaged)
        try:
            header, words = unpack(data)
        except CorruptFileError:
            refused += 1
            continue
        assert isinstance(header, Header) and pack(header, words) == data
        parsed += 1
    assert refused and parsed, (refused, parsed)


def test_bad_magic():
    data = pack(HEADER, WORDS)
    with pytest.raises(CorruptFileError, match="not a vaezip file"):
        unpack(b"\x89PNG\r\n\x1a\n" + data[8:])
    with pytest.raises(CorruptFileError, match="not a vaezip file"):
        unpack(b"")


def test_unknown_version():
    body = pack(HEADER, WORDS)[:-4]
    data = _with_crc(MAGIC + struct.pack("<H", 99) + body[len(MAGIC) + 2 :])
    with pytest.raises(UnsupportedVersionError, match=r"version 99 .*reads: 1, 2"):
        unpack(data)


def test_trailing_bytes():
    body = pack(HEADER, WORDS)[:-4]
    with pytest.raises(CorruptFileError, match="trailing"):
        unpack(_with_crc(body + b"\x00"))
    with pytest.raises(CorruptFileError):
        unpack(pack(HEADER, WORDS) + b"\x00")


def _body_with(**changes) -> bytes:
    """Packs HEADER (minus CRC) after swapping in raw field bytes by name, for invalid values."""
    body = pack(HEADER, WORDS)[:-4]
    offsets = {"mode": 10, "width": 12, "height": 16, "name": 20}
    for field, raw in changes.items():
        start = offsets[field]
        end = start + (2 if field == "mode" else 4 if field in ("width", "height") else 2 + 7)
        body = body[:start] + raw + body[end:]
    return body


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"width": struct.pack("<I", 0)}, "size"),
        ({"height": struct.pack("<I", 65536)}, "size"),
        ({"width": struct.pack("<I", 65535), "height": struct.pack("<I", 65535)}, "exceeds"),
        ({"mode": b"\x04CMYK"}, "unknown image mode"),
        ({"mode": b"\x02\xff\xfe"}, "unknown image mode"),
        ({"name": b"\x02\x00\xff\xfe"}, "UTF-8"),
    ],
)
def test_invalid_fields_with_valid_crc(changes, message):
    with pytest.raises(CorruptFileError, match=message):
        unpack(_with_crc(_body_with(**changes)))


@pytest.mark.parametrize("header,count", [(HEADER, struct.pack("<I", 2**31)), (COMPACT, varint(2**31))],
                         ids=["fixed", "compact"])
def test_huge_payload_count_refused_without_allocating(header, count):
    empty = pack(header, np.zeros(0, np.uint32))[:-4]
    zero = b"\x00" * (1 if header.fmt.compact_header else 4)
    assert empty.endswith(zero)
    data = _with_crc(empty[: -len(zero)] + count + b"\x00" * 16)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CorruptFileError, match="payload"):
        unpack(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 0.5
    assert peak < 1 << 20


def test_huge_icc_length_refused():
    body = pack(HEADER, WORDS)[:-4]
    icc_at = body.index(b"\x03\x00\x00\x00icc")
    damaged = body[:icc_at] + struct.pack("<I", 0xFFFFFFFF) + body[icc_at + 4 :]
    with pytest.raises(CorruptFileError, match="ICC"):
        unpack(_with_crc(damaged))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_refused(data):
    with pytest.raises(CorruptFileError):
        unpack(data)
    with pytest.raises(CorruptFileError):
        unpack(MAGIC + b"\x01\x00" + data)


def test_pack_refuses_invalid_headers():
    from dataclasses import replace

    for bad in [
        replace(HEADER, width=0),
        replace(HEADER, mode="RGB"),  # palette on a non-P image
        replace(HEADER, model_hash=b"short"),
        replace(HEADER, schedule=(70000,)),
        replace(HEADER, transparency=b"Z"),
    ]:
        with pytest.raises(ValueError):
            pack(bad, WORDS)
    with pytest.raises(ValueError):
        pack(HEADER, np.array([-1]))


def test_pixel_checksum_covers_lossless_fields():
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    image = Image("RGB", pixels)
    checksum = pixel_checksum(image)
    assert len(checksum) == 16
    assert pixel_checksum(Image("RGB", pixels.copy())) == checksum
    assert pixel_checksum(Image("RGB", pixels, icc_profile=b"x")) == checksum
    flipped = pixels.copy()
    flipped[1, 3, 2] ^= 1
    others = [
        Image("RGB", flipped),
        Image("RGB", pixels.reshape(4, 2, 3)),
        Image("L", pixels.reshape(2, 12, 1)),
        Image("RGB", pixels, transparency=encode_transparency((0, 0, 0))),
    ]
    assert len({checksum, *(pixel_checksum(o) for o in others)}) == 1 + len(others)
    index = Image("P", np.zeros((1, 1, 1), np.uint8), b"\x00\x00\x00")
    assert pixel_checksum(index) != pixel_checksum(Image("P", index.pixels, b"\x00\x00\x01"))


def test_versions_1_to_9_share_the_layout():
    """Versions 1 to 9 differ in how the payload is coded, not in the header layout, except
    for version 5's effort byte after the runtime."""
    current = pack(HEADER, WORDS)
    payload = 4 + 4 * len(WORDS) + 4  # word count, words, CRC
    for version in [v for v in KNOWN_VERSIONS if not get(v).compact_header]:
        other = pack(dataclasses.replace(HEADER, version=version), WORDS)
        effort = bytes([HEADER.effort]) if version < 5 else b""  # what the older header lacks
        assert other[:8] == current[:8] and other[8] == version
        assert other[10:-payload] + effort == current[10:-payload]
        assert other[-payload:-4] == current[-payload:-4]
        assert unpack(other)[0] == dataclasses.replace(HEADER, version=version)
