"""Photo banks: one file that holds everything a training run reads, small enough to travel.

A bank holds training images of several sources and scales, each cut to a window (so that
the file travels, e.g. to a GPU machine with an upload limit), and fixed held-out crops.
This module says what goes in (`BankRecipe`) and builds it; `bankfile` is the file itself
(format 2: lossless WebP, 3.6 bits per subpixel on the gen2 recipe's windows, 19 % below
format 1's 2-D difference filter and LZMA). The same data, recipe, budget and library
versions give the same bytes and sha256.

A bank can be built to a byte budget (`max_bytes`): every window then shrinks by one common
factor (the centre of the window drawn for the full recipe) until the file fits.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from vaezip.errors import InputError
from vaezip.files import atomic_write
from vaezip.network.registry import sha256_file
from vaezip.training import bankfile
from vaezip.training.data import (
    PhotoSource,
    data_root,
    evaluation_crops,
    heldout_wikiphotos,
    photos2_validation,
    read_image,
)

HELDOUT_SEED = 20240601
WINDOW_STEP = 8  # shrunk windows are multiples of this many pixels


@dataclass(frozen=True)
class BankPart:
    """The photos of `source` in a bank; each keeps at most a `window` x `window`
    region (None: all of it) at a position drawn from its file name."""

    source: PhotoSource
    window: Optional[int] = None

    def describe(self) -> str:
        window = "" if self.window is None else f", one window of at most {self.window}x{self.window}"
        return self.source.describe() + window


@dataclass(frozen=True)
class BankRecipe:
    """What a photo bank holds: training `parts` and `heldout_crops` fixed crops of
    side `crop` from the `heldout` sources (drawn with `evaluation_crops`)."""

    parts: tuple[BankPart, ...]
    heldout: tuple[PhotoSource, ...]
    heldout_crops: int = 256
    crop: int = 64


def gen2_bank_recipe(window_scale: float = 1.0) -> BankRecipe:
    """The photo bank of the second photo model (issue 15): 17.1 Mpx, 24 MB as format 2;
    the campaign shrinks its windows to what the device upload leaves room for.

    Training: photos2 minus its validation split at 1x (windows of 112) and 2x
    (windows of 96); BSDS500 train+val+test reduced 2x (JPEGs: never at 1x;
    windows of 80); wikiphotos 001-040 at 1x and 2x (windows of 192). Held-out:
    256 crops of 64 from the photos2 validation split at 1x. Never Kodak, never
    wikiphotos 041-049.

    Args:
        window_scale: every window's side times this (rounded to `WINDOW_STEP`): 3 gives
            the bank a CPU campaign trains on where the data is (`Campaign.local_bank`):
            nearly every pixel of photos2 and BSDS500, 102.1 Mpx in 130 MB (built in about 4
            minutes on 2 cores). The held-out crops do not change.
    """
    root = data_root()
    validation = tuple(photos2_validation())
    held_wiki = tuple(p.name for p in heldout_wikiphotos())
    photos2 = lambda scale: PhotoSource(root / "photos2", downscale=scale, exclude=validation)  # noqa: E731
    wiki = lambda scale: PhotoSource(root / "wikiphotos", downscale=scale, exclude=held_wiki)  # noqa: E731
    window = lambda side: max(WINDOW_STEP, round(side * window_scale / WINDOW_STEP) * WINDOW_STEP)  # noqa: E731
    parts = (
        BankPart(photos2(1), window(112)), BankPart(photos2(2), window(96)),
        *(BankPart(PhotoSource(root / "bsds500" / split, downscale=2), window(80))
          for split in ("train", "val", "test")),
        BankPart(wiki(1), window(192)), BankPart(wiki(2), window(192)),
    )
    return BankRecipe(parts, (PhotoSource(root / "photos2", include=validation),))


def window_origin(height: int, width: int, window: int, key: str) -> tuple[int, int]:
    """(top, left) of the `window` x `window` region a bank draws from an image of this size,
    seeded by `key` ("FOLDER/NAME@DOWNSCALE")."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    top = int(rng.integers(0, max(height - window, 0) + 1))
    left = int(rng.integers(0, max(width - window, 0) + 1))
    return top, left


def _window(image: np.ndarray, window: Optional[int], key: str) -> np.ndarray:
    """A `window` x `window` region of image (clipped to its size) at a position seeded by `key`."""
    if window is None:
        return image
    top, left = window_origin(image.shape[0], image.shape[1], window, key)
    return image[top : top + window, left : left + window]


def _centre(image: np.ndarray, side: Optional[int]) -> np.ndarray:
    """The central region of image of at most `side` x `side` (None: all of it)."""
    if side is None:
        return image
    h, w = image.shape[:2]
    top, left = max(h - side, 0) // 2, max(w - side, 0) // 2
    return image[top : top + side, left : left + side]


def _shrunk(part: BankPart, scale: float, smallest: int) -> BankPart:
    """`part` with its window scaled by `scale` (down to a multiple of `WINDOW_STEP`, at
    least `smallest`); a part of whole images stays as it is."""
    if part.window is None:
        return part
    side = int(part.window * scale) // WINDOW_STEP * WINDOW_STEP
    return replace(part, window=max(smallest, min(part.window, side)))


def build_photo_bank(path: str | Path, recipe: Optional[BankRecipe] = None, channels: int = 3,
                     log=lambda line: None, max_bytes: Optional[int] = None) -> dict:
    """Build a photo bank from `data_root()` as `recipe` says (default `gen2_bank_recipe()`).

    Writes PATH (the .npz) and PATH.json (the manifest: recipe, every image with its
    source file's sha256, library versions, and the bank's own sha256 and size).
    Deterministic: the same data, budget and library versions give the same bytes.

    Args:
        max_bytes: if set, the file's size limit: windows shrink by a common factor
            (recorded as the manifest's `window_scale`) until it fits; never below
            the recipe's crop plus `WINDOW_STEP`.

    Returns:
        The manifest written to PATH.json.
    """
    import PIL

    recipe = recipe or gen2_bank_recipe()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = []  # (part index, name, source sha256, window drawn for the full recipe)
    for index, part in enumerate(recipe.parts):
        paths = part.source.paths()
        if not paths:
            raise InputError(f"no images for the bank in {part.source.describe()}")
        for p in paths:
            key = f"{p.parent.name}/{p.name}@{part.source.downscale}"
            image = _window(read_image(p, channels, part.source.downscale), part.window, key)
            drawn.append((index, key, hashlib.sha256(p.read_bytes()).hexdigest()[:16], image))
        log(f"bank: {part.describe()}: {len(paths)} images")
    held_images = [im for s in recipe.heldout for im in s.load(channels)]
    heldout = evaluation_crops(held_images, recipe.crop, recipe.heldout_crops, seed=HELDOUT_SEED)
    smallest = recipe.crop + WINDOW_STEP
    scale = 1.0
    candidate = path.with_name(f".{path.name}.candidate")  # becomes PATH only once it fits
    try:
        while True:
            parts = tuple(_shrunk(part, scale, smallest) for part in recipe.parts)
            images = [_centre(image, parts[index].window) for index, _, _, image in drawn]
            encoded = [bankfile.encode(image) for image in images]
            manifest = {
                "format": bankfile.PHOTO_BANK_FORMAT,
                "parts": [part.describe() for part in parts],
                "window_scale": round(scale, 4),
                "heldout": ", ".join(s.describe() for s in recipe.heldout)
                           + f" ({len(held_images)} images, seed {HELDOUT_SEED})",
                "images": [[key, int(im.shape[0]), int(im.shape[1]), src]
                           for (_, key, src, _), im in zip(drawn, images)],
                "pillow": PIL.__version__,
                "numpy": np.__version__,
            }
            bankfile.write_bank(candidate, [key for _, key, _, _ in drawn], images, encoded, heldout, manifest)
            size = candidate.stat().st_size
            if max_bytes is None or size <= max_bytes:
                break
            image_bytes = sum(len(e) for e in encoded)
            room = max_bytes - (size - image_bytes)
            if room <= 0 or all(part.window in (None, smallest) for part in parts):
                raise InputError(f"a photo bank of this recipe does not fit in {max_bytes / 2**20:.1f} MiB "
                                 f"(smallest windows: {size / 2**20:.1f} MiB)")
            scale *= 0.99 * math.sqrt(room / image_bytes)
            log(f"bank: {size / 2**20:.1f} MiB is over the budget of {max_bytes / 2**20:.1f} MiB; windows x{scale:.3f}")
        candidate.replace(path)
    finally:
        candidate.unlink(missing_ok=True)
    pixels = int(sum(im.shape[0] * im.shape[1] for im in images))
    manifest = {"bank": path.name, "sha256": sha256_file(path), "bytes": size,
                "training_images": len(images), "training_pixels": pixels, **manifest}
    with atomic_write(path.with_name(path.name + ".json")) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"bank: wrote {path}, {size / 1e6:.1f} MB, sha256 {manifest['sha256']}: "
        f"{len(images)} images, {pixels / 1e6:.1f} Mpx; held-out {len(heldout)} crops")
    return manifest


