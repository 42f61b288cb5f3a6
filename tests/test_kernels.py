"""oneDNN's AVX2 cap (`vaezip.network.kernels`): set by `import vaezip`, lifted by the command line only
where every format it codes is exact, kept for float-network files and for a level the user set.

oneDNN reads the cap once per process, so these tests run fresh interpreters. The level a
process ran at is the "isa" line oneDNN prints with ONEDNN_VERBOSE=1, compared with reference
processes capped at AVX2 and uncapped (on a CPU without AVX-512 both say AVX2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vaezip.imaging.images import pixels_equal, read_image
from vaezip.network import kernels

VAEZIP = Path(sys.executable).parent / "vaezip"
GOLDEN = Path(__file__).parent / "golden"


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in (kernels.VARIABLE, kernels.MARK, "ONEDNN_VERBOSE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_caps_and_lift_uncaps_once():
    out = _python("import os, vaezip; from vaezip.network import kernels; v = kernels.VARIABLE\n"
                  "print(os.environ[v], kernels.lift_cap(), os.environ[v], kernels.lift_cap())")
    assert out.split() == ["AVX2", "True", "DEFAULT", "False"]


@pytest.mark.parametrize("level", ["AVX2", "SSE41", "DEFAULT"])
def test_a_level_the_user_set_stays(level):
    out = _python("import os, vaezip; from vaezip.network import kernels\n"
                  "print(kernels.lift_cap(), os.environ[kernels.VARIABLE])", ONEDNN_MAX_CPU_ISA=level)
    assert out.split() == ["False", level]


def test_an_inherited_cap_is_vaezips():
    """A command started by a program that imported vaezip inherits its cap, not a user's
    choice; a lifted cap passes to the processes a command starts (`--jobs`)."""
    code = ("import os, vaezip; from vaezip.network import kernels\n"
            "print(kernels.lift_cap(), os.environ[kernels.VARIABLE], kernels.MARK in os.environ)")
    assert _python(code, ONEDNN_MAX_CPU_ISA="AVX2", VAEZIP_ONEDNN_CAP="AVX2").split() == ["True", "DEFAULT", "False"]
    assert _python(code, ONEDNN_MAX_CPU_ISA="DEFAULT").split() == ["False", "DEFAULT", "False"]
    assert _python(code, ONEDNN_MAX_CPU_ISA="SSE41", VAEZIP_ONEDNN_CAP="AVX2").split() == ["False", "SSE41", "True"]


def test_no_lift_once_torch_is_imported():
    """Torch may have run a convolution, which read the cap: lifting then would be a lie."""
    out = _python("import os, vaezip, torch; from vaezip.network import kernels\n"
                  "print(kernels.lift_cap(), os.environ[kernels.VARIABLE])")
    assert out.split() == ["False", "AVX2"]


def test_exact_only():
    assert kernels.exact_only([6, 10])
    assert kernels.exact_only([])
    assert not kernels.exact_only([10, 5])
    assert not kernels.exact_only([2])
    assert not kernels.exact_only([10, 9999])


def _isa_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if ",info,cpu,isa:" in line]
    assert lines, stdout[-2000:]
    return lines[0].split(",info,cpu,")[1]


def _reference_isa(level: str) -> str:
    """The isa line of a plain torch convolution (channels-last, so oneDNN runs it) at `level`."""
    code = ("import torch\nx = torch.ones(1, 64, 32, 32).to(memory_format=torch.channels_last)\n"
            "torch.nn.functional.conv2d(x, torch.ones(64, 64, 3, 3).to(memory_format=torch.channels_last))")
    return _isa_line(_python(code, ONEDNN_VERBOSE="1", ONEDNN_MAX_CPU_ISA=level))


def _vaezip(*args) -> subprocess.CompletedProcess:
    # Started as from a program that imported vaezip: the cap it inherits is vaezip's.
    env = {**os.environ, kernels.VARIABLE: kernels.CAP, kernels.MARK: kernels.CAP, "ONEDNN_VERBOSE": "1"}
    return subprocess.run([str(VAEZIP), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def levels() -> dict[str, str]:
    """The isa lines of a process uncapped and of one capped at AVX2."""
    if not VAEZIP.exists():
        pytest.skip("vaezip console script not installed beside this interpreter")
    return {"uncapped": _reference_isa(kernels.UNCAPPED), "capped": _reference_isa(kernels.CAP)}


@pytest.mark.parametrize("model, level", [
    (None, "uncapped"),  # the default models are fixed-point (format 10)
    ("photo-rgb-2", "capped"),  # a float model writes format 5, whose numbers depend on the kernels
])
def test_command_line_lifts_the_cap_for_exact_formats_only(tmp_path, levels, model, level):
    png = GOLDEN / "rgb_kodim23_96x96.png"
    steps = (["compress", png, "-o", tmp_path / "a.vz"] + (["--model", model] if model else []),
             ["decompress", tmp_path / "a.vz", "-o", tmp_path / "a.png"])
    for args in steps:
        proc = _vaezip(*args)
        assert proc.returncode == 0, proc.stderr
        assert _isa_line(proc.stdout) == levels[level], args[0]
    assert pixels_equal(read_image(tmp_path / "a.png"), read_image(png))


def test_one_float_file_keeps_the_whole_command_capped(tmp_path, levels):
    """A format-5 file beside a format-10 one. (This CPU may not decode the golden format-5
    file, written elsewhere; its checksum then fails loudly, after the first file's decode.)"""
    proc = _vaezip("compress", GOLDEN / "rgb_kodim23_48x40.png", "-o", tmp_path / "a.vz")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "out").mkdir()
    proc = _vaezip("decompress", tmp_path / "a.vz", GOLDEN / "v5" / "rgb_kodim23_48x40.vz", "-o", tmp_path / "out")
    assert _isa_line(proc.stdout) == levels["capped"]
    assert pixels_equal(read_image(tmp_path / "out" / "a.png"), read_image(GOLDEN / "rgb_kodim23_48x40.png"))
