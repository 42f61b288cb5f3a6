"""Determinism across thread counts: encode with one torch thread count, decode with another.

Each image is encoded in a fresh subprocess with `torch.set_num_threads(2)` and decoded in
another with `torch.set_num_threads(1)`, then the other way round (fresh model load in
every process). An image passes when both decodes give the original mode and pixels; the
two encodes are also compared byte for byte. Exit status 1 if anything differs or fails.

    .venv/bin/python benchmarks/determinism.py [--images A.png ...] [--json-out FILE]

Default images: 256x256 centre crops of kodim01, kodim12 and kodim23, and a seeded random
RGBA image 17 wide by 23 high.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _snapshot
import numpy as np

KODAK = Path("/work/shared/data/kodak")
DEFAULT_JSON = Path(tempfile.gettempdir()) / "vaezip-bench" / "determinism.json"
PAIRS = ((2, 1), (1, 2))  # (encode threads, decode threads)


def worker(action: str, threads: int, source: str, target: str) -> int:
    """Run in a subprocess: set the thread count first, then load the model and code."""
    import torch

    torch.set_num_threads(threads)
    from vaezip import api
    from vaezip.imaging.images import read_image, write_png

    if action == "encode":
        Path(target).write_bytes(api.compress(read_image(source)))
    else:
        write_png(api.decompress_image(Path(source).read_bytes()), target)
    import vaezip

    print(json.dumps({"threads": torch.get_num_threads(), "vaezip": vaezip.__file__}))
    return 0


def default_images(folder: Path) -> list[Path]:
    from PIL import Image as PILImage

    paths = []
    for name in ("kodim01", "kodim12", "kodim23"):
        with PILImage.open(KODAK / f"{name}.png") as im:
            left, top = (im.width - 256) // 2, (im.height - 256) // 2
            path = folder / f"{name}-crop256.png"
            im.crop((left, top, left + 256, top + 256)).save(path)
            paths.append(path)
    pixels = np.random.default_rng(0).integers(0, 256, (23, 17, 4), dtype=np.uint8)
    path = folder / "random-rgba-17x23.png"
    PILImage.fromarray(pixels, "RGBA").save(path)
    paths.append(path)
    return paths


def _run(action: str, threads: int, source: Path, target: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", action, str(threads), str(source), str(target)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = {"action": action, "threads_requested": threads, "seconds": time.perf_counter() - start,
           "returncode": proc.returncode}
    if proc.returncode == 0:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        out["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return out


def check_image(path: Path, workdir: Path, env: dict) -> dict:
    from vaezip.imaging.images import pixels_equal, read_image

    original = read_image(path)
    row = {"image": path.name, "mode": original.mode, "width": original.width, "height": original.height,
           "runs": [], "encodes": {}}
    for enc, dec in PAIRS:
        vz = workdir / f"{path.stem}.enc{enc}.vz"
        back = workdir / f"{path.stem}.enc{enc}.dec{dec}.png"
        run = {"encode_threads": enc, "decode_threads": dec,
               "encode": _run("encode", enc, path, vz, env)}
        if run["encode"]["returncode"] == 0:
            row["encodes"][enc] = vz.read_bytes()
            run["decode"] = _run("decode", dec, vz, back, env)
            run["identical"] = run["decode"]["returncode"] == 0 and pixels_equal(original, read_image(back))
        else:
            run["identical"] = False
        row["runs"].append(run)
    blobs = list(row.pop("encodes").values())
    row["encode_bytes"] = [len(b) for b in blobs]
    row["encodes_identical"] = len(blobs) == len(PAIRS) and all(b == blobs[0] for b in blobs)
    row["ok"] = row["encodes_identical"] and all(r["identical"] for r in row["runs"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", type=Path, help="default: 3 Kodak crops and a random RGBA image")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--code", choices=("head", "worktree", "installed"), default="head",
                        help="which code to run, copied once at start (default: git HEAD); see _snapshot.py")
    parser.add_argument("--worker", nargs=4, metavar=("ACTION", "THREADS", "IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        action, threads, source, target = args.worker
        return worker(action, int(threads), source, target)

    with tempfile.TemporaryDirectory(prefix="vaezip-det-") as tmp:
        code = _snapshot.make(args.code, Path(tmp) / "code")
        images = args.images or default_images(Path(tmp))
        rows = []
        for path in images:
            row = check_image(path, Path(tmp), code["env"])
            rows.append(row)
            print(f"{row['image']}: {'identical' if row['ok'] else 'DIFFERENT'}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "determinism", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv), "code": _snapshot.public(code), "pairs": PAIRS, "images": rows, "all_ok": all(r["ok"] for r in rows),
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")

    print("| image | mode | size | enc 2 thr → dec 1 thr | enc 1 thr → dec 2 thr | .vz bytes equal (enc 2 vs 1) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for run in r["runs"]:
            err = run["encode"].get("error") or run.get("decode", {}).get("error")
            cells.append("identical" if run["identical"] else f"DIFFERENT{f' ({err})' if err else ''}")
        sizes = "/".join(str(n) for n in r["encode_bytes"])
        print(f"| {r['image']} | {r['mode']} | {r['width']}x{r['height']} | {cells[0]} | {cells[1]} "
              f"| {'yes' if r['encodes_identical'] else 'NO'} ({sizes} B) |")
    print(f"\nAll identical: {result['all_ok']}. Command: `{result['command']}`")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
