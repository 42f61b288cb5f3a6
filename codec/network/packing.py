"""Compact storage of registered weights: a `torch.save` file, byte-shuffled and zlib-compressed,
whole or as its difference from another registered model's bytes.

Float32 weights compress poorly byte by byte. Gathering the first, second, third and fourth
bytes of every 4-byte word (the sign-and-exponent bytes together) lets zlib store the
registered models in 77 % of their size (57.2 -> 44.2 MB, so the repository and a photo bank
fit the device machine's 64 MiB upload), and unpacking takes about 0.04 s for the 6.4 MB
default model.
Unpacking gives back the original file's bytes exactly, so its sha256, the model identity
written into every .vz file, does not change.

Successive sessions of one training campaign change about half of the snapped float32 words
and mostly their low bytes, so a superseded model stored as the XOR of its bytes with its
successor's packs to about half its own packed size (0.86-1.36 MB against 1.95 MB for the
photo-rgb-halo models).

Layouts (little-endian; the zlib stream holds the shuffled bytes, padded with zeros to a
multiple of 4):
  whole  MAGIC (8 bytes) | original length (u64) | zlib stream of the original
  delta  DELTA_MAGIC (8 bytes) | original length (u64) | sha256 of the base bytes (32 bytes) |
         zlib stream of original XOR base (the base cut or zero-padded to the original's length)
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Optional

import numpy as np

MAGIC = b"VZWPACK1"
DELTA_MAGIC = b"VZWDELT1"
SUFFIX = ".ptz"
_HEADER = struct.Struct("<8sQ")
_DELTA_HEADER = struct.Struct("<8sQ32s")
_WORD = 4


class PackError(ValueError):
    """Bytes that are not a packed weights file, or a damaged one."""


def _shuffle(raw: bytes) -> bytes:
    padded = raw + b"\0" * (-len(raw) % _WORD)
    return np.frombuffer(padded, np.uint8).reshape(-1, _WORD).T.tobytes()


def _unshuffle(shuffled: bytes, length: int) -> bytes:
    return np.frombuffer(shuffled, np.uint8).reshape(_WORD, -1).T.tobytes()[:length]


def _xor(raw: bytes, base: bytes) -> bytes:
    """`raw` XOR `base`, the base cut or zero-padded to len(raw)."""
    fitted = base[:len(raw)] + b"\0" * max(0, len(raw) - len(base))
    return (np.frombuffer(raw, np.uint8) ^ np.frombuffer(fitted, np.uint8)).tobytes()


def pack(raw: bytes) -> bytes:
    """A weights file's bytes -> the packed form (zlib level 9)."""
    return _HEADER.pack(MAGIC, len(raw)) + zlib.compress(_shuffle(raw), 9)


def pack_delta(raw: bytes, base: bytes) -> bytes:
    """A weights file's bytes -> the packed difference from `base` (another weights file's bytes,
    needed again to unpack)."""
    header = _DELTA_HEADER.pack(DELTA_MAGIC, len(raw), hashlib.sha256(base).digest())
    return header + zlib.compress(_shuffle(_xor(raw, base)), 9)


def delta_base(packed: bytes) -> Optional[str]:
    """The sha256 (hex) of the bytes a delta-packed file needs to unpack; None for a whole one."""
    if packed[:len(DELTA_MAGIC)] != DELTA_MAGIC or len(packed) < _DELTA_HEADER.size:
        return None
    return _DELTA_HEADER.unpack_from(packed)[2].hex()


def unpack(packed: bytes, base: Optional[bytes] = None) -> bytes:
    """The packed form -> the original bytes; a delta needs its `base` bytes. Raises `PackError`
    when damaged, or when a delta's base is missing or not the one it was made from."""
    delta = packed[:len(DELTA_MAGIC)] == DELTA_MAGIC
    header = _DELTA_HEADER if delta else _HEADER
    if len(packed) < header.size:
        raise PackError("too short for a packed weights file")
    magic, length, *base_sha = header.unpack_from(packed)
    if magic not in (MAGIC, DELTA_MAGIC):
        raise PackError("not a packed weights file")
    if delta and base is None:
        raise PackError("a difference from another model's weights, unpacked without them")
    if delta and hashlib.sha256(base).digest() != base_sha[0]:
        raise PackError("a difference from other weights than the base given")
    try:
        shuffled = zlib.decompress(packed[header.size:])
    except zlib.error as exc:
        raise PackError(f"damaged zlib stream ({exc})") from None
    if len(shuffled) != length + (-length % _WORD):
        raise PackError(f"unpacks to {len(shuffled)} bytes, the header says {length}")
    raw = _unshuffle(shuffled, length)
    return _xor(raw, base) if delta else raw


def read_weights(path, base: Optional[bytes] = None) -> bytes:
    """The `torch.save` bytes of a weights file: unpacked if its name ends in `SUFFIX` (a delta
    with its `base` bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    return unpack(data, base) if str(path).endswith(SUFFIX) else data
