"""The `vaezip` command: a click group whose commands are thin calls into `vaezip.api`.

Every `VaezipError` becomes one line on stderr and exit status 1; outputs are
written to a temporary name in the target folder and renamed, so a failure
never leaves a partial file, and nothing is overwritten without --force.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

from vaezip.errors import OutputExistsError, VaezipError


class VaezipGroup(click.Group):
    """Maps VaezipError (and Ctrl-C) to one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VaezipError as exc:
            click.echo(f"vaezip: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("vaezip: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("vaezip: error: out of memory", err=True)
            sys.exit(1)


@click.group(cls=VaezipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vaezip")
def main() -> None:
    """Lossless image compression with a hierarchical VAE and bits-back ANS coding."""


def _check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists (use --force to overwrite)")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory")


@contextmanager
def _atomic_output(path: Path):
    """Yield a temporary path beside `path`; rename it into place on success."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _progress(total: int, label: str):
    """A rich progress bar over tiles, shown only on a terminal."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total} tiles",
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty())
    return bar, bar.add_task(label, total=total)


def _tile_count(height: int, width: int) -> int:
    from vaezip.api import MAX_TILE

    return -(-height // MAX_TILE) * -(-width // MAX_TILE)


def _inputs_exist(paths) -> None:
    for p in paths:
        if not Path(p).exists():
            raise VaezipError(f"{p}: no such file")
        if Path(p).is_dir():
            raise VaezipError(f"{p}: is a directory")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file (one input) or folder.")
@click.option("--model", help="Registered model name (default: the one for the image mode).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
def compress(images, output, model, force) -> None:
    """Compress IMAGES losslessly: IMG -> IMG.vz (inputs are kept)."""
    from vaezip import api
    from vaezip.images import read_image

    _inputs_exist(images)
    targets = _targets(images, output, lambda p: p.with_name(p.name + ".vz"))
    for source, target in targets:
        _check_output(target, force)
    for source, target in targets:
        start = time.perf_counter()
        image = read_image(source)
        bar, task = _progress(_tile_count(image.height, image.width), f"compress {source.name}")
        with bar:
            data = api.compress(image, model, progress=lambda n: bar.advance(task, n))
        with _atomic_output(target) as tmp:
            tmp.write_bytes(data)
        seconds = time.perf_counter() - start
        bpd = 8 * len(data) / image.num_subpixels
        click.echo(f"{source} -> {target}: {_size(source.stat().st_size)} -> {_size(len(data))}, "
                   f"{bpd:.3f} bits/subpixel, ratio {image.num_subpixels / len(data):.2f}:1, {seconds:.1f} s")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file (one input) or folder.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
def decompress(files, output, force) -> None:
    """Decompress FILES: FILE.vz -> FILE (a PNG unless the name says otherwise)."""
    from vaezip import api
    from vaezip.container import read_header
    from vaezip.images import write_png

    _inputs_exist(files)
    targets = _targets(files, output, _decoded_name)
    for source, target in targets:
        _check_output(target, force)
    for source, target in targets:
        start = time.perf_counter()
        data = source.read_bytes()
        header = read_header(data)
        tiles = _tile_count(header.height, header.width) if header.model_name else 0
        bar, task = _progress(tiles, f"decompress {source.name}")
        with bar:
            image = api.decompress_image(data, progress=lambda n: bar.advance(task, n))
        with _atomic_output(target) as tmp:
            write_png(image, tmp)
        seconds = time.perf_counter() - start
        click.echo(f"{source} -> {target}: {image.width}x{image.height} {image.mode}, {seconds:.1f} s")


def _decoded_name(path: Path) -> Path:
    if path.suffix == ".vz":
        stem = path.with_suffix("")
        return stem if stem.suffix.lower() == ".png" else stem.with_name(stem.name + ".png")
    return path.with_name(path.name + ".png")


def _targets(inputs, output, default):
    """(input, output) pairs; -o names a file for one input, a folder for several."""
    if output is None:
        return [(p, default(p)) for p in inputs]
    if len(inputs) == 1 and not output.is_dir():
        return [(inputs[0], output)]
    if not output.is_dir():
        raise VaezipError(f"{output}: -o must be an existing folder when there are several inputs")
    return [(p, output / default(p).name) for p in inputs]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(file) -> None:
    """Show the header of a .vz file."""
    from vaezip.container import unpack

    data = file.read_bytes()
    header, words = unpack(data)
    det = sum(1 for e in header.schedule if e & 0x8000)
    rows = [
        ("file", f"{file} ({len(data)} bytes)"),
        ("image", f"{header.width}x{header.height} {header.mode}"),
        ("model", f"{header.model_name or '(plane coder only)'} {header.model_hash.hex() if header.model_name else ''}"),
        ("tiles", f"{header.tile_size}px, {len(header.schedule)} batches ({det} without bits-back)" if header.model_name else "-"),
        ("payload", f"{len(words)} words ({4 * len(words)} bytes), header {len(data) - 4 * len(words)} bytes"),
        ("bits/subpixel", f"{8 * len(data) / (header.width * header.height * _channels(header.mode)):.4f}"),
        ("icc profile", f"{len(header.icc_profile)} bytes" if header.icc_profile else "none"),
        ("written by", header.runtime or "?"),
    ]
    for key, value in rows:
        click.echo(f"{key:>14}: {value}")


def _channels(mode: str) -> int:
    return {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 1, "1": 1}[mode]


@main.command()
def models() -> None:
    """List the registered models."""
    from vaezip import registry

    for spec in registry.specs().values():
        bpd = ", ".join(f"{k} {v}" for k, v in spec.bpd.items()) or "-"
        click.echo(f"{spec.name:<16} modes {','.join(spec.modes):<6} sha256 {spec.sha256[:12]}  {bpd}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", help="Registered model name.")
@click.option("--samples", type=click.IntRange(0, 1000), default=0, help="IWAE importance samples K (0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image (a list for several).")
def bpd(images, model, samples, as_json) -> None:
    """Bits per subpixel of IMAGES: −ELBO, IWAE, coded and file size."""
    from vaezip import api

    for p in images:
        if not p.exists():
            raise VaezipError(f"{p}: no such file or folder")
    reports = []
    for path in _expand(images):
        r = api.measure(path, model, samples=samples)
        reports.append((path, r))
        if not as_json:
            iwae = f"  iwae({samples}) {r.iwae_bpd:.4f}" if r.iwae_bpd is not None else ""
            click.echo(f"{path}: -elbo {r.nelbo_bpd:.4f}{iwae}  coded {r.coded_bpd:.4f}  file {r.file_bpd:.4f}"
                       f"  gap {100 * r.gap:+.2f}%  ({r.model})")
    if as_json:
        objs = [_report_json(p, r) for p, r in reports]
        click.echo(json.dumps(objs[0] if len(objs) == 1 else objs, indent=1))


def _report_json(path: Path, r) -> dict:
    obj = {"image": str(path), "model": r.model, "mode": r.mode, "width": r.width, "height": r.height,
           "nelbo_bpd": r.nelbo_bpd, "coded_bpd": r.coded_bpd, "file_bpd": r.file_bpd,
           "file_bytes": r.file_bytes, "header_bytes": r.header_bytes, "gap": r.gap}
    if r.iwae_bpd is not None:
        obj["iwae_bpd"], obj["samples"] = r.iwae_bpd, r.samples
    return obj


def _expand(paths):
    image_suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.suffix.lower() in image_suffixes)
        else:
            yield p


def _register_train() -> None:
    from .train import train_command

    main.add_command(train_command)


_register_train()

if __name__ == "__main__":
    main()
