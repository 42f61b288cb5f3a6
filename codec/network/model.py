"""`HierarchicalVAE`: top-down VAE with a sub-lattice logistic-mixture pixel decoder.

Computes ELBO / IWAE in bits per subpixel for training and measurement, all on
one posterior walk (`sample_posterior`), and exposes the pieces bits-back coding
needs: the bottom-up pass, one top-down walk whose latents are chosen by a
callback, and the pixel-likelihood parameters of each of the four 2x2 sub-lattice
stages. It knows nothing about entropy coders.

Layout (H x W image, C channels):
  stem: 4x4 pixel-unshuffle -> 1x1 conv, trunk at H/4;
  bottom-up: residual blocks, average-pool down to each latent scale;
  top-down: groups of diagonal-Gaussian latents, coarsest first, the posterior
    parameterised relative to the prior (NVAE);
  pixels: top-down features pixel-shuffled to H/2; the 2x2 positions of every
    block are decoded in four stages, each conditioned on the stages before it
    (a local context the latents model poorly), as a discretised logistic
    mixture with channel-autoregressive means (R, then G given R, then B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vaezip.network.config import ModelConfig

LN2 = math.log(2.0)
# Pixel-likelihood parameter ranges, in pixel units; quantize.py uses the same.
LOG_SCALE_MIN = -3.0
LOG_SCALE_MAX = 4.875
COEFF_RANGE = 1.0
LOGIT_RANGE = 16.0
LATENT_LOG_STD_MIN = -6.0
LATENT_LOG_STD_MAX = 2.0

# Order of the 2x2 sub-lattice positions (row, col): diagonals first, so the
# later stages see neighbours on all four sides.
STAGE_OFFSETS = ((0, 0), (1, 1), (0, 1), (1, 0))


@dataclass(frozen=True)
class GroupSpec:
    """One latent group: its downsampling factor and number of channels."""

    factor: int
    channels: int


@dataclass
class Gaussian:
    """Diagonal Gaussian; `mean` and `log_std` are (N, channels, h, w) tensors."""

    mean: torch.Tensor
    log_std: torch.Tensor

    def channels(self, keep: Optional[list[int]]) -> "Gaussian":
        """The Gaussian over the channels `keep` (all when None)."""
        if keep is None:
            return self
        return Gaussian(self.mean[:, keep], self.log_std[:, keep])


class HeadAdaptation(Protocol):
    """What `stage_params` applies to a stage head's raw output (`vaezip.coding.adapt.Adaptation`)."""

    def apply(self, raw: torch.Tensor, stage: int) -> torch.Tensor: ...


# choose(group index, prior, posterior or None) -> latent tensor fed to the decoder.
LatentChooser = Callable[[int, Gaussian, Optional[Gaussian]], torch.Tensor]
TopDownSteps = Generator[tuple[int, Gaussian, Optional[Gaussian]], torch.Tensor, torch.Tensor]


def drive(steps: TopDownSteps, choose: LatentChooser) -> torch.Tensor:
    """Run a `top_down_steps` generator to the end, answering each group with `choose`."""
    try:
        request = next(steps)
        while True:
            request = steps.send(choose(*request))
    except StopIteration as done:
        return done.value


def _act(x: torch.Tensor) -> torch.Tensor:
    """ReLU, not GELU: no transcendental functions anywhere in the network, so
    vectorised and scalar code paths (which differ with the thread count) agree."""
    return F.relu(x)


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class Block(nn.Module):
    """Residual bottleneck block: 1x1 -> 3x3 -> 3x3 -> 1x1 with ReLUs."""

    def __init__(self, cin: int, mid: int, cout: int, residual: bool = True, zero_last: bool = False):
        super().__init__()
        self.residual = residual
        self.c1, self.c2, self.c3, self.c4 = _conv(cin, mid, 1), _conv(mid, mid, 3), _conv(mid, mid, 3), _conv(mid, cout, 1)
        if zero_last:
            nn.init.zeros_(self.c4.weight)
            nn.init.zeros_(self.c4.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c4(_act(self.c3(_act(self.c2(_act(self.c1(_act(x))))))))
        return x + y if self.residual else y


class TopDownGroup(nn.Module):
    """Prior p(z_g | z_<g), posterior q(z_g | z_<g, x) and the update of the decoder state."""

    def __init__(self, width: int, mid: int, zdim: int):
        super().__init__()
        self.zdim = zdim
        self.prior = Block(width, mid, 2 * zdim + width, residual=False, zero_last=True)
        self.posterior = Block(2 * width, mid, 2 * zdim, residual=False, zero_last=True)
        self.z_proj = _conv(zdim, width, 1)
        self.z_proj.weight.data.mul_(0.1)
        self.out = Block(width, mid, width)

    def prior_params(self, h: torch.Tensor) -> tuple[Gaussian, torch.Tensor]:
        out = self.prior(h)
        mean, log_std, feat = out[:, : self.zdim], out[:, self.zdim : 2 * self.zdim], out[:, 2 * self.zdim :]
        return Gaussian(mean, log_std.clamp(LATENT_LOG_STD_MIN, LATENT_LOG_STD_MAX)), feat

    def posterior_params(self, h: torch.Tensor, act: torch.Tensor, prior: Gaussian) -> Gaussian:
        delta = self.posterior(torch.cat([h, act], dim=1))
        mean = prior.mean + delta[:, : self.zdim]
        log_std = (prior.log_std + delta[:, self.zdim :]).clamp(LATENT_LOG_STD_MIN, LATENT_LOG_STD_MAX)
        return Gaussian(mean, log_std)

    def update(self, h: torch.Tensor, feat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out(h + feat + self.z_proj(z))


class PixelStage(nn.Module):
    """Mixture parameters of one 2x2 sub-lattice position from features and earlier stages."""

    def __init__(self, cfg: ModelConfig, stage: int):
        super().__init__()
        c, p = cfg.channels, cfg.pixel_width
        self.stage = stage
        self.feat = _conv(p, p, 1)
        self.context = _conv(4 * c, p, 3) if stage > 0 else None
        self.mid1, self.mid2 = _conv(p, p, 3), _conv(p, p, 1)
        self.head = _conv(p, params_per_position(cfg), 1)

    def forward(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.feat(features)
        if self.context is not None:
            h = h + self.context(context)
        h = h + self.mid2(_act(self.mid1(_act(h))))
        return self.head(_act(h))


def params_per_position(cfg: ModelConfig) -> int:
    """Mixture parameters per pixel: logits, means, log-scales (+ 3 coefficients for RGB)."""
    k, c = cfg.mixtures, cfg.channels
    return k * (1 + 2 * c + (3 if c == 3 else 0))


@dataclass
class MixtureParams:
    """Discretised logistic mixture for subpixels in pixel units (0..255).

    logits: (N, K, h, w); means, log_scales: (N, C, K, h, w), means before the
    channel-autoregressive shift; coeffs: (N, 3, K, h, w) for RGB (G<-R, B<-R,
    B<-G), None for gray.
    """

    logits: torch.Tensor
    means: torch.Tensor
    log_scales: torch.Tensor
    coeffs: Optional[torch.Tensor]


def split_params(raw: torch.Tensor, cfg: ModelConfig) -> MixtureParams:
    """Map raw head output (N, P, h, w) to bounded mixture parameters."""
    n, _, h, w = raw.shape
    k, c = cfg.mixtures, cfg.channels
    logits = raw[:, :k].clamp(-LOGIT_RANGE, LOGIT_RANGE)
    means = 127.5 + 127.5 * raw[:, k : k + c * k].reshape(n, c, k, h, w)
    log_scales = raw[:, k + c * k : k + 2 * c * k].reshape(n, c, k, h, w) + 2.0
    log_scales = log_scales.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    coeffs = None
    if c == 3:
        coeffs = raw[:, k + 2 * c * k :].reshape(n, 3, k, h, w).clamp(-COEFF_RANGE, COEFF_RANGE)
    return MixtureParams(logits, means, log_scales, coeffs)


def autoregressive_means(p: MixtureParams, x: torch.Tensor) -> torch.Tensor:
    """Per-channel means (N, C, K, h, w) after conditioning G on R and B on R, G.

    Args:
        x: (N, C, h, w) float pixel values 0..255 of the same positions.
    """
    if p.coeffs is None:
        return p.means
    centred = (x - 127.5).unsqueeze(2)
    r, g = centred[:, 0:1], centred[:, 1:2]
    mean_r = p.means[:, 0:1]
    mean_g = p.means[:, 1:2] + p.coeffs[:, 0:1] * r
    mean_b = p.means[:, 2:3] + p.coeffs[:, 1:2] * r + p.coeffs[:, 2:3] * g
    return torch.cat([mean_r, mean_g, mean_b], dim=1)


def mixture_log_prob(p: MixtureParams, x: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats per subpixel, (N, C, h, w), for integer pixel values x (float)."""
    means = autoregressive_means(p, x)
    xe = x.unsqueeze(2)
    inv_s = torch.exp(-p.log_scales)
    upper = torch.where(xe >= 255, torch.full_like(xe, 1e4), (xe + 0.5 - means) * inv_s)
    lower = torch.where(xe <= 0, torch.full_like(xe, -1e4), (xe - 0.5 - means) * inv_s)
    # log(sigmoid(u) - sigmoid(l)), stable for both tails.
    log_mass = torch.log(torch.clamp(torch.sigmoid(upper) - torch.sigmoid(lower), min=1e-12))
    mid = (xe - means) * inv_s
    log_pdf_mid = mid - p.log_scales - 2 * F.softplus(mid)  # density approx when the bin is tiny
    log_mass = torch.where(torch.sigmoid(upper) - torch.sigmoid(lower) > 1e-5, log_mass, log_pdf_mid)
    log_w = torch.log_softmax(p.logits, dim=1).unsqueeze(1)
    return torch.logsumexp(log_mass + log_w, dim=2)


def gaussian_log_prob(g: Gaussian, z: torch.Tensor) -> torch.Tensor:
    """Elementwise log density in nats."""
    return -0.5 * ((z - g.mean) * torch.exp(-g.log_std)) ** 2 - g.log_std - 0.5 * math.log(2 * math.pi)


def gaussian_kl(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """Elementwise KL(q || p) in nats."""
    return (
        p.log_std - q.log_std
        + 0.5 * (torch.exp(2 * q.log_std) + (q.mean - p.mean) ** 2) * torch.exp(-2 * p.log_std)
        - 0.5
    )


@dataclass
class NelboTerms:
    """Per-image terms in bits: `nelbo_bits` (N,), `recon_bits` (N,), `kl_bits` (N, groups)."""

    nelbo_bits: torch.Tensor
    recon_bits: torch.Tensor
    kl_bits: torch.Tensor


@dataclass
class PosteriorSample:
    """One top-down pass on latents from the posterior of x (`HierarchicalVAE.sample_posterior`).

    features: pixel-decoder features (N, pixel_width, H/2, W/2); per latent group,
    coarsest first, over its coded channels: `priors`, `posteriors`, the `latents`
    z fed to the decoder and `kl_nats`, the analytic KL(q || p) in nats (N, channels, h, w).
    """

    features: torch.Tensor
    priors: list[Gaussian]
    posteriors: list[Gaussian]
    latents: list[torch.Tensor]
    kl_nats: list[torch.Tensor]

    def log_ratios(self) -> list[torch.Tensor]:
        """Per group, log p(z) − log q(z | x) of the latents in nats, summed per image (N,)."""
        return [(gaussian_log_prob(p, z) - gaussian_log_prob(q, z)).sum(dim=(1, 2, 3))
                for p, q, z in zip(self.priors, self.posteriors, self.latents)]


class HierarchicalVAE(nn.Module):
    """Fully convolutional top-down VAE; images are uint8 (N, C, H, W), H and W
    multiples of `config.downsampling`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, w, mid = config.channels, config.width, config.bottleneck
        self.stem = _conv(16 * c, w, 1)
        self.factors = sorted({f for f, _, _ in config.latent_scales} | {4})
        self.encoder = nn.ModuleList([Block(w, mid, w) for _ in self.factors])
        self.groups = [GroupSpec(f, zdim) for f, n, zdim in config.latent_scales for _ in range(n)]
        active = config.active_latents or (None,) * len(self.groups)
        self.active = [None if a is None else list(a) for a in active]
        self.decoder = nn.ModuleList([TopDownGroup(w, mid, g.channels) for g in self.groups])
        self.top_bias = nn.Parameter(torch.zeros(1, w, 1, 1))
        self.to_pixels = _conv(w, 4 * config.pixel_width, 1)
        self.stages = nn.ModuleList([PixelStage(config, s) for s in range(4)])

    # ---- bottom-up -------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Encoder activations keyed by downsampling factor, for uint8 x (N, C, H, W)."""
        h = self.stem(F.pixel_unshuffle(x.float() / 127.5 - 1.0, 4))
        acts = {}
        for factor, block in zip(self.factors, self.encoder):
            while h.shape[-1] > x.shape[-1] // factor:
                h = F.avg_pool2d(h, 2)
            h = block(h)
            acts[factor] = h
        return acts

    # ---- top-down --------------------------------------------------------
    def top_down(
        self,
        batch: int,
        height: int,
        width: int,
        choose: LatentChooser,
        acts: Optional[dict[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Walk the latent groups coarsest first; `choose` picks each z.

        Args:
            batch, height, width: image batch size and pixel size.
            choose: called as choose(g, prior, posterior) with posterior None
                when `acts` is None, both restricted to the group's active
                channels; returns z_g over those channels.
            acts: bottom-up activations of the images, or None (prior only).
        Returns:
            Pixel-decoder features (N, pixel_width, H/2, W/2).
        """
        return drive(self.top_down_steps(batch, height, width, acts), choose)

    def top_down_steps(self, batch: int, height: int, width: int,
                       acts: Optional[dict[int, torch.Tensor]] = None,
                       states: Optional[list] = None) -> TopDownSteps:
        """`top_down` as a generator: yields (g, prior, posterior) per group, is sent
        z_g, returns the features. Lets a caller run several sub-batches in lockstep.

        Args:
            states: if a list, gets each group's decoder state and full prior, (h, prior),
                from which `posteriors` rebuilds the posteriors without walking again.
        """
        first = self.groups[0].factor
        h = self.top_bias.expand(batch, -1, height // first, width // first)
        for g, (spec, group) in enumerate(zip(self.groups, self.decoder)):
            size = (height // spec.factor, width // spec.factor)
            if h.shape[-2:] != size:
                h = F.interpolate(h, size=size, mode="nearest")
            prior, feat = group.prior_params(h)
            if states is not None:
                states.append((h, prior))
            posterior = None if acts is None else group.posterior_params(h, acts[spec.factor], prior)
            keep = self.active[g]
            z = yield g, prior.channels(keep), None if posterior is None else posterior.channels(keep)
            if keep is not None:  # pruned channels sit at the prior mean, uncoded
                z_all = prior.mean.clone()
                z_all[:, keep] = z
                z = z_all
            h = group.update(h, feat, z)
        if h.shape[-2:] != (height // 4, width // 4):
            h = F.interpolate(h, size=(height // 4, width // 4), mode="nearest")
        return F.pixel_shuffle(self.to_pixels(h), 2)

    def posteriors(self, states: list, acts: dict[int, torch.Tensor]) -> list[Gaussian]:
        """Each group's posterior (active channels) from the `states` a walk with the same
        latents recorded: the numbers `top_down_steps` with `acts` yields, without
        recomputing the priors and decoder updates."""
        return [
            group.posterior_params(h, acts[spec.factor], prior).channels(keep)
            for (h, prior), spec, group, keep in zip(states, self.groups, self.decoder, self.active)
        ]

    # ---- pixels ----------------------------------------------------------
    def stage_params(self, features: torch.Tensor, lattice: torch.Tensor, stage: int,
                     adaptation: Optional["HeadAdaptation"] = None) -> MixtureParams:
        """Mixture parameters of sub-lattice `stage` given the stages before it.

        Args:
            features: (N, pixel_width, H/2, W/2) from `top_down`.
            lattice: (N, 4, C, H/2, W/2) uint8 pixels split by 2x2 position in
                STAGE_OFFSETS order; only stages < `stage` are read.
            adaptation: per-image changes of the stage heads' outputs (format
                version 5, `vaezip.coding.adapt`), or None.
        """
        raw = self.stage_raw(features, lattice, stage)
        if adaptation is not None:
            raw = adaptation.apply(raw, stage)
        return split_params(raw, self.config)

    def stage_raw(self, features: torch.Tensor, lattice: torch.Tensor, stage: int) -> torch.Tensor:
        """The head output (N, `params_per_position`, H/2, W/2) of `stage_params`, before
        any adaptation and before `split_params` bounds it."""
        n, _, c, h, w = lattice.shape
        context = torch.zeros(n, 4, c, h, w, dtype=torch.float32, device=features.device)
        if stage > 0:
            context[:, :stage] = lattice[:, :stage].float() / 127.5 - 1.0
        return self.stages[stage](features, context.reshape(n, 4 * c, h, w))

    # ---- objectives ------------------------------------------------------
    def sample_posterior(self, x: torch.Tensor, *, latents: str = "sample", generator: Optional[torch.Generator] = None,
                         acts: Optional[dict[int, torch.Tensor]] = None) -> PosteriorSample:
        """The top-down walk on latents from the posterior of x: the one sampling path of
        training, measurement and the benchmarks.

        Args:
            x: uint8 (N, C, H, W).
            latents: "sample" draws z = mean + std * eps, eps ~ N(0, 1) from `generator`
                (None: torch's global generator); "mean" takes the posterior means.
            acts: `bottom_up(x)`, if already computed.
        """
        if latents not in ("sample", "mean"):
            raise ValueError(f"latents must be 'sample' or 'mean', got {latents!r}")
        n, _, height, width = x.shape
        priors, posteriors, chosen, kls = [], [], [], []

        def choose(g: int, prior: Gaussian, posterior: Optional[Gaussian]) -> torch.Tensor:
            # The KL before z: training's gradients are summed in the order the graph was built.
            kls.append(gaussian_kl(posterior, prior))
            z = posterior.mean
            if latents == "sample":
                eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
                z = posterior.mean + torch.exp(posterior.log_std) * eps
            priors.append(prior)
            posteriors.append(posterior)
            chosen.append(z)
            return z

        features = self.top_down(n, height, width, choose, self.bottom_up(x) if acts is None else acts)
        return PosteriorSample(features, priors, posteriors, chosen, kls)

    def nelbo(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> NelboTerms:
        """Single-sample negative ELBO with analytic KLs, in bits per image.

        Args:
            x: uint8 (N, C, H, W).
            mask: optional bool (N, 1, H, W); only True pixels count in the
                reconstruction term (tile padding is not coded).
        """
        sample = self.sample_posterior(x)
        log_prob = self.pixel_log_prob(sample.features, x, mask)
        recon = -log_prob.sum(dim=(1, 2, 3, 4)) / LN2
        kl_bits = torch.stack([kl.sum(dim=(1, 2, 3)) for kl in sample.kl_nats], dim=1) / LN2
        return NelboTerms(recon + kl_bits.sum(1), recon, kl_bits)

    def pixel_log_prob(self, features: torch.Tensor, x: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(x | z) in nats, (N, 4, C, H/2, W/2) by sub-lattice stage; 0 where
        `mask` (bool (N, 1, H, W), optional) is False."""
        lattice = split_lattice(x)
        out = []
        for s in range(4):
            params = self.stage_params(features, lattice, s)
            out.append(mixture_log_prob(params, lattice[:, s].float()))
        log_prob = torch.stack(out, dim=1)
        return log_prob if mask is None else log_prob * split_lattice(mask)

    def iwae_bits(self, x: torch.Tensor, samples: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-log p(x) estimated with `samples` importance samples, bits per image (N,).

        `mask` as in `nelbo`. Non-increasing in `samples` on average, <= nelbo.
        """
        acts = self.bottom_up(x)
        log_w = []
        for _ in range(samples):
            sample = self.sample_posterior(x, acts=acts)
            log_ratio = torch.zeros(x.shape[0], device=x.device)
            for ratio in sample.log_ratios():
                log_ratio = log_ratio + ratio
            log_w.append(self.pixel_log_prob(sample.features, x, mask).sum(dim=(1, 2, 3, 4)) + log_ratio)
        log_w = torch.stack(log_w, dim=1)
        return -(torch.logsumexp(log_w, dim=1) - math.log(samples)) / LN2


def split_lattice(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4, C, H/2, W/2), positions in STAGE_OFFSETS order."""
    return torch.stack([x[:, :, i::2, j::2] for i, j in STAGE_OFFSETS], dim=1)


def merge_lattice(lattice: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_lattice`."""
    n, _, c, h, w = lattice.shape
    x = lattice.new_zeros(n, c, 2 * h, 2 * w)
    for s, (i, j) in enumerate(STAGE_OFFSETS):
        x[:, :, i::2, j::2] = lattice[:, s]
    return x
