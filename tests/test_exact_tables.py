"""Format version 6's integer probability tables (`entropy.exact`, `quantize.ExactChannelTables`):
exact round trips, tables that depend only on the integers, no float transcendental at
coding time, and the constant tables' sha256 check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vaezip.coding import quantize
from vaezip.entropy import coders, exact
from vaezip.format import versions

V6 = versions.get(6)
RADIUS = 512  # the default grid 1/64
GRID_BITS = 6


def _mixture(rng: np.random.Generator, n: int, fmt=V6, k: int = 3, channels: int = 3) -> quantize.QuantizedMixture:
    """Random integer parameters over their whole grids, means often at the clamp."""
    lo, hi = quantize.mean_range(fmt)
    means = rng.integers(lo - 3000, hi + 3000, (n, channels, k)).clip(lo, hi)
    return quantize.QuantizedMixture(
        logits=rng.integers(-quantize.LOGIT_LIMIT, quantize.LOGIT_LIMIT + 1, (n, k)).astype(np.int32),
        means=means.astype(np.int32),
        log_scales=rng.integers(quantize.SCALE_LO, quantize.SCALE_HI + 1, (n, channels, k)).astype(np.int32),
        coeffs=rng.integers(-quantize.COEFF_STEPS, quantize.COEFF_STEPS + 1, (n, 3, k)).astype(np.int32),
        fmt=fmt)


def _round_trip(codec: coders.Codec, symbols: np.ndarray) -> None:
    """push then pop gives the symbols back and leaves the coder as it was."""
    ans = coders.new_coder(np.array([0x12345678, 0x9ABCDEF0], dtype=np.uint32))
    before = ans.get_compressed().copy()
    codec.push(ans, symbols)
    np.testing.assert_array_equal(codec.pop(ans), symbols)
    np.testing.assert_array_equal(ans.get_compressed(), before)


def test_pixel_tables_round_trip_through_the_coder():
    rng = np.random.default_rng(0)
    n = 3000
    q = _mixture(rng, n)
    values = rng.integers(0, 256, (n, 3))
    for c in range(3):
        tables = quantize.ExactChannelTables(q, c, values)
        coarse, fine = tables.coarse(), tables.fine(values[:, c] // quantize.BIN)
        assert coarse.dtype == fine.dtype == np.int64
        assert coarse.min() >= 1 and fine.min() >= 1  # every value can occur
        assert coarse.sum(axis=1).max() < 2**53 and fine.sum(axis=1).max() < 2**53  # exact in float64
        _round_trip(coders.categorical(coarse), values[:, c] // quantize.BIN)
        _round_trip(coders.categorical(fine), values[:, c] % quantize.BIN)


def test_pixel_tables_factorise_one_distribution():
    """The bin masses are the sums of their values' masses (less the floors)."""
    rng = np.random.default_rng(1)
    q = _mixture(rng, 200)
    values = rng.integers(0, 256, (200, 3))
    tables = quantize.ExactChannelTables(q, 2, values)
    coarse = tables.coarse()
    for b in range(256 // quantize.BIN):
        fine = tables.fine(np.full(200, b))
        np.testing.assert_array_equal(coarse[:, b] - 1, (fine - 1).sum(axis=1))


def test_pixel_tables_depend_only_on_the_integers_of_each_row():
    rng = np.random.default_rng(2)
    n = 1000
    q = _mixture(rng, n)
    values = rng.integers(0, 256, (n, 3))
    bins = values[:, 1] // quantize.BIN
    whole = quantize.ExactChannelTables(q, 1, values)
    chunked = quantize.ExactChannelTables(q, 1, values)
    cuts = [0, 1, 7, 300, 301, 999, n]
    parts = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    np.testing.assert_array_equal(whole.coarse(), np.concatenate([chunked.coarse(s) for s in parts]))
    np.testing.assert_array_equal(whole.fine(bins), np.concatenate([chunked.fine(bins, s) for s in parts]))
    # A row's table is that of the row alone.
    single = q.rows(slice(500, 501))
    np.testing.assert_array_equal(quantize.ExactChannelTables(single, 1, values[500:501]).coarse(),
                                  whole.coarse()[500:501])


def test_pixel_tables_are_close_to_the_float_ones():
    rng = np.random.default_rng(3)
    q6 = _mixture(rng, 2000)
    q5 = quantize.QuantizedMixture(q6.logits, q6.means, q6.log_scales, q6.coeffs, versions.get(5))
    values = rng.integers(0, 256, (2000, 3))
    exact_rows = coders.normalized_rows(quantize.ExactChannelTables(q6, 0, values).coarse())
    float_rows = coders.normalized_rows(quantize.ChannelTables(q5, 0, values).coarse())
    assert np.abs(exact_rows - float_rows).max() < 3e-4  # t on a grid of 2**-11 scales
    # What the difference costs: the float rows' bits coded with the exact ones, per bin.
    kl = (float_rows * np.log2(np.maximum(float_rows, 1e-300) / exact_rows)).sum(axis=1)
    assert kl.mean() < 2e-5  # measured 5e-6


def test_mixture_weights_are_integer_exponentials():
    weights = exact.softmax_weights(np.array([[0, -8, -256], [128, 128, -128]]))
    np.testing.assert_array_equal(weights, [[65536, round(65536 / math.e), 0], [65536, 65536, 0]])


@pytest.mark.parametrize("log_std", [exact.LATENT_LOG_STD_LO, -60, -16, 0, exact.LATENT_LOG_STD_HI])
def test_latent_round_trip_every_std(log_std):
    rng = np.random.default_rng(4)
    n = 4000
    mean_q = rng.integers(-4 * RADIUS, 4 * RADIUS + 1, n)
    mean_q[:4] = [-4 * RADIUS, 4 * RADIUS, -4 * RADIUS - 2, 4 * RADIUS + 1]  # at and beyond the clamp
    std = math.exp(log_std / 16) * 2**GRID_BITS
    k = np.clip(np.rint(mean_q / 4 + rng.standard_normal(n) * std), -RADIUS, RADIUS).astype(np.int64)
    k[4:400] = rng.integers(-RADIUS, RADIUS + 1, 396)  # far tails
    k[400:404] = [-RADIUS, RADIUS, RADIUS, -RADIUS]
    _round_trip(exact.gaussian_codec(mean_q, np.full(n, log_std), GRID_BITS, RADIUS), k)


@pytest.mark.parametrize("grid_bits, radius", [(GRID_BITS, RADIUS), (4, 128), (8, 2048)])
def test_latent_rows_from_the_centred_tables_are_the_computed_ones(grid_bits, radius):
    """`normalized_coarse`/`normalized_fine` take most rows from tables computed once; every
    row must be the number the per-latent computation gives (means near the radius, every
    std, tails inside and beyond the CDF table)."""
    rng = np.random.default_rng(11)
    n = 6000
    mean_q = rng.integers(-4 * radius - 8, 4 * radius + 9, n)
    mean_q[: n // 2] = rng.integers(-40, 41, n // 2)  # centred bins
    log_std = rng.integers(exact.LATENT_LOG_STD_LO - 4, exact.LATENT_LOG_STD_HI + 5, n)
    tables = exact.LatentTables(mean_q, log_std, grid_bits, radius)
    assert 0 < tables._centred.mean() < 1 and 0 < tables._far_tails.mean() < 1  # both paths run
    for rows, start, stop in tables.coarse_groups():
        np.testing.assert_array_equal(tables.normalized_coarse(rows, start, stop),
                                      coders.normalized_rows(tables.coarse(rows)[:, start:stop]))
    coarse = rng.integers(1, exact.COARSE_BINS + 1, n)
    for rows, kind, size in tables.steps(coarse):
        if kind == "bin":
            np.testing.assert_array_equal(tables.normalized_fine(rows, coarse[rows], size),
                                          coders.normalized_rows(tables.fine(rows, coarse[rows], size)))


def test_latent_pop_from_any_stack_gives_valid_latents():
    """Bits-back pops latents from arbitrary bits: each is in range and pushes back exactly."""
    rng = np.random.default_rng(5)
    n = 3000
    mean_q = rng.integers(-4 * RADIUS, 4 * RADIUS + 1, n)
    log_std = rng.integers(exact.LATENT_LOG_STD_LO, exact.LATENT_LOG_STD_HI + 1, n)
    codec = exact.gaussian_codec(mean_q, log_std, GRID_BITS, RADIUS)
    ans = coders.new_coder(rng.integers(0, 2**32, 4000, dtype=np.uint32))
    before = ans.get_compressed().copy()
    k = codec.pop(ans)
    assert np.abs(k).max() <= RADIUS
    codec.push(ans, k)
    np.testing.assert_array_equal(ans.get_compressed(), before)


def test_latent_tables_are_close_to_the_discretised_gaussian():
    rng = np.random.default_rng(6)
    n = 2000
    mean_q = rng.integers(-400, 400, n)
    log_std = rng.integers(-80, 33, n)
    std = np.exp(log_std / 16) * 2**GRID_BITS
    k = np.clip(np.rint(mean_q / 4 + rng.standard_normal(n) * std), -RADIUS, RADIUS)
    bits = exact.LatentTables(mean_q, log_std, GRID_BITS, RADIUS).bits_of(k)
    ideal = [-math.log2(_gaussian_mass(k_i - 0.5, k_i + 0.5, m / 4, s)
                        / _gaussian_mass(-RADIUS - 0.5, RADIUS + 0.5, m / 4, s))
             for k_i, m, s in zip(k, mean_q, std)]
    assert abs(bits.sum() / sum(ideal) - 1) < 1e-3


def _gaussian_mass(a: float, b: float, mean: float, std: float) -> float:
    """N(mean, std) mass of [a, b], accurate in either tail."""
    a, b = (a - mean) / (std * math.sqrt(2)), (b - mean) / (std * math.sqrt(2))
    if a > 0:
        return 0.5 * (math.erfc(a) - math.erfc(b))
    return 0.5 * (math.erfc(-b) - math.erfc(-a))


def test_latent_tables_depend_only_on_the_integers_of_each_latent():
    rng = np.random.default_rng(7)
    mean_q = rng.integers(-4 * RADIUS, 4 * RADIUS + 1, 500)
    log_std = rng.integers(exact.LATENT_LOG_STD_LO, exact.LATENT_LOG_STD_HI + 1, 500)
    k = rng.integers(-RADIUS, RADIUS + 1, 500)
    whole = exact.LatentTables(mean_q, log_std, GRID_BITS, RADIUS).bits_of(k)
    halves = [exact.LatentTables(mean_q[s], log_std[s], GRID_BITS, RADIUS).bits_of(k[s])
              for s in (slice(0, 123), slice(123, 500))]
    np.testing.assert_array_equal(whole, np.concatenate(halves))


def test_no_float_transcendental_at_coding_time(monkeypatch):
    exact.constants()  # the constant tables exist (built once per process)

    def refuse(*args, **kwargs):
        raise AssertionError("a float transcendental function ran at coding time")

    for name in ("exp", "exp2", "expm1", "log", "log2", "log1p", "tanh", "sin", "cos", "power", "sqrt"):
        monkeypatch.setattr(np, name, refuse)
    for name in ("exp", "log", "log2", "tanh", "erf", "erfc", "sqrt", "pow"):
        monkeypatch.setattr(math, name, refuse)
    rng = np.random.default_rng(8)
    q = _mixture(rng, 500)
    values = rng.integers(0, 256, (500, 3))
    tables = quantize.ExactChannelTables(q, 2, values)
    _round_trip(coders.categorical(tables.coarse()), values[:, 2] // quantize.BIN)
    _round_trip(coders.categorical(tables.fine(values[:, 2] // quantize.BIN)), values[:, 2] % quantize.BIN)
    mean_q = rng.integers(-4 * RADIUS, 4 * RADIUS + 1, 500)
    log_std = rng.integers(exact.LATENT_LOG_STD_LO, exact.LATENT_LOG_STD_HI + 1, 500)
    _round_trip(exact.gaussian_codec(mean_q, log_std, GRID_BITS, RADIUS), rng.integers(-RADIUS, RADIUS + 1, 500))
    # The bits-back entry point too: a Gaussian from the network, on the grids.
    import torch

    from vaezip.coding import bitsback
    from vaezip.network.model import Gaussian

    g = Gaussian(torch.from_numpy(mean_q / 4 / 64), torch.from_numpy(log_std / 16))
    codec = bitsback.latent_codec(g, bitsback.CodingParams(tile=64, latent_grid=1 / 64, fmt=V6))
    _round_trip(codec, rng.integers(-RADIUS, RADIUS + 1, 500))


def test_constant_tables_match_their_sha256():
    assert exact.build_constants().digest() == exact.TABLES_SHA256
    assert exact.checked(exact.build_constants()) is not None


def test_a_platform_with_other_tables_refuses_to_code(monkeypatch):
    real_erfc = math.erfc
    # A libm one ulp off somewhere: the tables' hash changes and coding refuses.
    monkeypatch.setattr(exact.math, "erfc", lambda x: real_erfc(x) + (1e-9 if abs(x) < 1 else 0.0))
    with pytest.raises(exact.ExactTablesError, match="libm"):
        exact.checked(exact.build_constants())
    monkeypatch.setattr(exact, "TABLES_SHA256", "0" * 64)
    exact.constants.cache_clear()
    try:
        with pytest.raises(exact.ExactTablesError):
            exact.gaussian_codec(np.zeros(3), np.zeros(3), GRID_BITS, RADIUS)
    finally:
        exact.constants.cache_clear()


def test_version_6_codes_with_the_exact_tables(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from vaezip.coding import bitsback
    from vaezip.network.inference import Later

    assert V6.numerics.exact and not versions.get(5).numerics.exact
    rng = np.random.default_rng(9)
    q = _mixture(rng, 64)
    values = rng.integers(0, 256, (64, 3))
    monkeypatch.setattr(bitsback, "ROW_CHUNK", 40)  # two chunks: tables of the second built ahead
    monkeypatch.setattr(bitsback, "ENCODER_TABLES_AHEAD", 3)

    class Net:  # `_binned_codec` needs only `later`
        def __init__(self, pool):
            self.pool = pool

        def later(self, build):
            return Later(build, self.pool)

    codes = []
    with ThreadPoolExecutor(2) as pool:
        for net in (Net(None), Net(pool)):
            ans = coders.new_coder()
            coders.push_steps(ans, bitsback._subpixel_steps(net, q, 3, values))
            codes.append(ans.get_compressed())
            np.testing.assert_array_equal(coders.pop_steps(ans, bitsback._subpixel_steps(net, q, 3)), values)
    np.testing.assert_array_equal(codes[0], codes[1])  # the same code built in threads or not


def test_latent_codec_takes_the_integers_of_an_on_grid_gaussian():
    import torch

    from vaezip.coding import bitsback
    from vaezip.network.model import Gaussian

    params = bitsback.CodingParams(tile=64, latent_grid=1 / 64, fmt=V6)
    rng = np.random.default_rng(10)
    mean_q = rng.integers(-4 * RADIUS, 4 * RADIUS + 1, (2, 3, 4, 4))
    log_std_q = rng.integers(exact.LATENT_LOG_STD_LO, exact.LATENT_LOG_STD_HI + 1, (2, 3, 4, 4))
    g = Gaussian(torch.from_numpy(mean_q / 4 / 64).float(), torch.from_numpy(log_std_q / 16).float())
    got_mean, got_log_std, grid_bits = bitsback.exact_latent_params(g, params)
    np.testing.assert_array_equal(got_mean, mean_q.reshape(-1))
    np.testing.assert_array_equal(got_log_std, log_std_q.reshape(-1))
    assert grid_bits == GRID_BITS
    _round_trip(bitsback.latent_codec(g, params), rng.integers(-RADIUS, RADIUS + 1, mean_q.size))
    off_grid = Gaussian(g.mean + 1e-4, g.log_std)
    with pytest.raises(ValueError, match="not on the exact grid"):
        bitsback.latent_codec(off_grid, params)
    with pytest.raises(ValueError, match="grid 2"):
        bitsback.latent_codec(g, bitsback.CodingParams(tile=64, latent_grid=0.02, fmt=V6))


def test_latent_coarse_masses_are_the_gaussian_masses_of_tails_and_bins():
    rng = np.random.default_rng(11)
    n = 300
    mean_q = rng.integers(-4 * RADIUS, 4 * RADIUS + 1, n)
    log_std = rng.integers(exact.LATENT_LOG_STD_LO, exact.LATENT_LOG_STD_HI + 1, n)
    tables = exact.LatentTables(mean_q, log_std, GRID_BITS, RADIUS)
    got = coders.normalized_rows(tables.coarse(np.arange(n)))
    for i in range(n):
        w = 1 << int(tables.bits[i])
        lo = int(tables.lo[i])
        edges = [-RADIUS] + [lo + j * w for j in range(exact.COARSE_BINS + 1)] + [RADIUS + 1]
        mean, std = mean_q[i] / 4, math.exp(log_std[i] / 16) * 2**GRID_BITS
        mass = np.array([_gaussian_mass(a - 0.5, b - 0.5, mean, std) for a, b in zip(edges, edges[1:])])
        # t is floored onto a 2**-13 grid: each of two edges off by at most 0.4 * 2**-13.
        np.testing.assert_allclose(got[i], mass / mass.sum(), atol=1e-4)
