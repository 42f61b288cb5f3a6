"""IWAE bound against the number of importance samples K, for the shipped models.

For every image, `vaezip.evaluation.rates.tile_log_weights` draws K_max posterior samples
per tile once. IWAE(K) is then averaged over the K_max / K disjoint groups of K
columns (the usual unbiased estimate of E[IWAE_K], much less noisy for small K
than one draw), summed over tiles, and totalled over images: total bits over
total subpixels. −ELBO (one posterior sample, analytic KL) is printed beside it.

Sets: photo-rgb-1 on centre crops (256x256 by default, to keep it fast) of Kodak
images, and mnist-1 on the first MNIST test images (28x28, one 32x32 tile each).

    python benchmarks/iwae_curve.py --json-out docs/iwae_curve.json --plot docs/iwae_curve.png \\
        [--kodak 1 3 15 23] [--crop 256] [--mnist 200] [--ks 1 2 4 16 64 256] \\
        [--heatmap docs/heatmap_kodim23.png]
    python benchmarks/iwae_curve.py --from-json docs/iwae_curve.json --plot docs/iwae_curve.png

The heatmap is of a 256x256 crop of kodim23 (rows 60-315, columns 360-615: the red parrot's head)
with photo-rgb-1. One torch thread by default (OMP_NUM_THREADS): on a shared
2-core machine a second thread's spin-waits cost far more than it gains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from vaezip.coding import imagecodec  # noqa: E402
from vaezip.evaluation.rates import heatmap, model_terms, render_heatmap, tile_log_weights  # noqa: E402
from vaezip.network import registry  # noqa: E402
from vaezip.training import data  # noqa: E402

KODAK = "/work/shared/data/kodak/kodim{:02d}.png"
LN2 = math.log(2.0)


def centre_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def iwae_bits_by_k(log_w: np.ndarray, ks: list[int]) -> dict[int, float]:
    """−log2 IWAE(K) of one image from its (tiles, K_max) log-weights in nats,
    averaged over the K_max // K disjoint column groups."""
    out = {}
    for k in ks:
        groups = log_w[:, : (log_w.shape[1] // k) * k].reshape(log_w.shape[0], -1, k)
        top = groups.max(axis=2, keepdims=True)
        lme = (top[..., 0] + np.log(np.exp(groups - top).mean(axis=2)))  # (tiles, groups), nats
        out[k] = float(-lme.sum(axis=0).mean() / LN2)
    return out


def curve(name: str, images: list[np.ndarray], ks: list[int], label: str) -> dict:
    loaded = registry.load_model(name)
    k_max = max(ks)
    bits = {k: 0.0 for k in ks}
    nelbo, subpixels = 0.0, 0
    start = time.perf_counter()
    for i, pixels in enumerate(images):
        tile = imagecodec.tile_size(pixels.shape[0], pixels.shape[1], loaded.spec.config.downsampling)
        for k, b in iwae_bits_by_k(tile_log_weights(loaded, pixels, tile, k_max, seed=i), ks).items():
            bits[k] += b
        nelbo += model_terms(loaded, pixels, tile, seed=i).nelbo_bits
        subpixels += pixels.size
        print(f"  {label} {i + 1}/{len(images)}  {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {
        "model": name, "set": label, "images": len(images), "subpixels": subpixels,
        "k": ks, "iwae_bpd": [bits[k] / subpixels for k in ks], "nelbo_bpd": nelbo / subpixels,
        "seconds": time.perf_counter() - start,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    for ax, r in zip(np.atleast_1d(axes), results):
        ax.plot(r["k"], r["iwae_bpd"], "o-", label="IWAE(K)")
        ax.axhline(r["nelbo_bpd"], color="gray", linestyle="--", label="−ELBO")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("importance samples K")
        ax.set_ylabel("bits per subpixel")
        ax.set_title(f"{r['model']}\n{r['set']}", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak", type=int, nargs="+", default=[1, 3, 15, 23])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--mnist", type=int, default=200)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256])
    parser.add_argument("--json-out", help="where to write the results")
    parser.add_argument("--from-json", help="plot the results of an earlier run instead of measuring")
    parser.add_argument("--plot", help="PNG path for the plot")
    parser.add_argument("--heatmap", help="PNG path for the kodim23 heatmap example")
    args = parser.parse_args()
    if max(args.ks) % min(args.ks) or any(max(args.ks) % k for k in args.ks):
        parser.error("every K must divide the largest K")

    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)["results"]
        if args.plot:
            plot(results, args.plot)
        return
    if not args.json_out:
        parser.error("--json-out is required unless --from-json is given")
    if args.heatmap:
        rgb = np.asarray(PILImage.open(KODAK.format(23)).convert("RGB"))
        crop = np.ascontiguousarray(rgb[60:316, 360:616])
        bits = heatmap(crop, "photo-rgb-1")
        render_heatmap(crop, bits, args.heatmap)
        print(f"heatmap: {args.heatmap}: mean {bits.mean():.3f} bits/pixel", file=sys.stderr)

    results = []
    if args.kodak:
        photos = [centre_crop(np.asarray(PILImage.open(KODAK.format(i)).convert("RGB")), args.crop)
                  for i in args.kodak]
        label = f"Kodak {', '.join(f'kodim{i:02d}' for i in args.kodak)} ({args.crop}x{args.crop} centre crops)"
        results.append(curve("photo-rgb-1", photos, args.ks, label))
    if args.mnist:
        digits = data.load_dataset("mnist-test", args.mnist, 1)
        results.append(curve("mnist-1", digits, args.ks, f"MNIST test (first {args.mnist})"))
    with open(args.json_out, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "results": results}, f, indent=1)
    for r in results:
        print(f"{r['model']} on {r['set']}: -ELBO {r['nelbo_bpd']:.4f}  "
              + "  ".join(f"IWAE({k}) {b:.4f}" for k, b in zip(r["k"], r["iwae_bpd"])))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
