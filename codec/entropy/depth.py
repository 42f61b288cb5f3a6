"""16-bit samples as an 8-bit high image plus coded low bits.

A 16-bit image is coded in two parts on the same ANS stack: its high bytes are an
ordinary 8-bit image (the photo model codes them), and the low bytes of each channel
follow with the plane coder, conditioned on the high bytes (`planes.plane_codec`
with a base). What a channel's low byte holds is often implied:

* **significant bits** b in 8..16: only the top b bits of each sample carry data and
  the 16 - b below are a fill, either zeros or the top bits repeated (PNG's sBIT and
  its recommended left-bit replication; 8-bit data scaled by 257 is b = 8);
* the remaining b - 8 bits per sample are the coded plane, predicted from the full
  values of decoded neighbours, so smooth 16-bit data codes well below 8 bits.

Stream of one channel, in pop order: b - 8 (uniform over 9), the fill (uniform over
2), then the plane of b - 8 bits (nothing when b = 8). Channels pop in order 0, 1, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from vaezip.entropy.coders import Codec, Steps, pop_steps, push_steps, uniform


@dataclass(frozen=True)
class LowBits:
    """How one channel's 16-bit samples are rebuilt from the high byte and coded bits.

    Attributes:
        bits: significant bits, 8..16; the top `bits` bits of a sample are data.
        replicate: the 16 - bits below are the top bits repeated (else zeros).
    """

    bits: int
    replicate: bool

    @property
    def levels(self) -> int:
        """Alphabet of the coded plane: 2 ** (bits - 8)."""
        return 1 << (self.bits - 8)

    def base(self, high: np.ndarray) -> np.ndarray:
        """The plane coder's base for a channel's high bytes: high << (bits - 8), int32."""
        return high.astype(np.int32) << (self.bits - 8)

    def coded(self, samples: np.ndarray) -> np.ndarray:
        """The coded plane of int64 16-bit `samples`: their bits below the high byte."""
        return (samples >> (16 - self.bits)) & (self.levels - 1)

    def fill(self, data: np.ndarray) -> np.ndarray:
        """The 16-bit samples whose top `bits` bits are `data` (int64 array)."""
        shift = 16 - self.bits
        samples = data << shift
        if self.replicate and shift:
            samples |= data >> (self.bits - shift)
        return samples


def significant_bits(samples: np.ndarray) -> LowBits:
    """The fewest significant bits that rebuild `samples` (uint16) exactly, zero fill
    preferred; 16 bits always do."""
    samples = samples.astype(np.int64)
    for bits in range(8, 16):
        data = samples >> (16 - bits)
        for replicate in (False, True):
            low = LowBits(bits, replicate)
            if np.array_equal(low.fill(data), samples):
                return low
    return LowBits(16, False)


def split(pixels: np.ndarray) -> np.ndarray:
    """High bytes of uint16 pixels, uint8 of the same shape."""
    return (pixels >> 8).astype(np.uint8)


def low_codec(high: np.ndarray) -> Codec:
    """Codec of the low bits of a (H, W, C) image whose high bytes `high` (uint8) are known.

    push(ans, pixels): pixels (H, W, C) uint16 with `split(pixels) == high`; stack
        before: S; after: S + the low bits (channel 0 on top).
    pop(ans): stack before: S + the low bits; after: S. Returns the (H, W, C) uint16 pixels.
    """
    return Codec(lambda ans, pixels: push_steps(ans, _low_steps(high, pixels)),
                 lambda ans: pop_steps(ans, _low_steps(high, None)))


def _low_steps(high: np.ndarray, pixels: Optional[np.ndarray]) -> Steps:
    """The low bits of every channel in pop order (`coders.Steps`); returns the uint16
    pixels. `pixels` is the truth on the encoder, None on the decoder."""
    from vaezip.entropy.planes import plane_codec

    height, width, channels = high.shape
    out = np.empty((height, width, channels), np.uint16)
    for c in range(channels):
        samples = None if pixels is None else pixels[:, :, c].astype(np.int64)
        truth = None if samples is None else significant_bits(samples)
        bits = 8 + int((yield uniform(9, 1), None if truth is None else np.array([truth.bits - 8]))[0])
        replicate = (yield uniform(2, 1), None if truth is None else np.array([int(truth.replicate)]))[0]
        low = LowBits(bits, bool(replicate))
        base = low.base(high[:, :, c])
        coded = yield plane_codec(height, width, low.levels, base), None if samples is None else low.coded(samples)
        out[:, :, c] = low.fill(base.astype(np.int64) | np.asarray(coded, np.int64))
    return out


def estimate_low_bits(pixels: np.ndarray) -> float:
    """Ideal bits of `low_codec(split(pixels)).push(pixels)` (within a few bits per channel)."""
    from vaezip.entropy.planes import estimate_bits

    high = split(pixels)
    total = 0.0
    for c in range(pixels.shape[2]):
        samples = pixels[:, :, c].astype(np.int64)
        low = significant_bits(samples)
        total += np.log2(18) + estimate_bits(low.coded(samples), low.levels, low.base(high[:, :, c]))
    return float(total)
