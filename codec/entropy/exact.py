"""Probability tables by integer arithmetic (format version 6): the same numbers on any machine.

Versions 2 to 5 evaluate CDFs with float32 `np.exp` and constriction's QuantizedGaussian
(erf through the platform libm); a libm or instruction set that differs in the last bit of
one value changes a table, and a file may not decode elsewhere. Here every number that
reaches the coder is an integer computed from integer parameters with integer operations
(numpy add, multiply, shift, table look-up), so every machine builds the same tables.

Fixed point:
  a CDF is an integer in units of 2**-CDF_BITS: a table on a t grid of 2**-TABLE_BITS,
  linearly interpolated onto a finer grid once (integers, rounded down), then looked up
  at t = (offset * inverse scale) >> shift (pixels: 2**-LOOKUP_BITS, latents:
  2**-GAUSSIAN_LOOKUP_BITS);
  mixture weights are integers, the largest exactly 2**WEIGHT_BITS (no division); a
  mixture CDF is sum_k weight_k * CDF_k in int64, below 2**52 for fewer than 64 components.
Every row handed to `coders.categorical` is integers whose sum is below 2**53, so its
float64 copy and sum are exact and the normalisation is one correctly rounded division
per entry: portable.

The constant tables (logistic and Gaussian CDFs, inverse scales, softmax exponentials) are
computed once in float64 and rounded to integers. Their sha256 is `TABLES_SHA256`: a platform
whose libm would round one entry differently raises `ExactTablesError` rather than write or
read different files. No float transcendental runs at coding time.

Pixels (`softmax_weights`, `logistic_mixture_cdf`): the grids of `coding.quantize` (means in
1/32 pixel, log-scales in 1/16, logits in 1/8). Latents (`LatentTables`, `gaussian_codec`):
an integer k in [-radius, radius] on a grid of 2**-grid_bits under a Gaussian with mean in
quarter grid steps and log-std (in z units) in 1/16; k is coded as one of COARSE_BINS bins
of 2**b values around the mean (b from the std) or a tail beyond them, then its place in
the bin (or tail): two small tables a latent, not one of 2 * radius + 1 entries.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

from vaezip.entropy import coders
from vaezip.entropy.coders import AnsCoder, Codec
from vaezip.errors import VaezipError

TABLE_BITS = 7
"""CDF tables on a t grid of 2**-TABLE_BITS."""
LOOKUP_BITS = 11
"""Pixels: t in units of 2**-LOOKUP_BITS, looked up in the logistic table interpolated onto
that grid once (one look-up an edge: as fast as float32 exp; a 1-pixel bin of the widest
scale, 131 pixels, is 15.6 units wide)."""
CDF_BITS = 30
"""CDFs in units of 2**-CDF_BITS (int32 table entries)."""
WEIGHT_BITS = 16
"""Mixture weights: the largest component's weight is 2**WEIGHT_BITS."""
MAX_COMPONENTS = 63
"""Mixture components such that a mixture CDF stays below 2**52."""
MANTISSA_BITS = 15
"""Pixels: inverse scales as mantissa * 2**-shift, mantissa in [2**14, 2**15): with offsets
below 2**16 mean steps every product fits int32."""
MAX_OFFSET = 1 << 16
"""Pixels: |edge - mean| below this many mean steps (the means' clamp keeps them below 40944)."""
GAUSSIAN_LOOKUP_BITS = 13
"""Latents: t in units of 2**-13, looked up in the Gaussian table interpolated onto that grid
(512 KB; a value of the widest std, 473 grid steps, is 17 units wide)."""
INVERSE_SHIFT = 16
"""Latents: inverse stds are integers in units of 2**-(GAUSSIAN_LOOKUP_BITS + INVERSE_SHIFT)
per quarter step."""

# Pixel grids (the network's heads and `coding.quantize` use these; quantize checks the ranges).
MEAN_STEPS = 32
"""Pixel means and bin edges in units of 1/MEAN_STEPS pixel."""
LOG_SCALE_STEPS = 16
SCALE_LO, SCALE_HI = -48, 78
"""Logistic log-scale indices (1/LOG_SCALE_STEPS): scales exp(-3) .. exp(4.875) pixels."""
LOGIT_STEPS = 8
LOGIT_LIMIT = 128
"""Mixture logits are integers in [-LOGIT_LIMIT, LOGIT_LIMIT] (1/LOGIT_STEPS)."""
LOGISTIC_T_MAX = 24
"""The logistic CDF table covers |t| <= 24: beyond it the CDF rounds to 0 or 1."""

# Latent grids.
LATENT_MEAN_STEPS = 4
"""Latent means in units of 1/4 grid step."""
LATENT_LOG_STD_STEPS = 16
LATENT_LOG_STD_LO, LATENT_LOG_STD_HI = -96, 32
"""Latent log-std indices (1/16, z units): std exp(-6) .. exp(2)."""
GAUSSIAN_T_MAX = 8
"""The Gaussian CDF table covers |t| <= 8."""
COARSE_BINS = 32
"""Bins of a latent's coarse table, between the two tails."""
_LATENT_CHUNK = 2048
"""Latents whose tables are built at once (bounds the temporaries, not the result)."""
_LOG2_E_16 = 5909
"""round(2**16 / (16 ln 2)): log-std index -> log2 std, as (index * this) >> 16."""

TABLES_SHA256 = "234c88eafb89fb9165a31a1b5bcbb6f2eebf365e9b429fabe511b6fcaea42211"
"""sha256 of the constant tables (`Constants.digest`) as this build expects them."""


class ExactTablesError(VaezipError):
    """This platform's libm gives constant tables other than the format's: refusing to code."""


@dataclass(frozen=True)
class CdfTable:
    """A CDF on the t grid: value[i] at t = (i - half) * 2**-TABLE_BITS, int32 in units of
    2**-CDF_BITS; slope[i] = value[i + 1] - value[i]; half = t_max * 2**TABLE_BITS."""

    value: np.ndarray
    slope: np.ndarray
    t_max: int

    @staticmethod
    def of(cdf: Callable[[float], float], t_max: int) -> "CdfTable":
        """The table of a CDF `cdf` (float64, the platform's libm) on |t| <= t_max; its first
        and last two entries must round to exactly 0 and 2**CDF_BITS."""
        half = t_max << TABLE_BITS
        t = np.arange(-half, half + 1, dtype=np.float64) / (1 << TABLE_BITS)
        value = np.rint(np.array([cdf(x) for x in t]) * (1 << CDF_BITS)).astype(np.int64)
        if value[1] != 0 or value[-2] != 1 << CDF_BITS:
            raise ExactTablesError("a CDF table does not reach 0 and 1 at its ends")
        value = value.astype(np.int32)
        slope = np.append(np.diff(value), 0).astype(np.int32)  # the last cell is never entered
        return CdfTable(value, slope, t_max)

    def lookup(self, bits: int) -> np.ndarray:
        """This table linearly interpolated onto the grid 2**-bits, rounded down, int32:
        entry u is the CDF at t = u * 2**-bits - t_max."""
        fine = bits - TABLE_BITS
        u = np.arange(2 * (self.t_max << bits) + 1, dtype=np.int64)
        cell, frac = u >> fine, u & ((1 << fine) - 1)
        return (self.value[cell] + ((self.slope[cell].astype(np.int64) * frac) >> fine)).astype(np.int32)


def _logistic(t: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * t))


def _gaussian(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


@dataclass(frozen=True)
class Constants:
    """The constant tables, integers.

    Attributes:
        logistic, gaussian: CDF tables on the 2**-TABLE_BITS grid (`CdfTable`).
        logistic_lookup: `logistic.lookup(LOOKUP_BITS)` (integer arithmetic on `logistic`).
        gaussian_lookup: `gaussian.lookup(GAUSSIAN_LOOKUP_BITS)`.
        logistic_mantissa, logistic_shift: (SCALE_HI - SCALE_LO + 1,) int32 each:
            exp(-log_scale) / MEAN_STEPS ~ mantissa * 2**-(LOOKUP_BITS + shift), mantissa in
            [2**(MANTISSA_BITS - 1), 2**MANTISSA_BITS): t = (offset * mantissa) >> shift.
        gaussian_inverse: (LATENT_LOG_STD_HI - LATENT_LOG_STD_LO + 1,) int64:
            exp(-log_std) / LATENT_MEAN_STEPS in units of 2**-(GAUSSIAN_LOOKUP_BITS +
            INVERSE_SHIFT): for a grid 2**-g, t = (offset in quarter steps * this) >> (INVERSE_SHIFT + g).
        softmax: (2 * LOGIT_LIMIT + 1,) int64: round(2**WEIGHT_BITS * exp(-i / LOGIT_STEPS)).
    """

    logistic: CdfTable
    gaussian: CdfTable
    logistic_lookup: np.ndarray
    gaussian_lookup: np.ndarray
    logistic_mantissa: np.ndarray
    logistic_shift: np.ndarray
    gaussian_inverse: np.ndarray
    softmax: np.ndarray

    def digest(self) -> str:
        """sha256 of the tables computed with floats, as little-endian int64, in a fixed order
        (the look-up tables are integer arithmetic on them)."""
        h = hashlib.sha256()
        for a in (self.logistic.value, self.gaussian.value, self.logistic_mantissa, self.logistic_shift,
                  self.gaussian_inverse, self.softmax):
            h.update(np.asarray(a, dtype="<i8").tobytes())
        return h.hexdigest()


def build_constants() -> Constants:
    """The constant tables computed afresh in float64, not checked. Python's `math` (the
    platform libm, elementwise), not numpy's vectorised functions, whose results may
    depend on the instruction set."""

    def exps(numerators: range, steps: int, scale: float) -> np.ndarray:
        return np.array([round(scale * math.exp(-i / steps)) for i in numerators], dtype=np.int64)

    # Inverse scales per mean step in t units of 2**-LOOKUP_BITS, as mantissa * 2**-shift.
    inverse = [(1 << LOOKUP_BITS) * math.exp(-i / LOG_SCALE_STEPS) / MEAN_STEPS for i in range(SCALE_LO, SCALE_HI + 1)]
    shift = np.array([MANTISSA_BITS - 1 - math.floor(math.log2(v)) for v in inverse], dtype=np.int64)
    mantissa = np.array([round(v * 2.0**k) for v, k in zip(inverse, shift)], dtype=np.int64)
    if shift.min() < 0 or mantissa.max() >= 1 << MANTISSA_BITS:
        raise ExactTablesError("logistic inverse scales do not fit their mantissas")
    logistic = CdfTable.of(_logistic, LOGISTIC_T_MAX)
    gaussian = CdfTable.of(_gaussian, GAUSSIAN_T_MAX)
    return Constants(
        logistic=logistic,
        gaussian=gaussian,
        logistic_lookup=logistic.lookup(LOOKUP_BITS),
        gaussian_lookup=gaussian.lookup(GAUSSIAN_LOOKUP_BITS),
        logistic_mantissa=mantissa.astype(np.int32),
        logistic_shift=shift.astype(np.int32),
        gaussian_inverse=exps(range(LATENT_LOG_STD_LO, LATENT_LOG_STD_HI + 1), LATENT_LOG_STD_STEPS,
                              float(1 << (GAUSSIAN_LOOKUP_BITS + INVERSE_SHIFT)) / LATENT_MEAN_STEPS),
        softmax=exps(range(2 * LOGIT_LIMIT + 1), LOGIT_STEPS, float(1 << WEIGHT_BITS)),
    )


def checked(tables: Constants) -> Constants:
    """`tables` if their sha256 is `TABLES_SHA256`.

    Raises:
        ExactTablesError: they differ (this platform's libm rounds some entry otherwise).
    """
    digest = tables.digest()
    if digest != TABLES_SHA256:
        raise ExactTablesError(
            f"this platform computes the format 6 probability tables differently (sha256 {digest}, "
            f"expected {TABLES_SHA256}): its libm differs; refusing to code rather than write or read "
            "files other machines would not decode")
    return tables


@lru_cache(maxsize=1)
def constants() -> Constants:
    """The checked constant tables, computed once per process (`build_constants`, `checked`)."""
    return checked(build_constants())


# ---- pixels: logistic mixtures -----------------------------------------------------------


def softmax_weights(logits: np.ndarray) -> np.ndarray:
    """Integer mixture weights (n, K) int64 of integer logits (n, K) (1/LOGIT_STEPS):
    2**WEIGHT_BITS * exp(logit - max logit) by table, unnormalised."""
    if logits.shape[-1] > MAX_COMPONENTS:
        raise ValueError(f"at most {MAX_COMPONENTS} mixture components, got {logits.shape[-1]}")
    index = logits.max(axis=-1, keepdims=True).astype(np.int64) - logits
    return np.take(constants().softmax, index)


def logistic_mixture_cdf(offsets: np.ndarray, stride: int, count: int, scale_index: np.ndarray,
                         weights: np.ndarray) -> np.ndarray:
    """Mixture CDFs at `count` edges a row, int64 in units of 2**-CDF_BITS per unit weight.

    Component k's CDF at an offset d (mean steps) is logistic_lookup[(d * mantissa) >> shift
    + LOGISTIC_T_MAX * 2**LOOKUP_BITS], the index clipped to the table: int32 throughout.

    Args:
        offsets: (K, m) int32: first edge - component mean, in 1/MEAN_STEPS pixel; every edge
            of a row within MAX_OFFSET of the mean.
        stride: edge spacing in 1/MEAN_STEPS pixel.
        scale_index: (K, m) log-scale indices, each in [SCALE_LO, SCALE_HI].
        weights: (K, m) int64 (`softmax_weights`, transposed).

    Returns:
        (count, m) int64, edge-major (the long axis inside: fast numpy loops): the sum over k
        of weights[k] * CDF_k at edge i, in 0 .. weights.sum(0) << CDF_BITS.
    """
    c = constants()
    mantissa = np.take(c.logistic_mantissa, scale_index - SCALE_LO)
    shift = np.take(c.logistic_shift, scale_index - SCALE_LO)
    steps = np.arange(0, stride * count, stride, dtype=np.int32)[:, None]
    middle = np.int32(LOGISTIC_T_MAX << LOOKUP_BITS)
    out = np.zeros((count, offsets.shape[1]), dtype=np.int64)
    t = np.empty(out.shape, dtype=np.int32)
    for k in range(len(offsets)):
        np.add(offsets[k], steps, out=t)
        t *= mantissa[k]  # |offset| < 2**16, mantissa < 2**15: below 2**31
        np.right_shift(t, shift[k], out=t)
        t += middle
        out += np.take(c.logistic_lookup, t, mode="clip") * weights[k]
    return out


# ---- latents: discretised Gaussians ------------------------------------------------------


def _edge_cdf(values: np.ndarray, mean: np.ndarray, inverse: np.ndarray, grid_bits: int) -> np.ndarray:
    """Gaussian CDFs (int32, units of 2**-CDF_BITS) at the edges `values` - 1/2 (grid steps,
    int64) of latents with integer means (quarter steps) and inverse stds (`Constants.gaussian_inverse`),
    all broadcast together: t = ((4 * value - 2 - mean) * inverse) >> (INVERSE_SHIFT + grid_bits),
    looked up in the Gaussian table (beyond |t| = 8: 0 or 1)."""
    t = LATENT_MEAN_STEPS * values - (LATENT_MEAN_STEPS // 2)  # edges in quarter steps
    t = t - mean
    t *= inverse  # |t| < 2**(grid_bits + 6), inverse < 2**36
    np.right_shift(t, INVERSE_SHIFT + grid_bits, out=t)
    t += GAUSSIAN_T_MAX << GAUSSIAN_LOOKUP_BITS
    return np.take(constants().gaussian_lookup, t, mode="clip")


@dataclass(frozen=True)
class CentredTables:
    """The normalised latent tables of every (log-std, mean mod 4) whose bins are centred on the
    mean (`LatentTables`: `lo` not clipped): relative to the bins, the edges then depend on
    nothing else, so these rows are computed once, not per latent. Same arithmetic as
    `LatentTables._masses` and `coders.normalized_rows`, so the same float64 numbers.

    coarse: (log-std indices, 4, COARSE_BINS + 2) float64, for tails whose outer edges lie
        beyond the CDF table (CDF 0 and 1 there).
    fine: bits -> (first log-std index with these bits, (indices, 4, COARSE_BINS, 2**bits) float64).
    """

    coarse: np.ndarray
    fine: dict


@lru_cache(maxsize=4)
def centred_tables(grid_bits: int, radius: int) -> CentredTables:
    """`CentredTables` of latents on a grid of 2**-grid_bits within [-radius, radius]."""
    log_std = np.arange(LATENT_LOG_STD_LO, LATENT_LOG_STD_HI + 1, dtype=np.int64)
    max_bits = ((2 * radius + 1) // COARSE_BINS).bit_length() - 1
    bits = np.clip(((log_std * _LOG2_E_16) >> 16) + grid_bits, 0, max_bits)
    inverse = constants().gaussian_inverse[:, None, None]
    mean = np.arange(4, dtype=np.int64)[None, :, None]  # the mean mod 4 (quarter steps)
    lo = ((mean + 2) >> 2) - ((COARSE_BINS << bits) >> 1)[:, None, None]
    width = (1 << bits)[:, None, None]

    def normalized(cdf: np.ndarray) -> np.ndarray:
        masses = np.diff(cdf.astype(np.int64), axis=-1) + 1
        return masses / masses.sum(axis=-1, keepdims=True).astype(np.float64)

    inner = _edge_cdf(lo + width * np.arange(COARSE_BINS + 1), mean, inverse, grid_bits)
    shape = inner.shape[:-1] + (1,)
    coarse = normalized(np.concatenate([np.zeros(shape, np.int64), inner, np.full(shape, 1 << CDF_BITS)], axis=-1))
    fine = {}
    for b in np.unique(bits[bits > 0]):
        b = int(b)
        rows = np.flatnonzero(bits == b)  # consecutive: bits grows with the log-std
        first = (lo[rows] + ((np.arange(COARSE_BINS) << b)[None, None, :]))[..., None]
        edges = first + np.arange((1 << b) + 1)
        fine[b] = (int(rows[0]), normalized(_edge_cdf(edges, mean[..., None], inverse[rows][..., None], grid_bits)))
    return CentredTables(coarse, fine)


def _combine(fast: np.ndarray, from_table: Callable, computed: Callable) -> np.ndarray:
    """Rows from `from_table(selector)` where `fast`, else from `computed(selector)`, in order
    (a selector indexes the caller's rows: a slice for all, else a boolean mask)."""
    if fast.all():
        return from_table(slice(None))
    if not fast.any():
        return computed(slice(None))
    first = from_table(fast)
    out = np.empty((len(fast), first.shape[1]), dtype=np.float64)
    out[fast], out[~fast] = first, computed(~fast)
    return out


class LatentTables:
    """The integer tables of n latents k in [-radius, radius] on a grid of 2**-grid_bits.

    A latent's coarse symbol: 0 (left tail: k < lo), 1 + (k - lo) >> b (one of COARSE_BINS
    bins of 2**b values from `lo`), or COARSE_BINS + 1 (right tail). b ~ floor(log2 std in
    grid steps), so the bins span 8 to 16 stds either side of the mean; `lo` centres them
    on the rounded mean inside [-radius, radius]. Then its place in a bin (b > 0) from the
    Gaussian, or in a tail, uniform. Masses are CDF differences on the grid edges k +- 1/2,
    + 1 (every value keeps a nonzero mass), truncated to [-radius, radius].

    Args:
        mean_q: (n,) integer means in quarter grid steps (clipped to +- 4 radius).
        log_std_q: (n,) integer log-stds (z units) in 1/16 (clipped to the grid's range).
        grid_bits: the grid is 2**-grid_bits (z units).
        radius: the largest |k|; 2 * radius + 1 >= COARSE_BINS.
    """

    def __init__(self, mean_q: np.ndarray, log_std_q: np.ndarray, grid_bits: int, radius: int):
        if 2 * radius + 1 < COARSE_BINS:
            raise ValueError(f"radius {radius} is below {COARSE_BINS // 2}")
        if (8 * radius + 6) * int(constants().gaussian_inverse.max()) >= 1 << 63:
            raise ValueError(f"radius {radius}: offsets times inverse stds would overflow int64")
        self.grid_bits, self.radius = int(grid_bits), int(radius)
        self.mean = np.clip(np.asarray(mean_q, dtype=np.int64).reshape(-1), -4 * radius, 4 * radius)
        self.log_std = np.clip(np.asarray(log_std_q, dtype=np.int64).reshape(-1), LATENT_LOG_STD_LO,
                               LATENT_LOG_STD_HI)
        max_bits = ((2 * radius + 1) // COARSE_BINS).bit_length() - 1
        self.bits = np.clip(((self.log_std * _LOG2_E_16) >> 16) + grid_bits, 0, max_bits)
        centre = (self.mean + 2) >> 2
        span = COARSE_BINS << self.bits
        self.lo = np.clip(centre - (span >> 1), -radius, radius + 1 - span)
        self.left = self.lo + radius  # values in each tail
        self.right = radius + 1 - self.lo - span
        self._inverse = np.take(constants().gaussian_inverse, self.log_std - LATENT_LOG_STD_LO)

    def __len__(self) -> int:
        return len(self.mean)

    def _masses(self, rows: np.ndarray, first: np.ndarray, step: np.ndarray, count: int,
                tails: bool = False) -> np.ndarray:
        """(len(rows), count) int64 (a transposed view): Gaussian masses of latents `rows`
        between the edges e_i - 1/2 and e_(i+1) - 1/2, e_i = first + step * i, i <= count
        (grid steps, (len(rows),) each), + 1; with `tails`, e_0 = -radius and e_count =
        radius + 1 (the outer edges of the tails). Edge-major in chunks of _LATENT_CHUNK
        latents: long numpy loops, temporaries in cache."""
        out = np.empty((count, len(rows)), dtype=np.int64)
        index = np.arange(count + 1, dtype=np.int64)[:, None]
        for a in range(0, len(rows), _LATENT_CHUNK):
            part = rows[a : a + _LATENT_CHUNK]
            values = first[a : a + _LATENT_CHUNK] + step[a : a + _LATENT_CHUNK] * index
            if tails:
                values[0], values[-1] = -self.radius, self.radius + 1
            cdf = _edge_cdf(values, self.mean[part], self._inverse[part], self.grid_bits)
            np.subtract(cdf[1:], cdf[:-1], out=out[:, a : a + _LATENT_CHUNK])
        out += 1
        return out.T

    def coarse(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), COARSE_BINS + 2) int64 masses: left tail, the bins, right tail."""
        width = 1 << self.bits[rows]
        # Edges -radius, lo, lo + w, ..., lo + 32 w, radius + 1 (an empty tail's mass is
        # 0 + 1 and never coded).
        return self._masses(rows, self.lo[rows] - width, width, COARSE_BINS + 2, tails=True)

    def fine(self, rows: np.ndarray, bins: np.ndarray, bits: int) -> np.ndarray:
        """(len(rows), 2**bits) int64 masses of the values in bin `bins` (1..COARSE_BINS) of
        latents `rows`, all with width 2**bits."""
        first = self.lo[rows] + ((bins - 1) << bits)
        return self._masses(rows, first, np.ones(len(rows), dtype=np.int64), 1 << bits)

    @cached_property
    def _centred(self) -> np.ndarray:
        """(n,) bool: the latent's bins are centred on its mean (`lo` not clipped at the radius)."""
        return self.lo == ((self.mean + 2) >> 2) - ((COARSE_BINS << self.bits) >> 1)

    @cached_property
    def _far_tails(self) -> np.ndarray:
        """(n,) bool: the CDF is 0 at -radius - 1/2 and 1 at radius + 1/2, and neither tail is
        empty: the coarse masses are those of `CentredTables` (every value in the table's reach)."""
        edges = np.array([[-self.radius], [self.radius + 1]], dtype=np.int64)
        cdf = _edge_cdf(edges, self.mean, self._inverse, self.grid_bits)
        return (cdf[0] == 0) & (cdf[1] == 1 << CDF_BITS) & (self.left > 0) & (self.right > 0)

    def normalized_coarse(self, rows: np.ndarray, start: int, stop: int) -> np.ndarray:
        """`coders.normalized_rows(self.coarse(rows)[:, start:stop])`, the same numbers: rows of
        centred latents with far tails come from tables computed once (`centred_tables`)."""
        if (start, stop) != (0, COARSE_BINS + 2):
            return coders.normalized_rows(self.coarse(rows)[:, start:stop])
        table = centred_tables(self.grid_bits, self.radius).coarse
        return _combine(self._centred[rows] & self._far_tails[rows],
                        lambda s: table[self.log_std[rows[s]] - LATENT_LOG_STD_LO, self.mean[rows[s]] & 3],
                        lambda s: coders.normalized_rows(self.coarse(rows[s])))

    def normalized_fine(self, rows: np.ndarray, bins: np.ndarray, bits: int) -> np.ndarray:
        """`coders.normalized_rows(self.fine(rows, bins, bits))`, the same numbers (centred
        latents' rows from `centred_tables`)."""
        first, table = centred_tables(self.grid_bits, self.radius).fine[bits]

        def from_table(s):
            r = rows[s]
            return table[self.log_std[r] - LATENT_LOG_STD_LO - first, self.mean[r] & 3, bins[s] - 1]

        return _combine(self._centred[rows], from_table,
                        lambda s: coders.normalized_rows(self.fine(rows[s], bins[s], bits)))

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) (n,) each: the coarse symbols a latent can take (an empty tail cannot)."""
        return (self.left == 0).astype(np.int64), COARSE_BINS + 1 + (self.right > 0)

    def split(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coarse symbol, place in the bin or tail) of latents k (n,) int."""
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        if len(k) != len(self) or (len(k) and np.abs(k).max() > self.radius):
            raise ValueError(f"latents must be {len(self)} integers in [-{self.radius}, {self.radius}]")
        inner = k - self.lo
        span = COARSE_BINS << self.bits
        coarse = np.where(inner < 0, 0, np.where(inner >= span, COARSE_BINS + 1, 1 + (inner >> self.bits)))
        in_bin = inner & ((1 << self.bits) - 1)
        place = np.where(inner < 0, k + self.radius, np.where(inner >= span, inner - span, in_bin))
        return coarse, place

    def join(self, coarse: np.ndarray, place: np.ndarray) -> np.ndarray:
        """Inverse of `split`: latents (n,) int64."""
        span = COARSE_BINS << self.bits
        return np.where(coarse == 0, place - self.radius,
                        np.where(coarse == COARSE_BINS + 1, self.lo + span + place,
                                 self.lo + ((coarse - 1) << self.bits) + place))

    def steps(self, coarse: np.ndarray) -> list[tuple[np.ndarray, str, int]]:
        """The second-level groups in pop order given the coarse symbols: (rows, kind, size),
        kind "bin" (size: width bits) or "tail" (size: values), each group one table shape."""
        groups = []
        in_bin = (coarse >= 1) & (coarse <= COARSE_BINS)
        for b in np.unique(self.bits[in_bin]):
            if b > 0:
                groups.append((np.flatnonzero(in_bin & (self.bits == b)), "bin", int(b)))
        tail_size = np.where(coarse == 0, self.left, np.where(coarse == COARSE_BINS + 1, self.right, 0))
        for size in np.unique(tail_size):
            if size > 1:
                groups.append((np.flatnonzero(tail_size == size), "tail", int(size)))
        return groups

    def coarse_groups(self) -> list[tuple[np.ndarray, int, int]]:
        """The coarse groups in pop order: (rows, start, stop), one per set of valid symbols."""
        start, stop = self.columns()
        key = 2 * start + (stop - COARSE_BINS - 1)
        return [(np.flatnonzero(key == v), int(v // 2), int(COARSE_BINS + 1 + v % 2))
                for v in np.unique(key)]

    def bits_of(self, k: np.ndarray) -> np.ndarray:
        """Ideal code length (n,) float64 in bits of latents k under these tables (the
        probabilities the coder is given, before constriction's quantisation)."""
        coarse, place = self.split(k)
        out = np.zeros(len(self))
        for rows, start, stop in self.coarse_groups():
            p = self.normalized_coarse(rows, start, stop)
            out[rows] -= np.log2(p[np.arange(len(rows)), coarse[rows] - start])
        for rows, kind, size in self.steps(coarse):
            if kind == "bin":
                p = self.normalized_fine(rows, coarse[rows], size)
                out[rows] -= np.log2(p[np.arange(len(rows)), place[rows]])
            else:
                out[rows] += np.log2(size)
        return out


def gaussian_codec(mean_q: np.ndarray, log_std_q: np.ndarray, grid_bits: int, radius: int) -> Codec:
    """Codec for latents k (n,) in [-radius, radius] under integer Gaussians (`LatentTables`).

    Pop order: the coarse symbols, group by group (`LatentTables.coarse_groups`); then the
    places in bins and tails, group by group (`LatentTables.steps`). Push: the reverse.
    Stack before push: S; after: S + the latents. Pop returns (n,) int64.
    """
    tables = LatentTables(mean_q, log_std_q, grid_bits, radius)

    def first(rows: np.ndarray, start: int, stop: int) -> Codec:
        return coders.categorical(tables.normalized_coarse(rows, start, stop), normalized=True)

    def second(rows: np.ndarray, kind: str, size: int, coarse: np.ndarray) -> Codec:
        if kind == "tail":
            return coders.uniform(size, len(rows))
        return coders.categorical(tables.normalized_fine(rows, coarse[rows], size), normalized=True)

    def push(ans: AnsCoder, k: np.ndarray) -> None:
        coarse, place = tables.split(k)
        for rows, kind, size in reversed(tables.steps(coarse)):  # last-in first-out
            second(rows, kind, size, coarse).push(ans, place[rows])
        for rows, start, stop in reversed(tables.coarse_groups()):
            first(rows, start, stop).push(ans, coarse[rows] - start)

    def pop(ans: AnsCoder) -> np.ndarray:
        coarse = np.zeros(len(tables), dtype=np.int64)
        for rows, start, stop in tables.coarse_groups():
            coarse[rows] = first(rows, start, stop).pop(ans) + start
        place = np.zeros(len(tables), dtype=np.int64)
        for rows, kind, size in tables.steps(coarse):
            place[rows] = second(rows, kind, size, coarse).pop(ans)
        return tables.join(coarse, place)

    return Codec(push, pop)
