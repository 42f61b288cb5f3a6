"""Speed of this checkout's coder against an earlier commit's, side by side in one process.

Exports the package of commit REV (`git archive`: codec/, cli/, models/) into a temporary
folder under another import name (`vaezip_at_REV`, its `vaezip` imports rewritten), loads
both, says whether they write the same bytes (a change of the format or the default model
makes them differ), then times `compress` and `decompress` of the images with each for
--rounds rounds, alternating which goes first. Prints medians, minima and the median of the
per-round ratios (this over REV): the shared 2 cores drift by several per cent within
minutes, and pairs of calls a few seconds apart cancel most of it. Every decode is checked.

    python benchmarks/compare_code_speed.py 24d7cd7 [IMAGE...] [--rounds 12] [--json-out F]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

import vaezip

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))
REPO = Path(__file__).resolve().parents[1]
IMPORTS = re.compile(r"\bvaezip(?=\.)|(?<=from )vaezip(?= import)|(?<=^import )vaezip$", re.MULTILINE)


def import_commit(rev: str, folder: Path):
    """The package at commit `rev` of this repository, imported as `vaezip_at_<rev>`."""
    name = "vaezip_at_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "codec", "cli", "models"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / name
    (folder / "codec").rename(package)
    for part in ("cli", "models"):
        (folder / part).rename(package / part)
    for path in package.rglob("*.py"):
        path.write_text(IMPORTS.sub(name, path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare with (anything `git archive` takes)")
    parser.add_argument("images", nargs="*", default=[str(DATA / "kodak" / f"kodim{i:02d}.png") for i in (3, 8)])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        old = import_commit(args.rev, Path(folder))
        coders = {"this": vaezip, args.rev: old}
        images = {label: [importlib.import_module(module.__name__ + ".imaging.images").read_image(path)
                          for path in args.images]
                  for label, module in coders.items()}
        files = {label: [module.compress(image) for image in images[label]] for label, module in coders.items()}
        same = files["this"] == files[args.rev]
        print(f"{args.rev}: {'the same bytes' if same else 'different bytes'}; load {os.getloadavg()[0]:.2f}",
              flush=True)
        times = {(label, op): [] for label in coders for op in ("compress", "decompress")}
        for r in range(args.rounds):
            for label in list(coders)[:: 1 if r % 2 == 0 else -1]:
                module = coders[label]
                start = time.perf_counter()
                for image in images[label]:
                    module.compress(image)
                times[label, "compress"].append(time.perf_counter() - start)
                start = time.perf_counter()
                decoded = [module.decompress(data) for data in files[label]]
                times[label, "decompress"].append(time.perf_counter() - start)
                for image, pixels in zip(images[label], decoded):
                    if not np.array_equal(np.asarray(pixels).reshape(image.pixels.shape), image.pixels):
                        raise SystemExit(f"{label}: decoded pixels differ")
    print(f"load after: {os.getloadavg()[0]:.2f}; {len(args.images)} images, {args.rounds} rounds, seconds per round")
    result = {"rev": args.rev, "images": args.images, "rounds": args.rounds, "same_bytes": same, "ops": {}}
    for op in ("compress", "decompress"):
        this, then = times["this", op], times[args.rev, op]
        ratio = statistics.median(a / b for a, b in zip(this, then))
        print(f"{op}: this {statistics.median(this):.3f} (min {min(this):.3f}), {args.rev} "
              f"{statistics.median(then):.3f} (min {min(then):.3f}); paired ratio x{ratio:.3f}")
        result["ops"][op] = {"this": this, args.rev: then, "paired_ratio_median": ratio}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
