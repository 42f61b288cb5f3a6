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
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

import vaezip
from vaezip.imaging.images import Image, read_image

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))
SETS = {
    "kodak": [DATA / "kodak" / f"kodim{i:02d}.png" for i in range(1, 25)],
    "wiki": [DATA / "wikiphotos" / f"{i:03d}.png" for i in range(41, 50)],
}


def load(path: Path, gray: bool) -> Image:
    if not gray:
        return read_image(path)
    with PILImage.open(path) as im:
        return Image("L", np.asarray(im.convert("RGB").convert("L"))[:, :, None])


def code(image: Image, version: int) -> tuple[int, float, float]:
    """(file bytes, compress s, decompress s); raises if the decoded pixels differ."""
    start = time.perf_counter()
    data = vaezip.compress(image, version=version)
    middle = time.perf_counter()
    out = vaezip.decompress(data)
    end = time.perf_counter()
    if not np.array_equal(out.reshape(image.pixels.shape), image.pixels):
        raise SystemExit(f"version {version}: decoded pixels differ")
    return len(data), middle - start, end - middle


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
    code(load(paths[0], args.gray), args.versions[0])  # warm-up: model load, thread pool
    for i, path in enumerate(paths):
        image = load(path, args.gray)
        subpixels += image.pixels.size
        row = {"image": path.name}
        for v in (args.versions if i % 2 == 0 else args.versions[::-1]):
            result = code(image, v)
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
