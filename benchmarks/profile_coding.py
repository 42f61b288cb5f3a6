"""Where the time of compress and decompress goes, for (model, format version) runs side by side.

In one process (models loaded and each run warmed up off the clock), `--reps` rounds of
compressing and decompressing every image with every run, the runs in alternating order
(the shared 2 cores drift by several per cent within minutes: compare runs of one round,
not of separate processes). Each call's wall time is split into phases by wrapping the
functions that do the work:

  network   `inference.Network._map` and `Later` jobs of kind "network": every network
            call (bottom-up, the top-down steps, posteriors, the stage heads), run in the
            pool while the main thread waits; the encoder starts a batch's pixel steps at
            once, each with its offset search, and waits for each as it codes it;
  tables    waiting for `inference.Later.result`: pixel tables are built in the pool
            while earlier chunks are coded, so only the part coding does not hide;
  latents   building, pushing and popping the latent codecs (`bitsback.latent_codec`);
  offsets   the encoder's search for the scale offsets (`calibrate.choose_offsets`, and
            version 9's per-tile changes, `calibrate.tile_deltas`) where the main thread
            runs it (the encoder's pixel steps run it in the pool: "network");
  ANS       constriction's calls for the pixels (`coders.categorical`);
  rest      everything else (parameter rounding, lattices, checksums).

Reports the median over rounds of each phase, summed over the images, and how long the
pool's workers were busy: none, one, or two or more at once (jobs of the pool timed as they
run); every file is decoded and compared with its image.

    python benchmarks/profile_coding.py                      # kodim03 and kodim08, v3 float vs v6
    python benchmarks/profile_coding.py IMG... --runs photo-rgb-2:3 photo-rgb-exact-1:6 --reps 7
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import vaezip
from vaezip.coding import bitsback, calibrate
from vaezip.entropy import coders
from vaezip.imaging.images import read_image
from vaezip.network import inference, registry

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))
PHASES = ("network", "tables", "latents", "offsets", "ANS")


def _timed(totals: collections.Counter, phase: str, function):
    """`function`, adding the wall time of each call from the main thread to totals[phase]."""
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - start
    return wrapper


OCCUPANCY = ("pool: none busy", "pool: one busy", "pool: two or more busy")


def record_pool_jobs(spans: list) -> None:
    """Append (start, end) of every job any thread pool runs to `spans`."""
    submit = ThreadPoolExecutor.submit

    def timed_submit(self, fn, /, *args, **kwargs):
        def job():
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((start, time.perf_counter()))
        return submit(self, job)

    ThreadPoolExecutor.submit = timed_submit


def occupancy(spans: list, start: float, end: float) -> list[float]:
    """Seconds of [start, end] with no job running, one, and two or more (`OCCUPANCY`)."""
    inside = [(max(a, start), min(b, end)) for a, b in spans if b > start and a < end]
    events = sorted([(a, 1) for a, _ in inside] + [(b, -1) for _, b in inside])
    seconds, running, last = [0.0, 0.0, 0.0], 0, start
    for moment, change in events:
        seconds[min(running, 2)] += moment - last
        running, last = running + change, moment
    seconds[min(running, 2)] += max(0.0, end - last)
    return seconds


def instrument(totals: collections.Counter) -> None:
    """Wrap the phase functions so that each call adds its wall time to `totals`."""
    inference.Network._map = _timed(totals, "network", inference.Network._map)
    calibrate.choose_offsets = _timed(totals, "offsets", calibrate.choose_offsets)
    calibrate.tile_deltas = _timed(totals, "offsets", calibrate.tile_deltas)
    later_result = inference.Later.result

    def timed_later_result(self):
        return _timed(totals, self.kind, later_result)(self)

    inference.Later.result = timed_later_result
    for module, name, phase in ((coders, "categorical", "ANS"), (bitsback, "latent_codec", "latents")):
        build = getattr(module, name)

        def timed_build(*args, _build=build, _phase=phase, **kwargs):
            codec = _timed(totals, _phase, _build)(*args, **kwargs)
            return coders.Codec(_timed(totals, _phase, codec.push), _timed(totals, _phase, codec.pop))

        setattr(module, name, timed_build)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", default=[str(DATA / "kodak" / f"kodim{i:02d}.png") for i in (3, 8)])
    parser.add_argument("--runs", nargs="+", default=["photo-rgb-2:3", "photo-rgb-exact-1:6"], metavar="MODEL:VERSION")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    runs = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.runs]
    images = [read_image(path) for path in args.images]
    for model, _ in runs:
        registry.load_model(model)
    files = {run: [vaezip.compress(image, run[0], version=run[1]) for image in images] for run in runs}
    for run in runs:  # warm-up decode
        for data in files[run]:
            vaezip.decompress(data)
    totals: collections.Counter = collections.Counter()
    instrument(totals)
    spans: list = []
    record_pool_jobs(spans)
    rounds = {(run, label): [] for run in runs for label in ("compress", "decompress")}
    print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
    for rep in range(args.reps):
        for run in runs if rep % 2 == 0 else runs[::-1]:
            for label in ("compress", "decompress"):
                totals.clear()
                spans.clear()
                start = time.perf_counter()
                for image, data in zip(images, files[run]):
                    if label == "compress":
                        if vaezip.compress(image, run[0], version=run[1]) != data:
                            raise SystemExit(f"{run}: compress is not deterministic")
                    elif not np.array_equal(vaezip.decompress(data).reshape(image.pixels.shape), image.pixels):
                        raise SystemExit(f"{run}: decoded pixels differ")
                phases = {phase: totals[phase] for phase in PHASES}
                phases["total"] = time.perf_counter() - start
                phases["rest"] = phases["total"] - sum(phases[p] for p in PHASES)
                phases.update(zip(OCCUPANCY, occupancy(spans, start, start + phases["total"])))
                rounds[run, label].append(phases)
    print(f"load after: {os.getloadavg()[0]:.2f}; {len(images)} images, medians of {args.reps} rounds, seconds")
    result = {"images": args.images, "reps": args.reps, "threads": inference.default_workers(), "runs": []}
    for label in ("compress", "decompress"):
        print(f"\n{label}\n| phase | " + " | ".join(f"{m} v{v}" for m, v in runs) + " |")
        print("|---" * (len(runs) + 1) + "|")
        for phase in ("total",) + PHASES + ("rest",) + OCCUPANCY:
            medians = [float(np.median([r[phase] for r in rounds[run, label]])) for run in runs]
            print(f"| {phase} | " + " | ".join(f"{m:.3f}" for m in medians) + " |")
        totals_by_run = [float(np.median([r["total"] for r in rounds[run, label]])) for run in runs]
        print("ratio to the first run: " + ", ".join(f"x{t / totals_by_run[0]:.3f}" for t in totals_by_run))
    for run in runs:
        result["runs"].append({"model": run[0], "version": run[1], "bytes": [len(d) for d in files[run]],
                               **{label: rounds[run, label] for label in ("compress", "decompress")}})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
