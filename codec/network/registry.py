"""Model registry: name -> `ModelSpec` (file, sha256, config, training record).

Entries live in `models/registry.json`, weights beside it as package data found
through `importlib.resources`, so a non-editable install works. Weights are stored
packed (`NAME.ptz`, see `packing`); the entry's sha256 is that of the unpacked
`torch.save` bytes and is checked in full before `torch.load(..., weights_only=True)`;
loading is strict. A fixed-point model registered before weights were snapped to their
integer grid can be re-stored snapped (`restore_on_grid`: the same integers, so the same
files): its sha256 stays its identity and `stored_sha256` checks the new bytes. A superseded
model can be stored as its difference from its successor (`restore_as_delta`, the entry's
`delta_base`): loading it reads the successor's bytes first.
A retrain gets a new name; old names stay so old files still decode.

Add an entry (prints it and writes registry.json, no hand-typed hashes):
    vaezip registry add NAME WEIGHTS.pt META.json [MODE...]
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

from vaezip.errors import InputError, ModelError
from vaezip.files import atomic_write
from vaezip.network import packing
from vaezip.network.config import ModelConfig

REGISTRY_FILE = "registry.json"


@dataclass(frozen=True)
class ModelSpec:
    """One registered model. `sha256` is the hex digest of the weights' `torch.save` bytes as
    registered (of the file, once unpacked where it is stored packed): the model's identity.
    `stored_sha256`, when set, is that of the bytes stored now, which `restore_on_grid` made
    from the registered ones (the same integer weights). `delta_base`, when set, names the model
    whose stored bytes this file is a difference from (`packing.pack_delta`)."""

    name: str
    file: str
    sha256: str
    config: ModelConfig
    modes: tuple[str, ...] = ()
    training: dict = field(default_factory=dict, compare=False)
    bpd: dict = field(default_factory=dict, compare=False)
    stored_sha256: str = ""
    delta_base: str = ""

    @property
    def hash_prefix(self) -> bytes:
        """The 8-byte model identity stored in every .vz file made with this model:
        a hash of the weights' sha256 and the config, so a changed config (pruning,
        latent grid) under the same weights is reported, not mis-decoded."""
        identity = self.sha256.encode() + self.config.to_json().encode()
        return hashlib.sha256(identity).digest()[:8]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to code: its spec and the network in eval mode."""

    spec: ModelSpec
    net: object  # HierarchicalVAE; typed loosely so this module imports without torch


def _models_dir():
    return resources.files("vaezip.models")


@lru_cache(maxsize=1)
def specs() -> dict[str, ModelSpec]:
    """All registered models by name."""
    path = _models_dir() / REGISTRY_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out = {}
    for entry in data["models"]:
        out[entry["name"]] = ModelSpec(
            name=entry["name"], file=entry["file"], sha256=entry["sha256"],
            config=ModelConfig.from_dict(entry["config"]), modes=tuple(entry.get("modes", ())),
            training=entry.get("training", {}), bpd=entry.get("bpd", {}),
            stored_sha256=entry.get("stored_sha256", ""), delta_base=entry.get("delta_base", ""),
        )
    return out


def get_spec(name: str) -> ModelSpec:
    try:
        return specs()[name]
    except KeyError:
        known = ", ".join(sorted(specs())) or "none"
        raise ModelError(f"unknown model {name!r} (registered: {known})") from None


@lru_cache(maxsize=1)
def defaults() -> dict[str, str]:
    """The registry's "defaults": mode -> model name (may be empty)."""
    path = _models_dir() / REGISTRY_FILE
    return dict(json.loads(path.read_text()).get("defaults", {})) if path.is_file() else {}


def default_model(mode: str) -> Optional[str]:
    """The model the registry names as the default for `mode` ("RGB", "L"), else the first
    registered model that lists it, or None."""
    chosen = defaults().get(mode)
    if chosen in specs() and mode in specs()[chosen].modes:
        return chosen
    for spec in specs().values():
        if mode in spec.modes:
            return spec.name
    return None


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=4)
def load_model(name: str) -> LoadedModel:
    """Load a registered model once per process, after checking its full sha256."""
    return model_from_weights(get_spec(name), stored_weights(name))


def stored_weights(name: str, _needed_by: tuple[str, ...] = ()) -> bytes:
    """The `torch.save` bytes stored for registered model `name`, checked against their sha256
    (a model stored as a difference unpacks with its `delta_base`'s bytes, checked first)."""
    if name in _needed_by:
        raise ModelError(f"weights of model {name!r} are stored as a difference from themselves "
                         f"({' -> '.join(_needed_by + (name,))})")
    spec = get_spec(name)
    base = stored_weights(spec.delta_base, _needed_by + (name,)) if spec.delta_base else None
    resource = _models_dir() / spec.file
    with resources.as_file(resource) as path:
        if not Path(path).is_file():
            raise ModelError(f"weights of model {name!r} are missing ({spec.file})")
        try:
            raw = packing.read_weights(path, base)
        except packing.PackError as exc:
            raise ModelError(f"weights of model {name!r} are corrupt ({spec.file}: {exc})") from None
    if hashlib.sha256(raw).hexdigest() != (spec.stored_sha256 or spec.sha256):
        raise ModelError(f"weights of model {name!r} fail the sha256 check ({spec.file})")
    return raw


def model_from_weights(spec: ModelSpec, weights) -> LoadedModel:
    """Build the network of `spec` and load weights strictly (a path, `torch.save` bytes or a
    state dict)."""
    import torch

    from vaezip.network.model import HierarchicalVAE

    net = HierarchicalVAE(spec.config)
    state, fresh = weights, not isinstance(weights, dict)
    if isinstance(state, bytes):
        state = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
    elif fresh:
        state = torch.load(state, map_location="cpu", weights_only=True)
    if fresh:  # tensors only this function holds: the network takes them instead of copying (40 ms)
        state = {key: value.contiguous() for key, value in state.items()}
    try:
        net.load_state_dict(state, strict=True, assign=fresh)
    except RuntimeError as exc:
        raise ModelError(f"weights of model {spec.name!r} do not match its config: {exc}") from None
    net.eval()
    return LoadedModel(spec, net)


def _snapped_weights(name: str, config: ModelConfig, raw: bytes) -> tuple[bytes, dict]:
    """A fixed-point model's `torch.save` bytes with its float weights snapped to their integer
    grid (`fixedpoint.snap_network`: the same integers, so the same coding, at under half the
    packed size) and what was snapped. Raises ModelError if a layer's integers would change."""
    import torch

    from vaezip.network.fixedpoint import snap_network

    loaded = model_from_weights(ModelSpec(name, "", "", config, ()), raw)
    try:
        channels, total = snap_network(loaded.net)
    except RuntimeError as exc:
        raise ModelError(f"model {name!r}: {exc}") from None
    out = io.BytesIO()
    torch.save(loaded.net.state_dict(), out)
    return out.getvalue(), {"channels": channels, "of": total}


def image_mode(config: ModelConfig) -> str:
    """The 8-bit image mode a model codes: "L" for one channel, else "RGB"."""
    return "L" if config.channels == 1 else "RGB"


def load_named_or_run(model: str) -> LoadedModel:
    """A registered model, or the weights OUT.pt of a training run with its record OUT.json
    (for measuring a run before it is registered)."""
    if not model.endswith(".pt"):
        return load_model(model)
    config = ModelConfig.from_dict(read_record(Path(model).with_suffix(".json"))["config"])
    spec = ModelSpec(name=Path(model).stem, file=model, sha256=sha256_file(model), config=config,
                     modes=(image_mode(config),))
    return model_from_weights(spec, model)


def read_record(path: str | Path) -> dict:
    """A training run's JSON record (config + training record), as `vaezip train` writes it."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON record ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise InputError(f"{path}: no model config in this record")
    return record


def source_models_dir() -> Path:
    """Where `add_entry` writes: in a source checkout its models/ folder (the package data of
    the next install), in an installed package the installed models (`vaezip.models`)."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    return checkout if (checkout / REGISTRY_FILE).is_file() else Path(str(_models_dir()))


def _read_entries(registry_path: Path) -> dict:
    """The checkout's registry.json as stored (an empty registry where there is none yet)."""
    return json.loads(registry_path.read_text()) if registry_path.exists() else {"models": []}


def _write_entries(registry_path: Path, data: dict) -> None:
    with atomic_write(registry_path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def add_entry(name: str, weights: Path, meta: Path, modes: list[str], make_default: bool = False) -> dict:
    """Pack weights into the checkout's models/ and add (or refuse to replace) a registry entry;
    with `make_default`, the registry's "defaults" name it for each of its `modes`."""
    models_dir = source_models_dir()
    registry_path = models_dir / REGISTRY_FILE
    data = _read_entries(registry_path)
    if any(e["name"] == name for e in data["models"]):
        raise ModelError(f"model name {name!r} is taken; names are never reused")
    record = read_record(meta)
    config = ModelConfig.from_dict(record["config"])  # checked before anything is written
    raw, snapped = Path(weights).read_bytes(), None
    if config.fixed_bits is not None:
        raw, snapped = _snapped_weights(name, config, raw)
    target = models_dir / f"{name}{packing.SUFFIX}"
    with atomic_write(target) as tmp:
        tmp.write_bytes(packing.pack(raw))
    entry = {
        "name": name, "file": target.name, "sha256": hashlib.sha256(raw).hexdigest(), "config": config.to_dict(),
        "modes": modes,
        "training": record.get("training", {}), "bpd": record.get("bpd", {}),
    }
    if snapped is not None:
        entry["grid_snapped"] = snapped
    data["models"].append(entry)
    if make_default:
        data["defaults"] = {**data.get("defaults", {}), **{mode: name for mode in modes}}
    _write_entries(registry_path, data)
    return entry


def restore_on_grid(name: str) -> dict:
    """Re-store the registered fixed-point model `name` with its float weights snapped to their
    integer grid (as `add_entry` stores new ones): the same integers, so every file made with
    it decodes and re-encodes to the same bytes, in about 40 % of the packed size. Its `sha256`
    (the identity in its files) is kept; `stored_sha256` checks the new bytes. Returns the
    updated entry."""
    models_dir = source_models_dir()
    registry_path = models_dir / REGISTRY_FILE
    data = _read_entries(registry_path)
    entry = _stored_entry(data, name, registry_path)
    config = ModelConfig.from_dict(entry["config"])
    if config.fixed_bits is None:
        raise ModelError(f"model {name!r} is a float model: its weights are not on an integer grid")
    if "grid_snapped" in entry:
        raise ModelError(f"model {name!r} is already stored on its integer grid")
    _refuse_if_a_delta_base(data, name)
    target = models_dir / entry["file"]
    snapped_raw, snapped = _snapped_weights(name, config, stored_weights(name))
    entry.update(stored_sha256=hashlib.sha256(snapped_raw).hexdigest(), grid_snapped=snapped)
    entry.pop("delta_base", None)  # stored whole
    with atomic_write(target) as tmp:
        tmp.write_bytes(packing.pack(snapped_raw))
    _write_entries(registry_path, data)
    specs.cache_clear()
    load_model.cache_clear()
    return entry


def restore_as_delta(name: str, base: str) -> dict:
    """Re-store registered model `name` as the difference from registered model `base`'s stored
    bytes (`packing.pack_delta`): the same bytes once unpacked, so the same sha256s and the same
    files, in about half the space when `base` continues `name`'s training. Loading `name` then
    reads `base` first. Refuses a default model (loaded by every compress), a `base` stored
    relative to `name` (a cycle) and a difference not smaller than what is stored now. Returns the
    updated entry."""
    models_dir = source_models_dir()
    registry_path = models_dir / REGISTRY_FILE
    data = _read_entries(registry_path)
    entry = _stored_entry(data, name, registry_path)
    _stored_entry(data, base, registry_path)
    entries = {e["name"]: e for e in data["models"]}
    default_for = sorted(mode for mode, chosen in data.get("defaults", {}).items() if chosen == name)
    if default_for:
        raise ModelError(f"model {name!r} is the default for {', '.join(default_for)}: it stays stored whole")
    link, chain = base, [name, base]
    while link != name and entries[link].get("delta_base"):
        link = entries[link]["delta_base"]
        chain.append(link)
    if link == name:
        raise ModelError(f"model {base!r} is stored relative to {name!r}: a cycle ({' -> '.join(chain)})")
    raw, base_raw = stored_weights(name), stored_weights(base)
    packed = packing.pack_delta(raw, base_raw)
    target = models_dir / entry["file"]
    if len(packed) >= target.stat().st_size:
        raise ModelError(f"model {name!r} as a difference from {base!r} takes {len(packed):,} bytes, "
                         f"not less than the {target.stat().st_size:,} stored now")
    if packing.unpack(packed, base_raw) != raw:  # pragma: no cover - a packing bug, never a user error
        raise ModelError(f"model {name!r}: the difference from {base!r} does not unpack to its weights")
    entry["delta_base"] = base
    _write_entries(registry_path, data)  # first: a whole file under a delta entry still loads
    with atomic_write(target) as tmp:
        tmp.write_bytes(packed)
    specs.cache_clear()
    load_model.cache_clear()
    return entry


def _stored_entry(data: dict, name: str, registry_path: Path) -> dict:
    """`name`'s entry in the checkout's registry `data` (read from `registry_path`)."""
    entry = next((e for e in data["models"] if e["name"] == name), None)
    if entry is None:
        get_spec(name)  # raises with the registered names
        raise ModelError(f"model {name!r} is not in {registry_path}")
    return entry


def _refuse_if_a_delta_base(data: dict, name: str) -> None:
    """Models stored as a difference from `name`'s bytes need those bytes unchanged."""
    dependents = [e["name"] for e in data["models"] if e.get("delta_base") == name]
    if dependents:
        raise ModelError(f"model {name!r} is the base of {', '.join(dependents)} (stored as differences "
                         f"from its bytes); its stored bytes cannot change")
