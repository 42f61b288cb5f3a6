"""IWAE against the exact likelihood, on a model small enough to integrate.

The model is a real `HierarchicalVAE` (seeded random weights) with ONE coded
scalar latent: one latent group at factor 4 with two channels, channel 0 pruned
to the prior mean by `active_latents`. A 2x2 image is coded as the coder codes
it: one 4x4 tile, padded as `vaezip.coding.tiles` pads, the padding masked out of the
likelihood. So for each of the 16 binary 2x2 images (pixels 0 or 255)

    log p(x) = log ∫ p(x | z) p(z) dz

is a one-dimensional integral. It is taken by the trapezoid rule on a uniform
grid over the prior mean ± 10 prior standard deviations, with p(x | z) from the
model's own top-down pass (`top_down` with a chooser that returns the grid
values) and pixel likelihood (`pixel_log_prob`). Outside the grid p(x | z) <= 1
(a probability mass), so the tails add at most P(|u| > 10) = 1.5e-23.

Against that exact value the instrument (`vaezip.evaluation.rates.tile_log_weights`, whose
log-weights `model_terms` and `vaezip bpd` stream) and the model's own
`iwae_bits` / `nelbo` are checked. Every tolerance is a multiple of the
estimator's standard error measured from the same samples (4 standard errors:
a 6e-5 two-sided chance per comparison for a Gaussian error), never a fixed
number of bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import _state_sha256

from vaezip.coding.tiles import TileGrid
from vaezip.evaluation.rates import _tile_tensors, log_mean_exp, tile_log_weights
from vaezip.network import registry
from vaezip.network.config import ModelConfig
from vaezip.network.model import HierarchicalVAE, split_lattice

LN2 = math.log(2.0)
CONFIG = ModelConfig(channels=1, width=8, bottleneck=8, pixel_width=4, mixtures=2,
                     latent_scales=((4, 1, 2),), active_latents=((1,),))
SPAN = 10.0  # grid half-width, prior standard deviations
STEP = 2e-3  # grid step, prior standard deviations
Z_SCORE = 4.0  # tolerances are this many standard errors
K_MAX, K_MAX_REPEATS = 2048, 8  # the converged IWAE: mean of 8 independent IWAE(2048)
CURVE_KS = (1, 4, 16, 64, 256)  # IWAE(K) on its own block of samples per K ...
CURVE_BLOCK = 2048  # ... of this many samples (2048 // K independent estimates)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def binary_images() -> list[np.ndarray]:
    """The 16 binary 2x2 gray images, (2, 2, 1) uint8 with values 0 and 255; bit b of
    the index is pixel (b // 2, b % 2)."""
    bits = (np.arange(16)[:, None] >> np.arange(4)) & 1
    return [(255 * b).astype(np.uint8).reshape(2, 2, 1) for b in bits]


@pytest.fixture(scope="module")
def model() -> registry.LoadedModel:
    """`CONFIG` with seeded random weights, made non-degenerate.

    At initialisation the prior and posterior heads are zero (prior = posterior =
    N(0, 1)), the latent enters the trunk at 0.1 gain, and the pixel log-scales
    sit near 2 (a 7-level logistic: a 0 or 255 pixel would cost ~25 bits and move
    by many bits per unit of z). So the prior and posterior heads get random
    weights (the prior is then not N(0, 1) and the posterior is neither the prior
    nor the exact posterior), the latent's gain is raised 30-fold, and the
    log-scales are lifted by 2.5 (an end bin then holds ~20% of the mass), so
    p(x | z) changes by up to a few bits over the prior's range. (With random
    weights the posterior depends on x only weakly; a poor q is what IWAE is for.)
    """
    torch.manual_seed(0)
    net = HierarchicalVAE(CONFIG)
    gen = torch.Generator().manual_seed(1)
    group = net.decoder[0]
    k, c = CONFIG.mixtures, CONFIG.channels
    with torch.no_grad():
        for conv, weight_std, bias_std in ((group.prior.c4, 0.5, 0.3), (group.posterior.c4, 0.5, 0.05)):
            conv.weight.copy_(weight_std * torch.randn(conv.weight.shape, generator=gen))
            conv.bias.copy_(bias_std * torch.randn(conv.bias.shape, generator=gen))
        group.z_proj.weight.mul_(30.0)
        for stage in net.stages:
            stage.head.bias[k + c * k : k + 2 * c * k] += 2.5
    state = net.state_dict()
    spec = registry.ModelSpec("exact-test", "exact-test.pt", _state_sha256(state), CONFIG, ("L",))
    return registry.model_from_weights(spec, state)


def tile(pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x uint8 (1, 1, 4, 4), mask bool (1, 1, 4, 4)) of a 2x2 image, as the coder tiles it."""
    tiles = _tile_tensors(pixels, TileGrid(2, 2, 4), range(1))
    return tiles.x, tiles.mask


def latent_gaussians(net: HierarchicalVAE, x: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
    """((prior mean, prior std), (posterior mean, posterior std)) of the coded latent of tile x."""
    seen = []

    def record(g, prior, posterior):
        seen.append((prior, posterior))
        return posterior.mean

    net.top_down(1, 4, 4, record, net.bottom_up(x))
    ((prior, posterior),) = seen
    assert prior.mean.shape == (1, 1, 1, 1)  # one scalar latent is coded
    return ((float(prior.mean), math.exp(float(prior.log_std))),
            (float(posterior.mean), math.exp(float(posterior.log_std))))


def trapezoid_weights(z: torch.Tensor) -> torch.Tensor:
    """Trapezoid-rule weights of sorted nodes z (float64): ∫ f ≈ Σ w_i f(z_i)."""
    gaps = z[1:] - z[:-1]
    w = torch.zeros_like(z)
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return w


def normal_log_pdf(z: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return -0.5 * ((z - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def exact(model) -> dict[str, np.ndarray]:
    """Quadrature over the latent for every binary image, bits per image (16,):

    nll_bits: −log2 p(x) on the grid; nll_half_bits: on every other node (twice the
    step); nelbo_bits: the exact −ELBO, ∫ q(z|x) log2 [q(z|x) / p(x, z)] dz;
    max_log_px_z: max over the grid of log p(x | z), nats; q_mass: ∫ q over the grid;
    px_z_range_bits: max − min of log2 p(x | z) over the prior mean ± 2 std.
    Also "prior": (mean, std), "posteriors": (16, 2) means and stds.
    """
    net = model.net
    images = binary_images()
    with torch.inference_mode():
        (mean, std), _ = latent_gaussians(net, tile(images[0])[0])
    count = int(round(2 * SPAN / STEP)) + 1
    z32 = (mean + std * torch.linspace(-SPAN, SPAN, count, dtype=torch.float64)).float()
    z = z32.double()  # the nodes exactly as the network sees them (float32: not quite uniform)
    with torch.inference_mode():
        features = net.top_down(count, 4, 4, lambda g, prior, posterior: z32.reshape(count, 1, 1, 1))
    log_prior = normal_log_pdf(z, mean, std)
    grids = {"nll_bits": slice(None), "nll_half_bits": slice(None, None, 2)}  # step, twice the step
    log_weights = {key: torch.log(trapezoid_weights(z[nodes])) for key, nodes in grids.items()}
    central = (z - mean).abs() <= 2 * std
    out = {k: [] for k in ("nll_bits", "nll_half_bits", "nelbo_bits", "max_log_px_z", "q_mass", "px_z_range_bits")}
    posteriors = []
    for pixels in images:
        x, mask = tile(pixels)
        with torch.inference_mode():
            log_px_z = (net.pixel_log_prob(features, x.expand(count, -1, -1, -1)) * split_lattice(mask))
            log_px_z = log_px_z.sum(dim=(1, 2, 3, 4)).double()
            (prior_mean, prior_std), (q_mean, q_std) = latent_gaussians(net, x)
        assert (prior_mean, prior_std) == (mean, std)  # the prior does not depend on x
        posteriors.append((q_mean, q_std))
        log_joint = log_px_z + log_prior
        for key, nodes in grids.items():
            out[key].append(-float(torch.logsumexp(log_joint[nodes] + log_weights[key], 0)) / LN2)
        log_q = normal_log_pdf(z, q_mean, q_std)
        q_w = trapezoid_weights(z) * torch.exp(log_q)
        out["nelbo_bits"].append(float((q_w * (log_q - log_joint)).sum()) / LN2)
        out["q_mass"].append(float(q_w.sum()))
        out["max_log_px_z"].append(float(log_px_z.max()))
        out["px_z_range_bits"].append(float(log_px_z[central].max() - log_px_z[central].min()) / LN2)
    result = {k: np.array(v) for k, v in out.items()}
    result["prior"] = np.array([mean, std])
    result["posteriors"] = np.array(posteriors)
    return result


@pytest.fixture(scope="module")
def log_weights(model) -> list[np.ndarray]:
    """Per image, (K_MAX * K_MAX_REPEATS + len(CURVE_KS) * CURVE_BLOCK,) float64 importance
    log-weights log p(x, z) − log q(z | x) in nats, from the instrument (`tile_log_weights`)."""
    samples = K_MAX * K_MAX_REPEATS + len(CURVE_KS) * CURVE_BLOCK
    return [tile_log_weights(model, pixels, 4, samples, seed=i)[0] for i, pixels in enumerate(binary_images())]


def iwae_bits(log_w: np.ndarray, k: int) -> np.ndarray:
    """−log2 of the IWAE(k) estimate of each consecutive group of k log-weights (nats)."""
    groups = torch.from_numpy(log_w[: len(log_w) // k * k].reshape(-1, k))
    return -log_mean_exp([groups]).numpy() / LN2


def relative_variance(log_w: np.ndarray) -> float:
    """Var(w) / E[w]^2 of the importance weights w = exp(log_w), estimated from the sample."""
    w = np.exp(log_w - log_w.max())
    return float(np.mean(w**2) / np.mean(w) ** 2 - 1.0)


# ------------------------------------------------------------------ the integral


def test_quadrature_is_converged(exact):
    # Halving the step moves −log2 p(x) by less than 1e-6 bits for every image.
    assert np.abs(exact["nll_bits"] - exact["nll_half_bits"]).max() < 1e-6
    # Beyond ± SPAN std: p(x | z) <= max over the grid (and <= 1), times the prior's tail mass.
    assert (exact["max_log_px_z"] <= 0).all()
    tail = math.erfc(SPAN / math.sqrt(2)) * np.exp(exact["max_log_px_z"])
    assert (tail / np.exp2(-exact["nll_bits"]) < 1e-12).all()
    # The grid holds the whole posterior q too (the exact −ELBO integrates over it).
    assert np.abs(exact["q_mass"] - 1).max() < 1e-9


def test_model_is_not_degenerate(exact):
    mean, std = exact["prior"]
    assert abs(mean) > 0.05 and abs(math.log(std)) > 0.05  # the prior is not N(0, 1)
    q = exact["posteriors"]
    assert (np.abs(q[:, 0] - mean) > 0.01 * std).all() and (np.abs(np.log(q[:, 1] / std)) > 0.01).all()
    # p(x | z) depends on z: over the prior mean ± 2 std it moves by > 0.1 bit for every image, > 2 for some.
    assert (exact["px_z_range_bits"] > 0.1).all() and exact["px_z_range_bits"].max() > 2
    assert (exact["nelbo_bits"] - exact["nll_bits"] > 1e-3).all()  # q is not the exact posterior


# ------------------------------------------------------------------ −ELBO


def test_nelbo_is_above_exact_and_estimated_without_bias(model, exact, log_weights):
    # Exact: −ELBO − (−log2 p(x)) = KL(q(z|x) || p(z|x)) / ln 2 >= 0, far above the quadrature error.
    gap = exact["nelbo_bits"] - exact["nll_bits"]
    assert (gap > 1e-4).all()
    # The instrument's −ELBO with a sampled KL: the mean of −log w (all samples of the pool).
    sampled = np.array([-w.mean() / LN2 for w in log_weights])
    sampled_se = np.array([w.std(ddof=1) / math.sqrt(len(w)) / LN2 for w in log_weights])
    assert (np.abs(sampled - exact["nelbo_bits"]) <= Z_SCORE * sampled_se).all()
    # The model's own −ELBO (`nelbo`, analytic KL, one sample per copy), through the mask.
    copies = 1024
    x, mask = zip(*(tile(p) for p in binary_images()))
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(0)
        terms = model.net.nelbo(torch.cat(x).repeat_interleave(copies, 0), torch.cat(mask).repeat_interleave(copies, 0))
    nelbo = terms.nelbo_bits.double().reshape(16, copies).numpy()
    nelbo_se = nelbo.std(axis=1, ddof=1) / math.sqrt(copies)
    assert (np.abs(nelbo.mean(axis=1) - exact["nelbo_bits"]) <= Z_SCORE * nelbo_se).all()
    # Summed over the images, the estimated −ELBO is above the exact −log2 p(x) by many standard errors.
    total_se = math.sqrt(float((sampled_se**2).sum()))
    assert sampled.sum() - exact["nll_bits"].sum() > 10 * Z_SCORE * total_se


# ------------------------------------------------------------------ IWAE


def test_iwae_converges_to_exact_log_likelihood(exact, log_weights):
    """Mean of K_MAX_REPEATS independent IWAE(K_MAX) against −log2 p(x), image by image.

    For large K, IWAE(K) ≈ log p(x) − ρ²/(2K) + noise of variance ρ²/K (nats), with
    ρ² = Var(w)/E[w]^2 (delta method); ρ² is estimated from the same samples.
    """
    n = K_MAX * K_MAX_REPEATS
    errors, bias, se = [], [], []
    for log_w, nll in zip(log_weights, exact["nll_bits"]):
        rho2 = relative_variance(log_w[:n])
        errors.append(iwae_bits(log_w[:n], K_MAX).mean() - nll)
        bias.append(rho2 / (2 * K_MAX) / LN2)
        se.append(math.sqrt(rho2 / n) / LN2)
    errors, bias, se = map(np.array, (errors, bias, se))
    assert (np.abs(errors - bias) <= Z_SCORE * se).all()
    # The test can tell IWAE from −ELBO: its tolerance is a small part of the gap it closes,
    # per image and in total.
    gap = exact["nelbo_bits"] - exact["nll_bits"]
    assert (Z_SCORE * se + bias < 0.5 * gap).all()
    total_se = math.sqrt(float((se**2).sum()))
    assert abs(errors.sum() - bias.sum()) <= Z_SCORE * total_se < 0.1 * gap.sum()


def test_iwae_tightens_with_k(model, exact, log_weights):
    """IWAE(K) for K in CURVE_KS, each K on its own block of samples (independent
    estimates), summed over the 16 images: non-increasing in K up to noise; K = 1
    is the −ELBO; the model's own `iwae_bits` gives the same IWAE(16)."""
    start = K_MAX * K_MAX_REPEATS
    totals, total_se = [], []
    for i, k in enumerate(CURVE_KS):
        block = [w[start + i * CURVE_BLOCK : start + (i + 1) * CURVE_BLOCK] for w in log_weights]
        estimates = [iwae_bits(w, k) for w in block]  # per image, CURVE_BLOCK // k estimates
        totals.append(sum(e.mean() for e in estimates))
        total_se.append(math.sqrt(sum(e.var(ddof=1) / len(e) for e in estimates)))
    totals, total_se = np.array(totals), np.array(total_se)
    step_se = np.sqrt(total_se[1:] ** 2 + total_se[:-1] ** 2)
    assert (np.diff(totals) <= Z_SCORE * step_se).all()
    assert totals[0] - totals[-1] > Z_SCORE * math.hypot(total_se[0], total_se[-1])
    assert abs(totals[0] - exact["nelbo_bits"].sum()) <= Z_SCORE * total_se[0]
    assert (totals - exact["nll_bits"].sum() >= -Z_SCORE * total_se).all()  # E[IWAE(K)] >= −log2 p(x)

    k, copies = 16, 128
    assert k in CURVE_KS
    x, mask = zip(*(tile(p) for p in binary_images()))
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(0)
        bits = model.net.iwae_bits(torch.cat(x).repeat_interleave(copies, 0), k,
                                   torch.cat(mask).repeat_interleave(copies, 0))
    bits = bits.double().reshape(16, copies).numpy()
    model_total, model_se = bits.mean(axis=1).sum(), math.sqrt(float((bits.var(axis=1, ddof=1) / copies).sum()))
    curve_total, curve_se = totals[CURVE_KS.index(k)], total_se[CURVE_KS.index(k)]
    assert abs(model_total - curve_total) <= Z_SCORE * math.hypot(model_se, curve_se)
