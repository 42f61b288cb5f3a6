"""Tests for .vzp archives: vaezip.format.archive (format), api.pack/unpack (chained bits-back,
tile sets across images), bitsback tile sets, and the `vaezip pack` / `unpack` commands.

Everything runs on the tiny seeded models of conftest; the CLI tests map the registry's
model names onto them, so no shipped weights are loaded.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_model, random_image, random_pixels
from PIL import Image as PILImage

from vaezip import api
from vaezip.cli.main import main
from vaezip.coding import bitsback
from vaezip.entropy import coders
from vaezip.errors import CorruptFileError, DecodeMismatchError, InputError, UnsupportedVersionError, VaezipError
from vaezip.format import archive, container, versions
from vaezip.imaging.images import encode_transparency
from vaezip.network import registry
from vaezip.network.inference import coding_network

ICC = b"icc profile \x00\xff"


def _items():
    """Mixed modes and sizes; two runs that share model and tile side (joined when packed)."""
    return [
        ("photos/a.png", random_image("RGB", 17, 23, seed=1, smooth=True, icc_profile=ICC)),
        ("photos/b", random_image("RGBA", 20, 20, seed=2, smooth=True)),  # same tile as a: joined
        ("gray/c.png", random_image("L", 32, 32, seed=3, smooth=True)),
        ("gray/d", random_image("L", 30, 9, seed=4, smooth=True)),  # joined to c
        ("e.png", random_image("P", 5, 7, seed=5, transparency=encode_transparency(3))),
        ("f", random_image("1", 9, 4, seed=6)),
        ("g", random_image("LA", 12, 12, seed=7, smooth=True)),
        ("h", random_image("RGB", 33, 70, seed=8, smooth=True)),  # two tiles of 64
    ]


@pytest.fixture(scope="module")
def models(tiny_model, tiny_gray_model):
    return [tiny_model, tiny_gray_model]


@pytest.fixture(scope="module")
def packed(models):
    return api.pack(_items(), loaded=models)


def _assert_same(items, decoded):
    assert [name for name, _ in decoded] == [name for name, _ in items]
    for (name, a), (_, b) in zip(items, decoded):
        assert (b.mode, b.palette, b.transparency, b.icc_profile) == (a.mode, a.palette, a.transparency, a.icc_profile), name
        np.testing.assert_array_equal(b.pixels, a.pixels, err_msg=name)


# ------------------------------------------------------------------ round trips


def test_round_trip_mixed_modes_and_sizes(packed, models):
    entries, _ = archive.unpack(packed)
    assert [e.joined for e in entries] == [False, True, False, True, False, False, False, False]
    _assert_same(_items(), api.unpack(packed, loaded=models))


def test_round_trip_one_image_at_a_time(models):
    """join=False: every image through push_image / pop_image, one stack."""
    data = api.pack(_items(), loaded=models, join=False)
    assert not any(e.joined for e in archive.unpack(data)[0])
    _assert_same(_items(), api.unpack(data, loaded=models))


def test_single_item_payload_equals_compress(tiny_model):
    """A run of one image is coded exactly as `compress` codes it."""
    img = random_image("RGB", 40, 50, seed=9, smooth=True)
    contents = archive.read(api.pack([("x", img)], loaded=tiny_model))
    header, vz_words = container.unpack(api.compress(img, loaded=tiny_model))
    assert contents.entries[0].header == dataclasses.replace(header, pixel_checksum=archive.NO_CHECKSUM)
    assert contents.checksum == archive.set_checksum([header.pixel_checksum])
    np.testing.assert_array_equal(contents.words, vz_words)


def test_packing_is_repeatable_and_progress_counts_tiles(models):
    seen = []
    first = api.pack(_items(), loaded=models, progress=seen.append)
    assert first == api.pack(_items(), loaded=models)
    tiles = sum(archive.tile_count(e.header) for e in archive.unpack(first)[0])
    assert sum(seen) == tiles == 1 + 1 + 1 + 1 + 1 + 2  # a, b, c, d, g, h (e and f are plane-coded)
    seen.clear()
    api.unpack(first, loaded=models, progress=seen.append)
    assert sum(seen) == tiles


def test_chained_images_borrow_from_the_stack(tiny_model):
    """Each extra copy costs less than a file of its own: its latents are paid with
    bits already on the stack, not at the start-up rate."""
    img = random_image("RGB", 24, 24, seed=10, smooth=True)
    single = len(api.compress(img, loaded=tiny_model))
    for join in (False, True):
        sizes = [len(api.pack([(f"{i}", img) for i in range(n)], loaded=tiny_model, join=join)) for n in (1, 5)]
        per_extra = (sizes[1] - sizes[0]) / 4
        assert per_extra < 0.95 * single, (join, sizes, single)  # measured: 2209 vs 2468 bytes
        entries, _ = archive.unpack(api.pack([(f"{i}", img) for i in range(5)], loaded=tiny_model, join=join))
        flags = [s & bitsback.DETERMINISTIC_FLAG for e in entries for s in e.header.schedule]
        assert flags[0] and not any(flags[1:]), "only the first batch is coded without borrowing"


def test_tile_set_batches_straddle_images_and_restore_the_stack(tiny_gray_model):
    """encode_tile_sets / decode_tile_sets on a pre-filled stack: exact pixels, the stack
    restored word for word, and batches that hold tiles of several images."""
    shapes = [(28, 28), (16, 40), (64, 64), (1, 1), (28, 28)]
    images = [random_pixels("L", h, w, seed=i, smooth=True) for i, (h, w) in enumerate(shapes)]
    params = bitsback.CodingParams(tile=64, latent_grid=tiny_gray_model.spec.config.latent_grid)
    ans = coders.new_coder()
    coders.uniform(1 << 16, 20000).push(ans, np.random.default_rng(0).integers(0, 1 << 16, 20000))
    before = ans.get_compressed().copy()
    with coding_network(tiny_gray_model.net, params.fmt) as net:
        schedule, ans = bitsback.encode_tile_sets(net, ans, images, params)
        ans = coders.new_coder(ans.get_compressed())
        out = bitsback.decode_tile_sets(net, ans, shapes, 1, params, schedule)
    for a, b in zip(images, out):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(ans.get_compressed(), before)
    assert max(s & ~bitsback.DETERMINISTIC_FLAG for s in schedule) > 1


def test_archive_schedule_constant_matches_bitsback():
    assert archive.BATCH_SIZE_MASK == bitsback.DETERMINISTIC_FLAG - 1


# ------------------------------------------------------------------ api refusals


@pytest.mark.parametrize("name", ["", "/abs.png", "../up.png", "a/../b", "a\\b.png", "nul\x00.png", "a//b", "./a",
                                  "a/", "C:/x.png"])
def test_bad_names_are_refused(tiny_model, name):
    assert archive.name_problem(name)
    with pytest.raises(InputError):
        api.pack([(name, random_image("P", 2, 2))], loaded=tiny_model)


def test_good_names(tmp_path):
    for name in ["a", "a.png", "dir/sub/ü.png", ".hidden", "a b/c..d"]:
        assert archive.name_problem(name) == "", name


def test_duplicate_names_and_empty_sets_are_refused(tiny_model):
    img = random_image("P", 2, 2)
    with pytest.raises(InputError, match="duplicate"):
        api.pack([("x", img), ("y", img), ("x", img)], loaded=tiny_model)
    with pytest.raises(InputError):
        api.pack([], loaded=tiny_model)


# ------------------------------------------------------------------ format


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _parts(data: bytes):
    """(count, raw table, payload bytes incl. its count) of a valid archive."""
    count, size, zsize = struct.unpack_from("<III", data, 10)
    table = zlib.decompress(data[22:22 + zsize])
    assert len(table) == size
    return count, table, data[22 + zsize:-4]


def _rebuild(count: int, table: bytes, payload: bytes, version: int = versions.NEWEST_FLOAT.version,
             magic: bytes = archive.MAGIC) -> bytes:
    packed_table = zlib.compress(table, 9)
    return _with_crc(magic + struct.pack("<HIII", version, count, len(table), len(packed_table)) + packed_table + payload)


def _pin_header(version: int) -> container.Header:
    return container.Header(mode="P", width=3, height=2, model_name="", model_hash=bytes(8), tile_size=0,
                            schedule=(), num_initial_words=0, pixel_checksum=bytes(range(16)),
                            palette=b"\x01\x02\x03", runtime="rt", version=version)


PIN_WORDS = np.array([7, 0xFFFFFFFF], dtype=np.uint32)
PIN_PAYLOAD = b"\x02\x00\x00\x00\x07\x00\x00\x00\xff\xff\xff\xff"


@pytest.mark.parametrize("version", [2, 3])
def test_layout_is_pinned(version):
    """Versions 2 and 3 share the table layout (they differ in how payloads are coded)."""
    header = _pin_header(version)
    data = archive.pack([archive.Entry("n.png", header)], PIN_WORDS)
    table = b"".join([
        b"\x02\x00rt", archive.set_checksum([bytes(range(16))]),
        b"\x00\x05\x00n.png",  # names: listed
        b"\x00", b"\x01P", b"\x03\x00\x00\x00\x02\x00\x00\x00", b"\x00\x00" + bytes(8), b"\x00\x00",  # flags .. tile
        b"\x00\x00", b"\x03\x00\x01\x02\x03", b"\x00\x00", b"\x00\x00\x00\x00",  # schedule .. ICC
    ])
    assert data == _rebuild(1, table, PIN_PAYLOAD, version=version)
    assert data[:8] == b"VZPK\r\n\x1a\n" and archive.MAGIC != container.MAGIC
    contents = archive.read(data)
    assert contents.entries == [archive.Entry("n.png", dataclasses.replace(header, pixel_checksum=archive.NO_CHECKSUM))]
    assert contents.checksum == archive.set_checksum([header.pixel_checksum]) and contents.version == version


def test_version_1_layout_is_pinned():
    header = _pin_header(1)
    data = archive.pack([archive.Entry("n.png", header)], PIN_WORDS)
    record = b"\x05\x00n.png" + b"\x00" + container.header_fields(header)
    assert data == _rebuild(1, record, PIN_PAYLOAD, version=1)
    # The record's header fields are byte for byte those of a .vz file.
    vz = container.pack(header, PIN_WORDS)
    assert vz[10:10 + len(container.header_fields(header))] == container.header_fields(header)
    assert archive.unpack(data)[0] == [archive.Entry("n.png", header)]


@pytest.mark.parametrize("names,expected", [
    (["0000", "0001", "0002"], ("", 0, 4, "")),
    (["img_7.png", "img_8.png", "img_9.png", "img_10.png"], ("img_", 7, 1, ".png")),  # padded to at least 1
    (["a/x9.png", "a/x10.png"], ("a/x", 9, 1, ".png")),
    (["set2/img_099.png", "set2/img_100.png"], ("set2/img_", 99, 3, ".png")),
    (["a.png"], None),
    (["01", "03"], None),
])
def test_numbered_names(names, expected):
    assert archive.numbered_names(names) == expected


def test_numbered_names_cost_no_table_bytes(tiny_gray_model):
    """10 numbered 1x1 images vs the same with one odd name: the template is a few bytes."""
    img = random_image("L", 1, 1, seed=0)
    numbered = archive.read(api.pack([(f"{i:03d}.png", img) for i in range(10)], loaded=tiny_gray_model))
    assert [e.name for e in numbered.entries] == [f"{i:03d}.png" for i in range(10)]
    data = api.pack([(f"{i:03d}.png", img) for i in range(10)], loaded=tiny_gray_model)
    listed = api.pack([(f"{i:03d}.png", img) for i in range(9)] + [("other.png", img)], loaded=tiny_gray_model)
    assert len(_parts(data)[1]) + 50 < len(_parts(listed)[1])


def test_archives_refuse_mixed_versions_and_runtimes(packed):
    entries, words = archive.unpack(packed)
    mixed = [archive.Entry(e.name, dataclasses.replace(e.header, version=1), e.joined) if i == 0 else e
             for i, e in enumerate(entries)]
    with pytest.raises(ValueError, match="versions"):
        archive.pack(mixed, words)
    other = [archive.Entry(e.name, dataclasses.replace(e.header, runtime="x"), e.joined) if i == 0 else e
             for i, e in enumerate(entries)]
    with pytest.raises(ValueError, match="runtimes"):
        archive.pack(other, words)


def test_a_wrong_image_fails_the_set_checksum(packed, models):
    """Decoding that yields other pixels (here: a forged set checksum) is an error, never a result."""
    count, table, payload = _parts(packed)
    runtime_length = struct.unpack_from("<H", table)[0]
    at = 2 + runtime_length
    forged = table[:at] + bytes(16) + table[at + 16:]
    with pytest.raises(DecodeMismatchError, match="archive's checksum"):
        api.unpack(_rebuild(count, forged, payload), loaded=models)


def test_every_truncation_is_corrupt(packed):
    for length in range(len(packed)):
        with pytest.raises(CorruptFileError):
            archive.unpack(packed[:length])
    for length in (0, 9, 30, len(packed) // 2, len(packed) - 1):
        with pytest.raises(CorruptFileError):
            api.unpack(packed[:length])


def test_random_bit_flips_are_corrupt(packed):
    rng = np.random.default_rng(0)
    for bit in rng.choice(8 * len(packed), size=400, replace=False):
        damaged = bytearray(packed)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptFileError):
            archive.unpack(bytes(damaged))


def test_payload_damage_behind_a_valid_crc_is_a_typed_error(packed, models):
    _, _, payload = _parts(packed)
    body = packed[:-4 - len(payload)]
    rng = np.random.default_rng(1)
    for _ in range(4):
        damaged = bytearray(payload)
        position = int(rng.integers(4, len(payload)))
        damaged[position] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises((CorruptFileError, DecodeMismatchError)):
            api.unpack(_with_crc(body + bytes(damaged)), loaded=models)


def _set_flag(table: bytes, flags: int) -> bytes:
    """The table with the first image's flags byte (the column after the names) set."""
    at = table.index(b"\x01\x00h") + 3  # the last name, "h", ends the names block
    assert table[at:at + 8] == bytes([0, 1, 0, 1, 0, 0, 0, 0])
    return table[:at] + bytes([flags]) + table[at + 1:]


def test_crafted_fields_are_corrupt(packed):
    count, table, payload = _parts(packed)
    cases = {
        "huge count": _rebuild(0xFFFFFFFF, table, payload),
        "zero count": _rebuild(0, table, payload),
        "count too high": _rebuild(count + 1, table, payload),
        "count too low": _rebuild(count - 1, table, payload),
        "trailing bytes": _rebuild(count, table, payload + b"\x00"),
        "payload count": _rebuild(count, table, struct.pack("<I", 0xFFFFFFFF) + payload[4:]),
        "unknown flag": _rebuild(count, _set_flag(table, 0x02), payload),
        "first joined": _rebuild(count, _set_flag(table, 0x01), payload),
        "unknown name kind": _rebuild(count, table.replace(b"\x00\x0c\x00photos/a.png", b"\x02\x0c\x00photos/a.png", 1), payload),
        "absolute name": _rebuild(count, table.replace(b"photos/a.png", b"/hotos/a.png", 1), payload),
        "dotdot name": _rebuild(count, table.replace(b"photos/a.png", b"../tos/a.png", 1), payload),
        "backslash name": _rebuild(count, table.replace(b"photos/a.png", b"photos\\a.png", 1), payload),
        "NUL name": _rebuild(count, table.replace(b"photos/a.png", b"photos/a\x00png", 1), payload),
        "duplicate name": _rebuild(count, table.replace(b"photos/b", b"gray/d\x00\x00").replace(
            b"\x08\x00gray/d\x00\x00", b"\x06\x00gray/d", 1), payload),
        "bad UTF-8": _rebuild(count, table.replace(b"photos/a.png", b"photos/a.pn\xff", 1), payload),
        "not zlib": _with_crc(packed[:22] + b"\x00" * 8 + packed[30:-4]),
    }
    for what, data in cases.items():
        with pytest.raises(CorruptFileError):
            archive.unpack(data)
            pytest.fail(what)


def test_table_size_claims_are_checked_before_inflating(packed):
    count, table, payload = _parts(packed)
    packed_table = zlib.compress(table, 9)
    head = archive.MAGIC + struct.pack("<H", versions.CURRENT.version)
    for size, zsize in [(0xFFFFFFFF, len(packed_table)), (len(table), 0xFFFFFFFF), (len(table) - 1, len(packed_table)),
                        (len(table) + 1, len(packed_table))]:
        data = _with_crc(head + struct.pack("<III", count, size, zsize) + packed_table + payload)
        with pytest.raises(CorruptFileError):
            archive.unpack(data)


def test_structured_fuzz_never_escapes_as_another_exception(packed, models):
    """Random byte changes inside the record table, CRC recomputed: CorruptFileError, or a
    table that parses; of those, the first few decoded give a VaezipError or exactly the
    original images (names are not checksummed: a changed name may decode under it)."""
    count, table, payload = _parts(packed)
    _, original_words = archive.unpack(packed)
    expected = _items()
    rng = np.random.default_rng(2)
    outcomes = {"refused": 0, "parsed": 0, "decode refused": 0, "decoded exactly": 0}
    for _ in range(500):
        damaged = bytearray(table)
        for _ in range(int(rng.integers(1, 4))):
            damaged[int(rng.integers(0, len(damaged)))] = int(rng.integers(0, 256))
        data = _rebuild(count, bytes(damaged), payload)
        try:
            entries, words = archive.unpack(data)
        except CorruptFileError:
            outcomes["refused"] += 1
            continue
        outcomes["parsed"] += 1
        assert len(entries) == count and np.array_equal(words, original_words)
        if outcomes["parsed"] > 12:  # decoding is the slow part: a sample of the parsed tables
            continue
        try:
            decoded = api.unpack(data, loaded=models)
        except VaezipError:
            outcomes["decode refused"] += 1
            continue
        _assert_same(expected, [(name, image) for (name, _), (_, image) in zip(expected, decoded)])
        outcomes["decoded exactly"] += 1
    assert all(outcomes.values()), outcomes  # every path exercised


def test_version_and_foreign_magic(packed, tiny_model):
    count, table, payload = _parts(packed)
    unknown = max(versions.KNOWN_VERSIONS) + 1
    with pytest.raises(UnsupportedVersionError, match=f"version {unknown}"):
        archive.unpack(_rebuild(count, table, payload, version=unknown))
    with pytest.raises(CorruptFileError):  # a version 3 table read as version 1
        archive.unpack(_rebuild(count, table, payload, version=1))
    with pytest.raises(CorruptFileError, match="wrong magic"):
        archive.unpack(b"\x89PNG\r\n\x1a\n" + packed[8:])
    with pytest.raises(CorruptFileError, match=r"\.vz file"):
        archive.unpack(api.compress(random_image("P", 2, 2), loaded=tiny_model))


def test_joined_images_must_share_model_and_tile(packed):
    entries, words = archive.unpack(packed)
    other = container.Header(**{**entries[1].header.__dict__, "tile_size": 64, "schedule": ()})
    with pytest.raises(ValueError, match="joined"):
        archive.pack([entries[0], archive.Entry("photos/b", other, joined=True)] + entries[2:], words)
    moved = [archive.Entry(e.name, container.Header(**{**e.header.__dict__, "schedule": ()}), e.joined)
             if i == 0 else e for i, e in enumerate(entries)]
    with pytest.raises(ValueError, match="schedule"):
        archive.pack(moved, words)


# ------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def tiny_under_registry_names():
    return {name: make_tiny_model(channels, name)
            for name, channels in [(registry.default_model("RGB"), 3), (registry.default_model("L"), 1)]}


@pytest.fixture
def tiny_registry(monkeypatch, tiny_under_registry_names):
    """The CLI's default models load as tiny seeded models under the same names (no shipped weights)."""
    monkeypatch.setattr(registry, "load_model", lambda name: tiny_under_registry_names[name])


def _save(path, mode: str, h: int, w: int, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = random_image(mode, h, w, seed=seed, smooth=True)
    pixels = img.pixels[:, :, 0] if img.channels == 1 else img.pixels
    pil = PILImage.fromarray(pixels.astype(bool) if mode == "1" else pixels, mode)
    if mode == "P":
        pil.putpalette(img.palette)
    pil.save(path)
    return np.asarray(pil)


def _folder(root):
    return {
        "a.png": _save(root / "a.png", "RGB", 12, 20, 1),
        "sub/b.png": _save(root / "sub" / "b.png", "L", 9, 9, 2),
        "sub/deeper/c.png": _save(root / "sub" / "deeper" / "c.png", "P", 5, 6, 3),
        "d.png": _save(root / "d.png", "1", 7, 3, 4),
    }


def test_cli_pack_and_unpack_a_folder(tmp_path, tiny_registry):
    expected = _folder(tmp_path / "in")
    runner = CliRunner()
    result = runner.invoke(main, ["pack", str(tmp_path / "in"), "-o", str(tmp_path / "set.vzp")])
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "bits/subpixel" in result.output
    names = [e.name for e in archive.unpack((tmp_path / "set.vzp").read_bytes())[0]]
    assert sorted(names) == sorted(expected)
    result = runner.invoke(main, ["unpack", str(tmp_path / "set.vzp"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for name, pixels in expected.items():
        with PILImage.open(tmp_path / "out" / name) as im:
            np.testing.assert_array_equal(np.asarray(im), pixels)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == sorted(expected)


def test_cli_pack_and_unpack_json(tmp_path, tiny_registry):
    """--json: one document on stdout whose numbers are those of the files written."""
    import json

    expected = _folder(tmp_path / "in")
    vzp = tmp_path / "set.vzp"
    result = CliRunner().invoke(main, ["pack", str(tmp_path / "in"), "-o", str(vzp), "--json"])
    assert result.exit_code == 0, result.output
    packed = json.loads(result.stdout)
    subpixels = {name: pixels.shape[0] * pixels.shape[1] * (3 if pixels.ndim == 3 else 1)
                 for name, pixels in expected.items()}
    assert packed["output"] == str(vzp) and packed["output_bytes"] == vzp.stat().st_size
    assert {i["name"]: i["subpixels"] for i in packed["images"]} == subpixels
    assert {i["name"]: i["input"] for i in packed["images"]} == {n: str(tmp_path / "in" / n) for n in expected}
    assert packed["input_bytes"] == sum((tmp_path / "in" / n).stat().st_size for n in expected)
    assert packed["subpixels"] == sum(subpixels.values())
    assert packed["bpd"] == pytest.approx(8 * vzp.stat().st_size / packed["subpixels"])
    assert packed["seconds"] >= 0

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["unpack", str(vzp), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    unpacked = json.loads(result.stdout)
    assert unpacked["input"] == str(vzp) and unpacked["output"] == str(out)
    assert unpacked["input_bytes"] == vzp.stat().st_size and unpacked["subpixels"] == packed["subpixels"]
    assert unpacked["bpd"] == pytest.approx(packed["bpd"]) and unpacked["seconds"] >= 0
    assert sorted(i["name"] for i in unpacked["images"]) == sorted(expected)
    for record in unpacked["images"]:
        assert record["output"] == str(out / record["name"])
        with PILImage.open(record["output"]) as im:
            np.testing.assert_array_equal(np.asarray(im), expected[record["name"]])
            assert (record["width"], record["height"], record["mode"]) == (im.width, im.height, im.mode)
        assert record["subpixels"] == subpixels[record["name"]]

    # Errors stay one line on stderr, stdout empty.
    result = CliRunner().invoke(main, ["unpack", str(vzp), "-o", str(out), "--json"])
    assert result.exit_code == 1 and result.stdout == "" and "--force" in result.stderr


def test_cli_force(tmp_path, tiny_registry):
    _folder(tmp_path / "in")
    runner = CliRunner()
    target = tmp_path / "set.vzp"
    target.write_bytes(b"keep me")
    result = runner.invoke(main, ["pack", str(tmp_path / "in"), "-o", str(target)])
    assert result.exit_code == 1 and "--force" in result.output and target.read_bytes() == b"keep me"
    assert runner.invoke(main, ["pack", str(tmp_path / "in"), "-o", str(target), "--force"]).exit_code == 0
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "b.png").write_bytes(b"old")
    result = runner.invoke(main, ["unpack", str(target), "-o", str(out)])
    assert result.exit_code == 1 and "--force" in result.output
    assert (out / "sub" / "b.png").read_bytes() == b"old" and not (out / "a.png").exists(), "nothing written"
    result = runner.invoke(main, ["unpack", str(target), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "sub" / "b.png").read_bytes() != b"old" and (out / "a.png").exists()
    assert not list(out.rglob("*.tmp")), "no temporary files left"


def test_cli_refuses_bad_and_clashing_names(tmp_path, tiny_registry, tiny_model):
    runner = CliRunner()
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "back\\slash.png", "L", 4, 4, 1)
    result = runner.invoke(main, ["pack", str(tmp_path / "in"), "-o", str(tmp_path / "s.vzp")])
    assert result.exit_code == 1 and "backslash" in result.output and not (tmp_path / "s.vzp").exists()
    _save(tmp_path / "x" / "a.png", "L", 4, 4, 1)
    _save(tmp_path / "y" / "a.png", "L", 4, 4, 2)
    result = runner.invoke(main, ["pack", str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.png"),
                                  "-o", str(tmp_path / "s.vzp")])
    assert result.exit_code == 1 and "both be stored" in result.output
    # Members "a" and "a.png" would both unpack to a.png: refused before writing anything.
    img = random_image("P", 2, 2)
    (tmp_path / "clash.vzp").write_bytes(api.pack([("z", img), ("a", img), ("a.png", img)], loaded=tiny_model))
    result = runner.invoke(main, ["unpack", str(tmp_path / "clash.vzp"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "both be written" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_damaged_archive_is_one_line(tmp_path, tiny_registry):
    _folder(tmp_path / "in")
    runner = CliRunner()
    assert runner.invoke(main, ["pack", str(tmp_path / "in"), "-o", str(tmp_path / "s.vzp")]).exit_code == 0
    data = (tmp_path / "s.vzp").read_bytes()
    (tmp_path / "bad.vzp").write_bytes(data[:-3])
    result = runner.invoke(main, ["unpack", str(tmp_path / "bad.vzp"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(main, ["pack", str(tmp_path / "missing"), "-o", str(tmp_path / "t.vzp")])
    assert result.exit_code == 1 and "no such file" in result.output
