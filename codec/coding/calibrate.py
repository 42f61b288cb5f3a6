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

Format version 9 adds, after a step's batch offsets, one change of them per tile and
channel (`tile_deltas`, coded with `delta_codec`): grain and texture differ from tile
to tile: the changes made Kodak files 0.5 % smaller (docs/RESULTS.md, "Scale offsets
per tile").
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
DELTA_LIMIT = 16
"""A tile's change of its batch's offset, in log-scale steps: |delta| <= 1 nat."""
TILE_SAMPLE_POSITIONS = 256
"""Positions per tile, on average, that `tile_deltas` evaluates (a strided sample of the step)."""
_DELTA_PROBE = 4
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


@lru_cache(maxsize=1)
def delta_probabilities() -> np.ndarray:
    """(2 * DELTA_LIMIT + 1,) float64, delta d at index d + DELTA_LIMIT: P(d) proportional
    to 2^-|d| (powers of two and their exact sum: the same table on every machine)."""
    p = 2.0 ** -np.abs(np.arange(-DELTA_LIMIT, DELTA_LIMIT + 1)).astype(np.float64)
    return p / p.sum()


def delta_codec(tiles: int, channels: int) -> Codec:
    """Codec for a step's per-tile changes of the offsets, (tiles, C) int arrays in
    -DELTA_LIMIT..DELTA_LIMIT: a flag (1 bit), then, if any is not 0, all of them tile
    by tile (`delta_probabilities`)."""
    flag = coders.uniform(2, 1)
    inner = coders.iid_categorical(delta_probabilities(), tiles * channels)

    def push(ans, deltas: np.ndarray) -> None:
        deltas = np.asarray(deltas)
        if deltas.any():
            inner.push(ans, deltas.reshape(-1) + DELTA_LIMIT)
        flag.push(ans, np.array([int(deltas.any())]))

    def pop(ans) -> np.ndarray:
        if not int(np.asarray(flag.pop(ans))[0]):
            return np.zeros((tiles, channels), dtype=np.int64)
        return (np.asarray(inner.pop(ans), dtype=np.int64) - DELTA_LIMIT).reshape(tiles, channels)

    return Codec(push, pop)


def row_offsets(offsets: np.ndarray, deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(m, C) int64: each row's offsets, its batch's (C,) plus its tile's deltas (T, C);
    rows are tile by tile, `counts` (T,) of them per tile."""
    return np.repeat(np.asarray(offsets)[None, :] + np.asarray(deltas), counts, axis=0)


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
    edges = _Edges(q, values, rows)
    scale_up = m / edges.count

    def cost(offsets: np.ndarray) -> np.ndarray:
        """Estimated bits (D, C) of the stage with offsets (D, C) (scale clamping ignored)."""
        return edges.bits(offsets[:, None, :]).sum(axis=1) * scale_up + offset_bits(offsets)

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


def tile_deltas(q: QuantizedMixture, values: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each tile's change (T, C) int64 of the step's `offsets` (C,) that codes its `values`
    (m, C; `counts` (T,) rows per tile, tile by tile) in the fewest bits, its own code
    included, estimated on a strided sample of about `TILE_SAMPLE_POSITIONS` rows a tile.

    Each tile's bits at changes -`_DELTA_PROBE`, 0 and +`_DELTA_PROBE` fix the model
    bits(t) = n t + A e^-t + c of residuals with a scale e^t (`_model_minimum`); its
    minimum (rounded, within ±`DELTA_LIMIT`) is evaluated too, and the cheapest of the four,
    code included, is chosen. All 0 (`delta_codec` then codes only its flag) unless they
    save more than their code costs.
    """
    m, channels = values.shape
    tiles = len(counts)
    tile_of_row = np.repeat(np.arange(tiles), counts)
    rows = slice(0, m, max(1, m // max(1, TILE_SAMPLE_POSITIONS * tiles)))
    edges = _Edges(q, values, rows)
    sampled_tiles = tile_of_row[rows]
    sampled = np.bincount(sampled_tiles, minlength=tiles)
    scale_up = (counts / np.maximum(sampled, 1))[:, None]  # (T, 1)

    def data_bits(deltas: np.ndarray) -> np.ndarray:
        """Estimated bits (D, T, C) of each tile's values with changes (D, T, C), code not included."""
        row_bits = edges.bits(offsets + deltas[:, sampled_tiles, :])  # (D, n, C)
        d = len(deltas)
        cell = (np.arange(d)[:, None, None] * tiles + sampled_tiles[None, :, None]) * channels \
            + np.arange(channels)[None, None, :]
        sums = np.bincount(np.broadcast_to(cell, row_bits.shape).ravel(), weights=row_bits.ravel(),
                           minlength=d * tiles * channels)
        return sums.reshape(d, tiles, channels) * scale_up

    probes = np.broadcast_to(np.array([-_DELTA_PROBE, 0, _DELTA_PROBE])[:, None, None], (3, tiles, channels))
    below, unchanged, above = data_bits(probes)
    vertex = np.clip(np.rint(_model_minimum(below, unchanged, above)), -DELTA_LIMIT, DELTA_LIMIT).astype(np.int64)
    candidates = np.concatenate([probes, vertex[None]])
    totals = np.stack([below, unchanged, above, data_bits(vertex[None])[0]]) \
        - np.log2(delta_probabilities())[candidates + DELTA_LIMIT]
    # A tile without sampled rows costs only the code of its change there: 0 wins.
    best = np.take_along_axis(candidates, totals.argmin(0)[None], 0)[0].astype(np.int64)
    if totals.min(0).sum() >= unchanged.sum():
        return np.zeros_like(best)
    return best


def _model_minimum(below: np.ndarray, unchanged: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Where bits(t) = n t + A e^-t + c is least, in log-scale steps, given its values at
    -h, 0 and +h (h = `_DELTA_PROBE` steps): A = (f(h) + f(-h) - 2 f(0)) / (2 cosh h - 2),
    n = (f(h) - f(-h) + 2 A sinh h) / 2h, minimum at log(A / n). Without a minimum (A or n
    not positive): the end of the range the bits fall towards."""
    h = _DELTA_PROBE / LOG_SCALE_STEPS
    slope = above - below
    a = (below + above - 2 * unchanged) / (2 * np.cosh(h) - 2)
    n = (slope + 2 * a * np.sinh(h)) / (2 * h)
    found = (a > 0) & (n > 0)
    minimum = np.log(np.where(found, a, 1.0) / np.where(found, n, 1.0)) * LOG_SCALE_STEPS
    return np.where(found, minimum, np.where(slope > 0, -DELTA_LIMIT, DELTA_LIMIT))


class _Edges:
    """Logistic CDF arguments of sampled subpixels at their lower and upper edges, at
    offset 0, for estimating bits under log-scale offsets (scale clamping ignored)."""

    def __init__(self, q: QuantizedMixture, values: np.ndarray, rows: slice):
        sample, x = q.rows(rows), values[rows]
        channels = x.shape[1]
        self.count = len(x)
        self.weights = mixture_weights(sample.logits).T[:, :, None]  # (K, n, 1)
        centred = np.stack([x[:, c, None] - channel_means(sample, c, x) / MEAN_STEPS for c in range(channels)])
        centred = centred.transpose(2, 1, 0)  # (K, n, C), pixels
        inverse = np.exp(-sample.log_scales.transpose(2, 0, 1) / LOG_SCALE_STEPS)  # 1 / scale, (K, n, C)
        # Above the mean the mirrored edges (1 - CDF), so neither tail cancels. Kept
        # negated, float32: `_cdf` takes -t.
        lower, upper = (centred - 0.5) * inverse, (centred + 0.5) * inverse
        lower[:, x == 0] = -np.inf
        upper[:, x == 255] = np.inf
        mirror = centred > 0
        lower, upper = np.where(mirror, upper, -lower), np.where(mirror, lower, -upper)
        self.lower, self.upper = lower.astype(np.float32), upper.astype(np.float32)

    def bits(self, offsets: np.ndarray) -> np.ndarray:
        """Bits (D, n, C) of the sampled subpixels with offsets broadcast to (D, n, C)."""
        factor = np.exp(-np.asarray(offsets) / LOG_SCALE_STEPS).astype(np.float32)
        shape = np.broadcast_shapes(factor.shape, self.lower.shape[1:])
        p = np.zeros(shape, dtype=np.float32)
        with np.errstate(over="ignore"):
            for k in range(len(self.weights)):
                p += (_cdf(self.upper[k] * factor) - _cdf(self.lower[k] * factor)) * self.weights[k]
        return -np.log2(np.maximum(p, _FLOOR))


def _cdf(negative: np.ndarray) -> np.ndarray:
    """Logistic CDF at t from -t (exp may overflow to inf: CDF 0)."""
    return 1.0 / (1.0 + np.exp(negative))
