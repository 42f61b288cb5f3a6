"""Push/pop codec primitives on a constriction `AnsCoder` (no torch here).

Every primitive is a `Codec`: `push(ans, symbols)` puts `symbols` on top of the
stack, `pop(ans)` takes exactly those symbols off again. ANS is last-in first-out,
so a sequence of codecs is pushed in reverse and popped in order.

All constriction options are passed explicitly (`perfect=False`, ranges): a
changed default would silently change the bytes.

A stream is described once, in pop order, as a generator of steps (`Steps`);
`pop_steps` decodes it and `push_steps` encodes it, so encoder and decoder are
the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import constriction
import numpy as np

AnsCoder = constriction.stream.stack.AnsCoder
_model = constriction.stream.model


@dataclass(frozen=True)
class Codec:
    """An exact inverse pair. push: stack -> stack + symbols; pop: the reverse."""

    push: Callable[[AnsCoder, Any], None]
    pop: Callable[[AnsCoder], Any]


def deferred(build: Callable[[], Codec]) -> Codec:
    """The codec `build()` returns, built anew on each push or pop: an encoder that
    records many steps before pushing them holds only their recipes, not their tables."""
    return Codec(lambda ans, symbols: build().push(ans, symbols), lambda ans: build().pop(ans))


def normalized_rows(probabilities: np.ndarray) -> np.ndarray:
    """(n, K) float64 C-contiguous rows summing to 1, from non-negative rows with positive sums.

    Integer rows (format 6's tables) must sum to below 2**53: their sums are then exact in any
    order, so they are summed in int64 and each entry is divided once, without a float copy
    first (the same numbers, faster on the tables' transposed views)."""
    if np.issubdtype(probabilities.dtype, np.integer):
        sums = probabilities.sum(axis=1, dtype=np.int64).astype(np.float64)
        return np.divide(probabilities, sums[:, None], out=np.empty(probabilities.shape, dtype=np.float64))
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


# ---------------------------------------------------------------- steps

Steps = Generator[Any, Any, Any]
"""A stream in pop order. Each step is either a pair (codec, truth): the decoder pops
a value with `codec` and the generator is sent it; the encoder's true value is `truth`
(None on the decoder) or a `Borrow`. Or it is a `Return`: the decoder pushes its
value; the encoder, which popped that value as a `Borrow`, passes over it. The
generator returns the stream's result."""


@dataclass(frozen=True)
class Borrow:
    """An encoder's truth that is not known in advance: the value it pops with `codec`
    (bits-back borrows it from the stack). The decoder gives those bits back with a
    `Return` step of the same value and codec, after the steps that depend on it."""

    codec: Codec


@dataclass(frozen=True)
class Return:
    """A decoder's step: push `value` with `codec` (returns what an encoder's `Borrow` took)."""

    codec: Codec
    value: Any


def pop_steps(ans: AnsCoder, steps: Steps) -> Any:
    """Decode: pop each step's value and send it back (push each `Return`); returns the result.

    Stack before: S + the stream. After: S (plus what the `Return` steps push).
    """
    try:
        step = next(steps)
        while True:
            if isinstance(step, Return):
                step.codec.push(ans, step.value)
                step = steps.send(None)
            else:
                step = steps.send(step[0].pop(ans))
    except StopIteration as stop:
        return stop.value


def record_steps(ans: AnsCoder, steps: Steps) -> tuple[list[tuple[Codec, Any]], Any]:
    """Encode, first half: run `steps` with their true values, popping each `Borrow` at once.

    Returns:
        The (codec, value) steps for `push_recorded`, and the generator's result.
        Stack after: before, minus the borrowed values.
    """
    recorded = []
    try:
        step = next(steps)
        while True:
            if isinstance(step, Return):  # its value was popped as a Borrow
                step = steps.send(None)
                continue
            codec, truth = step
            value = truth.codec.pop(ans) if isinstance(truth, Borrow) else np.asarray(truth)
            recorded.append((codec, value))
            step = steps.send(value)
    except StopIteration as stop:
        return recorded, stop.value


def push_recorded(ans: AnsCoder, recorded: Sequence[tuple[Codec, Any]]) -> None:
    """Encode, second half: push the recorded steps, last first (ANS is last-in first-out),
    so the decoder pops them in order."""
    for codec, value in reversed(recorded):
        codec.push(ans, value)


def push_steps(ans: AnsCoder, steps: Steps) -> Any:
    """Encode `steps` (`record_steps`, then `push_recorded`); returns the generator's result."""
    recorded, result = record_steps(ans, steps)
    push_recorded(ans, recorded)
    return result
