"""The `vaezip` command: a click group whose commands are thin calls into `vaezip.api`.

Every `VaezipError` becomes one line on stderr and exit status 1; outputs are
written to a temporary name in the target folder and moved into place, so a
failure never leaves a partial file, and nothing is overwritten without --force,
not even by another vaezip process writing the same name at the same time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import click

from vaezip.errors import VaezipError
from vaezip.files import atomic_write, check_output
from vaezip.imaging.images import PNG_LEVEL
from vaezip.network import kernels


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


def _progress(total: Optional[int], label: str, unit: str = "tiles"):
    """A rich progress bar over tiles (or `unit`) when stderr is a terminal, drawn there so
    stdout carries only results; elsewhere a silent stand-in (rich is not even imported)."""
    if not sys.stderr.isatty():
        return _NoProgress(), 0
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), f"{{task.completed}}/{{task.total}} {unit}",
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=Console(file=sys.stderr))
    return bar, bar.add_task(label, total=total)


class _NoProgress:
    """The part of rich's `Progress` the commands use, doing nothing."""

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def advance(self, task, advance: float = 1) -> None:
        return None

    def update(self, task, **fields) -> None:
        return None


JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout instead of the text summary.")


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1))


def _tile_count(height: int, width: int) -> int:
    from vaezip.coding.imagecodec import MAX_TILE

    return -(-height // MAX_TILE) * -(-width // MAX_TILE)


def _lift_cap_for_models(model: Optional[str]) -> None:
    """`_lift_cap_for_formats` of what `model`, or else every default model, writes
    (`versions.newest`); an unknown model keeps the cap (the command reports it)."""
    from vaezip.format import versions
    from vaezip.network import registry

    names = [model] if model else [registry.default_model(mode) for mode in ("RGB", "L")]
    specs = registry.specs()
    _lift_cap_for_formats(versions.newest(specs[name].config.fixed_bits is not None).version if name in specs else None
                          for name in names if name)


def _lift_cap_for_formats(format_versions) -> None:
    """Lift oneDNN's AVX2 cap (`kernels.lift_cap`) when every format coded is exact (None: not
    known, the cap stays)."""
    if kernels.exact_only(format_versions):
        kernels.lift_cap()


def _named_version(path: Path) -> Optional[int]:
    """The format version `path`'s preamble names (None if unreadable: the decoder reports it)."""
    from vaezip.format.container import PREAMBLE_BYTES, named_version

    try:
        with open(path, "rb") as f:
            return named_version(f.read(PREAMBLE_BYTES))
    except OSError:
        return None


def _inputs_exist(paths) -> None:
    for p in paths:
        if not Path(p).exists():
            raise VaezipError(f"{p}: no such file")
        if Path(p).is_dir():
            raise VaezipError(f"{p}: is a directory")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file (one image) or folder (several images, or folders: their tree is kept).")
@click.option("--model", help="Registered model name (default: the one for the image mode).")
@click.option("-j", "--jobs", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Images compressed at once, one process and core each.")
@click.option("-e", "--effort", type=int, default=None,
              help="Encoder effort 1..9, like cjxl -e: higher encodes more slowly into smaller files; "
                   "decoding time does not depend on it.  [default: 3]")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@JSON_OPTION
def compress(images, output, model, jobs, effort, force, as_json) -> None:
    """Compress IMAGES losslessly: IMG -> IMG.vz, DIR -> every image in it (inputs are kept).

    A JPEG or lossy WebP input is decoded and its pixels are coded losslessly: the .vz
    gives back those pixels (as a PNG), not the original file; the summary line says so.

    --json: a list with one record per image, in input order: input, output, input_bytes,
    output_bytes, mode, subpixels, bpd (bits per subpixel of the .vz file), ratio, seconds,
    decoded_from (the lossy format whose pixels were coded, or null), effort.
    """
    from vaezip.cli.jobs import compress_file, compress_parallel
    from vaezip.format.versions import DEFAULT_EFFORT, EFFORTS

    # Checked here, not by click.IntRange: a bad value is one line and exit status 1, as every error.
    effort = DEFAULT_EFFORT if effort is None else effort
    if effort not in EFFORTS:
        raise VaezipError(f"--effort must be {EFFORTS.start}..{EFFORTS.stop - 1}, got {effort}")
    targets = _compress_targets(images, output)
    for source, target in targets:
        check_output(target, force)
    _lift_cap_for_models(model)
    records: dict[Path, dict] = {}

    def report(done) -> None:
        record = {"input": str(done.source), "output": str(done.target), "input_bytes": done.source_bytes,
                  "output_bytes": done.output_bytes, "mode": done.mode, "subpixels": done.subpixels,
                  "bpd": 8 * done.output_bytes / done.subpixels, "ratio": done.subpixels / done.output_bytes,
                  "seconds": done.seconds, "decoded_from": done.source_format or None, "effort": effort}
        if as_json:
            records[done.target] = record
            return
        note = f" (the decoded {done.source_format} pixels, not the {done.source_format} file)" \
            if done.source_format else ""
        click.echo(f"{done.source} -> {done.target}: {done.mode}, {_size(done.source_bytes)} -> "
                   f"{_size(done.output_bytes)}, {record['bpd']:.3f} bits/subpixel, ratio {record['ratio']:.2f}:1, "
                   f"{done.seconds:.1f} s{note}")

    if jobs > 1 and len(targets) > 1:
        bar, task = _progress(len(targets), f"compress {len(targets)} images", unit="images")
        with bar:
            compress_parallel(targets, model, force, jobs, lambda done: (bar.advance(task, 1), report(done)), effort)
    else:
        for source, target in targets:
            bar, task = _progress(None, f"compress {source.name}")
            with bar:
                done = compress_file(source, target, model, force, progress=lambda n: bar.advance(task, n),
                                     on_image=lambda img: bar.update(task, total=_tile_count(img.height, img.width)),
                                     effort=effort)
            report(done)
    if as_json:
        _print_json([records[target] for _, target in targets])


def _compress_targets(inputs, output: Optional[Path]) -> list[tuple[Path, Path]]:
    """(image, .vz path) pairs. A file IMG gives IMG.vz (or -o); a folder gives every
    image under it, IMG.vz beside it, or under -o at the same relative path."""
    for p in inputs:
        if not p.exists():
            raise VaezipError(f"{p}: no such file or folder")
    if not any(p.is_dir() for p in inputs):
        return _targets(inputs, output, lambda p: p.with_name(p.name + ".vz"))
    if output is not None and output.exists() and not output.is_dir():
        raise VaezipError(f"{output}: -o must be a folder when compressing folders")
    pairs = []
    for p in inputs:
        if not p.is_dir():
            pairs.append((p, (output / p.name if output else p).with_name(p.name + ".vz")))
            continue
        for name, source in _image_members([p]):
            target = (output / name if output else source)
            pairs.append((source, target.with_name(target.name + ".vz")))
    if not pairs:
        raise VaezipError("no images to compress")
    return pairs


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file (one input) or folder.")
@click.option("--png-level", type=click.IntRange(0, 9), default=PNG_LEVEL, show_default=True,
              help="zlib level of the PNGs written (9: smallest, slowest; 6 is Pillow's default).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@JSON_OPTION
def decompress(files, output, png_level, force, as_json) -> None:
    """Decompress FILES: FILE.vz -> FILE (a PNG unless the name says otherwise).

    --json: a list with one record per file, in input order: input, output, input_bytes,
    output_bytes, width, height, mode, subpixels, bpd (bits per subpixel of the .vz file), seconds.
    """
    from vaezip import api
    from vaezip.format.container import read_header
    from vaezip.imaging.images import write_png

    _inputs_exist(files)
    targets = _targets(files, output, _decoded_name)
    for source, target in targets:
        check_output(target, force)
    _lift_cap_for_formats(_named_version(path) for path, _ in targets)
    records = []
    for source, target in targets:
        start = time.perf_counter()
        data = source.read_bytes()
        header = read_header(data)
        tiles = _tile_count(header.height, header.width) if header.model_name else 0
        bar, task = _progress(tiles, f"decompress {source.name}")
        with bar:
            image = api.decompress_image(data, progress=lambda n: bar.advance(task, n))
        with atomic_write(target, force) as tmp:
            write_png(image, tmp, png_level)
        seconds = time.perf_counter() - start
        if as_json:
            records.append({"input": str(source), "output": str(target), "input_bytes": len(data),
                            "output_bytes": target.stat().st_size, "width": image.width, "height": image.height,
                            "mode": image.mode, "subpixels": image.num_subpixels,
                            "bpd": 8 * len(data) / image.num_subpixels, "seconds": seconds})
            continue
        click.echo(f"{source} -> {target}: {image.width}x{image.height} {image.mode}, {seconds:.1f} s")
    if as_json:
        _print_json(records)


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
@click.argument("file", type=click.Path(path_type=Path))
@JSON_OPTION
def info(file, as_json) -> None:
    """Show the header of a .vz file.

    --json: one object: file, bytes, version, width, height, mode, model, model_hash,
    tile_size, batches, deterministic_batches, payload_words, header_bytes, bpd,
    icc_profile_bytes, runtime, effort (the encoder effort, null before format version 5).
    """
    from vaezip.format.container import DETERMINISTIC_FLAG, unpack
    from vaezip.imaging.images import CHANNELS

    _inputs_exist([file])  # not click's exists=True: bad input is a VaezipError, as in every command
    data = file.read_bytes()
    header, words = unpack(data)
    det = sum(1 for e in header.schedule if e & DETERMINISTIC_FLAG)
    bpd = 8 * len(data) / (header.width * header.height * CHANNELS[header.mode])
    if as_json:
        _print_json({
            "file": str(file), "bytes": len(data), "version": header.version, "width": header.width,
            "height": header.height, "mode": header.mode, "model": header.model_name or None,
            "model_hash": header.model_hash.hex() if header.model_name else None,
            "tile_size": header.tile_size if header.model_name else None, "batches": len(header.schedule),
            "deterministic_batches": det, "payload_words": len(words), "header_bytes": len(data) - 4 * len(words),
            "bpd": bpd, "icc_profile_bytes": len(header.icc_profile), "runtime": header.runtime or None,
            "effort": header.effort or None,
        })
        return
    rows = [
        ("file", f"{file} ({len(data)} bytes, format version {header.version})"),
        ("effort", str(header.effort) if header.effort else "- (not recorded before format version 5)"),
        ("image", f"{header.width}x{header.height} {header.mode}"),
        ("model", f"{header.model_name or '(plane coder only)'} {header.model_hash.hex() if header.model_name else ''}"),
        ("tiles", f"{header.tile_size}px, {len(header.schedule)} batches ({det} without bits-back)" if header.model_name else "-"),
        ("payload", f"{len(words)} words ({4 * len(words)} bytes), header {len(data) - 4 * len(words)} bytes"),
        ("bits/subpixel", f"{bpd:.4f}"),
        ("icc profile", f"{len(header.icc_profile)} bytes" if header.icc_profile else "none"),
        ("written by", header.runtime or ("- (not recorded from format version 10 on)"
                                          if header.fmt.compact_header else "?")),
    ]
    for key, value in rows:
        click.echo(f"{key:>14}: {value}")


@main.command()
@JSON_OPTION
def models(as_json) -> None:
    """List the registered models.

    --json: a list with one record per model: name, file, modes, sha256, bpd (as registered).
    """
    from vaezip.network import registry

    if as_json:
        _print_json([{"name": s.name, "file": s.file, "modes": list(s.modes), "sha256": s.sha256, "bpd": s.bpd}
                     for s in registry.specs().values()])
        return
    for spec in registry.specs().values():
        bpd = ", ".join(f"{k} {v}" for k, v in spec.bpd.items()) or "-"
        click.echo(f"{spec.name:<16} modes {','.join(spec.modes):<6} sha256 {spec.sha256[:12]}  {bpd}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Archive to write (SET.vzp).")
@click.option("--model", help="Registered model name for every image (default: the one for each image's mode).")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing archive.")
@JSON_OPTION
def pack(inputs, output, model, force, as_json) -> None:
    """Pack images and folders of images into one archive: IMG|DIR... -> SET.vzp.

    Folders are searched recursively; their images are stored under their path
    relative to the folder, a single image under its file name. All images share
    one bits-back stream, so only the first pays the start-up cost.

    --json: one object: output, images (name, input, subpixels per image), input_bytes,
    output_bytes, subpixels, bpd (bits per subpixel of the archive), seconds.
    """
    from vaezip import api
    from vaezip.format.archive import name_problem
    from vaezip.imaging.images import read_image

    for p in inputs:
        if not p.exists():
            raise VaezipError(f"{p}: no such file or folder")
    check_output(output, force)
    members = _image_members(inputs)
    if not members:
        raise VaezipError("no images to pack")
    seen: dict[str, Path] = {}
    for name, path in members:
        problem = name_problem(name)
        if problem:
            raise VaezipError(f"{path}: cannot store as {name!r}: {problem}")
        if name in seen:
            raise VaezipError(f"{seen[name]} and {path} would both be stored as {name!r}")
        seen[name] = path
    _lift_cap_for_models(model)
    start = time.perf_counter()
    items = [(name, read_image(path)) for name, path in members]
    tiles = sum(_tile_count(img.height, img.width) for _, img in items if img.mode in ("L", "LA", "RGB", "RGBA"))
    bar, task = _progress(tiles, f"pack {output.name}")
    with bar:
        data = api.pack(items, model, progress=lambda n: bar.advance(task, n))
    with atomic_write(output, force) as tmp:
        tmp.write_bytes(data)
    seconds = time.perf_counter() - start
    subpixels = sum(img.num_subpixels for _, img in items)
    source_bytes = sum(path.stat().st_size for _, path in members)
    if as_json:
        _print_json({"output": str(output),
                     "images": [{"name": name, "input": str(path), "subpixels": img.num_subpixels}
                                for (name, path), (_, img) in zip(members, items)],
                     "input_bytes": source_bytes, "output_bytes": len(data), "subpixels": subpixels,
                     "bpd": 8 * len(data) / subpixels, "seconds": seconds})
        return
    click.echo(f"{output}: {len(items)} images, {_size(source_bytes)} -> {_size(len(data))}, "
               f"{8 * len(data) / subpixels:.3f} bits/subpixel, {seconds:.1f} s")


def _image_members(inputs) -> list[tuple[str, Path]]:
    """(stored name, path): a folder's images by relative path, a file by its name."""
    image_suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".pbm"}
    members = []
    for p in inputs:
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in image_suffixes)
            members += [(q.relative_to(p).as_posix(), q) for q in files]
        else:
            members.append((p.name, p))
    return members


@main.command()
@click.argument("archive_file", metavar="SET.vzp", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Folder to write the images into (created if missing).")
@click.option("--png-level", type=click.IntRange(0, 9), default=PNG_LEVEL, show_default=True,
              help="zlib level of the PNGs written (9: smallest, slowest; 6 is Pillow's default).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing files.")
@JSON_OPTION
def unpack(archive_file, output, png_level, force, as_json) -> None:
    """Unpack an archive into a folder: each image as a PNG under its stored name
    (".png" appended unless the name ends so). Nothing is written unless every
    image decodes and no file would be overwritten (without --force).

    --json: one object: input, output, images (name, output, width, height, mode,
    subpixels per image), input_bytes, subpixels, bpd (bits per subpixel of the archive), seconds.
    """
    from vaezip import api
    from vaezip.format import archive
    from vaezip.imaging.images import write_png

    _inputs_exist([archive_file])
    data = archive_file.read_bytes()
    entries, _ = archive.unpack(data)  # validates the whole file before any decoding
    if output.exists() and not output.is_dir():
        raise VaezipError(f"{output}: not a folder")
    targets = [output / _unpacked_name(e.name) for e in entries]
    _check_unpack_targets(output, targets, [e.name for e in entries], force)
    _lift_cap_for_formats(e.header.version for e in entries)
    start = time.perf_counter()
    bar, task = _progress(sum(archive.tile_count(e.header) for e in entries), f"unpack {archive_file.name}")
    with bar:
        decoded = api.unpack(data, progress=lambda n: bar.advance(task, n))
    for target, (_, image) in zip(targets, decoded):
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, force) as tmp:
            write_png(image, tmp, png_level)
    seconds = time.perf_counter() - start
    subpixels = sum(image.num_subpixels for _, image in decoded)
    if as_json:
        _print_json({"input": str(archive_file), "output": str(output),
                     "images": [{"name": name, "output": str(target), "width": image.width, "height": image.height,
                                 "mode": image.mode, "subpixels": image.num_subpixels}
                                for target, (name, image) in zip(targets, decoded)],
                     "input_bytes": len(data), "subpixels": subpixels, "bpd": 8 * len(data) / subpixels,
                     "seconds": seconds})
        return
    click.echo(f"{archive_file} -> {output}: {len(decoded)} images, {_size(len(data))}, "
               f"{8 * len(data) / subpixels:.3f} bits/subpixel, {seconds:.1f} s")


def _unpacked_name(name: str) -> str:
    return name if name.lower().endswith(".png") else name + ".png"


def _check_unpack_targets(output: Path, targets: list[Path], names: list[str], force: bool) -> None:
    """Refuse clashing names, paths blocked by files, and (without --force) existing files."""
    by_target: dict[Path, str] = {}
    for target, name in zip(targets, names):
        if target in by_target:
            raise VaezipError(f"archive members {by_target[target]!r} and {name!r} would both be written to {target}")
        by_target[target] = name
    folders = {parent for t in targets for parent in t.parents if parent != output and output in parent.parents}
    for target, name in zip(targets, names):
        if target in folders:
            raise VaezipError(f"archive member {name!r} would be written to {target}, a folder of other members")
        for parent in target.parents:
            if parent == output:
                break
            if parent.exists() and not parent.is_dir():
                raise VaezipError(f"cannot write {target}: {parent} is not a folder")
        check_output(target, force)


def _register_train() -> None:
    from .train import train_command

    main.add_command(train_command)


def _register_bpd() -> None:
    from .bpd import bpd_command

    main.add_command(bpd_command)


def _register_model_tools() -> None:
    from .models import prune_command, registry_group

    main.add_command(registry_group)
    main.add_command(prune_command)


_register_train()
_register_bpd()
_register_model_tools()

def run() -> None:
    """The console entry point: `main`, then exit without the interpreter's teardown.

    Tearing down an interpreter that has loaded torch is a noticeable share of compressing a
    photo (measured in docs/RESULTS.md). Nothing needs it: every command closes and renames
    its outputs before it returns, and the streams are flushed here.
    """
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
