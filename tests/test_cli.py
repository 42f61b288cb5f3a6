"""Tests for the `vaezip` command line: names, --force, -o, errors as one line, no stray files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_image
from PIL import Image as PILImage

from vaezip import api
from vaezip.cli.main import main
from vaezip.format import container
from vaezip.imaging.images import pixels_equal, read_image, write_png
from vaezip.network import registry


def _run(*args, cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, [str(a) for a in args])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def _ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def _one_line_error(result, *needles: str) -> str:
    """The command failed with exactly one line on stderr, no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_temp_files(folder: Path) -> None:
    stray = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not stray, stray


@pytest.fixture
def png(tmp_path) -> Path:
    """A small RGB PNG (one 32x32 tile of the shipped model)."""
    path = tmp_path / "img.png"
    write_png(random_image("RGB", 20, 27, seed=1, smooth=True), path)
    return path


def test_compress_decompress_default_names_and_force(png, tmp_path):
    original = read_image(png)
    _ok(_run("compress", png))
    vz_path = png.with_name("img.png.vz")
    assert vz_path.is_file() and png.is_file()  # input kept

    # IMG.vz -> IMG, which exists: refused, and untouched.
    before = png.read_bytes()
    result = _run("decompress", vz_path)
    _one_line_error(result, "exists")
    assert png.read_bytes() == before

    _ok(_run("decompress", vz_path, "-o", tmp_path / "back.png"))
    assert pixels_equal(read_image(tmp_path / "back.png"), original)

    png.unlink()
    _ok(_run("decompress", vz_path))
    assert pixels_equal(read_image(png), original)

    # --force overwrites (with a different file in the way).
    png.write_bytes(b"something else")
    _ok(_run("decompress", "--force", vz_path))
    assert pixels_equal(read_image(png), original)
    _no_temp_files(tmp_path)


def test_compress_refuses_existing_output_without_force(png, tmp_path):
    target = tmp_path / "taken.vz"
    target.write_bytes(b"precious")
    result = _run("compress", png, "-o", target)
    _one_line_error(result, "taken.vz", "--force")
    assert target.read_bytes() == b"precious"
    _ok(_run("compress", png, "-o", target, "-f"))
    assert api.decompress(target.read_bytes()).shape == (20, 27, 3)
    _no_temp_files(tmp_path)


def test_decompressed_name_without_png_suffix(tmp_path):
    image = random_image("1", 9, 14, seed=3)
    (tmp_path / "scan.vz").write_bytes(api.compress(image))
    (tmp_path / "raw").write_bytes(api.compress(image))
    _ok(_run("decompress", tmp_path / "scan.vz", tmp_path / "raw"))
    assert pixels_equal(read_image(tmp_path / "scan.png"), image)
    assert pixels_equal(read_image(tmp_path / "raw.png"), image)


def test_several_inputs_into_an_output_folder(tmp_path):
    images = {f"im{k}.png": random_image(mode, 8 + k, 5 + k, seed=k) for k, mode in enumerate(["P", "1", "RGB"])}
    for name, image in images.items():
        write_png(image, tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    _ok(_run("compress", *[tmp_path / n for n in images], "-o", out))
    assert sorted(p.name for p in out.iterdir()) == sorted(n + ".vz" for n in images)
    back = tmp_path / "back"
    back.mkdir()
    _ok(_run("decompress", *sorted(out.iterdir()), "-o", back))
    for name, image in images.items():
        assert pixels_equal(read_image(back / name), image)

    # -o that is not a folder, with several inputs.
    result = _run("compress", tmp_path / "im0.png", tmp_path / "im1.png", "-o", tmp_path / "nofolder")
    _one_line_error(result, "nofolder")
    assert not (tmp_path / "nofolder").exists()
    _no_temp_files(tmp_path)


def test_one_existing_output_refuses_the_whole_batch(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(random_image("P", 4, 4), tmp_path / name)
    (tmp_path / "b.png.vz").write_bytes(b"old")
    _one_line_error(_run("compress", tmp_path / "a.png", tmp_path / "b.png"), "b.png.vz")
    assert not (tmp_path / "a.png.vz").exists()
    assert (tmp_path / "b.png.vz").read_bytes() == b"old"


def test_missing_input_and_text_file(tmp_path):
    _one_line_error(_run("compress", tmp_path / "nope.png"), "nope.png")
    _one_line_error(_run("decompress", tmp_path / "nope.vz"), "nope.vz")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image\n")
    _one_line_error(_run("compress", text), "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name,make,mode,says", [
    ("print.tif", lambda: PILImage.new("CMYK", (5, 4), (1, 2, 3, 4)), "CMYK", "CMYK"),
    ("float.tif", lambda: PILImage.fromarray(np.ones((3, 4), np.float32)), "F", "float"),
])
def test_unsupported_mode_names_the_mode(tmp_path, name, make, mode, says):
    path = tmp_path / name
    make().save(path)
    assert PILImage.open(path).mode == mode
    _one_line_error(_run("compress", path), says)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def _damaged_files(data: bytes):
    """(label, bytes) of broken versions of a .vz file."""
    out = [(f"truncated-{n}", data[:n]) for n in (0, 1, 7, 8, 10, 30, len(data) // 2, len(data) - 5, len(data) - 1)]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    out.append(("flipped-bit", bytes(flipped)))
    header, words = container.unpack(data)
    words = words.copy()
    words[0] ^= np.uint32(1 << 7)
    out.append(("payload-bit-valid-crc", container.pack(header, words)))  # passes the CRC, fails decoding
    out.append(("trailing-byte", data + b"\x00"))
    return out


def test_damaged_and_foreign_files_fail_cleanly(tmp_path, png):
    data = api.compress(random_image("RGB", 20, 27, seed=5, smooth=True))
    cases = _damaged_files(data) + [("foreign-png", png.read_bytes())]
    work = tmp_path / "work"
    work.mkdir()
    for label, blob in cases:
        source = work / f"{label}.vz"
        source.write_bytes(blob)
        result = _run("decompress", source)
        _one_line_error(result)
        assert not (work / f"{label}.png").exists(), label
        source.unlink()
    assert not list(work.iterdir())  # no output and no temporary file left behind
    _one_line_error(_run("info", png), "magic")


@pytest.mark.parametrize("command", ["compress", "decompress", "info", "unpack"])
def test_bad_input_is_exit_1_with_one_vaezip_error_line(tmp_path, command):
    """Every command reports a missing or folder input the same way: `vaezip: error: ...`, exit 1
    (compress takes folders: an empty one has no images)."""
    extra = ["-o", tmp_path / "out"] if command == "unpack" else []
    for bad, needle in [(tmp_path / "nope.vz", "nope.vz"), (tmp_path, "no images" if command == "compress" else "directory")]:
        result = _run(command, bad, *extra)
        line = _one_line_error(result, needle)
        assert result.exit_code == 1 and line.startswith("vaezip: error: "), (result.exit_code, line)


def test_info_and_models(tmp_path, png):
    _ok(_run("compress", png))
    result = _run("info", png.with_name("img.png.vz"))
    _ok(result)
    assert "27x20 RGB" in result.output
    assert registry.default_model("RGB") in result.output
    assert "written by: - (not recorded" in result.output  # format version 10 leaves the runtime out
    older = _run("info", Path(__file__).parent / "golden" / "v9" / "rgb_kodim23_48x40.vz")
    _ok(older)
    assert "format version 9" in older.output and "torch=" in older.output  # the runtime that wrote it

    plane = tmp_path / "p.vz"
    plane.write_bytes(api.compress(random_image("P", 5, 6)))
    result = _run("info", plane)
    _ok(result)
    assert "6x5 P" in result.output and "plane coder" in result.output

    result = _run("models")
    _ok(result)
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    for name in ("photo-rgb-1", "photo-gray-1", "mnist-1"):
        assert name in names


def test_bpd_json(png):
    result = _run("bpd", "--json", "--samples", "2", png)
    _ok(result)
    obj = json.loads(result.stdout)
    obj = obj[0] if isinstance(obj, list) else obj
    for key in ("model", "nelbo_bpd", "coded_bpd", "file_bpd", "iwae_bpd"):
        assert key in obj, key
    assert obj["model"] == registry.default_model("RGB")
    for key in ("nelbo_bpd", "coded_bpd", "file_bpd", "iwae_bpd"):
        assert isinstance(obj[key], float) and 0 < obj[key] < 16


def test_compress_decompress_info_json(tmp_path):
    """--json: one document on stdout whose numbers are those of the files written."""
    images = {"a.png": random_image("RGB", 20, 27, seed=1, smooth=True), "b.png": random_image("P", 6, 5, seed=2)}
    for name, image in images.items():
        write_png(image, tmp_path / name)
    sources = [tmp_path / name for name in images]
    result = _run("compress", "--json", *sources)
    _ok(result)
    records = json.loads(result.stdout)
    assert [r["input"] for r in records] == [str(s) for s in sources]
    for record, source, image in zip(records, sources, images.values()):
        vz = Path(record["output"])
        assert vz == source.with_name(source.name + ".vz")
        assert record["input_bytes"] == source.stat().st_size and record["output_bytes"] == vz.stat().st_size
        assert record["subpixels"] == image.num_subpixels
        assert record["bpd"] == pytest.approx(8 * vz.stat().st_size / image.num_subpixels)
        assert record["ratio"] == pytest.approx(image.num_subpixels / vz.stat().st_size)
        assert record["seconds"] >= 0

    vz_files = [Path(r["output"]) for r in records]
    out = tmp_path / "back"
    out.mkdir()
    result = _run("decompress", "--json", *vz_files, "-o", out)
    _ok(result)
    records = json.loads(result.stdout)
    assert [r["input"] for r in records] == [str(v) for v in vz_files]
    for record, vz, (name, image) in zip(records, vz_files, images.items()):
        png = out / name
        assert record["output"] == str(png) and pixels_equal(read_image(png), image)
        assert record["input_bytes"] == vz.stat().st_size and record["output_bytes"] == png.stat().st_size
        assert (record["width"], record["height"], record["mode"]) == (image.width, image.height, image.mode)
        assert record["subpixels"] == image.num_subpixels
        assert record["bpd"] == pytest.approx(8 * vz.stat().st_size / image.num_subpixels)

    result = _run("info", "--json", vz_files[0])
    _ok(result)
    info = json.loads(result.stdout)
    header, words = container.unpack(vz_files[0].read_bytes())
    assert info["file"] == str(vz_files[0]) and info["bytes"] == vz_files[0].stat().st_size
    assert (info["width"], info["height"], info["mode"], info["version"]) == (27, 20, "RGB", header.version)
    assert info["model"] == registry.default_model("RGB") and info["model_hash"] == header.model_hash.hex()
    assert info["tile_size"] == header.tile_size and info["batches"] == len(header.schedule)
    assert info["deterministic_batches"] == sum(1 for e in header.schedule if e & container.DETERMINISTIC_FLAG) >= 1
    assert info["payload_words"] == len(words) and info["header_bytes"] == info["bytes"] - 4 * len(words)
    assert info["bpd"] == pytest.approx(8 * info["bytes"] / (27 * 20 * 3))
    assert info["icc_profile_bytes"] == 0 and info["runtime"] is None  # not recorded in version 10
    plane = json.loads(_run("info", "--json", vz_files[1]).stdout)
    assert plane["model"] is None and plane["mode"] == "P" and plane["batches"] == 0

    # Errors stay one line on stderr, stdout empty.
    result = _run("decompress", "--json", vz_files[0], "-o", out)
    assert result.exit_code == 1 and result.stdout == "" and "--force" in result.stderr


def test_models_json():
    from vaezip.network import registry

    result = _run("models", "--json")
    _ok(result)
    records = json.loads(result.stdout)
    assert [r["name"] for r in records] == list(registry.specs())
    for record in records:
        spec = registry.get_spec(record["name"])
        assert record == {"name": spec.name, "file": spec.file, "modes": list(spec.modes), "sha256": spec.sha256,
                          "bpd": spec.bpd}


def test_usage_errors_exit_nonzero():
    assert _run("compress").exit_code != 0  # no inputs
    assert _run("frobnicate").exit_code != 0
    result = _run("--help")
    _ok(result)
    for command in ("compress", "decompress", "info", "models", "bpd"):
        assert command in result.output


def test_progress_bars_draw_on_stderr(monkeypatch):
    """The bar is gated on stderr being a terminal and drawn there, never into stdout's results."""
    import io

    from vaezip.cli import main as cli_main

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar, _ = cli_main._progress(3, "test")
    assert bar.console.file is sys.stderr
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar, _ = cli_main._progress(3, "test")
    assert isinstance(bar, cli_main._NoProgress)


def test_installed_entry_point(tmp_path, png):
    """The console script installed by pip runs (one real process; the rest use CliRunner)."""
    script = Path(sys.executable).parent / "vaezip"
    if not script.exists():
        pytest.skip("vaezip console script not installed beside this interpreter")
    out = tmp_path / "x.vz"
    proc = subprocess.run([str(script), "compress", str(png), "-o", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "x.vz" in proc.stdout
    assert pixels_equal(api.decompress_image(out.read_bytes()), read_image(png))


def test_outputs_get_the_usual_file_mode(png, tmp_path):
    """Outputs are made from a mkstemp file (0600); they must end up as the umask says, like the inputs."""
    old = os.umask(0o022)
    try:
        _ok(_run("compress", png, "-o", tmp_path / "a.vz"))
        _ok(_run("decompress", tmp_path / "a.vz", "-o", tmp_path / "a.png"))
    finally:
        os.umask(old)
    for name in ("a.vz", "a.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB, with no pixel data (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_one_line(tmp_path):
    """A file claiming 100000x100000 pixels is refused from its header, before any pixel is decoded."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    _one_line_error(_run("compress", bomb), "bomb.png", "too large")
    _one_line_error(_run("pack", bomb, "-o", tmp_path / "set.vzp"), "bomb.png", "too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png"]


def _image_tree(root: Path) -> dict[str, object]:
    """A folder of small images in three modes, one in a subfolder, and a non-image."""
    images = {"a.png": random_image("RGB", 20, 27, seed=1, smooth=True),
              "b.png": random_image("L", 18, 9, seed=2, smooth=True),
              "sub/c.png": random_image("RGBA", 12, 30, seed=3, smooth=True)}
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_png(image, root / name)
    (root / "notes.txt").write_text("not an image")
    return images


def test_compress_a_folder_with_jobs_keeps_the_tree_and_the_bytes(tmp_path):
    """--jobs 2 (worker processes) writes the same files as --jobs 1, under -o at the
    images' relative paths; each decodes to its image."""
    images = _image_tree(tmp_path / "in")
    result = _run("compress", tmp_path / "in", "-o", tmp_path / "one")
    _ok(result)
    assert result.output.count("bits/subpixel") == 3
    result = _run("compress", tmp_path / "in", "-o", tmp_path / "two", "--jobs", "2", "--json")
    _ok(result)
    records = json.loads(result.stdout)  # in input order, whichever worker finished first
    assert [(r["input"], r["output"]) for r in records] == \
        [(str(tmp_path / "in" / n), str(tmp_path / "two" / f"{n}.vz")) for n in sorted(images)]
    assert [r["output_bytes"] for r in records] == [Path(r["output"]).stat().st_size for r in records]
    for name, image in images.items():
        data = (tmp_path / "two" / f"{name}.vz").read_bytes()
        assert data == (tmp_path / "one" / f"{name}.vz").read_bytes(), name
        assert pixels_equal(api.decompress_image(data), image)
    assert sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*.vz")) == \
        ["a.png.vz", "b.png.vz", "sub/c.png.vz"]
    _no_temp_files(tmp_path)


def test_compress_a_folder_in_place_and_its_errors(tmp_path):
    _image_tree(tmp_path / "in")
    _ok(_run("compress", tmp_path / "in"))
    assert (tmp_path / "in" / "sub" / "c.png.vz").is_file()
    _one_line_error(_run("compress", tmp_path / "in", "--jobs", "2"), "exists")  # checked before any work
    (tmp_path / "empty").mkdir()
    _one_line_error(_run("compress", tmp_path / "empty"), "no images")
    _one_line_error(_run("compress", tmp_path / "in", "-o", tmp_path / "in" / "a.png"), "folder")


def test_png_level_changes_the_size_not_the_pixels(tmp_path):
    source = tmp_path / "a.png"
    write_png(random_image("RGB", 40, 56, seed=4, smooth=True), source)
    _ok(_run("compress", source))
    sizes = {}
    for level in (0, 9):
        out = tmp_path / f"level{level}.png"
        _ok(_run("decompress", tmp_path / "a.png.vz", "-o", out, "--png-level", level))
        assert pixels_equal(read_image(out), read_image(source))
        sizes[level] = out.stat().st_size
    assert sizes[0] > sizes[9]
    bad = _run("decompress", tmp_path / "a.png.vz", "-o", tmp_path / "x.png", "--png-level", 10)
    assert bad.exit_code == 2 and "png-level" in bad.output and not (tmp_path / "x.png").exists()
