"""Self-checks of the measuring instrument (vaezip.evaluation.rates) and of `vaezip bpd`.

(a) IWAE is a tighter bound than −ELBO and tightens with K, on average;
(b) the IWAE of a real `HierarchicalVAE` converges in K, and the chunked
    log-mean-exp estimator converges to log p(x) where that is known exactly;
(c) coded bits agree with −ELBO and the overhead split adds up exactly;
(d) the heatmap sums to the −ELBO at the posterior means;
(e) the command line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import kodak_crop, random_image, random_pixels, require_data
from PIL import Image as PILImage

from vaezip import api
from vaezip.coding import imagecodec
from vaezip.evaluation.rates import (
    Report,
    chunked_iwae,
    colormap,
    heatmap,
    log_mean_exp,
    measure,
    measure_dataset,
    model_terms,
    render_heatmap,
    total_report,
)
from vaezip.network import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bpd_cli():
    """The `vaezip` command group."""
    from vaezip.cli.main import main

    return main


# ------------------------------------------------------------ (a) IWAE vs −ELBO


def test_iwae_below_nelbo_and_tightening_in_k(tiny_model):
    images = [random_pixels("RGB", 16, 16, seed=s, smooth=True) for s in range(3)]
    seeds = range(4)
    nelbo = np.mean([model_terms(tiny_model, x, 16, seed=s).nelbo_bits for x in images for s in seeds])
    iwae = {k: np.mean([model_terms(tiny_model, x, 16, samples=k, seed=s).iwae_bits for x in images for s in seeds])
            for k in (1, 4, 16)}
    # K = 1 is the ELBO again (sampled instead of analytic KL): equal up to noise.
    assert iwae[1] == pytest.approx(nelbo, rel=0.01)
    assert iwae[4] < nelbo and iwae[16] < nelbo
    assert iwae[16] <= iwae[4] <= iwae[1]


def test_measure_iwae_is_reported_and_bounded(tiny_model):
    image = random_pixels("RGB", 32, 48, seed=5, smooth=True)
    report = measure(image, loaded=tiny_model, samples=8, breakdown=False)
    assert report.samples == 8 and report.iwae_bpd < report.nelbo_bpd
    assert report.startup_bpd is None and report.discretisation_bpd is None


def test_model_terms_leave_global_rng_alone(tiny_model):
    x = random_pixels("RGB", 16, 16, seed=1, smooth=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model_terms(tiny_model, x, 16, samples=3)
    assert torch.equal(torch.rand(3), expected)
    a = model_terms(tiny_model, x, 16, samples=3, seed=7)
    b = model_terms(tiny_model, x, 16, samples=3, seed=7)
    assert (a.nelbo_bits, a.iwae_bits) == (b.nelbo_bits, b.iwae_bits)


# ------------------------------------------------------- (b) IWAE convergence


def test_iwae_of_hierarchical_vae_converges(tiny_model):
    x = random_pixels("RGB", 16, 16, seed=0, smooth=True)
    seeds = range(3)
    iwae = {k: [model_terms(tiny_model, x, 16, samples=k, seed=s).iwae_bits for s in seeds] for k in (1, 16, 128, 256)}
    mean = {k: float(np.mean(v)) for k, v in iwae.items()}
    assert mean[1] > mean[16] > mean[256]
    # Between 128 and 256 samples the bound has (almost) stopped moving: the change
    # is within the spread of the estimates themselves.
    noise = float(np.std(iwae[128]) + np.std(iwae[256])) + 1.0
    assert abs(mean[256] - mean[128]) <= noise
    assert mean[16] - mean[256] > abs(mean[256] - mean[128])


def test_log_mean_exp_combines_chunks_exactly():
    w = torch.randn(5, 37, dtype=torch.float64) * 30 - 1000
    exact = torch.logsumexp(w, dim=1) - math.log(37)
    chunks = [w[:, :1], w[:, 1:20], w[:, 20:]]
    assert torch.allclose(log_mean_exp(chunks), exact, rtol=0, atol=1e-9)
    # chunk sizes as chunked_iwae draws them: 10, 10, 10, 7
    taken = []

    def draw(k):
        start = sum(taken)
        taken.append(k)
        return w[:, start : start + k]

    assert torch.allclose(chunked_iwae(draw, 37, 10), exact, rtol=0, atol=1e-9)
    assert taken == [10, 10, 10, 7]


def test_chunked_iwae_converges_to_exact_log_likelihood():
    """p(z) = N(0, 1), p(x | z) = N(z, s^2), q(z) = N(0, 1): log p(x) = log N(x; 0, 1 + s^2)."""
    sigma, x = 0.5, torch.tensor([[-1.5], [0.0], [2.0]], dtype=torch.float64)
    exact = -0.5 * x[:, 0] ** 2 / (1 + sigma**2) - 0.5 * math.log(2 * math.pi * (1 + sigma**2))
    gen = torch.Generator().manual_seed(0)

    def log_weights(k):
        z = torch.randn(x.shape[0], k, generator=gen, dtype=torch.float64)
        # q = prior, so log p(x, z) − log q(z) = log p(x | z)
        return -0.5 * ((x - z) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)

    estimate = chunked_iwae(log_weights, 200_000, 4096)
    assert torch.allclose(estimate, exact, atol=0.01)
    # K = 1 is biased low (Jensen), and the bias shrinks with K.
    few = torch.stack([chunked_iwae(log_weights, 1, 1) for _ in range(400)]).mean(0)
    assert (few < exact - 0.05).all()


# -------------------------------------------------------- (c) coded vs −ELBO


@pytest.fixture(scope="module")
def kodak_report():
    crop = kodak_crop("kodim23.png", 100, 300, 64, 64)
    return measure(crop, "photo-rgb-1", compare=True)


def test_coded_bits_close_to_nelbo_on_a_photo(kodak_report):
    r = kodak_report
    assert r.model == "photo-rgb-1" and r.subpixels == 64 * 64 * 3
    assert r.nelbo_bpd < r.file_bpd <= 1.10 * r.nelbo_bpd


def test_overhead_split_adds_up(kodak_report):
    r = kodak_report
    assert r.header_bpd + r.startup_bpd + r.discretisation_bpd == pytest.approx(r.file_bpd - r.nelbo_bpd, abs=1e-9)
    assert r.file_bpd == pytest.approx(r.header_bpd + r.coded_bpd, abs=1e-12)
    assert r.startup_bpd >= 0 and r.header_bpd > 0
    assert r.recon_bpd + sum(r.kl_bpd) == pytest.approx(r.nelbo_bpd, rel=1e-9)
    assert sum(r.kl_share) == pytest.approx(1.0) and len(r.kl_share) == len(r.latent_groups)


def test_compare_reports_baselines(kodak_report):
    assert set(kodak_report.baselines) == {"png", "webp", "jpegxl"}
    png = kodak_report.baselines["png"]
    assert png is None or 0 < png < 24


def test_overhead_split_for_every_coding_path(tiny_model):
    # Model-coded with a tiny model, and plane-coded images (no model at all).
    for image, loaded in [(random_pixels("RGB", 40, 72, seed=3, smooth=True), tiny_model),
                          (random_image("P", 20, 30, seed=2, smooth=True), None)]:
        r = measure(image, loaded=loaded, samples=2)
        assert r.header_bpd + r.startup_bpd + r.discretisation_bpd == pytest.approx(r.file_bpd - r.nelbo_bpd, abs=1e-9)
        assert r.iwae_bpd is not None and math.isfinite(r.iwae_bpd)


def test_model_bits_takes_gray_as_two_dimensional(tiny_gray_model):
    pixels = random_pixels("L", 24, 40, seed=4, smooth=True)
    flat = pixels.reshape(24, 40)
    assert api.model_bits(tiny_gray_model, flat, 16)[0] == api.model_bits(tiny_gray_model, flat[:, :, None], 16)[0]


def test_api_reexports_measure():
    import vaezip
    import vaezip.evaluation.rates

    assert api.measure is vaezip.evaluation.rates.measure and api.Report is Report
    assert api.model_bits is vaezip.evaluation.rates.model_bits
    assert vaezip.measure is api.measure  # the lazily exported function, untouched by the module import


def test_dataset_totals_are_bits_over_subpixels(tiny_model):
    images = [random_pixels("RGB", h, w, seed=h, smooth=True) for h, w in [(16, 16), (32, 48)]]
    seen = []
    result = measure_dataset(images, samples=2, loaded=tiny_model, progress=seen.append)
    assert seen == [1, 1] and len(result.images) == 2
    total, reports = result.total, result.images
    n = sum(r.subpixels for r in reports)
    for attr in ("nelbo_bpd", "iwae_bpd", "coded_bpd", "file_bpd", "startup_bpd", "discretisation_bpd"):
        assert getattr(total, attr) == pytest.approx(sum(getattr(r, attr) * r.subpixels for r in reports) / n)
    assert total.images == 2 and total.subpixels == n
    assert total.file_bytes == sum(r.file_bytes for r in reports)
    assert measure_dataset(images, loaded=tiny_model, limit=1, breakdown=False).total.images == 1
    assert total_report(reports[:1]).nelbo_bpd == pytest.approx(reports[0].nelbo_bpd)


# ------------------------------------------------------------- (d) heatmap


@pytest.mark.parametrize("size", [(64, 64), (37, 81), (5, 3)])
def test_heatmap_sums_to_nelbo_at_posterior_means(tiny_model, size):
    x = random_pixels("RGB", *size, seed=4, smooth=True)
    bits = heatmap(x, loaded=tiny_model)
    assert bits.shape == size and (bits > 0).all()
    tile = imagecodec.tile_size(*size, tiny_model.spec.config.downsampling)
    terms = model_terms(tiny_model, x, tile, latents="mean")
    assert bits.sum() == pytest.approx(terms.nelbo_bits, rel=1e-9)


def test_heatmap_gray_and_planes(tiny_gray_model):
    x = random_pixels("L", 20, 20, seed=1, smooth=True)
    assert heatmap(x[:, :, 0], loaded=tiny_gray_model).shape == (20, 20)
    from vaezip.errors import VaezipError

    with pytest.raises(VaezipError):
        heatmap(random_image("P", 8, 8))


def test_render_heatmap_writes_png(tmp_path, tiny_model):
    x = random_pixels("RGB", 24, 40, seed=2, smooth=True)
    out = tmp_path / "heat.png"
    render_heatmap(x, heatmap(x, loaded=tiny_model), out)
    with PILImage.open(out) as im:
        assert im.format == "PNG" and im.width > 2 * 40 and im.height > 24
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]  # no temporary left behind


def test_colormap_is_monotone_in_lightness():
    rgb = colormap().astype(np.float64) / 255
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luminance) > 0).all()


# ------------------------------------------------------------------ (e) CLI


@pytest.fixture(scope="module")
def small_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "small.png"
    PILImage.fromarray(random_pixels("RGB", 16, 24, seed=8, smooth=True)).save(path)
    return path


def test_cli_json_keys(small_png):
    result = CliRunner().invoke(_bpd_cli(), ["bpd", str(small_png), "--json", "--samples", "2"])
    assert result.exit_code == 0, result.output
    obj = json.loads(result.output)
    for key in ("model", "nelbo_bpd", "coded_bpd", "file_bpd", "iwae_bpd", "startup_bpd", "discretisation_bpd",
                "header_bpd", "kl_bpd", "kl_share"):
        assert key in obj
    assert obj["model"] == registry.default_model("RGB") and obj["samples"] == 2 and obj["image"] == str(small_png)


def test_cli_table_compare_and_heatmap(small_png, tmp_path):
    out = tmp_path / "heat.png"
    args = ["bpd", str(small_png), "--compare", "--heatmap", str(out), "--no-breakdown"]
    result = CliRunner().invoke(_bpd_cli(), args)
    assert result.exit_code == 0, result.output
    assert "PNG" in result.output and "JPEG-XL" in result.output and "−ELBO" in result.output
    with PILImage.open(out) as im:
        assert im.format == "PNG"
    again = CliRunner().invoke(_bpd_cli(), args)  # no overwrite without --force
    assert again.exit_code == 1 and "exists" in again.output
    assert CliRunner().invoke(_bpd_cli(), args + ["--force"]).exit_code == 0


def test_cli_dataset_spec_with_limit(tmp_path):
    stack = np.stack([random_pixels("L", 16, 16, seed=s, smooth=True) for s in range(5)])
    np.savez(tmp_path / "set.npz", test_x=stack)
    out = tmp_path / "h.png"
    result = CliRunner().invoke(_bpd_cli(), ["bpd", f"{tmp_path / 'set.npz'}:test_x", "--limit", "3", "--json",
                                              "--no-breakdown", "--heatmap", str(out)])
    assert result.exit_code == 0, result.output
    obj = json.loads(result.output)
    assert len(obj["images"]) == 3 and obj["total"]["images"] == 3
    assert obj["images"][0]["mode"] == "L" and obj["total"]["model"] == registry.default_model("L")
    assert sorted(p.name for p in tmp_path.glob("h_*.png")) == ["h_set_0.png", "h_set_1.png", "h_set_2.png"]


def test_cli_mnist_with_named_model():
    require_data("mnist", "t10k-images-idx3-ubyte.gz")
    result = CliRunner().invoke(_bpd_cli(), ["bpd", "mnist-test", "--limit", "3", "--model", "mnist-1",
                                              "--no-breakdown"])
    assert result.exit_code == 0, result.output
    assert "mnist-test[2]" in result.output and "total (3 images)" in result.output


@pytest.mark.parametrize("args, message", [
    (["bpd", "missing.png"], "missing.png: no such file"),
    (["bpd", "no-such-set"], "no such data set"),
    (["bpd", "mnist-test", "--model", "no-such-model"], "unknown model"),
])
def test_cli_errors_are_one_line(args, message):
    result = CliRunner().invoke(_bpd_cli(), args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_tile_log_weights_match_streamed_iwae(tiny_model):
    from vaezip.evaluation.rates import tile_log_weights

    x = random_pixels("RGB", 40, 72, seed=6, smooth=True)
    log_w = tile_log_weights(tiny_model, x, 64, 5, seed=3)
    assert log_w.shape == (2, 5)
    streamed = model_terms(tiny_model, x, 64, samples=5, seed=2).iwae_bits  # its IWAE draws use seed + 1
    exact = -float(log_mean_exp([torch.from_numpy(log_w)]).sum()) / math.log(2)
    assert streamed == pytest.approx(exact, rel=1e-12)
