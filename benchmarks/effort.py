"""Encoder effort against file size and encode / decode time, with PNG, WebP and JPEG-XL e9.

For each image: the baselines once (`vaezip.evaluation.baselines`, each checked lossless), then for
each effort level `api.compress(image, effort=e)` and `api.decompress_image` in this
process (model loaded once, so the times are the codec's own, without start-up), the
decoded pixels compared with the input (the run aborts on any difference). Rates are
bits per subpixel of the whole .vz file; totals are total bits / total subpixels.

    .venv/bin/python benchmarks/effort.py IMAGE... [--efforts 3,6,9] [--json-out FILE]

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


def run(paths: list[Path], efforts: list[int]) -> dict:
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
        for effort in efforts:
            start = time.perf_counter()
            data = api.compress(image, loaded=lm, effort=effort)
            encode = time.perf_counter() - start
            start = time.perf_counter()
            back = api.decompress_image(data, loaded=lm)
            decode = time.perf_counter() - start
            if not pixels_equal(back, image):
                raise SystemExit(f"{path}: effort {effort} did not round-trip")
            row["efforts"][str(effort)] = {"bytes": len(data), "encode_s": encode, "decode_s": decode}
            print(f"{path.name} effort {effort}: {8 * len(data) / image.num_subpixels:.4f} bpd, "
                  f"encode {encode:.1f} s, decode {decode:.1f} s", flush=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--efforts", default="3,6,9", help="comma-separated effort levels")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    efforts = [int(e) for e in args.efforts.split(",")]
    before = _uptime()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = run(args.images, efforts)
    result.update({"date_utc": started, "uptime_before": before, "uptime_after": _uptime(),
                   "machine": f"{os.cpu_count()} cores, {platform.platform()}", "versions": baselines.versions()})
    print(table(result))
    print(f"uptime before: {result['uptime_before']}\nuptime after: {result['uptime_after']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
