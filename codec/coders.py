"""Push/pop codec primitives on a constriction `AnsCoder` (no torch here).

Every primitive is a `Codec`: `push(ans, symbols)` puts `symbols` on top of the
stack, `pop(ans)` takes exactly those symbols off again. ANS is last-in first-out,
so a sequence of codecs is pushed in reverse and popped in order.

All constriction options are passed explicitly (`perfect=False`, ranges): a
changed default would silently change the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import constriction
import numpy as np

AnsCoder = constriction.stream.stack.AnsCoder
_model = constriction.stream.model


@dataclass(frozen=True)
class Codec:
    """An exact inverse pair. push: stack -> stack + symbols; pop: the reverse."""

    push: Callable[[AnsCoder, Any], None]
    pop: Callable[[AnsCoder], Any]


def normalized_rows(probabilities: np.ndarray) -> np.ndarray:
    """(n, K) float64 C-contiguous rows summing to 1, from non-negative rows with positive sums."""
    rows = np.array(probabilities, dtype=np.float64, order="C")
    rows /= rows.sum(axis=1, keepdims=True)
    return rows


def categorical(probabilities: np.ndarray, normalized: bool = False) -> Codec:
    """Codec for int symbols, symbol i drawn from row i of `probabilities`.

    Args:
        probabilities: (n, K) float array of non-negative rows with positive
            sums; rows need not be normalised; every symbol in 0..K-1 keeps a
            nonzero probability (constriction's leak).
        normalized: the rows already are `normalized_rows` (skips that pass).
    """
    # Normalised in float64: constriction 0.5.0's leaky Categorical panics on
    # a zero-probability symbol in some unnormalised rows.
    if not normalized:
        probabilities = normalized_rows(probabilities)
    family = _model.Categorical(perfect=False)

    def push(ans: AnsCoder, symbols: np.ndarray) -> None:
        ans.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), family, probabilities)

    def pop(ans: AnsCoder) -> np.ndarray:
        return ans.decode(family, probabilities)

    return Codec(push, pop)


def iid_categorical(probabilities: np.ndarray, count: int) -> Codec:
    """Codec for `count` i.i.d. int symbols with one (K,) probability table."""
    model = _model.Categorical(np.ascontiguousarray(probabilities, dtype=np.float64), perfect=False)

    def push(ans: AnsCoder, symbols: np.ndarray) -> None:
        ans.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), model)

    def pop(ans: AnsCoder) -> np.ndarray:
        return ans.decode(model, count)

    return Codec(push, pop)


def quantized_gaussian(means: np.ndarray, stds: np.ndarray, radius: int) -> Codec:
    """Codec for integers in [-radius, radius] under per-symbol discretised Gaussians.

    Args:
        means, stds: (n,) float arrays in units of the integer grid.
        radius: symbols outside [-radius, radius] cannot be coded.
    """
    family = _model.QuantizedGaussian(-radius, radius)
    means = np.ascontiguousarray(means, dtype=np.float64)
    stds = np.ascontiguousarray(stds, dtype=np.float64)

    def push(ans: AnsCoder, symbols: np.ndarray) -> None:
        ans.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), family, means, stds)

    def pop(ans: AnsCoder) -> np.ndarray:
        return ans.decode(family, means, stds)

    return Codec(push, pop)


def uniform(size: int, count: int) -> Codec:
    """Codec for `count` i.i.d. integers uniform on 0..size-1 (2 <= size <= 2**24)."""
    if size < 2:
        raise ValueError(f"uniform codec needs size >= 2, got {size}")
    model = _model.Uniform(size)

    def push(ans: AnsCoder, symbols: np.ndarray) -> None:
        ans.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), model)

    def pop(ans: AnsCoder) -> np.ndarray:
        return ans.decode(model, count)

    return Codec(push, pop)


def serial(codecs: Sequence[Codec]) -> Codec:
    """Codec for a tuple of values, one per codec, popped in the given order."""

    def push(ans: AnsCoder, values: Sequence[Any]) -> None:
        for codec, value in zip(reversed(codecs), reversed(values)):  # LIFO
            codec.push(ans, value)

    def pop(ans: AnsCoder) -> list:
        return [codec.pop(ans) for codec in codecs]

    return Codec(push, pop)


def new_coder(words: np.ndarray | None = None) -> AnsCoder:
    """A coder holding `words` (uint32, as written by `AnsCoder.get_compressed`)."""
    if words is None:
        return AnsCoder()
    return AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
