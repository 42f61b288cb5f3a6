"""Large images: wall time and peak memory of `vaezip compress` / `decompress` against image size.

For each size, a photographic test image is built from the Kodak set (the 24
images laid out on a grid of 768x512 cells, portrait ones turned, every other
cell mirrored so neighbours meet at matching edges, then cropped), written as
PNG, and run through the real CLI in subprocesses: `vaezip compress IMG -o X.vz`,
then `vaezip decompress X.vz -o X.png`. Each child is reaped with `os.wait4`, so
its own peak RSS is reported (RUSAGE_CHILDREN would give the largest child so
far, not this one). The decoded PNG must equal the original pixels; a size that
fails (an error from the CLI, or different pixels) is recorded with its one-line
reason and the run goes on (exit status 1 at the end).

    .venv/bin/python benchmarks/large_image.py --sizes 1000 2000 4000 8000 [--json-out FILE]
    .venv/bin/python benchmarks/large_image.py --megapixels 0.1 0.4 2 12 [--json-out FILE]

`--sizes N` means N x N pixels; `--megapixels X` a 3:2 landscape image of about
X million pixels. The full run, on a quiet machine (at about 3.5 s per megapixel
each way on 2 cores, the 8000x8000 image alone takes about 5 minutes to encode
and as long to decode):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/large_image.py --sizes 1000 2000 4000 8000 \\
        --json-out /tmp/vaezip-bench/large_image.json

Images over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
about 89.5 million pixels) are refused by `vaezip compress` with one line; such a
size shows up here as a failed row. Raw pixels are 3 bytes per pixel, shown in the
table as "raw MiB" to read the peak RSS against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
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
DEFAULT_JSON = Path(tempfile.gettempdir()) / "vaezip-bench" / "large_image.json"
CELL_HEIGHT, CELL_WIDTH = 512, 768


def kodak_cells(folder: Path) -> list[np.ndarray]:
    """The Kodak images as (512, 768, 3) uint8 arrays, portrait ones transposed."""
    from PIL import Image as PILImage

    cells = []
    for path in sorted(folder.glob("kodim*.png")):
        with PILImage.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        if rgb.shape[0] > rgb.shape[1]:
            rgb = rgb.transpose(1, 0, 2)
        if rgb.shape[:2] != (CELL_HEIGHT, CELL_WIDTH):
            raise SystemExit(f"{path}: expected 768x512 or 512x768, got {rgb.shape[1]}x{rgb.shape[0]}")
        cells.append(rgb)
    if not cells:
        raise SystemExit(f"no kodim*.png in {folder}")
    return cells


def photo(height: int, width: int, cells: list[np.ndarray]) -> np.ndarray:
    """(height, width, 3) uint8: the cells on a grid, mirrored by row and column parity, cropped."""
    rows, cols = -(-height // CELL_HEIGHT), -(-width // CELL_WIDTH)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            cell = cells[(r * cols + c) % len(cells)]
            cell = cell[::-1 if r % 2 else 1, ::-1 if c % 2 else 1]
            top, left = r * CELL_HEIGHT, c * CELL_WIDTH
            h, w = min(CELL_HEIGHT, height - top), min(CELL_WIDTH, width - left)
            out[top:top + h, left:left + w] = cell[:h, :w]
    return out


def shapes(args) -> list[tuple[int, int]]:
    """(height, width) of each requested image."""
    if args.sizes:
        return [(n, n) for n in args.sizes]
    out = []
    for mp in args.megapixels:
        width = max(1, round(math.sqrt(mp * 1e6 * 1.5)))
        out.append((max(1, round(mp * 1e6 / width)), width))
    return out


def run_measured(cmd: list[str], env: dict, workdir: Path) -> dict:
    """Run `cmd` to completion; its wall time, exit status, own peak RSS and output."""
    out_path, err_path = workdir / "child.out", workdir / "child.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    stderr = err_path.read_text().strip()
    return {
        "command": shlex.join(cmd), "returncode": proc.returncode, "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "user_s": usage.ru_utime, "system_s": usage.ru_stime,
        "stdout": out_path.read_text().strip(),
        "error": stderr.splitlines()[-1] if stderr else f"exit status {proc.returncode}, nothing on stderr",
    }


def bench_size(height: int, width: int, cells: list[np.ndarray], vaezip: str, env: dict, workdir: Path) -> dict:
    from PIL import Image as PILImage

    pixels = photo(height, width, cells)
    source, vz, back = workdir / f"photo-{width}x{height}.png", workdir / "photo.vz", workdir / "photo.back.png"
    start = time.perf_counter()
    PILImage.fromarray(pixels, "RGB").save(source, compress_level=1)
    row = {"width": width, "height": height, "megapixels": height * width / 1e6,
           "raw_mib": pixels.nbytes / 2**20, "png_bytes": source.stat().st_size,
           "build_s": time.perf_counter() - start}
    row["compress"] = run_measured([vaezip, "compress", str(source), "-o", str(vz)], env, workdir)
    if row["compress"]["returncode"] == 0:
        row["vz_bytes"] = vz.stat().st_size
        row["bpd"] = 8 * row["vz_bytes"] / pixels.size
        row["decompress"] = run_measured([vaezip, "decompress", str(vz), "-o", str(back)], env, workdir)
        if row["decompress"]["returncode"] == 0:
            with PILImage.open(back) as im:
                decoded = np.asarray(im)
            row["exact"] = decoded.shape == pixels.shape and bool(np.array_equal(decoded, pixels))
    row["ok"] = row.get("exact", False)
    for path in (source, vz, back):
        path.unlink(missing_ok=True)
    return row


def _summary(row: dict, step: str) -> str:
    run = row.get(step)
    if run is None:
        return f"{step} not run"
    if run["returncode"] != 0:
        return f"{step} FAILED ({run['error']})"
    return f"{step} {run['seconds']:.1f} s {run['peak_rss_mib']:.0f} MiB"


def _cell(row: dict, step: str, key: str, digits: int) -> str:
    run = row.get(step)
    if run is None:
        return "-"
    if run["returncode"] != 0:
        return "failed"
    return f"{run[key]:.{digits}f}"


def markdown(result: dict) -> str:
    lines = ["| image | MP | raw MiB | compress s | compress peak RSS MiB | decompress s "
             "| decompress peak RSS MiB | bits/subpixel | exact |", "|" + "---|" * 9]
    for r in result["rows"]:
        bpd = f"{r['bpd']:.3f}" if "bpd" in r else "-"
        exact = "yes" if r["ok"] else "NO"
        lines.append(f"| {r['width']}x{r['height']} | {r['megapixels']:.2f} | {r['raw_mib']:.1f} "
                     f"| {_cell(r, 'compress', 'seconds', 1)} | {_cell(r, 'compress', 'peak_rss_mib', 0)} "
                     f"| {_cell(r, 'decompress', 'seconds', 1)} | {_cell(r, 'decompress', 'peak_rss_mib', 0)} "
                     f"| {bpd} | {exact} |")
    for r in result["rows"]:
        for step in ("compress", "decompress"):
            if r.get(step, {}).get("returncode", 0) != 0:
                lines.append(f"\n{r['width']}x{r['height']} {step} failed: {r[step]['error']}")
    env = result["environment"]
    lines += ["", f"Times are CLI wall time including interpreter start-up and model load; peak RSS is each "
              f"child's own (`os.wait4`). Machine: {env['cpu']}, {env['cores']} cores, "
              f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}. Code: {result['code']['kind']} at "
              f"{result['code']['git_head'][:10]}.", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def environment() -> dict:
    from kodak import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
            "loadavg_1min_at_start": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sizes", nargs="+", type=int, metavar="N", help="N x N images")
    which.add_argument("--megapixels", nargs="+", type=float, metavar="X", help="3:2 images of about X MP")
    parser.add_argument("--data", type=Path, default=KODAK, help="folder of kodim*.png")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--vaezip", help="the vaezip executable (default: beside this python)")
    parser.add_argument("--code", choices=("head", "worktree", "installed"), default="head",
                        help="which code to run, copied once at start (default: git HEAD); see _snapshot.py")
    parser.add_argument("--workdir", type=Path, help="folder for the temporary images (default: the system's)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes or []) or any(x <= 0 for x in args.megapixels or []):
        parser.error("sizes must be positive")

    beside = Path(sys.executable).parent / "vaezip"
    vaezip = args.vaezip or (str(beside) if beside.exists() else shutil.which("vaezip") or "vaezip")
    cells = kodak_cells(args.data)
    command = shlex.join(sys.orig_argv) if argv is None else shlex.join([sys.executable, __file__, *argv])
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vaezip-large-", dir=args.workdir) as tmp:
        code = _snapshot.make(args.code, Path(tmp) / "code")
        result = {"benchmark": "large_image",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": command, "vaezip": vaezip, "code": _snapshot.public(code),
                  "environment": environment(), "rows": []}
        for height, width in shapes(args):
            row = bench_size(height, width, cells, vaezip, code["env"], Path(tmp))
            row["loadavg_1min_after"] = os.getloadavg()[0]  # other jobs on the machine inflate the times
            result["rows"].append(row)
            print(f"{width}x{height}: {_summary(row, 'compress')}, {_summary(row, 'decompress')}, "
                  f"exact {row['ok']}", file=sys.stderr, flush=True)
            args.json_out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive a crash
    result["complete"] = True
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nJSON: {args.json_out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
