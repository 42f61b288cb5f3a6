"""IWAE up to K = 1000 on full Kodak images: the bound, its cost, and its memory.

For each K (in increasing order) every image is measured with
`vaezip.evaluation.rates.model_terms(..., samples=K)`, the streaming estimator `vaezip bpd
--samples K` uses: each tile's K log-weights are drawn in chunks of at most
`SAMPLE_PIXELS` tile pixels x samples per network call and folded into a running
log-sum-exp, so memory should not grow with K. Each row reports, totalled over the
images (total bits over total subpixels):

    iwae_bpd     the K-sample importance-weighted bound, bits per subpixel;
    nelbo_bpd    −ELBO (one posterior sample, analytic KL) from the same call; the
                 seed is the image's index, so it is the same number in every row;
    seconds      wall time of the K-sample calls (one −ELBO pass included);
    peak_rss_mib the process's peak resident memory so far (getrusage ru_maxrss):
                 Ks run in increasing order, so a row whose K needed more memory
                 than every smaller K would raise it.

The long run (photo-rgb-1, kodim23 at 768x512 = 96 tiles of 64x64; one thread of
the shared development machine draws ~50 tile-samples a second, so ~35 min for
K = 1000 and ~45 min in all; K = 1 alone took 3.8 s):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/iwae_kodak.py \\
        --images 23 --ks 1 2 4 16 64 256 1000 --json-out /tmp/vaezip-bench/iwae_kodak.json

Smoke test (seconds): `--ks 1 2 --crop 64 --json-out /tmp/iwae_kodak_smoke.json`.
The JSON is rewritten after every K, so a stopped run keeps its finished rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads; see iwae_curve.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from iwae_curve import KODAK, centre_crop  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from vaezip.coding import imagecodec  # noqa: E402
from vaezip.evaluation.rates import SAMPLE_PIXELS, model_terms  # noqa: E402
from vaezip.network import registry  # noqa: E402

MODEL = "photo-rgb-1"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_images(indices: list[int], crop: int) -> list[np.ndarray]:
    """Kodak images as (H, W, 3) uint8; `crop` > 0 takes a centre crop of that side."""
    images = []
    for i in indices:
        with PILImage.open(KODAK.format(i)) as im:
            rgb = np.asarray(im.convert("RGB"))
        images.append(centre_crop(rgb, crop) if crop else rgb)
    return images


def row(loaded: registry.LoadedModel, images: list[np.ndarray], k: int) -> dict:
    """IWAE(k) and −ELBO of the images in bits per subpixel, with time and peak memory."""
    iwae = nelbo = 0.0
    start = time.perf_counter()
    for i, pixels in enumerate(images):
        tile = imagecodec.tile_size(pixels.shape[0], pixels.shape[1], loaded.spec.config.downsampling)
        terms = model_terms(loaded, pixels, tile, samples=k, seed=i)
        iwae, nelbo = iwae + terms.iwae_bits, nelbo + terms.nelbo_bits
    subpixels = sum(p.size for p in images)
    return {"k": k, "iwae_bpd": iwae / subpixels, "nelbo_bpd": nelbo / subpixels,
            "seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[23], help="Kodak numbers (23: kodim23.png)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256, 1000])
    parser.add_argument("--crop", type=int, default=0, help="centre crop side; 0 (default): the full image")
    parser.add_argument("--json-out", type=Path, required=True)
    args = parser.parse_args()
    if min(args.ks) < 1 or args.crop < 0:
        parser.error("every K must be positive and --crop >= 0")
    ks = sorted(set(args.ks))

    loaded = registry.load_model(MODEL)
    images = load_images(args.images, args.crop)
    result = {
        "command": " ".join(["python", *sys.argv]), "model": MODEL,
        "images": [f"kodim{i:02d}" for i in args.images], "sizes": [list(p.shape[:2]) for p in images],
        "subpixels": sum(p.size for p in images), "sample_pixels": SAMPLE_PIXELS,
        "torch_threads": torch.get_num_threads(), "rss_after_load_mib": peak_rss_mib(), "rows": [],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{MODEL} on {', '.join(result['images'])} {'x'.join(map(str, images[0].shape[1::-1]))}: "
          f"peak RSS after loading {result['rss_after_load_mib']:.0f} MiB", file=sys.stderr)
    print(f"{'K':>5} {'IWAE bpd':>9} {'-ELBO bpd':>9} {'seconds':>8} {'peak RSS MiB':>12}", flush=True)
    for k in ks:
        r = row(loaded, images, k)
        result["rows"].append(r)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{k:>5} {r['iwae_bpd']:>9.4f} {r['nelbo_bpd']:>9.4f} {r['seconds']:>8.2f} {r['peak_rss_mib']:>12.0f}",
              flush=True)
    result["loadavg_1min_after"] = os.getloadavg()[0]  # other jobs on the machine inflate the times
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
