"""16-bit images through the CLI: file bits per subpixel next to PNG and JPEG-XL e9.

Two kinds of 16-bit photo, written as 16-bit PNGs into a temporary folder:

  kodak-x257   Kodak photos scaled to 16 bits (sample * 257): 8-bit data stored as 16
               bits, the common case (editors, converters); the low byte is implied.
  wiki-mean3   held-out wikiphotos 041-049 reduced 3x by the exact mean of each 3x3 block,
               times 257: 16-bit samples whose low bits are real (a mean of 9 samples
               carries about 3 more bits), as a raw developer or a scanner writes them.
               Also as gray (L;16, the BT.601 luma of the same means).

Each set is compressed with one `vaezip compress DIR -o OUT --json` and decompressed
with one `vaezip decompress`; every decoded PNG is checked against its input (samples,
mode, 16-bit depth). PNG (zlib 9, filter search) and JPEG-XL (lossless, effort 9) code
the same samples, each checked lossless (`vaezip.evaluation.baselines`).

With --split N, the first N wiki-mean3 photos are also split into their high bytes (an 8-bit
photo: vaezip's photo model against JPEG-XL on it alone) and the rest (vaezip's low-bit coder,
`depth.estimate_low_bits`, against JPEG-XL's whole file minus its high-byte file).

    python benchmarks/deep16.py [--kodak 1 2 ... 24] [--split 4] [--json-out /tmp/vaezip-deep16.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

import vaezip as vz
from vaezip.entropy import depth
from vaezip.evaluation import baselines
from vaezip.imaging.images import Image, pixels_equal, read_image, write_png

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))


def kodak_x257(indices) -> dict[str, Image]:
    out = {}
    for i in indices:
        rgb = np.asarray(PILImage.open(DATA / "kodak" / f"kodim{i:02d}.png").convert("RGB"))
        out[f"kodim{i:02d}"] = Image("RGB;16", rgb.astype(np.uint16) * 257)
    return out


def wiki_mean3(gray: bool) -> dict[str, Image]:
    out = {}
    for path in sorted((DATA / "wikiphotos").glob("*.png")):
        if not path.stem.isdigit() or not 41 <= int(path.stem) <= 49:
            continue
        rgb = np.asarray(PILImage.open(path).convert("RGB")).astype(np.float64)
        h, w = rgb.shape[0] // 3 * 3, rgb.shape[1] // 3 * 3
        mean = rgb[:h, :w].reshape(h // 3, 3, w // 3, 3, 3).mean(axis=(1, 3)) * 257
        if gray:
            luma = mean @ np.array([0.299, 0.587, 0.114])
            out[path.stem] = Image("L;16", np.rint(luma).astype(np.uint16)[:, :, None])
        else:
            out[path.stem] = Image("RGB;16", np.rint(mean).astype(np.uint16))
    return out


def run_set(name: str, images: dict[str, Image], vaezip: str, folder: Path) -> dict:
    src, vz, back = folder / name / "png", folder / name / "vz", folder / name / "back"
    for d in (src, vz, back):
        d.mkdir(parents=True)
    for stem, image in images.items():
        write_png(image, src / f"{stem}.png")
    start = time.perf_counter()
    out = subprocess.run([vaezip, "compress", str(src), "-o", str(vz), "--json"], check=True,
                         capture_output=True, text=True).stdout
    compress_seconds = time.perf_counter() - start
    records = json.loads(out)
    start = time.perf_counter()
    subprocess.run([vaezip, "decompress", *sorted(str(p) for p in vz.glob("*.vz")), "-o", str(back)],
                   check=True, capture_output=True)
    decompress_seconds = time.perf_counter() - start
    subpixels = vaezip_bits = 0
    sizes = {b: 0 for b in ("png", "jpegxl")}
    for stem, image in images.items():
        decoded = read_image(back / f"{stem}.png")
        if not pixels_equal(decoded, image) or (back / f"{stem}.png").read_bytes()[24] != 16:
            raise SystemExit(f"{name}/{stem}: the CLI round trip is not exact")
        subpixels += image.num_subpixels
        for base, result in baselines.baseline_results(image, ("png", "jpegxl")).items():
            sizes[base] += result.size_bytes
    vaezip_bits = 8 * sum(r["output_bytes"] for r in records)
    row = {"set": name, "images": len(images), "mode": records[0]["mode"], "subpixels": subpixels,
           "vaezip_bpd": vaezip_bits / subpixels, "compress_s": compress_seconds, "decompress_s": decompress_seconds}
    row.update({f"{b}_bpd": 8 * size / subpixels for b, size in sizes.items()})
    print(f"{name:<14} {row['mode']:<7} {len(images):>3} images  vaezip {row['vaezip_bpd']:.3f}  "
          f"png {row['png_bpd']:.3f}  jpegxl-e9 {row['jpegxl_bpd']:.3f} bits/subpixel  "
          f"(CLI {compress_seconds:.0f} s compress, {decompress_seconds:.0f} s decompress)", flush=True)
    return row


def split_high_low(images: dict[str, Image]) -> dict:
    """Bits per subpixel of the high bytes and of the rest, vaezip against JPEG-XL e9."""
    bits = {"vaezip_high": 0.0, "vaezip_low": 0.0, "jpegxl_high": 0.0, "jpegxl_all": 0.0}
    subpixels = 0
    for image in images.values():
        high = Image(image.mode.split(";")[0], depth.split(image.pixels))
        bits["vaezip_high"] += 8 * len(vz.compress(high))
        bits["vaezip_low"] += depth.estimate_low_bits(image.pixels)
        bits["jpegxl_high"] += 8 * baselines.jpegxl_result(high).size_bytes
        bits["jpegxl_all"] += 8 * baselines.jpegxl_result(image).size_bytes
        subpixels += image.num_subpixels
    row = {k: v / subpixels for k, v in bits.items()}
    row["jpegxl_low"] = row["jpegxl_all"] - row["jpegxl_high"]
    print("split: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak", type=int, nargs="*", default=list(range(1, 25)))
    parser.add_argument("--split", type=int, default=0, help="split this many wiki-mean3 photos")
    parser.add_argument("--json-out", default="/tmp/vaezip-deep16.json")
    args = parser.parse_args()
    vaezip = str(Path(sys.executable).with_name("vaezip"))
    with tempfile.TemporaryDirectory() as tmp:
        wiki = wiki_mean3(gray=False)
        split = split_high_low(dict(list(wiki.items())[:args.split])) if args.split else None
        rows = [run_set("wiki-mean3", wiki, vaezip, Path(tmp)),
                run_set("wiki-mean3-L", wiki_mean3(gray=True), vaezip, Path(tmp))]
        if args.kodak:
            rows.append(run_set("kodak-x257", kodak_x257(args.kodak), vaezip, Path(tmp)))
    Path(args.json_out).write_text(json.dumps({"rows": rows, "split": split, "versions": baselines.versions()},
                                              indent=1))


if __name__ == "__main__":
    main()
