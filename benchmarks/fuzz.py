"""Fuzz the decoder: corrupted .vz and .vzp files must decode exactly or raise VaezipError.

Mutations of valid files (small images of every mode as .vz files of both format
versions, and .vzp archives of them of both versions): truncation, bit flips,
byte swaps, random bytes, 32-bit fields set to huge values; half of them with
the CRC-32 recomputed, so the field parser and the payload decoder are reached,
not only the checksum. Plus random byte strings. Every outcome must be either
the original pixels or a `VaezipError`; anything else (another exception, a
wrong image, a decode slower than --max-seconds) is a failure. The peak RSS of
the whole run is reported: headers that claim gigantic images must not allocate.

    python benchmarks/fuzz.py --cases 10000 [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import struct
import time
import zlib

import numpy as np

from vaezip import api
from vaezip.errors import VaezipError
from vaezip.format import archive, versions
from vaezip.imaging.images import Image


def samples(rng: np.random.Generator) -> list[tuple[list[Image], bytes]]:
    """Small valid files: RGB and L through the models, RGBA, P and 1 through the plane
    coder, each as a .vz of every format version, and all of them as one .vzp per version."""
    images = [
        Image("RGB", rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)),
        Image("L", np.repeat(np.arange(20, dtype=np.uint8)[:, None], 9, axis=1)[:, :, None]),
        Image("RGBA", rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)),
        Image("P", rng.integers(0, 4, (9, 6, 1), dtype=np.uint8), palette=bytes(range(12))),
        Image("1", rng.integers(0, 2, (8, 13, 1), dtype=np.uint8)),
    ]
    files = [([image], api.compress(image, version=v)) for image in images for v in versions.KNOWN_VERSIONS]
    named = [(f"{i:02d}.png", image) for i, image in enumerate(images + images[:2])]
    files += [(images + images[:2], api.pack(named, version=v)) for v in versions.KNOWN_VERSIONS]
    return files


def decode(data: bytes) -> list[Image]:
    """The images of a .vz or .vzp file, by its magic bytes."""
    if data[:8] == archive.MAGIC:
        return [image for _, image in api.unpack(data)]
    return [api.decompress_image(data)]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = rng.choice(["truncate", "flip", "swap", "bytes", "huge"])
    if kind == "truncate":
        b = b[: int(rng.integers(0, len(b)))]
    elif kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "swap":
        i, j = rng.integers(0, len(b), 2)
        b[i], b[j] = b[j], b[i]
    elif kind == "bytes":
        i = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 9))
        b[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    else:
        i = int(rng.integers(8, max(9, len(b) - 4)))
        b[i : i + 4] = struct.pack("<I", int(rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 28, 65536])))
    if rng.random() < 0.5 and len(b) > 4:  # recompute the CRC so the parser itself is exercised
        b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
        kind += "+crc"
    return kind, bytes(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--json-out", default="/tmp/vaezip-fuzz.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    valid = samples(rng)
    outcomes: collections.Counter = collections.Counter()
    failures = []
    slowest = 0.0
    start = time.perf_counter()
    for case in range(args.cases):
        if case % 10 == 9:
            kind, data = "random", rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
            originals = None
        else:
            originals, good = valid[int(rng.integers(0, len(valid)))]
            kind, data = mutate(good, rng)
            kind = ("vzp " if good[:8] == archive.MAGIC else "vz ") + kind
        t = time.perf_counter()
        try:
            images = decode(data)
            same = originals is not None and len(images) == len(originals) and all(
                a.mode == b.mode and np.array_equal(a.pixels, b.pixels) for a, b in zip(images, originals))
            outcomes[f"{kind.split()[0]}: " + ("decoded exactly" if same else "WRONG IMAGE")] += 1
            if not same:
                failures.append((case, kind, "wrong image"))
        except VaezipError as exc:
            outcomes[f"{kind.split()[0]}: rejected, {type(exc).__name__}"] += 1
        except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
            outcomes[f"{kind.split()[0]}: CRASH, {type(exc).__name__}"] += 1
            failures.append((case, kind, repr(exc)[:200]))
        seconds = time.perf_counter() - t
        slowest = max(slowest, seconds)
        if seconds > args.max_seconds:
            failures.append((case, kind, f"slow: {seconds:.1f} s"))
    result = {
        "cases": args.cases, "seed": args.seed, "outcomes": dict(outcomes), "failures": failures[:50],
        "failure_count": len(failures), "slowest_decode_s": slowest, "total_s": time.perf_counter() - start,
        "valid_files": len(valid), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
