"""Encoder effort against file size and encode / decode time, with PNG, WebP and JPEG-XL e9.

For each image: the baselines once (`vaezip.evaluation.baselines`, each checked lossless), then for
each effort level `api.compress(image, effort=e)`, then `api.decompress_image` of every
file (`--decode-repeats` times, efforts interleaved, the median kept) in this process (model loaded once, so the times are the codec's own, without start-up), the
decoded pixels compared with the input (the run aborts on any difference). Rates are
bits per subpixel of the whole .vz file; totals are total bits / total subpixels.

    .venv/bin/python benchmarks/effort.py IMAGE... [--efforts 3,6,9] [--decode-repeats 1] [--json-out FILE]
    .venv/bin/python benchmarks/effort.py --render FILE    # the tables again, from the JSON

Prints a markdown table per run (one row per effort, then the baselines) and writes
every per-image number to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vaezip import api
from vaezip.coding import imagecodec
from vaezip.evaluation import baselines
from vaezip.format import versions
from vaezip.imaging.images import as_image, pixels_equal


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run(paths: list[Path], efforts: list[int], decode_repeats: int = 1) -> dict:
    """Baselines and every effort of every image; decode times are the median of
    `decode_repeats` decodes."""
    images, loaded = [], {}
    for path in paths:
        image = as_image(path)
        model = imagecodec.model_for_mode(image.mode)
        images.append((path, image, loaded.setdefault(model.spec.name, model)))
    api.compress(images[0][1].pixels[:32, :32], loaded=images[0][2])  # warm-up: first-call costs off the clock
    rows = []
    for path, image, lm in images:
        row = {"image": path.name, "subpixels": image.num_subpixels, "efforts": {}, "baselines": {}}
        for name, result in baselines.baseline_results(image).items():
            row["baselines"][name] = {"bytes": result.size_bytes, "encode_s": result.encode_seconds,
                                      "decode_s": result.decode_seconds}
        files, decodes = {}, {effort: [] for effort in efforts}
        for effort in efforts:
            start = time.perf_counter()
            files[effort] = api.compress(image, loaded=lm, effort=effort)
            row["efforts"][str(effort)] = {"bytes": len(files[effort]), "encode_s": time.perf_counter() - start}
        for _ in range(decode_repeats):  # efforts interleaved: a load spike hits them alike
            for effort in efforts:
                start = time.perf_counter()
                back = api.decompress_image(files[effort], loaded=lm)
                decodes[effort].append(time.perf_counter() - start)
                if not pixels_equal(back, image):
                    raise SystemExit(f"{path}: effort {effort} did not round-trip")
        for effort in efforts:
            record = row["efforts"][str(effort)]
            record["decode_s"] = float(np.median(decodes[effort]))
            record["decode_all_s"] = decodes[effort]
            print(f"{path.name} effort {effort}: {8 * record['bytes'] / image.num_subpixels:.4f} bpd, "
                  f"encode {record['encode_s']:.1f} s, decode {record['decode_s']:.1f} s", flush=True)
        rows.append(row)
    return {"rows": rows, "efforts": efforts}


def table(result: dict) -> str:
    rows, efforts = result["rows"], result["efforts"]
    subpixels = sum(r["subpixels"] for r in rows)
    default = str(versions.DEFAULT_EFFORT if versions.DEFAULT_EFFORT in efforts else efforts[0])

    def total(kind: str, key: str, field: str) -> float:
        return sum(r[kind][key][field] for r in rows)

    lines = ["| encoder | bpd | size vs default | encode s | decode s | encode / default | decode / default |",
             "|---|---|---|---|---|---|---|"]
    base_bits = 8 * total("efforts", default, "bytes")
    base_enc, base_dec = total("efforts", default, "encode_s"), total("efforts", default, "decode_s")
    for effort in efforts:
        key = str(effort)
        bits, enc, dec = 8 * total("efforts", key, "bytes"), total("efforts", key, "encode_s"), total("efforts", key, "decode_s")
        lines.append(f"| vaezip effort {effort}{' (default)' if key == default else ''} | {bits / subpixels:.4f} | "
                     f"{100 * (bits / base_bits - 1):+.2f} % | {enc:.1f} | {dec:.1f} | {enc / base_enc:.2f}x | "
                     f"{dec / base_dec:.2f}x |")
    for name in baselines.BASELINES:
        if any(r["baselines"][name]["bytes"] is None for r in rows):
            lines.append(f"| {name} | missing | | | | | |")
            continue
        bits = 8 * total("baselines", name, "bytes")
        enc, dec = total("baselines", name, "encode_s"), total("baselines", name, "decode_s")
        label = {"png": "PNG (optimize)", "webp": "WebP lossless m6", "jpegxl": "JPEG-XL e9"}[name]
        lines.append(f"| {label} | {bits / subpixels:.4f} | {100 * (bits / base_bits - 1):+.2f} % | {enc:.1f} | "
                     f"{dec:.2f} | {enc / base_enc:.2f}x | {dec / base_dec:.3f}x |")
    return "\n".join(lines)


def per_image(result: dict) -> str:
    """One row per image: bpd at each effort, the change at the highest, JPEG-XL e9, times."""
    efforts = [str(e) for e in result["efforts"]]
    low, high = efforts[0], efforts[-1]
    head = " | ".join(f"e{e} bpd" for e in efforts)
    lines = [f"| image | {head} | e{high} vs e{low} | JPEG-XL e9 bpd | encode s e{low} / e{high} | "
             f"decode s e{low} / e{high} |", "|---" * (len(efforts) + 5) + "|"]
    for r in result["rows"]:
        bpd = {e: 8 * r["efforts"][e]["bytes"] / r["subpixels"] for e in efforts}
        jxl = r["baselines"]["jpegxl"]["bytes"]
        lines.append(
            f"| {r['image']} | " + " | ".join(f"{bpd[e]:.4f}" for e in efforts)
            + f" | {100 * (bpd[high] / bpd[low] - 1):+.2f} % | "
            + (f"{8 * jxl / r['subpixels']:.4f}" if jxl else "missing")
            + f" | {r['efforts'][low]['encode_s']:.1f} / {r['efforts'][high]['encode_s']:.1f}"
            + f" | {r['efforts'][low]['decode_s']:.1f} / {r['efforts'][high]['decode_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path)
    parser.add_argument("--efforts", default="3,6,9", help="comma-separated effort levels")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--decode-repeats", type=int, default=1,
                        help="decode each file this many times, efforts interleaved; the median counts")
    parser.add_argument("--render", type=Path, help="print the tables of an earlier --json-out file and stop")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        print(table(result) + "\n\n" + per_image(result))
        return
    if not args.images:
        parser.error("no images")
    efforts = [int(e) for e in args.efforts.split(",")]
    before = _uptime()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = run(args.images, efforts, args.decode_repeats)
    result.update({"date_utc": started, "uptime_before": before, "uptime_after": _uptime(),
                   "machine": f"{os.cpu_count()} cores, {platform.platform()}", "versions": baselines.versions()})
    print(table(result))
    print(f"uptime before: {result['uptime_before']}\nuptime after: {result['uptime_after']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
