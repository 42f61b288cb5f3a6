"""Tests for vaezip.entropy.coders: every primitive is an exact push/pop inverse that restores the coder."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vaezip.entropy import coders
from vaezip.entropy.coders import Codec, new_coder

SETTINGS = settings(max_examples=40, deadline=None)


def _prefilled(seed: int, count: int):
    """A coder already holding `count` uniform symbols, so push/pop work on a non-empty stack."""
    ans = new_coder()
    if count:
        other = np.random.default_rng(seed).integers(0, 1000, count).astype(np.int32)
        coders.uniform(1000, count).push(ans, other)
    return ans


def assert_inverse(codec: Codec, value, seed: int = 0, prefill: int = 7):
    """push then pop gives `value` back and leaves the coder's words as they were."""
    ans = _prefilled(seed, prefill)
    before = ans.get_compressed().copy()
    codec.push(ans, value)
    # The words must round-trip through `new_coder` too (what the container stores).
    ans = new_coder(ans.get_compressed())
    out = codec.pop(ans)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(value))
    np.testing.assert_array_equal(ans.get_compressed(), before)
    return out


@st.composite
def _prob_rows(draw, max_rows=20, max_k=40):
    n = draw(st.integers(1, max_rows))
    k = draw(st.integers(2, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p = rng.random((n, k)) ** draw(st.sampled_from([1, 4, 16]))  # sharper and sharper rows
    zeros = rng.random((n, k)) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    p[zeros] = 0.0
    p[np.arange(n), rng.integers(0, k, n)] += 0.5  # every row keeps some mass
    p /= p.sum(axis=1, keepdims=True)  # as quantize.channel_pmf gives them
    symbols = rng.integers(0, k, n)  # may land on a zero-probability entry: the leak covers it
    return p, symbols, seed


@SETTINGS
@given(_prob_rows(), st.integers(0, 30))
def test_categorical(case, prefill):
    p, symbols, seed = case
    out = assert_inverse(coders.categorical(p), symbols, seed, prefill)
    assert len(out) == len(symbols)


def test_categorical_unnormalised_row_zero_symbol():
    # constriction 0.5.0 panics on this row unless categorical() normalises it first.
    codec = coders.categorical(np.array([[0.9, 0.0]]))
    assert_inverse(codec, np.array([1]))


@SETTINGS
@given(st.integers(2, 300), st.integers(0, 200), st.integers(0, 2**32 - 1), st.integers(0, 30))
def test_iid_categorical(k, count, seed, prefill):
    rng = np.random.default_rng(seed)
    p = rng.random(k) ** 3
    p[rng.random(k) < 0.5] = 0.0
    p[rng.integers(0, k)] += 1.0
    symbols = rng.integers(0, k, count)
    assert_inverse(coders.iid_categorical(p, count), symbols, seed, prefill)


@SETTINGS
@given(st.integers(1, 600), st.integers(0, 50), st.integers(0, 2**32 - 1), st.integers(0, 30),
       st.sampled_from([1e-2, 1.0, 30.0, 1e4]))
def test_quantized_gaussian(radius, n, seed, prefill, std_scale):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, radius, n)  # some means lie outside the range
    stds = std_scale * np.exp(rng.normal(0, 1, n))
    symbols = rng.integers(-radius, radius + 1, n)  # also symbols far in the tails
    assert_inverse(coders.quantized_gaussian(means, stds, radius), symbols, seed, prefill)


@SETTINGS
@given(st.integers(2, 2**24), st.integers(0, 100), st.integers(0, 2**32 - 1), st.integers(0, 30))
def test_uniform(size, count, seed, prefill):
    # size 1 is not a valid constriction Uniform (it panics); planes.py never asks for it.
    symbols = np.random.default_rng(seed).integers(0, size, count)
    assert_inverse(coders.uniform(size, count), symbols, seed, prefill)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 30))
def test_serial_pops_in_order(seed, prefill):
    rng = np.random.default_rng(seed)
    p = rng.random((5, 6)) + 0.01
    codecs = [coders.uniform(10, 3), coders.categorical(p), coders.quantized_gaussian(np.zeros(4), np.ones(4) * 3, 20)]
    values = [rng.integers(0, 10, 3), rng.integers(0, 6, 5), rng.integers(-20, 21, 4)]
    ans = _prefilled(seed, prefill)
    before = ans.get_compressed().copy()
    serial = coders.serial(codecs)
    serial.push(ans, values)
    out = serial.pop(ans)
    assert len(out) == 3
    for got, want in zip(out, values):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ans.get_compressed(), before)


def test_serial_order_matches_separate_pops():
    """serial([a, b]).push == push b then push a (ANS is LIFO), so popping a first works."""
    a, b = coders.uniform(7, 2), coders.uniform(11, 3)
    va, vb = np.array([1, 6]), np.array([0, 10, 5])
    ans = new_coder()
    coders.serial([a, b]).push(ans, [va, vb])
    np.testing.assert_array_equal(a.pop(ans), va)
    np.testing.assert_array_equal(b.pop(ans), vb)
    assert ans.is_empty()


def _bits_back_steps(x=None):
    """A toy bits-back stream in pop order: z with a uniform prior, x given z, z returned with
    a posterior that depends on x. The encoder knows x and borrows z."""
    posterior = lambda x: coders.categorical(np.array([[1.0 + x[0], 1.0, 3.0]]))  # noqa: E731
    z = yield coders.uniform(3, 1), None if x is None else coders.Borrow(posterior(x))
    x = yield coders.categorical(np.array([[1.0, 2.0 + z[0], 4.0, 1.0]])), x
    yield coders.Return(posterior(x), z)
    return x


@SETTINGS
@given(st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_steps_with_borrowed_values_round_trip(x, seed, prefill):
    """push_steps borrows, pop_steps returns: the stack is restored exactly."""
    ans = _prefilled(seed, prefill)
    before = ans.get_compressed().copy()
    coders.push_steps(ans, _bits_back_steps(np.array([x])))
    assert coders.pop_steps(ans, _bits_back_steps())[0] == x
    np.testing.assert_array_equal(ans.get_compressed(), before)


def test_empty_coder_round_trip_ends_empty():
    ans = new_coder()
    p = np.array([[0.2, 0.8], [0.5, 0.5], [0.99, 0.01]])
    codec = coders.categorical(p)
    codec.push(ans, np.array([1, 0, 1]))
    np.testing.assert_array_equal(codec.pop(ans), [1, 0, 1])
    assert ans.is_empty()
    assert len(ans.get_compressed()) == 0


def test_new_coder_accepts_any_integer_words():
    ans = new_coder()
    coders.uniform(1 << 20, 9).push(ans, np.arange(9) * 1000)
    words = ans.get_compressed()
    for as_type in (words.astype(np.int64), list(words.tolist()), words.astype(">u4")):
        back = new_coder(as_type)
        np.testing.assert_array_equal(coders.uniform(1 << 20, 9).pop(back), np.arange(9) * 1000)
        assert back.is_empty()


def test_codes_are_pinned():
    """Exact words for fixed inputs: a constriction upgrade or a changed default shows up here."""
    ans = new_coder()
    coders.uniform(1000, 3).push(ans, np.array([1, 999, 500]))
    coders.iid_categorical(np.array([0.1, 0.2, 0.7]), 4).push(ans, np.array([2, 2, 0, 1]))
    coders.categorical(np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 1.0]])).push(ans, np.array([1, 0]))
    coders.quantized_gaussian(np.array([0.0, 3.5]), np.array([1.0, 10.0]), 100).push(ans, np.array([-2, 40]))
    assert ans.get_compressed().tolist() == [1066411976, 2517353545, 988207648]
