"""Several `vaezip` processes on one folder at once do not collide.

Real processes (`python -m vaezip.cli.main`), started together: different outputs
in one folder all arrive; racing for one name without --force, exactly one wins
and the rest fail with one line; with --force the last rename wins and the file
is whole. Never a temporary file left behind. Each process pays the torch import,
so the races use three processes at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_image

from vaezip import api
from vaezip.imaging.images import pixels_equal, read_image, write_png

PROCESSES = 3
TIMEOUT_S = 120


def _start(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "vaezip.cli.main", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, in order."""
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def _no_temp_files(folder: Path) -> None:
    stray = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not stray, stray


def _sources(folder: Path, count: int) -> list[Path]:
    """`count` different tiny images: each process's output can be told apart."""
    folder.mkdir()
    modes = ["RGB", "L", "RGBA", "P"]
    paths = []
    for k in range(count):
        path = folder / f"im{k}.png"
        write_png(random_image(modes[k % len(modes)], 12 + k, 16, seed=k, smooth=True), path)
        paths.append(path)
    return paths


def test_different_images_into_one_folder(tmp_path):
    sources = _sources(tmp_path / "src", PROCESSES)
    out, back = tmp_path / "out", tmp_path / "back"
    out.mkdir()
    back.mkdir()
    for status, _, stderr in _finish([_start("compress", p, "-o", out) for p in sources]):
        assert status == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name + ".vz" for p in sources)

    for status, _, stderr in _finish([_start("decompress", out / (p.name + ".vz"), "-o", back) for p in sources]):
        assert status == 0, stderr
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in sources)
    for p in sources:
        assert pixels_equal(read_image(back / p.name), read_image(p)), p.name
    _no_temp_files(tmp_path)


def test_race_for_one_name_without_force(tmp_path):
    sources = _sources(tmp_path / "src", PROCESSES)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "same.vz"
    results = _finish([_start("compress", p, "-o", target) for p in sources])

    winners = [k for k, (status, _, _) in enumerate(results) if status == 0]
    assert len(winners) == 1, [(s, e) for s, _, e in results]
    for k, (status, _, stderr) in enumerate(results):
        if k in winners:
            continue
        lines = stderr.strip().splitlines()
        assert status == 1 and len(lines) == 1, stderr
        assert "same.vz" in lines[0] and "--force" in lines[0], lines[0]

    # The file is the winner's, and only the file is in the folder.
    assert [p.name for p in out.iterdir()] == ["same.vz"]
    winner = sources[winners[0]]
    assert winner.name in results[winners[0]][1]
    assert pixels_equal(api.decompress_image(target.read_bytes()), read_image(winner))
    _no_temp_files(tmp_path)


def test_race_for_one_name_with_force(tmp_path):
    sources = _sources(tmp_path / "src", PROCESSES)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "same.vz"
    target.write_bytes(b"in the way")
    for status, _, stderr in _finish([_start("compress", "--force", p, "-o", target) for p in sources]):
        assert status == 0, stderr

    # A whole file from one of them (the last rename), decoding exactly.
    assert [p.name for p in out.iterdir()] == ["same.vz"]
    image = api.decompress_image(target.read_bytes())
    assert sum(pixels_equal(image, read_image(p)) for p in sources) == 1
    _no_temp_files(tmp_path)


def test_no_hard_links_still_never_replaces(tmp_path, monkeypatch):
    """On a file system without hard links the move falls back to claiming the name exclusively."""
    from vaezip import files
    from vaezip.errors import OutputExistsError

    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_link)
    target = tmp_path / "x.vz"
    with files.atomic_write(target, force=False) as tmp:
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(OutputExistsError, match="--force"):
        with files.atomic_write(target, force=False) as tmp:
            tmp.write_bytes(b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["x.vz"]
