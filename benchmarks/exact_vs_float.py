"""Format version 6 (fixed-point model, integer tables) against a float model's older format:
file bits per subpixel and compress/decompress time, same images, same run.

Every file is decoded and compared with the image. Totals are total bits over total
subpixels; times are per image, summed, with the load average printed (2 shared cores
swing up to 2x from day to day: compare the ratio, not a figure from another run).

    python benchmarks/exact_vs_float.py --float photo-rgb-2 --exact photo-rgb-exact-1
    python benchmarks/exact_vs_float.py --set wiki --limit 3 --json-out /tmp/exact.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import vaezip
from vaezip.imaging.images import read_image

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))
SETS = {
    "kodak": [DATA / "kodak" / f"kodim{i:02d}.png" for i in range(1, 25)],
    "wiki": [DATA / "wikiphotos" / f"{i:03d}.png" for i in range(41, 50)],
}


def code(image, model: str, version: int) -> tuple[int, float, float]:
    """(file bytes, compress s, decompress s); raises if the decoded pixels differ."""
    start = time.perf_counter()
    data = vaezip.compress(image, model, version=version)
    middle = time.perf_counter()
    out = vaezip.decompress(data)
    end = time.perf_counter()
    if not np.array_equal(out.reshape(image.pixels.shape), image.pixels):
        raise SystemExit(f"{model} version {version}: decoded pixels differ")
    return len(data), middle - start, end - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float", dest="float_model", default="photo-rgb-2")
    parser.add_argument("--float-version", type=int, default=3)
    parser.add_argument("--exact", dest="exact_model", default="photo-rgb-exact-1")
    parser.add_argument("--set", choices=sorted(SETS), default="kodak")
    parser.add_argument("--limit", type=int, default=None, help="first N images of the set")
    parser.add_argument("--json-out", default="/tmp/vaezip-exact-vs-float.json")
    args = parser.parse_args()
    runs = {"float": (args.float_model, args.float_version), "exact": (args.exact_model, 6)}
    totals = {k: np.zeros(3) for k in runs}
    rows, subpixels = [], 0
    print(f"load before: {os.getloadavg()[0]:.2f}")
    for path in SETS[args.set][: args.limit]:
        image = read_image(path)
        subpixels += image.pixels.size
        row = {"image": path.name}
        for kind, (model, version) in runs.items():
            size, enc, dec = code(image, model, version)
            totals[kind] += (size, enc, dec)
            row[kind] = {"bpsp": 8 * size / image.pixels.size, "compress_s": enc, "decompress_s": dec}
        rows.append(row)
        print(f"{path.name}: float {row['float']['bpsp']:.4f} ({row['float']['compress_s']:.1f} s / "
              f"{row['float']['decompress_s']:.1f} s)  exact {row['exact']['bpsp']:.4f} "
              f"({row['exact']['compress_s']:.1f} s / {row['exact']['decompress_s']:.1f} s)", flush=True)
    summary = {kind: {"bpsp": 8 * t[0] / subpixels, "compress_s": t[1], "decompress_s": t[2]}
               for kind, t in totals.items()}
    f, e = summary["float"], summary["exact"]
    print(f"{args.set} ({len(rows)} images), load after {os.getloadavg()[0]:.2f}")
    print("| model | version | bits per subpixel | compress s | decompress s |")
    print("|---|---|---|---|---|")
    for kind, (model, version) in runs.items():
        s = summary[kind]
        print(f"| {model} | {version} | {s['bpsp']:.4f} | {s['compress_s']:.1f} | {s['decompress_s']:.1f} |")
    print(f"exact/float: size {e['bpsp'] / f['bpsp'] - 1:+.2%}, compress x{e['compress_s'] / f['compress_s']:.2f}, "
          f"decompress x{e['decompress_s'] / f['decompress_s']:.2f}")
    Path(args.json_out).write_text(json.dumps({"args": vars(args), "summary": summary, "images": rows,
                                               "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
