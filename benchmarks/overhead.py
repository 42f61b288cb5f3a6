"""Start-up overhead of single-image files by image size: file bits / −ELBO bits.

For each size, centre crops of Kodak images are compressed as single .vz files
(header included) and compared with the model's −ELBO on the same pixels and
tiling. Strategies are model variants of the shipped weights:

  pruned    the shipped config: collapsed latent channels never coded;
  unpruned  every latent channel coded (the config before pruning).

    python benchmarks/overhead.py [--images 1 5 13 23] [--sizes 32 64 128 256 full]
        [--model NAME] [--strategies pruned unpruned] [--version N]

Default: all 24 Kodak images (crops are evaluation data: the models never saw Kodak).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from PIL import Image as PILImage

from vaezip import api
from vaezip.coding import imagecodec
from vaezip.network import registry

KODAK = "/work/shared/data/kodak/kodim{:02d}.png"


def crop(pixels: np.ndarray, size) -> np.ndarray:
    if size == "full":
        return pixels
    h, w = pixels.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def variants(name: str) -> dict[str, registry.LoadedModel]:
    spec = registry.get_spec(name)
    shipped = registry.load_model(name)
    unpruned = replace(spec, name=name, config=replace(spec.config, active_latents=None))
    return {"pruned": shipped, "unpruned": registry.model_from_weights(unpruned, shipped.net.state_dict())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=list(range(1, 25)))
    parser.add_argument("--sizes", nargs="+", default=["32", "64", "128", "256", "full"])
    parser.add_argument("--model", default="photo-rgb-1")
    parser.add_argument("--strategies", nargs="+", choices=["pruned", "unpruned"], default=["pruned", "unpruned"])
    parser.add_argument("--version", type=int, default=None, help="format version (default: the model's newest)")
    parser.add_argument("--json-out", default="/tmp/vaezip-overhead.json")
    args = parser.parse_args()
    sizes = [s if s == "full" else int(s) for s in args.sizes]
    models = {name: loaded for name, loaded in variants(args.model).items() if name in args.strategies}
    rows = []
    for size in sizes:
        for strategy, loaded in models.items():
            file_bits = nelbo_bits = header_bits = subpixels = png_bits = 0
            worst_overhead, worse_than_png = -1.0, 0
            start = time.perf_counter()
            for index in args.images:
                pixels = crop(np.asarray(PILImage.open(KODAK.format(index)).convert("RGB")), size)
                data = api.compress(pixels, loaded=loaded, version=args.version)
                back = api.decompress(data, loaded=loaded)
                if not np.array_equal(back, pixels):
                    raise SystemExit(f"round trip failed: kodim{index:02d} size {size} {strategy}")
                tile = imagecodec.tile_size(*pixels.shape[:2], loaded.spec.config.downsampling)
                nelbo, _ = api.model_bits(loaded, pixels, tile)
                report_header = len(data) - 4 * len(api.container.unpack(data)[1])
                file_bits += 8 * len(data)
                header_bits += 8 * report_header
                nelbo_bits += nelbo
                subpixels += pixels.size
                png = _png_bytes(pixels)
                png_bits += 8 * png
                worst_overhead = max(worst_overhead, 8 * len(data) / nelbo - 1)
                worse_than_png += len(data) > png
            row = {
                "size": size, "strategy": strategy, "images": len(args.images), "subpixels": subpixels,
                "file_bpd": file_bits / subpixels, "nelbo_bpd": nelbo_bits / subpixels,
                "header_bpd": header_bits / subpixels, "png_bpd": png_bits / subpixels,
                "overhead": file_bits / nelbo_bits - 1, "worst_overhead": worst_overhead,
                "files_larger_than_png": worse_than_png, "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.json_out, "w") as f:
        json.dump({"images": args.images, "model": args.model, "version": args.version, "rows": rows}, f, indent=1)
    print("\n| size | strategy | −ELBO bpd | file bpd | overhead (total) | worst image | of which header | PNG bpd | files > PNG |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["size"] if r["size"] == "full" else f"{r['size']}x{r['size']}"
        print(f"| {label} | {r['strategy']} | {r['nelbo_bpd']:.3f} | {r['file_bpd']:.3f} | "
              f"{100 * r['overhead']:+.2f}% | {100 * r['worst_overhead']:+.2f}% | "
              f"{100 * r['header_bpd'] / r['nelbo_bpd']:.2f}% | {r['png_bpd']:.3f} | {r['files_larger_than_png']}/{r['images']} |")


def _png_bytes(pixels: np.ndarray) -> int:
    import io

    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.tell()


if __name__ == "__main__":
    main()
