"""Format version 3's log-scale offsets: their code, the encoder's choice, and what it saves."""

from __future__ import annotations

import numpy as np
import pytest

from vaezip.coding import calibrate, quantize
from vaezip.coding.bitsback import _subpixel_steps
from vaezip.entropy import coders
from vaezip.format import versions
from vaezip.network import inference

N = 6000


def _mixture(channels: int, log_scale: float, seed: int = 0) -> tuple[quantize.QuantizedMixture, np.ndarray]:
    """Version 3 parameters of N positions (3 components, one dominant) and values drawn
    from the dominant logistic with `log_scale` (nats) around per-position means."""
    rng = np.random.default_rng(seed)
    k = 3
    means_px = rng.uniform(40, 215, size=(N, channels, 1)) + np.array([0.0, 30.0, -30.0])
    logits = np.tile([8, -40, -40], (N, 1))  # component 0 has ~all the weight (1/8 steps)
    q = quantize.QuantizedMixture(
        logits=logits.astype(np.int32),
        means=np.rint(means_px * quantize.MEAN_STEPS).astype(np.int32),
        log_scales=np.full((N, channels, k), quantize.LOG_SCALE_STEPS * 1, np.int32),  # model says e^1 px
        coeffs=None if channels == 1 else np.zeros((N, 3, k), np.int32),
        fmt=versions.get(3),
    )
    noise = rng.logistic(0.0, np.exp(log_scale), size=(N, channels))
    values = np.clip(np.rint(means_px[:, :, 0] + noise), 0, 255).astype(np.int64)
    return q, values


def test_offsets_round_trip_through_the_coder():
    offsets = np.array([calibrate.OFFSET_MIN, 0, calibrate.OFFSET_MAX])
    ans = coders.new_coder()
    calibrate.offset_codec(3).push(ans, offsets)
    assert np.array_equal(calibrate.offset_codec(3).pop(ans), offsets)
    assert ans.is_empty()


def test_offset_code_favours_zero():
    bits = calibrate.offset_bits(np.array([0, 8, -8, calibrate.OFFSET_MAX]))
    assert bits[0] < 5 and bits[1] == pytest.approx(bits[0] + 1) and bits[2] == bits[1] and bits[3] > 12
    assert calibrate.offset_probabilities().sum() == pytest.approx(1.0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("true_log_scale", [0.25, 1.0, 2.5])
def test_the_encoder_finds_the_scale_the_values_have(channels, true_log_scale):
    """The model says scale e^1; the values have e^true: the offset is 16 * (true - 1) steps."""
    q, values = _mixture(channels, true_log_scale)
    chosen = calibrate.choose_offsets(q, values)
    expected = quantize.LOG_SCALE_STEPS * (true_log_scale - 1.0)
    assert chosen.shape == (channels,) and chosen.dtype == np.int64
    assert np.all(np.abs(chosen - expected) <= 3), (chosen, expected)


def test_no_positions_no_offsets():
    q, values = _mixture(3, 1.0)
    assert np.array_equal(calibrate.choose_offsets(q.rows(slice(0, 0)), values[:0]), [0, 0, 0])


def test_offsets_shift_and_clamp_the_scales():
    q, _ = _mixture(3, 1.0)
    shifted = q.with_scale_offsets(np.array([calibrate.OFFSET_MAX, -4, 0]))
    assert np.all(shifted.log_scales[:, 0] == min(16 + calibrate.OFFSET_MAX, quantize.SCALE_HI))
    assert np.all(shifted.log_scales[:, 1] == 12) and np.all(shifted.log_scales[:, 2] == 16)
    assert shifted.logits is q.logits and np.all(q.log_scales == 16)  # the original is untouched


@pytest.mark.parametrize("true_log_scale", [0.0, 2.0])
def test_chosen_offsets_code_smaller_and_decode_exactly(true_log_scale):
    """A miscalibrated model: coding with the chosen offsets takes fewer bits, and the
    same offsets give the decoder the same tables."""
    q, values = _mixture(3, true_log_scale)
    net = inference.Network(model=None, numerics=versions.get(3).numerics, pool=None)
    sizes = {}
    for label, offsets in (("none", np.zeros(3, np.int64)), ("chosen", calibrate.choose_offsets(q, values))):
        ans = coders.new_coder()
        shifted = q.with_scale_offsets(offsets)
        coders.push_steps(ans, _subpixel_steps(net, shifted, 3, values))
        sizes[label] = ans.num_bits()
        assert np.array_equal(coders.pop_steps(ans, _subpixel_steps(net, shifted, 3)), values) and ans.is_empty()
    assert sizes["chosen"] < 0.9 * sizes["none"], sizes


# ---- format version 9: each tile's change of its batch's offsets ----------------------


def _tiles(log_scales: list[float], rows: int = 1000) -> tuple[quantize.QuantizedMixture, np.ndarray, np.ndarray]:
    """Tiles of `rows` positions each (the model says scale e^1 everywhere), the values of
    tile t with scale e^log_scales[t]; returns (q, values, counts)."""
    parts = [_mixture(3, s, seed=t) for t, s in enumerate(log_scales)]
    q = quantize.QuantizedMixture(*(np.concatenate([getattr(p[0], f)[:rows] for p in parts])
                                    for f in ("logits", "means", "log_scales", "coeffs")), fmt=versions.get(9))
    values = np.concatenate([p[1][:rows] for p in parts])
    return q, values, np.full(len(parts), rows)


def test_tile_deltas_round_trip_through_the_coder():
    deltas = np.array([[calibrate.DELTA_LIMIT, 0, -calibrate.DELTA_LIMIT], [1, -1, 2]])
    for sent in (deltas, np.zeros_like(deltas)):
        ans = coders.new_coder()
        calibrate.delta_codec(2, 3).push(ans, sent)
        assert np.array_equal(calibrate.delta_codec(2, 3).pop(ans), sent) and ans.is_empty()
    ans = coders.new_coder()
    calibrate.delta_codec(2, 3).push(ans, np.zeros_like(deltas))
    assert ans.num_bits() <= 32  # the flag alone (one word of the stack)


def test_delta_table_is_exact_powers_of_two():
    p = calibrate.delta_probabilities()
    assert p.sum() == pytest.approx(1.0) and p[calibrate.DELTA_LIMIT] == 1 / (3 - 2**-15)  # 1 + 2 (1 - 2^-16)
    assert p[calibrate.DELTA_LIMIT + 1] * 2 == p[calibrate.DELTA_LIMIT]


def test_each_tile_gets_the_change_its_values_need():
    """Batch offset 0 (scale e^1); the tiles' values have e^0.5, e^1 and e^2: the changes are
    about 16 * (true - 1) steps, within the search's reach of 1 nat, and code smaller."""
    q, values, counts = _tiles([0.5, 1.0, 2.0])
    deltas = calibrate.tile_deltas(q, values, np.zeros(3, np.int64), counts)
    assert deltas.shape == (3, 3) and deltas.dtype == np.int64
    expected = np.array([-8, 0, 16])[:, None]
    assert np.all(np.abs(deltas - expected) <= 3), deltas
    net = inference.Network(model=None, numerics=versions.get(9).numerics, pool=None)
    sizes = {}
    for label, d in (("batch", np.zeros_like(deltas)), ("tiles", deltas)):
        shifted = q.with_scale_offsets(calibrate.row_offsets(np.zeros(3, np.int64), d, counts))
        ans = coders.new_coder()
        coders.push_steps(ans, _subpixel_steps(net, shifted, 3, values))
        sizes[label] = ans.num_bits()
        assert np.array_equal(coders.pop_steps(ans, _subpixel_steps(net, shifted, 3)), values) and ans.is_empty()
    assert sizes["tiles"] < 0.97 * sizes["batch"], sizes


def test_tiles_alike_change_nothing():
    """Tiles whose values all fit the batch's offset: no change is worth its code."""
    q, values, counts = _tiles([1.0, 1.0, 1.0, 1.0])
    assert not calibrate.tile_deltas(q, values, np.zeros(3, np.int64), counts).any()


def test_row_offsets_follow_the_tiles():
    rows = calibrate.row_offsets(np.array([1, 2]), np.array([[0, 0], [3, -1]]), np.array([2, 1]))
    assert np.array_equal(rows, [[1, 2], [1, 2], [4, 1]])
    q, _ = _mixture(2, 1.0)
    shifted = q.rows(slice(0, 3)).with_scale_offsets(rows)
    assert np.array_equal(shifted.log_scales[:, :, 0], 16 + rows)
