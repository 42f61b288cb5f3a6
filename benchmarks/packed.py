"""Packed data-set benchmark: a whole set in one .vzp archive against the model's −ELBO.

Packs the images with `vaezip.api.pack` (one chained bits-back stream, tile
sets batched across images), unpacks them with `api.unpack`, checks every image
pixel-exact (the run aborts on any difference), and reports in bits per
subpixel (total bits / total subpixels, H*W*C summed over the set):

  file        the whole .vzp file;
  payload     its ANS words alone (what bits-back coding costs);
  metadata    file − payload per image, in bytes (names, per-image headers
              with their 16-byte pixel checksums, after deflate);
  −ELBO       the model's single-sample −ELBO, summed over the images, tiled
              as coded (the same quantity as `api.model_bits` per image,
              computed in batches of tiles);
  overhead    file / −ELBO − 1 and payload / −ELBO − 1;
  baselines   PNG / WebP-lossless / JPEG-XL-lossless, one file per image
              (`vaezip.evaluation.baselines.baseline_sizes`, skipped if absent);
  times       pack and unpack wall time (this machine, in-process, model loaded).

    .venv/bin/python benchmarks/packed.py --dataset mnist-test [--limit N] [--model mnist-1]
        [--no-join] [--skip-baselines] [--json OUT.json] [--keep SET.vzp]

`--dataset` is `mnist-test`, `cifar10-test` (the first 1,000 CIFAR-10 test
images only: not comparable with full-test-set numbers in papers) or a folder
(images keep their modes; names are paths relative to the folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from vaezip import api
from vaezip.coding import imagecodec
from vaezip.format import archive, container
from vaezip.imaging.images import Image, from_array
from vaezip.network import registry

NELBO_TILES = 96  # tiles per network call for the batched −ELBO


def load(spec: str, limit: int | None) -> list[tuple[str, Image]]:
    """(name, Image) pairs of a named data set or a folder."""
    from vaezip.imaging.images import read_image
    from vaezip.training import data

    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in data.IMAGE_SUFFIXES)
        files = files[:limit]
        return [(p.relative_to(path).as_posix(), read_image(p)) for p in files]
    channels = 1 if spec.startswith("mnist") else 3
    arrays = data.load_dataset(spec, limit=limit, channels=channels)
    width = len(str(max(len(arrays) - 1, 0)))
    return [(f"{i:0{width}d}", from_array(a[:, :, 0] if a.shape[2] == 1 else a)) for i, a in enumerate(arrays)]


def nelbo_bits(images: list[Image], model: str | None, seed: int = 0) -> float:
    """Sum over the images of the −ELBO bits `api.model_bits` reports, in batches of tiles.

    Plane-coded planes (alpha, palette, bilevel) are not counted: the packed
    sets this benchmark targets have none (it raises if they do).
    """
    import torch

    from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles

    groups: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for img in images:
        if img.mode not in ("L", "RGB"):
            raise SystemExit(f"−ELBO of mode {img.mode} images is not implemented here")
        lm = imagecodec.model_for_mode(img.mode, model)
        name = lm.spec.name
        tile = imagecodec.tile_size(img.height, img.width, lm.spec.config.downsampling)
        grid = TileGrid(img.height, img.width, tile)
        indices = range(grid.count)
        groups.setdefault((name, tile), []).append(
            (lattice_to_pixels(split_tiles(img.pixels, grid, indices)), grid.pixel_masks(indices)))
    torch.manual_seed(seed)
    total = 0.0
    with torch.inference_mode():
        for (name, _), parts in groups.items():
            net = registry.load_model(name).net
            x_all = np.concatenate([p[0] for p in parts])
            m_all = np.concatenate([p[1] for p in parts])
            for start in range(0, len(x_all), NELBO_TILES):
                x = torch.from_numpy(x_all[start:start + NELBO_TILES])
                mask = torch.from_numpy(m_all[start:start + NELBO_TILES])
                total += float(net.nelbo(x, mask).nelbo_bits.to(torch.float64).sum())
    return total


def baseline_bits(images: list[Image]) -> dict[str, float | None]:
    """Total bits of each baseline over the images, one file per image (None: codec missing)."""
    try:
        from vaezip.evaluation.baselines import baseline_sizes
    except ImportError:
        return {}
    totals: dict[str, float | None] = {}
    for k, img in enumerate(images):
        for name, size in baseline_sizes(img).items():
            if size is None:
                totals[name] = None
            elif totals.get(name, 0.0) is not None:
                totals[name] = totals.get(name, 0.0) + 8.0 * size
        if (k + 1) % 1000 == 0:
            print(f"  baselines {k + 1}/{len(images)}", file=sys.stderr, flush=True)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="mnist-test, cifar10-test or a folder")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--model", default=None,
                        help="model for every image (default: mnist-1 for mnist*, else the one for each mode)")
    parser.add_argument("--no-join", action="store_true", help="code each image alone (push_image), for comparison")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="write the .vzp archive here")
    args = parser.parse_args()
    if args.model is None and args.dataset.startswith("mnist"):
        args.model = "mnist-1"  # photo-gray-1 is the default for L images; digits have their own model

    items = load(args.dataset, args.limit)
    images = [img for _, img in items]
    subpixels = sum(img.num_subpixels for img in images)
    print(f"{args.dataset}: {len(items)} images, {subpixels} subpixels", file=sys.stderr, flush=True)

    # Load the models before timing (as a long-running process would have them).
    for img in images[:1]:
        imagecodec.model_for_mode(img.mode, args.model)

    done = [0]
    step = max(1, len(items) // 20)

    def progress(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if before // step != done[0] // step:
            print(f"  tiles {done[0]}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    blob = api.pack(items, args.model, join=not args.no_join, progress=progress)
    pack_seconds = time.perf_counter() - start
    entries, words = archive.unpack(blob)
    print(f"packed in {pack_seconds:.1f} s: {len(blob)} bytes", file=sys.stderr, flush=True)
    if args.keep:
        args.keep.write_bytes(blob)

    done[0] = 0
    start = time.perf_counter()
    decoded = api.unpack(blob, progress=progress)
    unpack_seconds = time.perf_counter() - start
    for (name, img), (name2, img2) in zip(items, decoded, strict=True):
        if name != name2 or img.mode != img2.mode or not np.array_equal(img.pixels, img2.pixels) \
                or img.palette != img2.palette:
            raise SystemExit(f"MISMATCH: {name} does not decode to its pixels")
    print(f"unpacked in {unpack_seconds:.1f} s, all {len(items)} images pixel-exact", file=sys.stderr, flush=True)

    start = time.perf_counter()
    nelbo = nelbo_bits(images, args.model)
    nelbo_seconds = time.perf_counter() - start
    file_bits, payload_bits = 8.0 * len(blob), 32.0 * len(words)
    result = {
        "dataset": args.dataset + ("" if args.limit is None else f" (first {len(items)})"),
        "images": len(items),
        "subpixels": subpixels,
        "models": sorted({e.header.model_name for e in entries if e.header.model_name}),
        "joined": not args.no_join,
        "file_bytes": len(blob),
        "file_bpd": file_bits / subpixels,
        "payload_bpd": payload_bits / subpixels,
        "metadata_bytes_per_image": (len(blob) - 4 * len(words)) / len(items),
        "nelbo_bpd": nelbo / subpixels,
        "overhead_file": file_bits / nelbo - 1.0,
        "overhead_payload": payload_bits / nelbo - 1.0,
        "pack_seconds": pack_seconds,
        "unpack_seconds": unpack_seconds,
        "nelbo_seconds": nelbo_seconds,
        "ms_per_image": {"pack": 1000 * pack_seconds / len(items), "unpack": 1000 * unpack_seconds / len(items)},
        "batches": sum(len(e.header.schedule) for e in entries),
        "deterministic_batches": sum(1 for e in entries for s in e.header.schedule if s & container.DETERMINISTIC_FLAG),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    print(f"-ELBO {result['nelbo_bpd']:.4f} bpd; file {result['file_bpd']:.4f} "
          f"({100 * result['overhead_file']:+.2f}%), payload {result['payload_bpd']:.4f} "
          f"({100 * result['overhead_payload']:+.2f}%)", file=sys.stderr, flush=True)
    if not args.skip_baselines:
        start = time.perf_counter()
        totals = baseline_bits(images)
        result["baselines_bpd"] = {k: (None if v is None else v / subpixels) for k, v in totals.items()}
        result["baseline_seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
