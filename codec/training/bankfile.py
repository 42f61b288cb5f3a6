"""The photo bank file: layout, writing and reading (what goes in a bank: `bank`).

A bank is one .npz (a zip with fixed timestamps, so the same arrays give the same bytes):
`format`, training images as lossless WebP streams (`webp`, split by `sizes`, each with its
`shapes` row and a CRC-32 of its pixels in `crc32`), their `names`, fixed `heldout` crops
(n, S, S, C) uint8 and the `manifest` (JSON) it was built from. The WebP member is stored, the
others LZMA-compressed. Gray images are stored as equal R, G and B.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from vaezip.errors import InputError, VaezipError
from vaezip.files import atomic_write
from vaezip.network.registry import sha256_file

PHOTO_BANK_FORMAT = "vaezip-photo-bank-2"
FORMAT_PREFIX = "vaezip-photo-bank-"


def encode(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> lossless WebP bytes (gray stored as equal R, G, B), checked by decoding."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, "WEBP", lossless=True, quality=100, method=4, exact=True)
    data = buffer.getvalue()
    if not np.array_equal(decode(data, image.shape[2]), image):
        raise VaezipError("lossless WebP did not reproduce a bank image: this Pillow's WebP is not lossless")
    return data


def decode(data: bytes, channels: int) -> np.ndarray:
    """Lossless WebP bytes -> (H, W, channels) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[..., :1]) if channels == 1 else rgb


def _write_npz(path: Path, arrays: dict[str, np.ndarray], stored: tuple[str, ...] = ()) -> None:
    """An .npz np.load reads, with fixed timestamps (same arrays, same bytes): LZMA members,
    except those named in `stored` (already compressed)."""
    with atomic_write(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if key in stored else zipfile.ZIP_LZMA
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


@dataclass
class PhotoBank:
    """A loaded photo bank: training `images` ((H, W, C) uint8 each, named in `names`),
    `heldout` crops (n, S, S, C) uint8, the `manifest` it was built from and the file's sha256."""

    images: list[np.ndarray]
    names: list[str]
    heldout: np.ndarray
    manifest: dict
    sha256: str

    def describe(self) -> str:
        """One line: sha256 prefix, images, pixels, the recipe's parts and the held-out set."""
        pixels = sum(im.shape[0] * im.shape[1] for im in self.images)
        return _describe(self.sha256, len(self.images), pixels, len(self.heldout), self.manifest)


def _describe(digest: str, images: int, pixels: int, heldout: int, manifest: dict) -> str:
    return (f"photo bank sha256 {digest[:16]}: {images} training images, {pixels / 1e6:.1f} Mpx ("
            + "; ".join(manifest["parts"]) + f"); held-out {heldout} crops of " + manifest["heldout"])


def write_bank(path: Path, names: Sequence[str], images: Sequence[np.ndarray], encoded: Sequence[bytes],
               heldout: np.ndarray, manifest: dict) -> None:
    """Write a bank file: `encoded` are the `images` as `encode` returns them."""
    _write_npz(path, {
        "format": np.array(PHOTO_BANK_FORMAT),
        "shapes": np.array([im.shape for im in images], dtype=np.int32),
        "sizes": np.array([len(e) for e in encoded], dtype=np.int64),
        "webp": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "crc32": np.array([zlib.crc32(np.ascontiguousarray(im).tobytes()) for im in images], dtype=np.uint32),
        "names": np.array(list(names)),
        "heldout": heldout,
        "manifest": np.array(json.dumps(manifest)),
    }, stored=("webp",))


def _text(array: np.ndarray) -> str:
    """The one string a (1,)-shaped str array holds."""
    return str(array.reshape(-1)[0]) if array.dtype.kind == "U" and array.size == 1 else ""


def bank_format(path: str | Path) -> str:
    """The format string of the .npz at `path` ("" if it is none or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _text(archive["format"]) if "format" in archive.files else ""
    except (OSError, ValueError, zipfile.BadZipFile):
        return ""


def is_photo_bank(path: str | Path) -> bool:
    """True when `path` is an .npz written by `build_photo_bank` (any bank format)."""
    return bank_format(path).startswith(FORMAT_PREFIX)


def describe_photo_bank(path: str | Path) -> str:
    """`PhotoBank.describe()` of the bank at `path`, without decoding its pixels."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes, heldout = archive["shapes"], archive["heldout"].shape
            manifest = json.loads(_text(archive["manifest"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read photo bank {path}: {exc}") from None
    pixels = int((shapes[:, 0].astype(np.int64) * shapes[:, 1]).sum())
    return _describe(sha256_file(path), len(shapes), pixels, heldout[0], manifest)


def read_photo_bank(path: str | Path) -> PhotoBank:
    """Load a photo bank written by `build_photo_bank` (no pickles)."""
    path = Path(path)
    found = bank_format(path)
    if found != PHOTO_BANK_FORMAT:
        rebuild = "; build it again (`vaezip train --campaign NAME --prepare --force`)" if found else ""
        raise InputError(f"{path} is not a {PHOTO_BANK_FORMAT} file{f' but {found}' if found else ''}{rebuild}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes, sizes, webp, crcs = archive["shapes"], archive["sizes"], archive["webp"], archive["crc32"]
            names, heldout = [str(n) for n in archive["names"]], archive["heldout"]
            manifest = json.loads(_text(archive["manifest"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read photo bank {path}: {exc}") from None
    if (webp.dtype != np.uint8 or int(sizes.sum()) != webp.size or shapes.ndim != 2 or shapes.shape[1] != 3
            or not len(names) == len(shapes) == len(sizes) == len(crcs)):
        raise InputError(f"{path}: photo bank arrays do not match its shapes")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    images = []
    for a, b, shape, crc, name in zip(bounds[:-1], bounds[1:], shapes, crcs, names):
        try:
            image = decode(webp[a:b].tobytes(), int(shape[2]))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: bank image {name} is damaged ({exc})") from None
        if image.shape != tuple(shape):
            raise InputError(f"{path}: bank image {name} decodes to {image.shape}, its shape says {tuple(shape)}")
        if zlib.crc32(image.tobytes()) != int(crc):
            raise InputError(f"{path}: bank image {name} fails its checksum")
        images.append(image)
    if heldout.dtype != np.uint8 or heldout.ndim != 4 or heldout.shape[3] not in (1, 3):
        raise InputError(f"{path}:heldout is not (n, S, S, C) uint8 crops")
    return PhotoBank(images, names, heldout, manifest, sha256_file(path))
