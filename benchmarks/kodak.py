"""Kodak benchmark: the real `vaezip` CLI against PNG, WebP and JPEG-XL, one file per image.

For each image: `vaezip compress IMG -o X.vz` and `vaezip decompress X.vz -o X.png` in
subprocesses (wall time including interpreter and model start-up), a pixel-exact check of
the decoded PNG (mode and pixels; the run aborts on any difference), the model's −ELBO on
the same pixels with the tile size read from the .vz header, and the baselines of
`vaezip.evaluation.baselines` (each checked lossless). Rates are bits per subpixel (H*W*C).
Totals are total bits over total subpixels, not means of ratios. With --gray every image is
first converted to 8-bit gray (Pillow's `convert("L")`, ITU-R 601 luma) and written as a
gray PNG, so the CLI codes it with the default gray model and the baselines see the same
gray pixels.

    .venv/bin/python benchmarks/kodak.py [--limit N] [--images kodim01.png ...] [--gray]
        [--json-out /tmp/vaezip-bench/kodak.json]

Writes a JSON file and prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _snapshot
import numpy as np

KODAK = Path("/work/shared/data/kodak")
DEFAULT_JSON = Path(tempfile.gettempdir()) / "vaezip-bench" / "kodak.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_timed(cmd: list[str], env: dict) -> tuple[float, str]:
    """Run `cmd`; return (wall seconds, stdout). Any failure aborts the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"FAILED ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return seconds, proc.stdout.strip()


def find_vaezip(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / "vaezip"
    return str(beside) if beside.exists() else (shutil.which("vaezip") or "vaezip")


def gray_copy(path: Path, folder: Path) -> Path:
    """`path` converted to 8-bit gray (Pillow's luma), as a PNG of the same name in `folder`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (path.stem + ".png")
    with Image.open(path) as image:
        image.convert("L").save(out)
    return out


def cli_seconds(stdout: str) -> float | None:
    """The time the CLI itself reports (after its imports), from its last line "..., 6.8 s"."""
    match = re.search(r"([0-9.]+) s$", stdout)
    return float(match.group(1)) if match else None


def bench_image(path: Path, vaezip: str, workdir: Path, loaded_models: dict, env: dict) -> dict:
    from vaezip import api
    from vaezip.evaluation import baselines
    from vaezip.format import container
    from vaezip.imaging.images import pixels_equal, read_image
    from vaezip.network import registry

    original = read_image(path)
    vz = workdir / (path.stem + ".vz")
    back = workdir / (path.stem + ".back.png")
    for p in (vz, back):
        p.unlink(missing_ok=True)
    encode_s, encode_out = run_timed([vaezip, "compress", str(path), "-o", str(vz)], env)
    decode_s, decode_out = run_timed([vaezip, "decompress", str(vz), "-o", str(back)], env)
    decoded = read_image(back)
    if not pixels_equal(original, decoded):
        diff = (int(np.count_nonzero(original.pixels != decoded.pixels))
                if original.pixels.shape == decoded.pixels.shape else "shape")
        raise SystemExit(f"NOT LOSSLESS: {path}: decoded {decoded.mode} {decoded.pixels.shape} vs original "
                         f"{original.mode} {original.pixels.shape}; differing subpixels: {diff}")
    data = vz.read_bytes()
    header = container.read_header(data)
    subpixels = original.num_subpixels
    # -ELBO of the same pixels, tiled exactly as the file was coded
    name = header.model_name
    if name not in loaded_models:
        loaded_models[name] = registry.load_model(name)
    elbo_start = time.perf_counter()
    nelbo_bits, _ = api.model_bits(loaded_models[name], np.ascontiguousarray(original.pixels), header.tile_size)
    elbo_s = time.perf_counter() - elbo_start
    base = baselines.baseline_results(original)
    row = {
        "image": path.name, "mode": original.mode, "width": original.width, "height": original.height,
        "subpixels": subpixels, "model": name, "tile": header.tile_size,
        "file_bytes": len(data), "file_bpd": 8 * len(data) / subpixels,
        "nelbo_bits": nelbo_bits, "nelbo_bpd": nelbo_bits / subpixels,
        "overhead": 8 * len(data) / nelbo_bits - 1,
        "encode_s": encode_s, "decode_s": decode_s, "nelbo_s": elbo_s,
        "cli_reported_encode_s": cli_seconds(encode_out), "cli_reported_decode_s": cli_seconds(decode_out),
        "roundtrip_exact": True,
        "cli_encode_stdout": encode_out, "cli_decode_stdout": decode_out,
        "baselines": {},
    }
    for key, r in base.items():
        row["baselines"][key] = {
            "bytes": r.size_bytes, "bpd": None if r.size_bytes is None else 8 * r.size_bytes / subpixels,
            "encode_s": r.encode_seconds, "decode_s": r.decode_seconds, "reason": r.reason,
        }
    vz.unlink()
    back.unlink()
    return row


def totals(rows: list[dict]) -> dict:
    subpixels = sum(r["subpixels"] for r in rows)
    pixels = sum(r["width"] * r["height"] for r in rows)
    file_bits = sum(8 * r["file_bytes"] for r in rows)
    nelbo_bits = sum(r["nelbo_bits"] for r in rows)
    out = {
        "images": len(rows), "subpixels": subpixels, "megapixels": pixels / 1e6,
        "file_bytes": file_bits // 8, "file_bpd": file_bits / subpixels, "nelbo_bpd": nelbo_bits / subpixels,
        "overhead_total": file_bits / nelbo_bits - 1,
        "overhead_mean": float(np.mean([r["overhead"] for r in rows])),
        "overhead_min": float(min(r["overhead"] for r in rows)),
        "overhead_max": float(max(r["overhead"] for r in rows)),
        "encode_s": sum(r["encode_s"] for r in rows), "decode_s": sum(r["decode_s"] for r in rows),
        "all_roundtrips_exact": all(r["roundtrip_exact"] for r in rows),
        "baselines": {},
    }
    for key in ("cli_reported_encode_s", "cli_reported_decode_s"):
        values = [r.get(key) for r in rows]
        out[key] = None if None in values else sum(values)
    out["encode_s_per_mp"] = out["encode_s"] / out["megapixels"]
    out["decode_s_per_mp"] = out["decode_s"] / out["megapixels"]
    for key in rows[0]["baselines"]:
        entries = [r["baselines"][key] for r in rows]
        if any(e["bytes"] is None for e in entries):
            out["baselines"][key] = {"bytes": None, "bpd": None, "encode_s": None, "decode_s": None}
            continue
        b = sum(e["bytes"] for e in entries)
        out["baselines"][key] = {"bytes": b, "bpd": 8 * b / subpixels,
                                 "encode_s": sum(e["encode_s"] for e in entries),
                                 "decode_s": sum(e["decode_s"] for e in entries)}
        out["baselines"][key]["encode_s_per_mp"] = out["baselines"][key]["encode_s"] / out["megapixels"]
        out["baselines"][key]["decode_s_per_mp"] = out["baselines"][key]["decode_s"] / out["megapixels"]
    jxl = out["baselines"].get("jpegxl", {})
    if jxl.get("encode_s"):
        out["encode_time_ratio_vs_jpegxl"] = out["encode_s"] / jxl["encode_s"]
        out["decode_time_ratio_vs_jpegxl"] = out["decode_s"] / jxl["decode_s"]
    for key in ("png", "webp", "jpegxl"):
        bpd = out["baselines"].get(key, {}).get("bpd")
        out[f"file_vs_{key}"] = None if bpd is None else out["file_bpd"] / bpd - 1
    return out


def _f(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _code_line(code: dict | None) -> str:
    if not code:
        return "unrecorded"
    what = {"head": "git HEAD (committed files only)", "worktree": "working tree copied at start",
            "installed": "installed package, not frozen"}[code["kind"]]
    dirty = code.get("uncommitted_in_package") or []
    extra = f"; uncommitted: {', '.join(d.split()[-1] for d in dirty)}" if dirty else ""
    added = code.get("added_from_worktree") or []
    extra += f"; benchmark helper added from the working tree: {', '.join(added)}" if added else ""
    sha = f", copy sha256 {code['sha256'][:12]}" if code.get("sha256") else ""
    return f"{what} at {code['git_head'][:10]}{extra}{sha}"


def markdown(result: dict) -> str:
    head = ("| image | vaezip file bpd | −ELBO bpd | overhead % | PNG bpd | WebP bpd | JPEG-XL bpd "
            "| encode s | decode s | JPEG-XL e9 encode s |")
    lines = [head, "|" + "---|" * 10]
    for r in result["images"]:
        b = r["baselines"]
        lines.append(f"| {r['image']} | {_f(r['file_bpd'])} | {_f(r['nelbo_bpd'])} | {_f(100 * r['overhead'], 2)} "
                     f"| {_f(b['png']['bpd'])} | {_f(b['webp']['bpd'])} | {_f(b['jpegxl']['bpd'])} "
                     f"| {_f(r['encode_s'], 1)} | {_f(r['decode_s'], 1)} | {_f(b['jpegxl']['encode_s'], 1)} |")
    t, b = result["totals"], result["totals"]["baselines"]
    lines.append(f"| **total** | **{_f(t['file_bpd'])}** | **{_f(t['nelbo_bpd'])}** | **{_f(100 * t['overhead_total'], 2)}** "
                 f"| **{_f(b['png']['bpd'])}** | **{_f(b['webp']['bpd'])}** | **{_f(b['jpegxl']['bpd'])}** "
                 f"| **{_f(t['encode_s'], 1)}** | **{_f(t['decode_s'], 1)}** | **{_f(b['jpegxl']['encode_s'], 1)}** |")
    env = result["environment"]
    lines += [
        "",
        ("Images: gray (luma) copies of the originals. " if result.get("gray") else "")
        + f"Totals are total bits / total subpixels ({t['subpixels']} subpixels, {t['megapixels']:.3f} MP). "
        f"Overhead: total {_f(100 * t['overhead_total'], 2)} %, mean of per-image {_f(100 * t['overhead_mean'], 2)} % "
        f"(min {_f(100 * t['overhead_min'], 2)} %, max {_f(100 * t['overhead_max'], 2)} %).",
        f"Time per megapixel: vaezip encode {_f(t['encode_s_per_mp'], 2)} s, decode {_f(t['decode_s_per_mp'], 2)} s "
        f"(CLI wall time incl. start-up); JPEG-XL e9 encode {_f(b['jpegxl'].get('encode_s_per_mp'), 2)} s, "
        f"decode {_f(b['jpegxl'].get('decode_s_per_mp'), 3)} s (in-process).",
        f"The CLI's own reported time (after its imports, model load included) sums to "
        f"{_f(t.get('cli_reported_encode_s'), 1)} s encode, {_f(t.get('cli_reported_decode_s'), 1)} s decode.",
        f"Code: {_code_line(result.get('code'))}.",
        f"All round trips pixel-exact: {t['all_roundtrips_exact']}. "
        f"torch threads in the CLI: default ({env['torch_default_threads']}; OMP_NUM_THREADS="
        f"{env['OMP_NUM_THREADS']}).",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def environment() -> dict:
    import torch

    from vaezip.evaluation import baselines

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "numpy": np.__version__,
        "libraries": baselines.versions(), "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=KODAK, help="folder of kodim*.png")
    parser.add_argument("--images", nargs="+", help="file names (in --data) or paths; default all kodim*.png")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--vaezip", help="the vaezip executable (default: beside this python)")
    parser.add_argument("--gray", action="store_true", help="code gray (luma) versions of the images")
    parser.add_argument("--code", choices=("head", "worktree", "installed"), default="head",
                        help="which code to run, copied once at start (default: git HEAD); see _snapshot.py")
    args = parser.parse_args(argv)

    if args.images:
        paths = [Path(p) if Path(p).exists() else args.data / p for p in args.images]
    else:
        paths = sorted(args.data.glob("kodim*.png"))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise SystemExit("no images")
    vaezip = find_vaezip(args.vaezip)
    command = shlex.join(sys.orig_argv) if argv is None else shlex.join([sys.executable, __file__, *argv])
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    loaded: dict = {}
    with tempfile.TemporaryDirectory(prefix="vaezip-kodak-") as tmp:
        code = _snapshot.make(args.code, Path(tmp) / "code")
        result = {
            "benchmark": "kodak", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "cwd": os.getcwd(), "vaezip": vaezip, "code": _snapshot.public(code),
            "environment": environment(), "images": [],
        }
        if args.gray:
            paths = [gray_copy(path, Path(tmp) / "gray") for path in paths]
        result["gray"] = args.gray
        for i, path in enumerate(paths, 1):
            row = bench_image(path, vaezip, Path(tmp), loaded, code["env"])
            row["loadavg_1min_after"] = os.getloadavg()[0]  # other jobs on the machine inflate the times
            result["images"].append(row)
            print(f"[{i}/{len(paths)}] {path.name}: file {row['file_bpd']:.3f} bpd, -elbo {row['nelbo_bpd']:.3f}, "
                  f"jxl {_f(row['baselines']['jpegxl']['bpd'])}, enc {row['encode_s']:.1f} s, "
                  f"dec {row['decode_s']:.1f} s", file=sys.stderr, flush=True)
            result["totals"] = totals(result["images"])
            args.json_out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive a crash
    result["complete"] = True
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nJSON: {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
