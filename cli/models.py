"""`vaezip registry add`/`snap`/`delta` and `vaezip prune`: turning a training run into a registered model.

Thin layers over `vaezip.network.registry` and `vaezip.training.prune.prune`; torch is
imported inside the commands, so `vaezip --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from vaezip.errors import InputError
from vaezip.files import atomic_write, check_output


def _inputs_exist(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such file")


@click.group("registry")
def registry_group() -> None:
    """Manage the model registry (models/registry.json in the checkout)."""


@registry_group.command("add")
@click.argument("name")
@click.argument("weights", metavar="WEIGHTS.pt", type=click.Path(path_type=Path))
@click.argument("meta", metavar="META.json", type=click.Path(path_type=Path))
@click.argument("modes", metavar="[MODE]...", nargs=-1)
@click.option("--only-if-better-than", "baseline", default=None, metavar="MODEL",
              help="Register only if WEIGHTS.pt has a lower -ELBO than the registered MODEL on the held-out "
                   "crops its run was selected on (its record's held-out set); else exit 1.")
@click.option("--default", "make_default", is_flag=True,
              help="Make NAME the default model for its MODEs (the registry's \"defaults\").")
def registry_add(name, weights, meta, modes, baseline, make_default) -> None:
    """Register WEIGHTS.pt under NAME with the config and training record of META.json.

    Copies the weights into models/ (a fixed-point model's float weights snapped to their integer
    grid: the same coding, half the size), computes their sha256 and prints the new entry.
    MODEs are the image modes the model codes (RGB, L; default RGB); with --default it becomes
    the model `vaezip compress` uses for them. Names are never reused.
    """
    from vaezip.network import registry

    _inputs_exist(weights, meta)
    if baseline is not None:
        from vaezip.training.campaign import compare_heldout

        new, old, count = compare_heldout(weights, registry.read_record(meta), baseline)
        verdict = f"held-out -ELBO on {count} crops: {weights} {new:.4f}, {baseline} {old:.4f} bits/subpixel"
        if not new < old:
            raise click.ClickException(verdict + f"; not better, {name} not registered")
        click.echo(verdict)
    entry = registry.add_entry(name, weights, meta, list(modes) or ["RGB"], make_default)
    shown = {k: entry[k] for k in ("name", "file", "sha256", "modes", "grid_snapped") if k in entry}
    click.echo(json.dumps({**shown, "default": make_default}, indent=1))


@registry_group.command("snap")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
def registry_snap(names) -> None:
    """Re-store registered fixed-point models with their float weights snapped to their integer
    grid, as `registry add` stores new ones: the same integers, so every file made with them
    decodes and re-encodes to the same bytes, in about 40 % of the space. Each model keeps its
    sha256 (the identity in its files); the entry gains the stored bytes' `stored_sha256`.
    Prints each updated entry's sizes.
    """
    from vaezip.network import registry

    for name in names:
        before = (registry.source_models_dir() / registry.get_spec(name).file).stat().st_size
        entry = registry.restore_on_grid(name)
        after = (registry.source_models_dir() / entry["file"]).stat().st_size
        click.echo(json.dumps({"name": name, "sha256": entry["sha256"], "stored_sha256": entry["stored_sha256"],
                               "grid_snapped": entry["grid_snapped"], "bytes": [before, after]}))


@registry_group.command("delta")
@click.argument("name")
@click.argument("base")
def registry_delta(name, base) -> None:
    """Re-store registered model NAME as its difference from registered model BASE (its successor
    in a training campaign): the same bytes once unpacked, so the same sha256s and the same files,
    in about half the space. Loading NAME then reads BASE first. Refuses a default model, a cycle
    and a difference that is not smaller. Prints the sizes before and after.
    """
    from vaezip.network import registry

    path = registry.source_models_dir() / registry.get_spec(name).file
    before = path.stat().st_size if path.is_file() else None
    entry = registry.restore_as_delta(name, base)
    click.echo(json.dumps({"name": name, "delta_base": entry["delta_base"], "sha256": entry["sha256"],
                           "bytes": [before, (registry.source_models_dir() / entry["file"]).stat().st_size]}))


@click.command("prune")
@click.argument("weights", metavar="WEIGHTS.pt", type=click.Path(path_type=Path))
@click.argument("meta", metavar="META.json", type=click.Path(path_type=Path))
@click.argument("out", metavar="OUT.json", type=click.Path(path_type=Path))
@click.option("--data", default="heldout", show_default=True, help="Images to measure KL on (never the test set).")
@click.option("--threshold", type=float, default=0.01, show_default=True,
              help="Bits per latent dimension a channel must exceed to be kept.")
@click.option("--crops", type=click.IntRange(min=1), default=256, show_default=True, help="Evaluation crops.")
@click.option("--crop", type=click.IntRange(min=16), default=64, show_default=True,
              help="Crop side; smaller images are edge-padded to it.")
@click.option("-f", "--force", is_flag=True, help="Overwrite OUT.json.")
def prune_command(weights, meta, out, data, threshold, crops, crop, force) -> None:
    """Prune collapsed latent channels: write OUT.json, META.json with the kept channels in its
    config and the measured KL in its training record, ready for `vaezip registry add`."""
    from vaezip.network.registry import read_record
    from vaezip.training.prune import prune

    _inputs_exist(weights, meta)
    check_output(out, force)
    record, active, kl = prune(weights, read_record(meta), data, threshold, crops, crop)
    with atomic_write(out, force) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    click.echo(f"kept {sum(len(a) for a in active)} of {sum(len(k) for k in kl)} latent channels: {active}")
