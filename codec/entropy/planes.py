"""Lossless coder for one 2-D plane of small integers (alpha, palette indices, bilevel, fallback).

A plane is a (H, W) uint8 array with values in 0..levels-1. It is coded onto the
same `AnsCoder` as the rest of the file, built only from the push/pop `Codec`s of
`vaezip.entropy.coders`; it writes no bytes of its own.

Algorithm (semi-static, two passes on the encoder):

* Every pixel is mapped to a symbol ``y`` and a context class ``k`` by one of a
  fixed list of *variants* (see `_variants`), all computed from causal neighbours:
  ``raw`` (uniform, no tables); ``direct`` (y = x, context = the values of the
  first n template neighbours, n = 0, 1, 2, 4, 6, 8, 10 while levels**n <= 1024:
  JBIG-like for bilevel); ``residual`` (y = x - MED(left, up, up-left) mod levels,
  context = quantised local activity |ur-u| + |u-ul| + |ul-l| in 1, 4 or 8 classes);
  ``rank`` (y = index of the first of left, up, up-left, up-right equal to x, else
  4 + x; context = which of those four are equal: for palettes and graphics).
* The encoder computes the per-context histograms of every variant, their exact
  ideal code length under the transmitted (quantised) counts plus the cost of the
  tables, and picks the cheapest. A constant plane costs a few bytes.
* Stream, in pop order: header (variant, pad value), tables, pixels. Tables: per
  context a used flag, the number of distinct symbols, which ones (the symbol, or
  a bitmap, or all), and each count as a 7-bit log-scale index (exact below 8,
  then 4 steps per octave), coded with `uniform` / `iid_categorical`. Contexts with
  one symbol cost nothing per pixel.
* Pixels are coded in *wavefronts*: wave t holds the pixels with 2*i + j == t,
  i ascending. Every template neighbour (rows i-2..i, see `_TEMPLATE`) lies in an
  earlier wave, so the decoder rebuilds all contexts of a wave at once from the
  pixels decoded so far: 2*(H-1) + W waves, one numpy step each (one per-symbol
  `categorical` call per wave for alphabets <= 16 or waves holding many classes,
  else one iid call per context class present, see `_segments`). Outside the
  plane, neighbours read a pad value (the plane's most frequent value),
  transmitted in the header.

One schedule (`_plane_steps`) describes the whole stream in pop order as a
generator of (codec, value) steps; the decoder pops each step, the encoder
records them with their true values and pushes them reversed (ANS is last-in
first-out): `coders.pop_steps` / `coders.push_steps`. So encode and decode are the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import constriction
import numpy as np

from vaezip.entropy.coders import (
    AnsCoder,
    Codec,
    Steps,
    categorical,
    deferred,
    iid_categorical,
    pop_steps,
    push_steps,
    uniform,
)

_constriction_model = constriction.stream.model

# Causal template (row offset, column offset), most informative first. With waves
# t = 2*i + j, (di, dj) lies in wave t + 2*di + dj < t for each entry.
_TEMPLATE = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0), (-1, -2), (-2, -1), (-2, 1), (0, -3))
_PAD_TOP, _PAD_LEFT, _PAD_RIGHT = 2, 3, 1
_COUNT_INDICES = 128  # count index t in 1..127 covers counts < 2**33
_PER_SYMBOL_MAX_ALPHABET = 16  # above this, one iid model per context class
_MAX_CONTEXTS = 1024
_GROUP_COST = 1600  # one iid call costs about as much as 1600 (symbol, alphabet) entries
_RESIDUAL_THRESHOLDS = {1: (), 4: (3, 12, 40), 8: (1, 3, 6, 12, 22, 40, 75)}  # for 256 levels
_BASED_NEIGHBOURS = 5  # left, up, up-left, up-right (base + value), the pixel's own base


# ---------------------------------------------------------------- count tables


def _count_index(counts: np.ndarray) -> np.ndarray:
    """Counts >= 1 -> index in 1..127: exact below 8, then 2 mantissa bits."""
    counts = np.asarray(counts, dtype=np.int64)
    exponent = np.frexp(counts.astype(np.float64))[1] - 3  # bit_length - 3, exact for ints
    exponent = np.maximum(exponent, 0)
    return np.where(counts < 8, counts, 4 * exponent + (counts >> exponent))


def _index_count(index: np.ndarray) -> np.ndarray:
    """Index -> representative count (midpoint of its bucket); 0 -> 0."""
    index = np.asarray(index, dtype=np.int64)
    exponent = np.maximum(index // 4 - 1, 1)
    big = ((index % 4 + 4) << exponent) + (1 << (exponent - 1))
    return np.where(index < 8, index, big)


def _table_bits(index: np.ndarray) -> float:
    """Exact cost in bits of `_table_steps` for a (K, A) count-index table."""
    n_contexts, alphabet = index.shape
    present = index > 0
    m = present.sum(1)
    used = m > 0
    bits = n_contexts * 1.0 + used.sum() * np.log2(alphabet) + (m == 1).sum() * np.log2(alphabet)
    partial = (m > 1) & (m < alphabet)
    frac = m[partial] / alphabet
    bits += alphabet * float(np.sum(-frac * np.log2(frac) - (1 - frac) * np.log2(1 - frac)))
    multi = m > 1
    bits += multi.sum() * np.log2(_COUNT_INDICES - 1)
    t_max = index[multi].max(1) if multi.any() else np.zeros(0)
    bits += float(np.sum(m[multi] * np.log2(np.maximum(t_max, 1))))
    return float(bits)


def _data_bits(hist: np.ndarray, index: np.ndarray) -> float:
    """Ideal bits of the symbols in `hist` (K, A) under the models of `index`."""
    coded = (index > 0).sum(1) > 1
    h, model = hist[coded], _index_count(index[coded]).astype(np.float64)
    if not h.size:
        return 0.0
    nz = h > 0
    log_p = np.log2(model, where=model > 0, out=np.zeros_like(model)) - np.log2(model.sum(1, keepdims=True))
    return float(-np.sum(h[nz] * log_p[nz]))


def _table_steps(n_contexts: int, alphabet: int, index: Optional[np.ndarray]) -> Steps:
    """Steps of one (K, A) count-index table, in pop order; returns the table.

    `index` is the true table (encoder) or None (decoder).
    """
    enc = index is not None
    m_true = (index > 0).sum(1) if enc else None
    used = (yield uniform(2, n_contexts), (m_true > 0).astype(np.int32) if enc else None).astype(bool)
    users = np.flatnonzero(used)
    m = np.zeros(n_contexts, np.int64)
    m[users] = (yield uniform(alphabet, len(users)), m_true[users] - 1 if enc else None) + 1
    table = np.zeros((n_contexts, alphabet), np.int64)
    singles = np.flatnonzero(m == 1)
    if len(singles):
        symbol = yield uniform(alphabet, len(singles)), index[singles].argmax(1) if enc else None
        table[singles, symbol] = 1
    for k in np.flatnonzero((m > 1) & (m < alphabet)):
        bitmap = yield (
            iid_categorical(np.array([alphabet - m[k], m[k]], np.float64), alphabet),
            (index[k] > 0).astype(np.int32) if enc else None,
        )
        table[k] = bitmap
    table[m == alphabet] = 1
    multi = np.flatnonzero(m > 1)
    if len(multi):
        t_max = (yield uniform(_COUNT_INDICES - 1, len(multi)), index[multi].max(1) - 1 if enc else None) + 1
        for k, top in zip(multi, t_max):
            where = table[k] > 0
            if top == 1:
                continue  # all indices 1; Uniform(1) is not a valid model
            table[k, where] = (yield uniform(int(top), int(m[k])), index[k, where] - 1 if enc else None) + 1
    return table


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class _Variant:
    """Symbol map and context classes of one way to code a plane.

    `context(nb)` and `forward(x, nb)` / `inverse(y, nb)` take nb: (n, n_neighbours)
    int32 template values and x, y: (n,) int arrays.
    """

    name: str
    n_neighbours: int
    n_contexts: int
    alphabet: int
    context: Callable[[np.ndarray], np.ndarray]
    forward: Callable[[np.ndarray, np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _direct(levels: int, n: int) -> _Variant:
    weights = levels ** np.arange(n, dtype=np.int64)
    return _Variant(
        f"direct{n}", n, levels**n, levels,
        context=lambda nb: nb[:, :n] @ weights if n else np.zeros(len(nb), np.int64),
        forward=lambda x, nb: x,
        inverse=lambda y, nb: y,
    )


def _med(nb: np.ndarray) -> np.ndarray:
    left, up, up_left = nb[:, 0], nb[:, 1], nb[:, 2]
    lo, hi = np.minimum(left, up), np.maximum(left, up)
    return np.where(up_left >= hi, lo, np.where(up_left <= lo, hi, left + up - up_left))


def _residual(levels: int, n_classes: int, forward, inverse) -> _Variant:
    thresholds = np.array(_RESIDUAL_THRESHOLDS[n_classes], np.float64) * levels / 256.0
    activity_class = np.searchsorted(thresholds, np.arange(3 * levels), side="right")

    def context(nb: np.ndarray) -> np.ndarray:
        left, up, up_left, up_right = nb[:, 0], nb[:, 1], nb[:, 2], nb[:, 3]
        return activity_class[np.abs(up_right - up) + np.abs(up - up_left) + np.abs(up_left - left)]

    return _Variant(f"residual{n_classes}", 4, n_classes, levels, context, forward, inverse)


_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _rank(levels: int) -> _Variant:
    def context(nb: np.ndarray) -> np.ndarray:
        return sum((nb[:, p] == nb[:, q]).astype(np.int64) << bit for bit, (p, q) in enumerate(_PAIRS))

    def forward(x: np.ndarray, nb: np.ndarray) -> np.ndarray:
        hit = nb[:, :4] == x[:, None]
        return np.where(hit.any(1), hit.argmax(1), 4 + x)

    def inverse(y: np.ndarray, nb: np.ndarray) -> np.ndarray:
        return np.where(y < 4, nb[np.arange(len(y)), np.minimum(y, 3)], y - 4)

    return _Variant("rank", 4, 64, levels + 4, context, forward, inverse)


def _based_residual(levels: int, n_classes: int, scale: float, forward, inverse) -> _Variant:
    """Residual variant of a based plane: activity of the full values, thresholds `scale` x
    the 8-bit ones (`scale` = levels for one high-byte step, levels / 16 for finer data)."""
    thresholds = np.array(_RESIDUAL_THRESHOLDS[n_classes], np.float64) * scale

    def context(nb: np.ndarray) -> np.ndarray:
        left, up, up_left, up_right = nb[:, 0], nb[:, 1], nb[:, 2], nb[:, 3]
        activity = np.abs(up_right - up) + np.abs(up - up_left) + np.abs(up_left - left)
        return np.searchsorted(thresholds, activity, side="right")

    name = f"based-residual{n_classes}" + ("" if scale == levels else "-fine")
    return _Variant(name, _BASED_NEIGHBOURS, n_classes, levels, context, forward, inverse)


def _based_variants(levels: int) -> list[Optional[_Variant]]:
    """Variants of a plane coded above a known `base` plane (`plane_codec(base=...)`).

    Neighbours hold full values base + x (left, up, up-left, up-right), and column 4 the
    base of the pixel itself: the residual variants predict the full value by MED and
    code x minus the prediction clipped into the pixel's range; `by-base` takes the
    pixel's base as its context (x a function of the base costs only the tables).
    Changing the list changes the format.
    """
    bits = levels.bit_length() - 1

    def predicted(nb: np.ndarray) -> np.ndarray:
        return np.clip(_med(nb) - nb[:, 4], 0, levels - 1)

    forward = lambda x, nb: (x - predicted(nb)) % levels  # noqa: E731
    inverse = lambda y, nb: (y + predicted(nb)) % levels  # noqa: E731
    out: list[Optional[_Variant]] = [None, _direct(levels, 0)]
    out += [_based_residual(levels, k, levels / 16, forward, inverse) for k in (1, 4, 8)]
    out.append(_based_residual(levels, 8, levels, forward, inverse))
    out.append(_Variant("by-base", _BASED_NEIGHBOURS, 256, levels,
                        context=lambda nb: (nb[:, 4] >> bits) & 255,
                        forward=lambda x, nb: x, inverse=lambda y, nb: y))
    return out


def _variants(levels: int) -> list[Optional[_Variant]]:
    """All variants for `levels`, in stream order; None is `raw`. Changing it changes the format."""
    out: list[Optional[_Variant]] = [None, _direct(levels, 0)]
    # One forward/inverse pair shared by the residual variants: `_histograms` reuses its result.
    forward = lambda x, nb: (x - _med(nb)) % levels  # noqa: E731
    inverse = lambda y, nb: (y + _med(nb)) % levels  # noqa: E731
    out += [_residual(levels, k, forward, inverse) for k in (1, 4, 8)]
    out.append(_rank(levels))
    out += [_direct(levels, n) for n in (1, 2, 4, 6, 8, 10) if levels**n <= _MAX_CONTEXTS]
    return out


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Waves:
    """Wavefront order of an (H, W) plane inside its padded buffer.

    positions: (H*W,) int64 flat buffer index of each pixel, in decode order.
    pixels: (H*W,) int64 flat plane index of each pixel, in decode order.
    starts: (n_waves + 1,) int64, wave w is positions[starts[w]:starts[w+1]].
    deltas: (len(_TEMPLATE),) int64 flat buffer offsets of the template.
    """

    buffer_shape: tuple[int, int]
    positions: np.ndarray
    pixels: np.ndarray
    starts: np.ndarray
    deltas: np.ndarray

    @staticmethod
    def build(height: int, width: int, based: bool = False) -> "_Waves":
        """The order of an (H, W) plane; `based`: the template of `_based_variants`."""
        stride = width + _PAD_LEFT + _PAD_RIGHT
        n_waves = 2 * (height - 1) + width
        wave = np.arange(n_waves, dtype=np.int64)
        first_row = np.maximum(0, (wave - width + 2) // 2)  # smallest i with t - 2i <= W-1
        last_row = np.minimum(height - 1, wave // 2)
        sizes = last_row - first_row + 1
        starts = np.concatenate([[0], np.cumsum(sizes)])
        row = np.repeat(first_row, sizes) + np.arange(starts[-1]) - np.repeat(starts[:-1], sizes)
        col = np.repeat(wave, sizes) - 2 * row
        pixels = row * width + col
        positions = (row + _PAD_TOP) * stride + col + _PAD_LEFT
        deltas = np.array([di * stride + dj for di, dj in _TEMPLATE], np.int64)
        if based:  # the pixel's own base sits one padded buffer further on
            deltas = np.append(deltas[:4], (height + _PAD_TOP) * stride)
        return _Waves((height + _PAD_TOP, stride), positions, pixels, starts, deltas)

    def buffer(self, fill: int, plane: Optional[np.ndarray] = None,
               base: Optional[np.ndarray] = None) -> np.ndarray:
        """Flat int32 padded buffer of what neighbours read: `fill` outside the plane and
        where nothing is decoded yet, else `plane`. With a `base` (H, W): base + those
        values (the base's edges replicated into the padding), then the padded base itself.
        """
        if base is None:
            buf = np.full(self.buffer_shape, fill, np.int32)
        else:
            padded_base = np.pad(base.astype(np.int32), ((_PAD_TOP, 0), (_PAD_LEFT, _PAD_RIGHT)), mode="edge")
            buf = padded_base + fill
        if plane is not None:
            h, w = plane.shape
            buf[_PAD_TOP:, _PAD_LEFT:_PAD_LEFT + w] = plane if base is None else plane + base
        return buf.ravel() if base is None else np.concatenate([buf.ravel(), padded_base.ravel()])

    def plane(self, buf: np.ndarray, width: int, base: Optional[np.ndarray]) -> np.ndarray:
        """The (H, W) plane held in a `buffer`."""
        values = buf[: self.buffer_shape[0] * self.buffer_shape[1]].reshape(self.buffer_shape)
        values = values[_PAD_TOP:, _PAD_LEFT:_PAD_LEFT + width]
        return values if base is None else values - base


# ---------------------------------------------------------------- choosing a variant


def _histograms(plane: np.ndarray, levels: int, waves: _Waves, fill: int, base: Optional[np.ndarray] = None):
    """Yield (variant id, count-index table, bits, (contexts, symbols)) for every variant.

    Contexts and symbols are (H*W,) int arrays in decode order, computed for the
    whole plane at once by the same variant functions the decoder applies per wave.
    """
    x = plane.ravel().astype(np.int32)
    buf = waves.buffer(fill, plane, base)
    nb = buf[waves.positions[:, None] + waves.deltas]
    x = x[waves.pixels]
    symbols = {}  # forward function -> symbols, shared between variants
    for vid, variant in enumerate(_variant_list(levels, base)):
        if variant is None:
            yield vid, None, x.size * float(np.log2(levels)), None
            continue
        ctx = variant.context(nb[:, : variant.n_neighbours])
        if variant.forward not in symbols:
            symbols = {variant.forward: variant.forward(x, nb[:, : variant.n_neighbours])}
        y = symbols[variant.forward]
        hist = np.bincount(ctx * variant.alphabet + y, minlength=variant.n_contexts * variant.alphabet)
        hist = hist.reshape(variant.n_contexts, variant.alphabet)
        index = np.where(hist > 0, _count_index(np.maximum(hist, 1)), 0)
        yield vid, index, _table_bits(index) + _data_bits(hist, index), (ctx, y)


def _variant_list(levels: int, base: Optional[np.ndarray]) -> list[Optional[_Variant]]:
    return _variants(levels) if base is None else _based_variants(levels)


def _choose(plane: np.ndarray, levels: int, waves: _Waves, base: Optional[np.ndarray] = None):
    """(variant id, pad value, count-index table, total bits, (contexts, symbols)) of the cheapest variant."""
    fill = int(np.bincount(plane.ravel(), minlength=levels).argmax())
    header_bits = np.log2(len(_variant_list(levels, base))) + np.log2(levels)
    best = None
    for result in _histograms(plane, levels, waves, fill, base):
        if best is None or result[2] < best[2]:
            best = result  # keep only the best contexts and symbols alive
    vid, index, bits, truth = best
    return vid, fill, index, bits + header_bits, truth


# ---------------------------------------------------------------- the schedule


def _iid_codec(model, count: int) -> Codec:
    """`iid_categorical` with its constriction model built once per context, not per call."""

    def push(ans: AnsCoder, symbols: np.ndarray) -> None:
        ans.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), model)

    def pop(ans: AnsCoder) -> np.ndarray:
        return ans.decode(model, count)

    return Codec(push, pop)


def _rows_codec(table: np.ndarray, rows: np.ndarray) -> Codec:
    """`categorical(table[rows])`, gathered only when used (the encoder holds many at once)."""
    return deferred(lambda: categorical(table[rows]))


def _segments(ctx: np.ndarray, coded_ctx: np.ndarray, alphabet: int) -> list[tuple[np.ndarray, int]]:
    """Split one wave's coded pixels into coder calls, in pop order.

    Returns (pixel indices into the wave, context or -1) pairs: -1 is one
    per-symbol `categorical` call for all coded pixels (cheap for small alphabets,
    or when the wave holds many contexts), else one iid call per context, ascending.
    Depends only on the wave's contexts, so encoder and decoder split alike.
    """
    coded = np.flatnonzero(coded_ctx[ctx])
    if not len(coded):
        return []
    if alphabet <= _PER_SYMBOL_MAX_ALPHABET:
        return [(coded, -1)]
    order = coded[np.argsort(ctx[coded], kind="stable")]
    sorted_ctx = ctx[order]
    cuts = (np.flatnonzero(sorted_ctx[1:] != sorted_ctx[:-1]) + 1).tolist()
    if (len(cuts) + 1) * _GROUP_COST > len(coded) * alphabet:
        return [(coded, -1)]
    bounds = [0, *cuts, len(order)]
    return [(order[s:e], int(sorted_ctx[s])) for s, e in zip(bounds[:-1], bounds[1:])]


def _pixel_steps(variant: _Variant, waves: _Waves, buf: np.ndarray, index: np.ndarray, truth,
                 based: bool = False) -> Steps:
    """Steps of all pixels, wave by wave; the decoder writes its values into `buf`.

    Args:
        buf: the flat padded buffer (`_Waves.buffer`), the pad value where not yet
            decoded; the decoder fills it in (base + value when `based`).
        truth: encoder only: (contexts, symbols), (H*W,) in decode order, the
            same as the decoder computes wave by wave; None on the decoder.
    """
    enc = truth is not None
    counts = _index_count(index).astype(np.float64)
    coded_ctx = (index > 0).sum(1) > 1
    single_symbol = counts.argmax(1)
    probs = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    probs32 = probs.astype(np.float32)
    models = {int(k): _constriction_model.Categorical(probs[k], perfect=False) for k in np.flatnonzero(coded_ctx)}
    deltas = waves.deltas[: variant.n_neighbours]
    starts = waves.starts.tolist()
    for s, e in zip(starts[:-1], starts[1:]):
        if enc:
            ctx, y_true = truth[0][s:e], truth[1][s:e]
        else:
            pos = waves.positions[s:e]
            nb = buf[pos[:, None] + deltas]
            ctx = variant.context(nb)
        y = single_symbol[ctx]
        for group, k in _segments(ctx, coded_ctx, variant.alphabet):
            codec = _rows_codec(probs32, ctx[group]) if k < 0 else _iid_codec(models[k], len(group))
            y[group] = yield codec, y_true[group] if enc else None
        if not enc:
            buf[pos] = variant.inverse(y, nb) + (buf[pos + waves.deltas[4]] if based else 0)


def _plane_steps(height: int, width: int, levels: int, plane: Optional[np.ndarray],
                 base: Optional[np.ndarray] = None) -> Steps:
    """The whole stream of one plane in pop order; returns the (H, W) plane (uint8, or
    int32 when `base` is given)."""
    enc = plane is not None
    variants = _variant_list(levels, base)
    waves = _Waves.build(height, width, based=base is not None)
    if enc:
        vid_true, fill_true, index_true, _, truth = _choose(plane, levels, waves, base=base)
    vid = int((yield uniform(len(variants), 1), np.array([vid_true]) if enc else None)[0])
    fill = int((yield uniform(levels, 1), np.array([fill_true]) if enc else None)[0])
    variant = variants[vid]
    dtype = np.uint8 if base is None else np.int32
    if variant is None:
        flat = yield uniform(levels, height * width), plane.ravel() if enc else None
        return np.asarray(flat, dtype).reshape(height, width)
    index = yield from _table_steps(variant.n_contexts, variant.alphabet, index_true if enc else None)
    if enc:
        yield from _pixel_steps(variant, waves, None, index, truth)
        return plane.astype(dtype)
    buf = waves.buffer(fill, base=base)
    yield from _pixel_steps(variant, waves, buf, index, None, based=base is not None)
    return waves.plane(buf, width, base).astype(dtype)


# ---------------------------------------------------------------- public API


def _check(plane: np.ndarray, height: int, width: int, levels: int) -> np.ndarray:
    plane = np.asarray(plane)
    if plane.shape != (height, width):
        raise ValueError(f"plane has shape {plane.shape}, expected {(height, width)}")
    if plane.size and not np.issubdtype(plane.dtype, np.integer) and plane.dtype != bool:
        raise ValueError(f"plane must hold integers, got {plane.dtype}")
    if plane.size and (plane.min() < 0 or plane.max() >= levels):
        raise ValueError(f"plane values must lie in 0..{levels - 1}")
    return plane.astype(np.int32)


def plane_codec(height: int, width: int, levels: int, base: Optional[np.ndarray] = None) -> Codec:
    """Codec for one (height, width) plane of integers in 0..levels-1.

    push(ans, plane): plane is an (H, W) integer array (uint8) with values < levels;
        stack before: anything; after: that, then the plane (header on top).
        Raises ValueError for a wrong shape or a value >= levels.
    pop(ans): stack before: ..., plane on top; after: the plane is removed, the
        stack is exactly as before its push. Returns an (H, W) uint8 array.

    levels == 1 or an empty shape pushes nothing (the plane is implied).

    With `base`, an (H, W) array of integers 0..2**24 that both sides know (for the low
    bits of 16-bit samples: the high part shifted left by log2(levels)), the plane is
    coded as the lower part of base + plane (`_based_variants`), and pop returns int32.
    """
    if not 1 <= levels <= 256:
        raise ValueError(f"levels must lie in 1..256, got {levels}")
    if height < 0 or width < 0:
        raise ValueError(f"negative plane shape {(height, width)}")
    if base is not None:
        base = _check(base, height, width, 1 << 24)
    trivial = levels == 1 or height * width == 0
    dtype = np.uint8 if base is None else np.int32

    def push(ans: AnsCoder, plane: np.ndarray) -> None:
        plane = _check(plane, height, width, levels)
        if not trivial:
            push_steps(ans, _plane_steps(height, width, levels, plane, base))

    def pop(ans: AnsCoder) -> np.ndarray:
        if trivial:
            return np.zeros((height, width), dtype)
        return pop_steps(ans, _plane_steps(height, width, levels, None, base))

    return Codec(push, pop)


def estimate_bits(plane: np.ndarray, levels: int, base: Optional[np.ndarray] = None) -> float:
    """Ideal code length in bits of `plane_codec(..., base).push(plane)` (the chosen variant).

    Within a few bits of the real cost (ANS and probability quantisation overhead).
    """
    plane = np.asarray(plane)
    if plane.ndim != 2:
        raise ValueError(f"plane must be 2-D, got shape {plane.shape}")
    plane = _check(plane, *plane.shape, levels)
    if base is not None:
        base = _check(base, *plane.shape, 1 << 24)
    if levels == 1 or plane.size == 0:
        return 0.0
    return _choose(plane, levels, _Waves.build(*plane.shape, based=base is not None), base=base)[3]
