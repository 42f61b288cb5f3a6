"""`vaezip bpd`: bits per subpixel of images, folders and data sets, as a table or JSON.

A thin layer over `vaezip.evaluation.rates`: it gathers the inputs (image files, folders of
images, any `vaezip.training.data.load_dataset` spec), measures each image on its own, and
prints one row per image plus a total (total bits over total subpixels).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

import click

from vaezip.errors import InputError, OutputExistsError


def _dataset_channels(model: Optional[str]) -> Optional[int]:
    """Channels to load a data set with: the model's, or None (decide from the data)."""
    if model is None:
        return None
    from vaezip.network import registry

    return registry.get_spec(model).config.channels


def _load_dataset(spec: str, limit: Optional[int], channels: Optional[int]):
    """Arrays of a data set; without a model, gray data (R = G = B) stays one channel."""
    from vaezip.training import data

    if channels is not None:
        return data.load_dataset(spec, limit, channels)
    arrays = data.load_dataset(spec, limit, 3)
    if all((a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all() for a in arrays):
        arrays = [a[..., :1] for a in arrays]
    return arrays


def gather(inputs, limit: Optional[int], model: Optional[str]) -> list[tuple[str, str, object]]:
    """(label, file stem, image or path) for every input, at most `limit` in all.

    An existing image file is read as it is (mode kept); a folder with image files
    gives those files, sorted; anything else is a `load_dataset` spec.
    """
    from vaezip.training import data

    items: list[tuple[str, str, object]] = []
    for spec in inputs:
        left = None if limit is None else limit - len(items)
        if left is not None and left <= 0:
            break
        path = Path(spec)
        if path.is_file() and path.suffix.lower() in data.IMAGE_SUFFIXES:
            items.append((str(path), path.stem, path))
        elif path.is_dir() and data.list_images(path):
            items += [(str(p), p.stem, p) for p in data.list_images(path)[:left]]
        elif path.suffix.lower() in data.IMAGE_SUFFIXES and not path.exists():
            raise InputError(f"{spec}: no such file")
        else:
            arrays = _load_dataset(spec, left, _dataset_channels(model))
            stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.split(":")[0]).stem or "image")
            items += [(f"{spec}[{i}]", f"{stem}_{i}", a) for i, a in enumerate(arrays)]
    if not items:
        raise InputError("no images to measure")
    return items


def _heatmap_targets(out: Path, stems: list[str], force: bool) -> list[Path]:
    """OUT for one image, OUT_{stem}.png for several; refuses to overwrite without --force."""
    if len(stems) == 1:
        targets = [out]
    else:
        base = out.with_suffix("") if out.suffix.lower() == ".png" else out
        targets = [base.with_name(f"{base.name}_{stem}.png") for stem in stems]
    for t in targets:
        if t.is_dir():
            raise OutputExistsError(f"{t} is a directory")
        if t.exists() and not force:
            raise OutputExistsError(f"{t} exists (use --force to overwrite)")
        if not t.parent.is_dir():
            raise InputError(f"{t.parent}: no such folder")
    return targets


def _json_row(label: str, report) -> dict:
    row = {"image": label, **report.to_dict()}
    if report.iwae_bpd is None:
        del row["iwae_bpd"]
    return row


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table(rows: list[tuple[str, object]], samples: int, breakdown: bool, compare: bool):
    from rich.table import Table

    from vaezip.evaluation.rates import BASELINE_NAMES

    models = sorted({r.model for _, r in rows})
    table = Table(title=f"bits per subpixel, model {', '.join(models)}", title_justify="left",
                  show_edge=False, pad_edge=False)
    table.add_column("image", overflow="fold")
    numeric = ["−ELBO"] + ([f"IWAE({samples})"] if samples else []) + ["coded", "file", "overhead", "header"]
    numeric += ["start-up", "grids, offsets"] if breakdown else []
    names = {"png": "PNG", "webp": "WebP", "jpegxl": "JPEG-XL"}
    numeric += [names.get(b, b) for b in BASELINE_NAMES] if compare else []
    for name in numeric:
        table.add_column(name, justify="right")
    for i, (label, r) in enumerate(rows):
        cells = [_fmt(r.nelbo_bpd)] + ([_fmt(r.iwae_bpd)] if samples else [])
        cells += [_fmt(r.coded_bpd), _fmt(r.file_bpd), f"{100 * r.gap:+.1f}%", _fmt(r.header_bpd, 4)]
        cells += [_fmt(r.startup_bpd, 4), _fmt(r.discretisation_bpd, 4)] if breakdown else []
        if compare:
            cells += ["missing" if r.baselines.get(b) is None else _fmt(r.baselines[b]) for b in BASELINE_NAMES]
        table.add_row(label, *cells, end_section=i == len(rows) - 2 and len(rows) > 1)
    return table


def _kl_line(report) -> str:
    if not report.kl_bpd:
        return ""
    parts = [f"1/{f} x{c}: {kl:.4f} ({100 * share:.0f}%)"
             for (f, c), kl, share in zip(report.latent_groups, report.kl_bpd, report.kl_share)]
    recon = f"reconstruction {report.recon_bpd:.4f}; " if report.recon_bpd is not None else ""
    return f"{recon}latent KL by group (scale x channels: bpd, share): " + ", ".join(parts)


@click.command("bpd")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", help="Registered model name (default: the one for the image mode).")
@click.option("--samples", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="IWAE importance samples K (0: skip).")
@click.option("--compare", is_flag=True, help="Also size each image with PNG, WebP and JPEG-XL (lossless).")
@click.option("--heatmap", "heatmap_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a bits-per-pixel picture (OUT_{stem}.png per image when there are several).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", type=click.IntRange(min=1), help="Measure at most N images.")
@click.option("--no-breakdown", is_flag=True, help="Skip the start-up / grids-and-offsets split (one encode less).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing heatmap files.")
def bpd_command(inputs, model, samples, compare, heatmap_out, as_json, limit, no_breakdown, force) -> None:
    """Bits per subpixel of images, folders and data sets: −ELBO, IWAE, coded size.

    INPUTS are image files, folders of images, or data set specs (mnist-test,
    cifar10-test, FILE.npz[:KEY], an IDX file, ...; see vaezip.training.data.load_dataset).

    Reports −ELBO, the IWAE bound with K samples, the real coded size (payload and
    whole file), the overhead over −ELBO split into header, start-up (what an
    empty stack costs) and the rest (the integer parameter grids, less what the
    scale offsets of format version 3 save), and with --compare the same pixels
    through PNG, WebP and JPEG-XL. Each image is coded as its own file; the total
    row is total bits over total subpixels.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from vaezip.evaluation.rates import heatmap, measure, render_heatmap, total_report
    from vaezip.imaging.images import read_image

    items = gather(inputs, limit, model)
    targets = _heatmap_targets(heatmap_out, [stem for _, stem, _ in items], force) if heatmap_out else []
    breakdown = not no_breakdown
    rows = []
    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty(),
                   console=Console(file=sys.stderr))
    with bar:
        task = bar.add_task("bpd", total=len(items))
        for i, (label, _, source) in enumerate(items):
            bar.update(task, description=f"bpd {Path(label).name}")
            image = read_image(source) if isinstance(source, Path) else source
            report = measure(image, model, samples=samples, breakdown=breakdown, compare=compare, seed=i)
            rows.append((label, report))
            if targets:
                bits = heatmap(image, model)
                render_heatmap(image, bits, targets[i])
            bar.advance(task)
    total = total_report([r for _, r in rows]) if len(rows) > 1 else None
    if as_json:
        if total is None:
            obj = _json_row(*rows[0])
        else:
            obj = {"images": [_json_row(label, r) for label, r in rows], "total": _json_row("total", total)}
        click.echo(json.dumps(obj, indent=1))
        return
    shown = rows + ([(f"total ({len(rows)} images)", total)] if total else [])
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200, highlight=False)
    console.print(_table(shown, samples, breakdown, compare))
    kl = _kl_line(total or rows[0][1])
    if kl:
        console.print(kl, soft_wrap=True)
    for t in targets:
        console.print(f"heatmap: {t}", soft_wrap=True)
