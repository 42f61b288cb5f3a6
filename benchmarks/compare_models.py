"""−ELBO of two models on Kodak and the held-out wikiphotos: does a new model beat the old?

Each model is a registered name or a training run's weights and record (`OUT.pt`, read with
`OUT.json`). Every image is measured whole, tiled as the coder tiles it, latents sampled with
a fixed seed (`rates.model_bits`), so both models see the same tiles and the same noise.
Totals are total bits over total subpixels. Gray models (one channel) are measured on the
images converted to gray (Pillow's `convert("L")`, ITU-R 601 luma).

With --files (two registered models) each image is also compressed with each model at the
default effort (`vaezip.compress`, in this process), decoded and checked; the file bits per
subpixel are printed beside the −ELBO.

    python benchmarks/compare_models.py photo-rgb-1 runs/gen2.pt [--json-out /tmp/vaezip-compare.json]
    python benchmarks/compare_models.py photo-rgb-1 photo-rgb-2 --files
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

import vaezip
from vaezip.coding.imagecodec import tile_size
from vaezip.evaluation.rates import model_bits
from vaezip.network import registry

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))
SETS = {
    "kodak": [DATA / "kodak" / f"kodim{i:02d}.png" for i in range(1, 25)],
    "wikiphotos 041-049": [DATA / "wikiphotos" / f"{i:03d}.png" for i in range(41, 50)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=2, help="old and new: registered names or OUT.pt files")
    parser.add_argument("--files", action="store_true", help="also compress with each (registered) model")
    parser.add_argument("--json-out", default="/tmp/vaezip-compare.json")
    args = parser.parse_args()
    models = [registry.load_named_or_run(m) for m in args.models]
    modes = {registry.image_mode(lm.spec.config) for lm in models}
    if len(modes) != 1:
        raise SystemExit("the two models code different modes (gray and RGB)")
    mode = modes.pop()
    out = {"models": args.models, "sets": {}, "load": os.getloadavg()}
    for set_name, paths in SETS.items():
        bits, file_bits = np.zeros(len(models)), np.zeros(len(models))
        subpixels = 0
        start = time.perf_counter()
        for path in paths:
            pixels = np.asarray(PILImage.open(path).convert(mode))
            for k, lm in enumerate(models):
                tile = tile_size(pixels.shape[0], pixels.shape[1], lm.spec.config.downsampling)
                bits[k] += model_bits(lm, pixels, tile)[0]
                if args.files:
                    data = vaezip.compress(pixels, lm.spec.name)
                    if not np.array_equal(vaezip.decompress(data), pixels):
                        raise SystemExit(f"{path}: round trip with {lm.spec.name} is not exact")
                    file_bits[k] += 8 * len(data)
            subpixels += pixels.size
        bpd = bits / subpixels
        out["sets"][set_name] = {"images": len(paths), "nelbo_bpd": bpd.tolist()}
        if args.files:
            out["sets"][set_name]["file_bpd"] = (file_bits / subpixels).tolist()
            print(f"{set_name:<20} files: " + "  ".join(f"{m} {b:.4f}" for m, b in zip(args.models, file_bits / subpixels))
                  + f"  change {100 * (file_bits[1] / file_bits[0] - 1):+.2f} %", flush=True)
        print(f"{set_name:<20} {len(paths):>3} images  " + "  ".join(
            f"{m} {b:.4f}" for m, b in zip(args.models, bpd)) + f"  change {100 * (bpd[1] / bpd[0] - 1):+.2f} %"
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
