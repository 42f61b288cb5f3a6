"""Tests for `vaezip registry add` and `vaezip prune` (CliRunner, tiny seeded models, a temporary models/)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_fixed_model, make_tiny_model, random_image, random_pixels

from vaezip.cli.main import main
from vaezip.errors import ModelError
from vaezip.imaging.images import write_png
from vaezip.network import packing, registry
from vaezip.network.config import ModelConfig


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaezip: error: ") and needle in lines[0], result.stderr


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def run_files(tmp_path):
    """WEIGHTS.pt and META.json of a tiny gray model, as `vaezip train` writes them."""
    loaded = make_tiny_model(1, "tiny-gray-test")
    weights, meta = tmp_path / "run.pt", tmp_path / "run.json"
    torch.save(loaded.net.state_dict(), weights)
    meta.write_text(json.dumps({"config": loaded.spec.config.to_dict(), "training": {"steps": 7}}))
    return weights, meta


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(Path(str(registry._models_dir() / registry.REGISTRY_FILE)), folder / registry.REGISTRY_FILE)
    monkeypatch.setattr(registry, "source_models_dir", lambda: folder)
    return folder


def test_registry_add(run_files, models_dir):
    weights, meta = run_files
    before_all = json.loads((models_dir / registry.REGISTRY_FILE).read_text())
    before = before_all["models"]
    result = _run("registry", "add", "tiny-gray-9", weights, meta, "L")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert printed == {"name": "tiny-gray-9", "file": "tiny-gray-9.ptz", "sha256": sha256, "modes": ["L"],
                       "default": False}
    assert packing.read_weights(models_dir / "tiny-gray-9.ptz") == weights.read_bytes()  # stored packed
    after = json.loads((models_dir / registry.REGISTRY_FILE).read_text())["models"]
    assert after[:-1] == before
    assert after[-1]["training"] == {"steps": 7} and after[-1]["sha256"] == sha256
    assert json.loads((models_dir / registry.REGISTRY_FILE).read_text())["defaults"] == before_all["defaults"]
    assert ModelConfig.from_dict(after[-1]["config"]) == ModelConfig.from_dict(json.loads(meta.read_text())["config"])
    assert sorted(p.name for p in models_dir.iterdir()) == [registry.REGISTRY_FILE, "tiny-gray-9.ptz"]

    # Names are never reused; bad inputs are one line, nothing written.
    _one_line_error(_run("registry", "add", "tiny-gray-9", weights, meta), "never reused")
    _one_line_error(_run("registry", "add", "tiny-gray-10", weights, meta.with_name("nope.json")), "nope.json")
    meta.write_text("{not json")
    _one_line_error(_run("registry", "add", "tiny-gray-10", weights, meta), "JSON")
    assert json.loads((models_dir / registry.REGISTRY_FILE).read_text())["models"] == after
    assert sorted(p.name for p in models_dir.iterdir()) == [registry.REGISTRY_FILE, "tiny-gray-9.ptz"]


def test_registry_add_default_mode_is_rgb(run_files, models_dir):
    result = _run("registry", "add", "tiny-gray-9", *run_files)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["modes"] == ["RGB"]


def test_registry_add_default_moves_only_its_modes(run_files, models_dir):
    defaults = json.loads((models_dir / registry.REGISTRY_FILE).read_text())["defaults"]
    result = _run("registry", "add", "tiny-gray-9", *run_files, "L", "--default")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["default"] is True
    after = json.loads((models_dir / registry.REGISTRY_FILE).read_text())["defaults"]
    assert after == {**defaults, "L": "tiny-gray-9"} and after["RGB"] == defaults["RGB"]


def test_registry_add_snaps_a_fixed_point_model_to_its_grid(tmp_path, models_dir):
    """A fixed-point run is stored with its float weights snapped to their integer grid: a new
    sha256, but the same integers in every layer, every other tensor unchanged, and the same
    coded bits."""
    import vaezip
    from vaezip.format import container
    from vaezip.network.fixedpoint import FixedConv2d

    run = make_tiny_fixed_model(3, "tiny-fixed-run", pixel_halo=True)
    weights, meta = tmp_path / "run.pt", tmp_path / "run.json"
    torch.save(run.net.state_dict(), weights)
    meta.write_text(json.dumps({"config": run.spec.config.to_dict(), "training": {"steps": 3}}))
    result = _run("registry", "add", "tiny-fixed-9", weights, meta)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    stored = packing.read_weights(models_dir / "tiny-fixed-9.ptz")
    assert printed["sha256"] == hashlib.sha256(stored).hexdigest() != hashlib.sha256(weights.read_bytes()).hexdigest()
    total = sum(m.out_channels for m in run.net.modules() if isinstance(m, FixedConv2d))
    assert printed["grid_snapped"]["of"] == total and printed["grid_snapped"]["channels"] >= 0.95 * total
    entry = json.loads((models_dir / registry.REGISTRY_FILE).read_text())["models"][-1]
    assert entry["grid_snapped"] == printed["grid_snapped"]

    spec = registry.ModelSpec("tiny-fixed-9", "tiny-fixed-9.ptz", printed["sha256"], run.spec.config, ("RGB",))
    snapped = registry.model_from_weights(spec, stored)
    old, new = dict(run.net.named_modules()), dict(snapped.net.named_modules())
    layers = [name for name, m in old.items() if isinstance(m, FixedConv2d)]
    for name in layers:
        assert all(torch.equal(a, b) for a, b in zip(old[name].exact_parameters(), new[name].exact_parameters()))
    changed = {k for k, v in snapped.net.state_dict().items() if not torch.equal(v, run.net.state_dict()[k])}
    assert changed and changed <= {f"{name}.weight" for name in layers}
    pixels = random_pixels("RGB", 48, 40, seed=3, smooth=True)
    payloads = []
    for loaded in (run, snapped):
        data = vaezip.compress(pixels, loaded=loaded, effort=3)
        assert np.array_equal(vaezip.decompress(data, loaded=loaded), pixels)
        payloads.append(container.unpack(data)[1])
    assert np.array_equal(*payloads)  # the same bits; only the header's model identity differs


@pytest.fixture
def installed_models(models_dir, monkeypatch):
    """`models_dir` as the models the package loads too (`registry.load_model`)."""
    monkeypatch.setattr(registry, "_models_dir", lambda: models_dir)
    for cached in (registry.specs, registry.defaults, registry.load_model):
        cached.cache_clear()
    yield models_dir
    for cached in (registry.specs, registry.defaults, registry.load_model):
        cached.cache_clear()


def _register_unsnapped(models_dir: Path, loaded) -> dict:
    """Store `loaded` as a model registered before `registry add` snapped weights to their grid."""
    buffer = io.BytesIO()
    torch.save(loaded.net.state_dict(), buffer)
    raw = buffer.getvalue()
    (models_dir / f"{loaded.spec.name}.ptz").write_bytes(packing.pack(raw))
    entry = {"name": loaded.spec.name, "file": f"{loaded.spec.name}.ptz", "sha256": hashlib.sha256(raw).hexdigest(),
             "config": loaded.spec.config.to_dict(), "modes": list(loaded.spec.modes), "training": {}}
    path = models_dir / registry.REGISTRY_FILE
    data = json.loads(path.read_text())
    data["models"].append(entry)
    path.write_text(json.dumps(data))
    registry.specs.cache_clear()
    return entry


def test_registry_snap_restores_an_old_model_without_changing_its_files(installed_models):
    """`vaezip registry snap`: an old fixed-point model re-stored on its integer grid keeps its
    identity, decodes the files made before and re-encodes them to the same bytes."""
    import vaezip

    entry = _register_unsnapped(installed_models, make_tiny_fixed_model(3, "tiny-old-9", pixel_halo=True))
    pixels = random_pixels("RGB", 48, 40, seed=4, smooth=True)
    before = vaezip.compress(pixels, "tiny-old-9", effort=3)
    stored_before = (installed_models / entry["file"]).stat().st_size

    result = _run("registry", "snap", "tiny-old-9")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    stored = packing.read_weights(installed_models / entry["file"])
    after = next(e for e in json.loads((installed_models / registry.REGISTRY_FILE).read_text())["models"]
                 if e["name"] == "tiny-old-9")
    assert after["sha256"] == printed["sha256"] == entry["sha256"]  # the identity in its files
    assert after["stored_sha256"] == printed["stored_sha256"] == hashlib.sha256(stored).hexdigest() != entry["sha256"]
    assert printed["bytes"] == [stored_before, (installed_models / entry["file"]).stat().st_size]
    assert after["grid_snapped"]["channels"] > 0 and printed["grid_snapped"] == after["grid_snapped"]
    unchanged = {k: v for k, v in after.items() if k not in ("stored_sha256", "grid_snapped")}
    assert unchanged == json.loads(json.dumps(entry))

    assert registry.load_model("tiny-old-9").spec.stored_sha256 == after["stored_sha256"]
    assert np.array_equal(vaezip.decompress(before), pixels)
    assert vaezip.compress(pixels, "tiny-old-9", effort=3) == before

    _one_line_error(_run("registry", "snap", "tiny-old-9"), "already stored on its integer grid")
    (installed_models / entry["file"]).write_bytes(packing.pack(stored[:-1] + bytes([stored[-1] ^ 1])))
    registry.load_model.cache_clear()
    with pytest.raises(vaezip.errors.ModelError, match="sha256"):
        registry.load_model("tiny-old-9")


def test_registry_snap_refuses_float_and_unknown_models(installed_models):
    _register_unsnapped(installed_models, make_tiny_model(1, "tiny-float-9"))
    _one_line_error(_run("registry", "snap", "tiny-float-9"), "float model")
    _one_line_error(_run("registry", "snap", "no-such-model"), "unknown model")


def _successor(loaded, name: str, step: float = 0.001):
    """`loaded` after a little more training: a few weights of each layer moved by `step`."""
    successor = make_tiny_fixed_model(3, name, pixel_halo=True)
    with torch.no_grad():
        for key, value in successor.net.state_dict().items():
            value.copy_(loaded.net.state_dict()[key])
            if key.endswith(".weight") and value.is_floating_point():
                value.view(-1)[::7] *= 1 + step
    return successor


def test_registry_delta_stores_a_model_as_its_difference(installed_models):
    """`vaezip registry delta`: a superseded model stored as its difference from its successor
    keeps its identity, loads the same bytes and decodes and re-encodes its files unchanged."""
    import vaezip

    older = make_tiny_fixed_model(3, "tiny-old-9", pixel_halo=True)
    entry = _register_unsnapped(installed_models, older)
    _register_unsnapped(installed_models, _successor(older, "tiny-new-9"))
    pixels = random_pixels("RGB", 48, 40, seed=5, smooth=True)
    before = vaezip.compress(pixels, "tiny-old-9", effort=3)
    raw = registry.stored_weights("tiny-old-9")
    stored_before = (installed_models / entry["file"]).stat().st_size

    result = _run("registry", "delta", "tiny-old-9", "tiny-new-9")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    after = (installed_models / entry["file"]).stat().st_size
    assert printed == {"name": "tiny-old-9", "delta_base": "tiny-new-9", "sha256": entry["sha256"],
                       "bytes": [stored_before, after]}
    assert after < stored_before / 2
    assert (installed_models / entry["file"]).read_bytes()[:8] == packing.DELTA_MAGIC
    stored = next(e for e in json.loads((installed_models / registry.REGISTRY_FILE).read_text())["models"]
                  if e["name"] == "tiny-old-9")
    assert stored == {**json.loads(json.dumps(entry)), "delta_base": "tiny-new-9"}
    assert registry.stored_weights("tiny-old-9") == raw
    assert np.array_equal(vaezip.decompress(before), pixels)
    assert vaezip.compress(pixels, "tiny-old-9", effort=3) == before

    cycle = "a cycle (tiny-new-9 -> tiny-old-9 -> tiny-new-9)"
    _one_line_error(_run("registry", "delta", "tiny-new-9", "tiny-old-9"), cycle)
    _one_line_error(_run("registry", "delta", "tiny-new-9", "tiny-new-9"), "a cycle")
    _one_line_error(_run("registry", "delta", "tiny-old-9", "tiny-new-9"), "not less than")  # already a difference
    _one_line_error(_run("registry", "delta", "tiny-old-9", "no-such-model"), "unknown model")
    default = registry.default_model("RGB")
    _one_line_error(_run("registry", "delta", default, "tiny-new-9"), "is the default for RGB")
    _one_line_error(_run("registry", "snap", "tiny-new-9"), "is the base of tiny-old-9")

    base_file = installed_models / "tiny-new-9.ptz"
    base_raw = registry.stored_weights("tiny-new-9")
    base_file.write_bytes(packing.pack(base_raw[:-1] + bytes([base_raw[-1] ^ 1])))
    registry.load_model.cache_clear()
    with pytest.raises(ModelError, match="'tiny-new-9' fail the sha256"):
        registry.load_model("tiny-old-9")  # the base is checked before it is used
    base_file.unlink()
    with pytest.raises(ModelError, match="'tiny-new-9' are missing"):
        registry.load_model("tiny-old-9")
    assert not (installed_models / "tiny-new-9.ptz").exists()


def test_a_delta_unpacked_with_the_wrong_base_is_refused(installed_models):
    older = make_tiny_fixed_model(3, "tiny-old-9", pixel_halo=True)
    entry = _register_unsnapped(installed_models, older)
    _register_unsnapped(installed_models, _successor(older, "tiny-new-9"))
    _register_unsnapped(installed_models, _successor(older, "tiny-other-9", step=0.002))
    assert _run("registry", "delta", "tiny-old-9", "tiny-new-9").exit_code == 0
    path = installed_models / registry.REGISTRY_FILE
    data = json.loads(path.read_text())
    next(e for e in data["models"] if e["name"] == "tiny-old-9")["delta_base"] = "tiny-other-9"
    path.write_text(json.dumps(data))
    registry.specs.cache_clear()
    with pytest.raises(ModelError, match=f"corrupt \\({entry['file']}: a difference from other weights"):
        registry.load_model("tiny-old-9")
    for name, base in (("tiny-old-9", "tiny-new-9"), ("tiny-new-9", "tiny-old-9")):  # a hand-made cycle
        next(e for e in data["models"] if e["name"] == name)["delta_base"] = base
    path.write_text(json.dumps(data))
    registry.specs.cache_clear()
    with pytest.raises(ModelError, match="difference from themselves"):
        registry.stored_weights("tiny-new-9")


def test_prune(run_files, tmp_path):
    weights, meta = run_files
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(2):
        write_png(random_image("L", 40, 36, seed=seed, smooth=True), images / f"{seed}.png")
    out = tmp_path / "pruned.json"
    args = ["prune", weights, meta, out, "--data", images, "--crops", "4", "--crop", "32"]

    result = _run(*args, "--threshold", "-1")  # every channel has KL > -1: all kept
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    pruning = record["training"]["pruning"]
    assert pruning["kept"] == pruning["of"] == 4 + 2  # TINY_SCALES: 4 and 2 channels
    assert record["config"]["active_latents"] == [[0, 1, 2, 3], [0, 1]]
    assert [len(k) for k in pruning["kl_bits_per_dim"]] == [4, 2]
    assert pruning["crops"] == 4 and pruning["data"] == str(images) and record["training"]["steps"] == 7
    assert "kept 6 of 6 latent channels" in result.stdout

    _one_line_error(_run(*args), "--force")  # OUT.json exists
    result = _run(*args, "--threshold", "1e9", "--force")  # nothing exceeds it: all pruned
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["training"]["pruning"]["kept"] == 0 and record["config"]["active_latents"] == [[], []]
    ModelConfig.from_dict(record["config"])  # a valid config for `registry add`

    _one_line_error(_run("prune", weights, tmp_path / "nope.json", tmp_path / "x.json"), "nope.json")
    assert not (tmp_path / "x.json").exists()
