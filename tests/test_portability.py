"""Files decode, and re-encode to the same bytes, under imitated other machines.

A small image is coded with the tiny seeded model, then decoded in fresh processes under
`portability.quick_matrix()` (oneDNN capped at SSE4.1 and at AVX2, ATen at its baseline,
1 and 2 threads, numpy's dispatched loops off). Format version 5 runs float kernels that
depend on the instruction set, so those cases are expected to fail there (xfail, not
strict: a small model may still agree); a thread count must never matter. Versions 6 and 7
(the integer-exact network: the tiny fixed-point model, and for 7 one whose stage 0 is split
into strided and dilated steps) must pass every case. Re-encoding must
give the same code (the `runtime` header field, which names the CPU dispatch, aside).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image

from vaezip.evaluation import portability
from vaezip.format import versions
from vaezip.imaging.images import write_png

VERSIONS = (5, 6, 7, 8, 9)
ISA_REASON = ("format version 5 sums with float kernels chosen by the instruction set "
              "(docs/PORTABILITY.md); version 6 must not")


def _cases(matrix):
    cases = []
    for version in VERSIONS:
        for setting in matrix:
            marks = ()
            if version < 6 and setting.isa_dependent:
                marks = pytest.mark.xfail(reason=ISA_REASON, strict=False)
            cases.append(pytest.param(version, setting, marks=marks, id=f"v{version}-{setting.name}"))
    return cases


@pytest.fixture(scope="module")
def coded(tmp_path_factory, tiny_model, tiny_fixed_model, tiny_steps_model, tiny_halo_model):
    """Per version: (folder, PNG path, .vz path, model file, pixels sha256, .vz sha256)."""
    from vaezip import api

    image = random_image("RGB", 24, 40, seed=3, smooth=True)
    tiles = random_image("RGB", 40, 72, seed=3, smooth=True)  # several tiles: their rings hold neighbours
    grainy = random_image("RGB", 40, 72, seed=3, smooth=True)  # tiles of other grain: version 9 codes their changes
    grain = np.random.default_rng(3).integers(-40, 41, (40, 36, 3))
    grainy.pixels[:, 36:] = np.clip(grainy.pixels[:, 36:].astype(np.int64) + grain, 0, 255).astype(np.uint8)
    cache = {}

    def get(version: int):
        if version not in cache:
            if version not in versions.FORMATS:
                pytest.skip(f"format version {version} is not in versions.FORMATS yet")
            fmt = versions.FORMATS[version]
            model = tiny_steps_model if fmt.stage0_steps else tiny_fixed_model if fmt.numerics.exact else tiny_model
            picture = grainy if fmt.tile_offsets else tiles if fmt.pixel_halo else image
            model = tiny_halo_model if fmt.pixel_halo else model
            data = api.compress(picture, loaded=model, version=version)
            folder = tmp_path_factory.mktemp(f"v{version}")
            png, vz = folder / "image.png", folder / "image.vz"
            write_png(picture, png)
            vz.write_bytes(data)
            model_file = portability.save_model(model, folder)
            cache[version] = (folder, png, vz, model_file, portability.pixels_sha256(picture),
                              portability.code_sha256(data))
        return cache[version]

    return get


@pytest.mark.parametrize("version, setting", _cases(portability.quick_matrix()))
def test_decodes_to_the_same_pixels(coded, version, setting):
    _, _, vz, model_file, pixels, _ = coded(version)
    [outcome] = portability.run_worker(setting, "decode", [vz], model_file=model_file, timeout=120)
    assert outcome.status == portability.OK, outcome.detail
    assert outcome.sha256 == pixels


@pytest.mark.parametrize("version, setting", _cases(portability.encode_matrix()[1:]))
def test_reencodes_to_the_same_bytes(coded, version, setting):
    folder, png, _, model_file, _, data = coded(version)
    [outcome] = portability.encode_all([setting], [png], folder / "enc", version=version, model_file=model_file,
                                       timeout=120)
    assert outcome.status == portability.OK, outcome.detail
    assert outcome.sha256 == data


def test_a_worker_that_cannot_start_reports_an_error(tmp_path):
    setting = portability.Setting("missing", command=(str(tmp_path / "no-python"),))
    [outcome] = portability.run_worker(setting, "decode", [tmp_path / "x.vz"])
    assert outcome.status == portability.ERROR
    assert "cannot start" in outcome.detail


def test_workers_inherit_no_numerics_switch(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    env = portability.worker_env(portability.Setting("x", (("MKL_CBWR", "AVX2"),)))
    assert "ONEDNN_MAX_CPU_ISA" not in env
    assert env["MKL_CBWR"] == "AVX2"


def test_the_constriction_stand_in_changes_nothing(coded, tmp_path):
    """benchmarks/constriction_rpc (how the aarch64 root decodes): x86 through it decodes exactly."""
    import subprocess
    import sys
    from pathlib import Path

    rpc = Path(__file__).resolve().parents[1] / "benchmarks" / "constriction_rpc"
    _, _, vz, model_file, pixels, _ = coded(5)
    sock = tmp_path / "rpc.sock"
    server = subprocess.Popen([sys.executable, str(rpc / "server.py"), str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        setting = portability.Setting("rpc", (("PYTHONPATH", str(rpc)), ("VAEZIP_CONSTRICTION_RPC", str(sock))))
        [outcome] = portability.run_worker(setting, "decode", [vz], model_file=model_file, timeout=120)
    finally:
        server.terminate()
        server.wait()
    assert outcome.status == portability.OK, outcome.detail
    assert outcome.sha256 == pixels
    assert outcome.runtime["constriction"].endswith("+rpc")
