"""The one float -> integer step: mixture parameters to fixed grids, grids to PMFs.

Network outputs (float32) are rounded once onto integer grids; the probability
tables that reach the entropy coder are computed from those integers alone
(table look-ups in version 1, elementwise float32 in version 2), so encoder and
decoder build them bit for bit alike.

Grids (pixel units, subpixel values 0..255):
  means: 1/32 pixel (`MEAN_STEPS`), clamped by version (below);
  log-scales: 1/16 (`LOG_SCALE_STEPS`) in [LOG_SCALE_MIN, LOG_SCALE_MAX];
  channel coefficients: 1/4096 in [-1, 1] (a coefficient multiplies a pixel
  deviation of up to 127.5, so a coarse grid would move G and B means by
  whole pixels: 1/64 cost 2% of the rate on Kodak);
  mixture logits: 1/8 in [-16, 16].
Measured on 16 Kodak tiles: these grids code 0.3% above the float likelihood.

Two table layouts, fixed by the format version:
  version 1: one 256-entry PMF per subpixel (`channel_pmf`), means clamped to
      [-64, 319] (this clamp cost MNIST 2.1%: its background means lie far below 0);
  version 2: a subpixel is coded as its 16-value bin, then its place in the bin
      (`ChannelTables.coarse`, `.fine`: the same distribution factorised, 32 CDF
      values a mixture component instead of 255, each evaluated directly), means
      clamped to [-1024, 1279];
  version 3: as version 2, on log-scales shifted by per-batch offsets
      (`QuantizedMixture.with_scale_offsets`, chosen in `calibrate`);
  version 6: as version 3, the tables by integer arithmetic (`ExactChannelTables`,
      `entropy.exact`): the same integers on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np

from vaezip.entropy import exact
from vaezip.format import versions
from vaezip.format.versions import Format
from vaezip.network.model import (
    COEFF_RANGE,
    COEFF_STEPS,
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    LOG_SCALE_STEPS,
    LOGIT_RANGE,
    LOGIT_STEPS,
    MEAN_STEPS,
    MixtureParams,
)

MEAN_MIN, MEAN_MAX = (limit * MEAN_STEPS for limit in versions.get(1).mean_range)
"""Version 1's mean clamp in mean steps: its 256-entry tables cover these means."""
BIN = 16
"""Versions 2 and 3: subpixel values per coarse bin; 256 // BIN bins."""
SCALE_LO = int(round(LOG_SCALE_MIN * LOG_SCALE_STEPS))
SCALE_HI = int(round(LOG_SCALE_MAX * LOG_SCALE_STEPS))
LOGIT_LIMIT = int(round(LOGIT_RANGE * LOGIT_STEPS))
# Offsets (in mean steps) between a bin edge and a mean that the CDF table covers.
_EDGE_SPAN = 255 * MEAN_STEPS + (MEAN_MAX - MEAN_MIN)
if (SCALE_LO, SCALE_HI, LOGIT_LIMIT) != (exact.SCALE_LO, exact.SCALE_HI, exact.LOGIT_LIMIT):
    raise ImportError("quantize's parameter ranges and entropy.exact's differ")
_CHUNK = 8192  # subpixels per PMF block: bounds temporary memory to ~25 MB


@dataclass
class QuantizedMixture:
    """Integer mixture parameters of n pixel positions (flattened).

    logits: (n, K); means: (n, C, K) in 1/MEAN_STEPS pixel before the channel
    shift; log_scales: (n, C, K) in 1/LOG_SCALE_STEPS; coeffs: (n, 3, K) in
    1/COEFF_STEPS, None for gray; fmt: the format version whose grids and tables apply.
    """

    logits: np.ndarray
    means: np.ndarray
    log_scales: np.ndarray
    coeffs: Optional[np.ndarray]
    fmt: Format
    _weights: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def mean_range(self) -> tuple[int, int]:
        """The means' clamp in mean steps."""
        return mean_range(self.fmt)

    def rows(self, rows: slice) -> "QuantizedMixture":
        """The parameters of positions `rows` (views, no copies)."""
        return QuantizedMixture(self.logits[rows], self.means[rows], self.log_scales[rows],
                                None if self.coeffs is None else self.coeffs[rows], self.fmt)

    def with_scale_offsets(self, offsets: np.ndarray) -> "QuantizedMixture":
        """These parameters with channel c's log-scales shifted by offsets[c] grid steps
        (clamped to the grid), as format version 3 codes them (`calibrate`); offsets
        (m, C) shift each position by its own (version 9's tiles)."""
        offsets = np.asarray(offsets, dtype=np.int32)
        shift = offsets[None, :, None] if offsets.ndim == 1 else offsets[:, :, None]
        log_scales = np.clip(self.log_scales + shift, SCALE_LO, SCALE_HI).astype(np.int32)
        shifted = QuantizedMixture(self.logits, self.means, log_scales, self.coeffs, self.fmt)
        shifted._weights = self._weights  # the weights do not depend on the scales
        return shifted

    def weights(self, rows: slice) -> np.ndarray:
        """`mixture_weights` (m, K) of positions `rows`, computed once per slice: every
        channel's tables use them (distinct slices may be asked for from several threads)."""
        key = (rows.start, rows.stop)
        if key not in self._weights:
            self._weights[key] = mixture_weights(self.logits[rows])
        return self._weights[key]


def _flat(t, lead: int) -> np.ndarray:
    """(N, *lead dims, h, w) tensor -> (N*h*w, *lead dims) float32 numpy array."""
    a = t.detach().float().cpu().numpy()
    n, h, w = a.shape[0], a.shape[-2], a.shape[-1]
    lead_shape = a.shape[1:-2]
    a = np.moveaxis(a.reshape(n, -1, h, w), 1, -1).reshape(n * h * w, *lead_shape)
    return a


def _round(a: np.ndarray, steps: int, lo: int, hi: int) -> np.ndarray:
    """int32 grid indices (every grid's products and sums stay far below 2**31)."""
    a = a * steps
    np.rint(a, out=a)
    return np.clip(a, lo, hi, out=a).astype(np.int32)


def mean_range(fmt: Format) -> tuple[int, int]:
    """The clamp of quantised means under `fmt`, in mean steps."""
    return fmt.mean_range[0] * MEAN_STEPS, fmt.mean_range[1] * MEAN_STEPS


def quantize_mixture(params: MixtureParams, mask: Optional[np.ndarray], fmt: Format) -> QuantizedMixture:
    """Round mixture parameters of shape (N, ..., h, w) onto format `fmt`'s grids.

    Args:
        mask: optional (N, h, w) bool; keeps only those positions (row-major order).
    """
    keep = slice(None) if mask is None else mask.reshape(-1)
    coeff_limit = int(COEFF_RANGE * COEFF_STEPS)
    return QuantizedMixture(
        logits=_round(_flat(params.logits, 1)[keep], LOGIT_STEPS, -LOGIT_LIMIT, LOGIT_LIMIT),
        means=_round(_flat(params.means, 2)[keep], MEAN_STEPS, *mean_range(fmt)),
        log_scales=_round(_flat(params.log_scales, 2)[keep], LOG_SCALE_STEPS, SCALE_LO, SCALE_HI),
        coeffs=None if params.coeffs is None else _round(_flat(params.coeffs, 2)[keep], COEFF_STEPS, -coeff_limit, coeff_limit),
        fmt=fmt,
    )


@lru_cache(maxsize=1)
def _cdf_table() -> np.ndarray:
    """(scales, offsets) float32: logistic CDF at offset (edge - mean) in mean steps,
    offsets -_EDGE_SPAN .. _EDGE_SPAN + MEAN_STEPS - 1, for every log-scale on the grid."""
    log_scales = np.arange(SCALE_LO, SCALE_HI + 1, dtype=np.float64) / LOG_SCALE_STEPS
    offsets = np.arange(-_EDGE_SPAN, _EDGE_SPAN + MEAN_STEPS, dtype=np.float64) / MEAN_STEPS
    t = offsets[None, :] * np.exp(-log_scales)[:, None]
    return (0.5 * (1.0 + np.tanh(0.5 * t))).astype(np.float32)  # logistic CDF, overflow-free


@lru_cache(maxsize=1)
def _cdf_rows() -> np.ndarray:
    """Version 1: logistic CDFs at the 255 inner bin edges, as a strided view, float32.

    rows[s, phase, u] is the (255,) vector CDF((edge_v - mean) / scale_s) for a
    mean with (edge_0 - mean) = phase + MEAN_STEPS * (u - offset); see `_row_index`.
    """
    cdf = _cdf_table()
    log_scales = cdf.shape[0]
    # Split offsets by phase (offset mod MEAN_STEPS) so each row is contiguous.
    by_phase = np.ascontiguousarray(
        cdf.reshape(log_scales, -1, MEAN_STEPS).transpose(0, 2, 1)
    )  # (scales, phase, offset // MEAN_STEPS)
    s, p, u = by_phase.shape
    item = by_phase.itemsize
    return np.lib.stride_tricks.as_strided(
        by_phase, shape=(s, p, u - 255, 255), strides=(p * u * item, u * item, item, item), writeable=False
    )


def _row_index(means: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into `_cdf_rows()` for integer means (mean steps) and scale indices."""
    first = MEAN_STEPS // 2 + _EDGE_SPAN - means  # offset of edge 0, shifted to >= 0
    return scales - SCALE_LO, first % MEAN_STEPS, first // MEAN_STEPS


@lru_cache(maxsize=1)
def _exp_table() -> np.ndarray:
    return np.exp(np.arange(-2 * LOGIT_LIMIT, 1, dtype=np.float64) / LOGIT_STEPS)


def mixture_weights(logits: np.ndarray) -> np.ndarray:
    """Softmax of integer logits (n, K) via a table, float32 (n, K)."""
    index = logits - logits.max(axis=1, keepdims=True)
    index += 2 * LOGIT_LIMIT
    w = np.take(_exp_table(), index)
    total = w[:, 0].copy()
    for j in range(1, w.shape[1]):  # left to right, as np.sum over so short an axis
        total += w[:, j]
    w /= total[:, None]
    return w.astype(np.float32)


def channel_means(q: QuantizedMixture, channel: int, previous: np.ndarray) -> np.ndarray:
    """Means (n, K) of `channel` in 1/MEAN_STEPS pixel after conditioning on earlier channels.

    Args:
        previous: (n, C) integer pixel values; only channels < `channel` are read.
    """
    means = q.means[:, channel].copy()
    if q.coeffs is None or channel == 0:
        return means
    # (x - 127.5) in mean steps; |coeff * centred| <= 4096 * 4080 < 2**31
    centred = MEAN_STEPS * previous[:, :channel].astype(np.int32) - 255 * MEAN_STEPS // 2
    terms = [(0, 0)] if channel == 1 else [(1, 0), (2, 1)]  # (coeff index, source channel)
    shift = COEFF_STEPS.bit_length() - 1  # an arithmetic shift is floor division by COEFF_STEPS
    for coeff, source in terms:
        means += np.right_shift(q.coeffs[:, coeff] * centred[:, source : source + 1], shift)
    return np.clip(means, *q.mean_range, out=means)


def channel_pmf(q: QuantizedMixture, channel: int, previous: np.ndarray) -> np.ndarray:
    """Version 1: probability tables (n, 256) float32 of one channel's subpixel values.

    The result depends only on integers, so encoder and decoder rebuild it bit
    for bit. Rows are not exactly normalised; constriction rescales them.
    """
    if q.fmt.binned_tables:
        raise ValueError(f"channel_pmf is the version 1 layout, not version {q.fmt.version}")
    rows = _cdf_rows()
    means = channel_means(q, channel, previous)
    weights = mixture_weights(q.logits)
    n, k = means.shape
    out = np.empty((n, 256), dtype=np.float32)
    cdf = np.empty((_CHUNK, 255), dtype=np.float32)
    term = np.empty((_CHUNK, 255), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        c, t = cdf[: stop - start], term[: stop - start]
        for j in range(k):
            rows_j = rows[_row_index(means[start:stop, j], q.log_scales[start:stop, channel, j])]
            np.multiply(rows_j, weights[start:stop, j : j + 1], out=c if j == 0 else t)
            if j:
                np.add(c, t, out=c)
        block = out[start:stop]
        block[:, 0] = c[:, 0]
        np.subtract(c[:, 1:], c[:, :-1], out=block[:, 1:255])
        np.subtract(1.0, c[:, 254], out=block[:, 255])
        np.maximum(block, 0.0, out=block)  # float rounding can dip below 0
    return out


# ---- version 2: bin, then place in the bin -----------------------------------

FINE_FLOOR = np.float32(2.0**-40)
"""Added to every fine-table entry: a bin whose CDF steps vanish in float32 (deep
in a tail) gets a uniform table instead of an all-zero row."""


@lru_cache(maxsize=1)
def _negative_inverse_scales() -> np.ndarray:
    """float32 -exp(-log_scale) / MEAN_STEPS for every log-scale on the grid: the logistic
    CDF at an offset of d mean steps is 1 / (1 + exp(d * this))."""
    log_scales = np.arange(SCALE_LO, SCALE_HI + 1, dtype=np.float64) / LOG_SCALE_STEPS
    return (-np.exp(-log_scales) / MEAN_STEPS).astype(np.float32)


class ChannelTables:
    """Version 2 probability tables of one channel: the bin, then the value in the bin.

    Built from integers only (means, scale indices, logits); the logistic CDFs are
    evaluated elementwise in float32 as 1 / (1 + exp(-x)), exact in the lower tail.
    Encoder and decoder evaluate the same rows in the same chunks, so even a
    vectorised exp whose last bits depended on an element's position in the array
    would agree. Per-position inputs are computed per chunk (in the chunk's thread).

    Args:
        q: version 2 parameters of n positions.
        channel: the channel; `previous` (n, C) holds the values of the channels before it.
    """

    def __init__(self, q: QuantizedMixture, channel: int, previous: np.ndarray):
        if not q.fmt.binned_tables:
            raise ValueError(f"ChannelTables is the binned layout, not version {q.fmt.version}'s")
        self._q, self._channel, self._previous = q, channel, previous
        self._inputs: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _inputs_of(self, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(means, negative inverse scales, weights) of `rows`, each float32 (K, m)."""
        key = (rows.start, rows.stop)
        if key not in self._inputs:  # chunks are distinct keys: safe from several threads
            q = self._q.rows(rows)
            self._inputs[key] = (
                np.ascontiguousarray(channel_means(q, self._channel, self._previous[rows]).T,
                                     dtype=np.float32),  # exact: |mean| < 2**24
                np.ascontiguousarray(_negative_inverse_scales()[q.log_scales[:, self._channel] - SCALE_LO].T),
                np.ascontiguousarray(self._q.weights(rows).T),
            )
        return self._inputs[key]

    def _cdf(self, rows: slice, first: "int | np.ndarray", stride: int, count: int) -> np.ndarray:
        """Mixture CDF (m, count) float32 for the positions `rows` at the bin edges
        first + stride * i, i < count (edge v lies between values v and v + 1; `first`
        is one edge index or one per position)."""
        means, negative_inverse, weights = self._inputs_of(rows)
        first_steps = np.asarray(MEAN_STEPS * first + MEAN_STEPS // 2, dtype=np.float32)
        steps = np.arange(count, dtype=np.float32) * np.float32(MEAN_STEPS * stride)
        # (edge - mean) in mean steps, (K, m, count): sums of integers below 2**24, exact.
        t = np.empty(means.shape + (count,), dtype=np.float32)
        np.add(np.subtract(first_steps, means)[:, :, None], steps, out=t)
        np.multiply(t, negative_inverse[:, :, None], out=t)
        with np.errstate(over="ignore"):  # exp overflows to inf deep in the lower tail: CDF 0
            np.exp(t, out=t)
        np.add(t, np.float32(1.0), out=t)
        np.reciprocal(t, out=t)
        out = np.multiply(t[0], weights[0][:, None])
        term = np.empty_like(out)
        for j in range(1, len(t)):
            out += np.multiply(t[j], weights[j][:, None], out=term)
        return out

    def coarse(self, rows: slice = slice(None)) -> np.ndarray:
        """(m, 256 // BIN) float32: probability of each bin (value // BIN)."""
        cdf = self._cdf(rows, BIN - 1, BIN, 256 // BIN - 1)
        out = np.empty((len(cdf), 256 // BIN), dtype=np.float32)
        out[:, 0] = cdf[:, 0]
        np.subtract(cdf[:, 1:], cdf[:, :-1], out=out[:, 1:-1])
        np.subtract(1.0, cdf[:, -1], out=out[:, -1])
        return np.maximum(out, 0.0, out=out)  # float rounding can dip below 0

    def fine(self, bins: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """(m, BIN) float32: masses of the values of bin `bins[rows]` (value % BIN),
        unnormalised, each + `FINE_FLOOR`."""
        bins = bins[rows]
        cdf = self._cdf(rows, BIN * bins.astype(np.int64) - 1, 1, BIN + 1)  # (m, BIN + 1)
        cdf[bins == 0, 0] = 0.0  # the edges below 0 and above 255 (edge indices -1 and 255)
        cdf[bins == 256 // BIN - 1, -1] = 1.0
        out = np.subtract(cdf[:, 1:], cdf[:, :-1])
        np.maximum(out, 0.0, out=out)
        out += FINE_FLOOR
        return out


class ExactChannelTables:
    """Version 6 probability tables of one channel: `ChannelTables`' layout (the bin, then
    the value in the bin), built by integer arithmetic (`entropy.exact`).

    Masses are int64 differences of the integer mixture CDF (`exact.logistic_mixture_cdf`,
    units 2**-exact.CDF_BITS per unit of integer weight) at the bin edges, + 1: every
    value keeps a nonzero mass, and a row sums to below 2**53 (exact in float64).
    Depend only on the integers of each row, not on how rows are chunked.

    Args:
        q: version 6 parameters of n positions.
        channel: the channel; `previous` (n, C) holds the values of the channels before it.
    """

    def __init__(self, q: QuantizedMixture, channel: int, previous: np.ndarray):
        if not (q.fmt.binned_tables and q.fmt.numerics.exact):
            raise ValueError(f"ExactChannelTables are integer tables, not version {q.fmt.version}'s")
        lo, hi = q.mean_range
        if max(255 * MEAN_STEPS + MEAN_STEPS // 2 - lo, hi + MEAN_STEPS // 2) >= exact.MAX_OFFSET:
            raise ValueError(f"version {q.fmt.version}'s mean clamp puts bin edges too far from the means")
        self._q, self._channel, self._previous = q, channel, previous
        self._inputs: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _inputs_of(self, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(means in mean steps int32, log-scale indices int32, integer weights int64) of
        `rows`, each (K, m), computed once per chunk (chunks are distinct keys: thread-safe)."""
        key = (rows.start, rows.stop)
        if key not in self._inputs:
            q = self._q.rows(rows)
            self._inputs[key] = (
                np.ascontiguousarray(channel_means(q, self._channel, self._previous[rows]).T),
                np.ascontiguousarray(q.log_scales[:, self._channel].T),
                np.ascontiguousarray(exact.softmax_weights(q.logits).T),
            )
        return self._inputs[key]

    def _cdf(self, rows: slice, first: "int | np.ndarray", stride: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer mixture CDF (count, m) int64 (edge-major) of positions `rows` at the bin
        edges first + stride * i, i < count (`first`: one edge index or one per position),
        and the CDF above every edge, (m,) int64 (the weights' sum << CDF_BITS)."""
        means, scales, weights = self._inputs_of(rows)
        offsets = (MEAN_STEPS * np.asarray(first, dtype=np.int32) + MEAN_STEPS // 2) - means  # |.| < 2**16
        cdf = exact.logistic_mixture_cdf(offsets, MEAN_STEPS * stride, count, scales, weights)
        return cdf, weights.sum(axis=0) << exact.CDF_BITS

    def coarse(self, rows: slice = slice(None)) -> np.ndarray:
        """(m, 256 // BIN) int64 (a transposed view): mass of each bin (value // BIN), + 1."""
        cdf, total = self._cdf(rows, BIN - 1, BIN, 256 // BIN - 1)
        out = np.empty((256 // BIN, cdf.shape[1]), dtype=np.int64)
        out[0] = cdf[0]
        np.subtract(cdf[1:], cdf[:-1], out=out[1:-1])
        np.subtract(total, cdf[-1], out=out[-1])
        out += 1
        return out.T

    def fine(self, bins: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """(m, BIN) int64 (a transposed view): masses of the values of bin `bins[rows]`
        (value % BIN), + 1."""
        bins = bins[rows]
        cdf, total = self._cdf(rows, BIN * bins.astype(np.int32) - 1, 1, BIN + 1)  # (BIN + 1, m)
        cdf[0, bins == 0] = 0  # the edges below 0 and above 255 (edge indices -1 and 255)
        last = bins == 256 // BIN - 1
        cdf[-1, last] = total[last]
        out = np.subtract(cdf[1:], cdf[:-1])
        out += 1
        return out.T
