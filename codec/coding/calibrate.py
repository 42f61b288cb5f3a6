"""Format version 3: per-batch log-scale offsets that fit the pixel model to the image.

The photo model's logistic scales are calibrated to its training photos. On a
noisier image (film grain, sensor noise) they are too narrow and every subpixel
pays for it: one held-out wikiphoto cost 5.61 bits per subpixel against PNG's
4.42. So for each batch of tiles, sub-lattice stage and channel, the encoder
picks an integer offset o (in log-scale grid steps, 1/`LOG_SCALE_STEPS` nat)
that every quantized log-scale of that channel is shifted by, scale * e^(o/16),
and codes the offsets in the payload just above the stage's pixels
(`offset_codec`). The decoder pops them and builds the same tables.

The choice is the encoder's alone (the decoder only reads it), so it may use any
estimate: `choose_offsets` evaluates the coded distribution on a
strided sample of the stage's positions (float32) and searches the offsets coarse
to fine.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from vaezip.coding.quantize import (
    LOG_SCALE_STEPS,
    MEAN_STEPS,
    QuantizedMixture,
    channel_means,
    mixture_weights,
)
from vaezip.entropy import coders
from vaezip.entropy.coders import Codec

OFFSET_MIN, OFFSET_MAX = -32, 64
"""Offsets in log-scale steps: scales from e^-2 to e^4 times the model's."""
OFFSET_SPREAD = 8
"""The offsets' code: P(o) proportional to 2^(-|o| / OFFSET_SPREAD), so 0 costs 4.6 bits."""
SAMPLE_POSITIONS = 1024
"""Positions `choose_offsets` evaluates (a strided sample of the stage)."""
_STEP = 8
_FLOOR = np.float32(2.0**-40)


@lru_cache(maxsize=1)
def offset_probabilities() -> np.ndarray:
    """(OFFSET_MAX - OFFSET_MIN + 1,) float64, offset o at index o - OFFSET_MIN."""
    offsets = np.arange(OFFSET_MIN, OFFSET_MAX + 1)
    p = 2.0 ** (-np.abs(offsets) / OFFSET_SPREAD)
    return p / p.sum()


def offset_codec(channels: int) -> Codec:
    """Codec for one stage's `channels` offsets (int arrays, OFFSET_MIN..OFFSET_MAX)."""
    inner = coders.iid_categorical(offset_probabilities(), channels)

    def push(ans, offsets: np.ndarray) -> None:
        inner.push(ans, np.asarray(offsets) - OFFSET_MIN)

    def pop(ans) -> np.ndarray:
        return np.asarray(inner.pop(ans), dtype=np.int64) + OFFSET_MIN

    return Codec(push, pop)


def offset_bits(offsets: np.ndarray) -> np.ndarray:
    """What coding each offset costs, bits."""
    return -np.log2(offset_probabilities()[np.asarray(offsets) - OFFSET_MIN])


def choose_offsets(q: QuantizedMixture, values: np.ndarray) -> np.ndarray:
    """The offsets (C,) int64 that code `values` (m, C) in the fewest bits, estimated.

    Each channel's cost depends on its own offset only (the mixture weights do not
    depend on the scales), so all channels are searched at once: from 0 in steps
    of `_STEP` while the cost falls, then steps of a half and a quarter of it.
    """
    m, channels = values.shape
    if m == 0:
        return np.zeros(channels, dtype=np.int64)
    rows = slice(0, m, max(1, m // SAMPLE_POSITIONS))
    sample, x = q.rows(rows), values[rows]
    weights = mixture_weights(sample.logits).T[:, :, None]  # (K, n, 1)
    centred = np.stack([x[:, c, None] - channel_means(sample, c, x) / MEAN_STEPS for c in range(channels)])
    centred = centred.transpose(2, 1, 0)  # (K, n, C), pixels
    inverse = np.exp(-sample.log_scales.transpose(2, 0, 1) / LOG_SCALE_STEPS)  # 1 / scale, (K, n, C)
    # Logistic CDF arguments at the value's lower and upper edges at offset 0; above
    # the mean the mirrored edges (1 - CDF), so neither tail cancels. Kept negated,
    # float32: `_cdf` takes -t.
    lower, upper = (centred - 0.5) * inverse, (centred + 0.5) * inverse
    lower[:, x == 0] = -np.inf
    upper[:, x == 255] = np.inf
    mirror = centred > 0
    lower, upper = np.where(mirror, upper, -lower), np.where(mirror, lower, -upper)
    lower, upper = lower.astype(np.float32), upper.astype(np.float32)
    scale_up = m / len(x)

    def cost(offsets: np.ndarray) -> np.ndarray:
        """Estimated bits (D, C) of the stage with offsets (D, C) (scale clamping ignored)."""
        factor = np.exp(-offsets / LOG_SCALE_STEPS).astype(np.float32)[:, None, :]  # (D, 1, C)
        p = np.zeros((len(offsets),) + x.shape, dtype=np.float32)  # (D, n, C)
        with np.errstate(over="ignore"):
            for k in range(len(weights)):
                p += (_cdf(upper[k] * factor) - _cdf(lower[k] * factor)) * weights[k]
        bits = -np.log2(np.maximum(p, _FLOOR)).sum(axis=1)
        return bits * scale_up + offset_bits(offsets)

    best = np.zeros(channels, dtype=np.int64)
    best_cost = cost(best[None])[0]
    for direction in (1, -1):  # walk up, then down, while the cost falls
        walking = np.ones(channels, dtype=bool)
        while walking.any():
            trial = np.clip(best + direction * _STEP * walking, OFFSET_MIN, OFFSET_MAX)
            trial_cost = cost(trial[None])[0]
            walking &= (trial_cost < best_cost) & (trial != best)
            best, best_cost = np.where(walking, trial, best), np.where(walking, trial_cost, best_cost)
    step = _STEP // 2
    while step >= _STEP // 4:
        candidates = np.clip(np.stack([best - step, best + step]), OFFSET_MIN, OFFSET_MAX)
        costs = cost(candidates)
        better = costs.min(0) < best_cost
        best = np.where(better, candidates[costs.argmin(0), range(channels)], best)
        best_cost = np.minimum(costs.min(0), best_cost)
        step //= 2
    return best


def _cdf(negative: np.ndarray) -> np.ndarray:
    """Logistic CDF at t from -t (exp may overflow to inf: CDF 0)."""
    return 1.0 / (1.0 + np.exp(negative))
