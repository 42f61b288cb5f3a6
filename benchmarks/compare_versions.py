"""Two format versions with the same model: file bits per subpixel and compress/decompress
time, same images, same run, the versions alternating per image so both see the same load.

Every file is decoded and compared with the image. Totals are total bits over total
subpixels; times are the library's (model loaded once, one warm-up off the clock), summed.
With --gray the images are converted to 8-bit gray (Pillow's luma) first and coded with the
gray default.

    python benchmarks/compare_versions.py 8 9 [--set kodak|wiki] [--gray] [--limit N] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from exact_vs_float import SETS, code
from PIL import Image as PILImage

from vaezip.imaging.images import Image, from_pil, read_image


def load(path: Path, gray: bool) -> Image:
    if not gray:
        return read_image(path)
    with PILImage.open(path) as im:
        return from_pil(im.convert("L"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs=2, type=int)
    parser.add_argument("--set", choices=sorted(SETS), default="kodak")
    parser.add_argument("--gray", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="first N images of the set")
    parser.add_argument("--json-out", default="/tmp/vaezip-compare-versions.json")
    args = parser.parse_args()
    paths = SETS[args.set][: args.limit]
    totals = {v: np.zeros(3) for v in args.versions}
    rows, subpixels = [], 0
    print(f"load before: {os.getloadavg()[0]:.2f}")
    code(load(paths[0], args.gray), None, args.versions[0])  # warm-up: model load, thread pool
    for i, path in enumerate(paths):
        image = load(path, args.gray)
        subpixels += image.pixels.size
        row = {"image": path.name}
        for v in (args.versions if i % 2 == 0 else args.versions[::-1]):
            result = code(image, None, v)  # the default model of the image's mode
            totals[v] += result
            row[str(v)] = {"bpd": result[0] * 8 / image.pixels.size, "compress_s": result[1], "decompress_s": result[2]}
        rows.append(row)
        print(path.name, "  ".join(f"v{v} {row[str(v)]['bpd']:.4f}" for v in args.versions), flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    base = totals[args.versions[0]]
    print("| format version | bits per subpixel | compress | decompress |")
    print("|---|---|---|---|")
    for v in args.versions:
        b, c, d = totals[v]
        print(f"| {v} | {b * 8 / subpixels:.4f} ({b / base[0] - 1:+.2%}) | {c:.1f} s (x{c / base[1]:.2f}) | "
              f"{d:.1f} s (x{d / base[2]:.2f}) |")
    Path(args.json_out).write_text(json.dumps({"set": args.set, "gray": args.gray, "subpixels": subpixels,
                                               "totals": {str(v): t.tolist() for v, t in totals.items()},
                                               "images": rows}, indent=1))


if __name__ == "__main__":
    main()
