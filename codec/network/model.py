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
from functools import lru_cache
from typing import Callable, Generator, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaezip.entropy.exact import LATENT_LOG_STD_STEPS, LATENT_MEAN_STEPS, LOG_SCALE_STEPS, LOGIT_STEPS, MEAN_STEPS
from vaezip.format import versions
from vaezip.network.config import ModelConfig
from vaezip.network.fixedpoint import (
    FixedConv2d,
    Requant,
    Stream,
    at_positions,
    calibrating,
    is_calibrating,
    power_of_two_scale,
)

LN2 = math.log(2.0)
# Pixel-likelihood parameter ranges, in pixel units; quantize.py uses the same.
LOG_SCALE_MIN = -3.0
LOG_SCALE_MAX = 4.875
COEFF_RANGE = 1.0
LOGIT_RANGE = 16.0
LATENT_LOG_STD_MIN = -6.0
LATENT_LOG_STD_MAX = 2.0
LATENT_RANGE = 8.0
"""Latents are coded in [-LATENT_RANGE, LATENT_RANGE] (`bitsback.CodingParams.radius`)."""
# Integer grids of the pixel-likelihood parameters (steps per unit), used by coding
# (`coding.quantize`) and produced directly by a fixed-point model's heads; the others
# (means, log-scales, logits, latent Gaussians) are `entropy.exact`'s.
COEFF_STEPS = 4096


def latent_units(latent_grid: float) -> tuple[float, float]:
    """A fixed-point model's latent Gaussians: integers per unit of a mean (quarter grid
    steps) and of a log-std (1/16), the grids `entropy.exact` codes them on."""
    return LATENT_MEAN_STEPS / latent_grid, float(LATENT_LOG_STD_STEPS)

# Order of the 2x2 sub-lattice positions (row, col): diagonals first, so the
# later stages see neighbours on all four sides.
STAGE_OFFSETS = ((0, 0), (1, 1), (0, 1), (1, 0))
HALO = 1
"""A `pixel_halo` model's ring around a tile's (H/2, W/2) grids, in samples (2 pixels)."""
RING_TRAINING_AVAILABILITY = 0.75
"""Training: each of the 8 neighbours (`ring_mask`) is there with this probability. When
coding, a neighbour is there when it lies in the image and in the same or a later batch
(the decoder pops batches last first): most of them, except the top row for a batch's
first tile row and the image's borders."""
RING_EVALUATION_NEIGHBOURS = ((False, False, False), (True, True, True), (True, True, True))
"""Held-out evaluation: every neighbour but the top row (a batch's first tile row)."""


def ring_mask(neighbours: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 1, height + 2 HALO, width + 2 HALO) float32 availability of a tile's ring
    (`HierarchicalVAE.stage_params`) from (N, 3, 3) bool: which neighbours are there,
    [row][col] with the tile at [1][1] (always there)."""
    regions = neighbours.clone()
    regions[:, 1, 1] = True
    rows = torch.tensor([HALO, height, HALO], device=neighbours.device)
    cols = torch.tensor([HALO, width, HALO], device=neighbours.device)
    mask = regions.repeat_interleave(rows, dim=1).repeat_interleave(cols, dim=2)
    return mask[:, None].to(torch.float32)


@lru_cache(maxsize=16)
def _interior(height: int, width: int) -> torch.Tensor:
    """(1, 1, height + 2 HALO, width + 2 HALO) float32: 1 in the tile, 0 on its ring."""
    return F.pad(torch.ones(1, 1, height, width), (HALO,) * 4)


def random_ring_mask(n: int, height: int, width: int, device=None, generator=None) -> torch.Tensor:
    """`ring_mask` with each neighbour there with probability RING_TRAINING_AVAILABILITY."""
    draw = torch.rand(n, 3, 3, device=device, generator=generator)
    return ring_mask(draw < RING_TRAINING_AVAILABILITY, height, width)


@dataclass(frozen=True)
class PixelStep:
    """One step of the pixel schedule: the positions (row + stride * a, col + stride * b)
    of sub-lattice `stage`'s (H/2, W/2) grid, coded given every step before it."""

    stage: int
    stride: int = 1
    row: int = 0
    col: int = 0

    @property
    def at(self) -> Optional[tuple[int, int, int]]:
        """(stride, row, col), or None for the whole grid (`fixedpoint.at_positions`)."""
        return None if self.stride == 1 else (self.stride, self.row, self.col)

    @property
    def window(self) -> tuple[slice, slice]:
        """(rows, cols): the step's positions as slices of the last two axes of a grid."""
        return slice(self.row, None, self.stride), slice(self.col, None, self.stride)

    def positions(self, height: int, width: int) -> np.ndarray:
        """(height, width) bool: the step's positions on its stage's grid."""
        mask = np.zeros((height, width), dtype=bool)
        mask[self.window] = True
        return mask


def pixel_schedule(stage0_levels: int) -> tuple[PixelStep, ...]:
    """The order in which the pixels of a 2x2 block lattice are coded.

    Stage 0 (the (0, 0) position of every 2x2 block) is split `stage0_levels` times
    into its own 2x2 sub-lattices, coarsest first: its base (every 2^levels-th position
    of its grid, no pixel context) and then, per level, the three other positions of
    each block in STAGE_OFFSETS order; then stages 1-3. With 0 levels: the four stages."""
    base = 2**stage0_levels
    steps = [PixelStep(0, base) if stage0_levels else PixelStep(0)]
    for level in range(stage0_levels, 0, -1):
        stride, half = 2**level, 2 ** (level - 1)
        steps += [PixelStep(0, stride, i * half, j * half) for i, j in STAGE_OFFSETS[1:]]
    return tuple(steps) + tuple(PixelStep(s) for s in (1, 2, 3))


@lru_cache(maxsize=None)
def known_before(schedule: tuple[PixelStep, ...], step: int, height: int, width: int, ring: int = 0) -> torch.Tensor:
    """(1, 1, height, width) float32: 1 where a step of the same stage before `step` codes,
    on a grid whose first `ring` rows and columns lie outside the tile (a halo)."""
    stage = schedule[step].stage
    known = np.zeros((height, width), dtype=bool)
    for st in schedule[:step]:
        if st.stage == stage:
            known[(st.row + ring) % st.stride :: st.stride, (st.col + ring) % st.stride :: st.stride] = True
    return torch.from_numpy(known.astype(np.float32)).view(1, 1, height, width)


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

    def apply_integers(self, out: torch.Tensor, stage: int, grid) -> torch.Tensor: ...


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


def _conv(cin: int, cout: int, k: int, fixed: bool = False) -> nn.Conv2d:
    return FixedConv2d(cin, cout, k) if fixed else nn.Conv2d(cin, cout, k, padding=k // 2)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) (half to even), with the identity's gradient when training."""
    return torch.round(x) if not x.requires_grad else x + (torch.round(x) - x).detach()


class Block(nn.Module):
    """Residual bottleneck block: 1x1 -> 3x3 -> 3x3 -> 1x1 with ReLUs.

    Fixed-point (`act_bits` set): `entry` brings the input (a wide stream) to ReLU
    integers of `act_bits`; c1-c3 output such integers (the ReLU is their clamp); c4
    outputs integers on the grid its caller sets (a stream's, or a Gaussian's)."""

    def __init__(self, cin: int, mid: int, cout: int, residual: bool = True, zero_last: bool = False,
                 act_bits: Optional[int] = None):
        super().__init__()
        self.residual = residual
        fixed = act_bits is not None
        self.c1, self.c2, self.c3 = _conv(cin, mid, 1, fixed), _conv(mid, mid, 3, fixed), _conv(mid, mid, 3, fixed)
        self.c4 = _conv(mid, cout, 1, fixed)
        self.entry = Requant(cin, act_bits, relu=True) if fixed else None
        if fixed:
            for conv in (self.c1, self.c2, self.c3):
                conv.relu = True
        if zero_last:
            nn.init.zeros_(self.c4.weight)
            nn.init.zeros_(self.c4.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.entry is not None:
            y = self.c4(self.c3(self.c2(self.c1(self.entry(x)))))
        else:
            y = self.c4(_act(self.c3(_act(self.c2(_act(self.c1(_act(x))))))))
        return x + y if self.residual else y


class TopDownGroup(nn.Module):
    """Prior p(z_g | z_<g), posterior q(z_g | z_<g, x) and the update of the decoder state."""

    def __init__(self, width: int, mid: int, zdim: int, act_bits: Optional[int] = None, latent_grid: float = 1.0):
        super().__init__()
        self.zdim = zdim
        self.fixed = act_bits is not None
        self.prior = Block(width, mid, 2 * zdim + width, residual=False, zero_last=True, act_bits=act_bits)
        self.posterior = Block(2 * width, mid, 2 * zdim, residual=False, zero_last=True, act_bits=act_bits)
        self.z_proj = _conv(zdim, width, 1, self.fixed)
        self.z_proj.weight.data.mul_(0.1)
        self.out = Block(width, mid, width, act_bits=act_bits)
        self.latent_grid = latent_grid  # fixed-point only: z arrives on this grid

    def prior_params(self, h: torch.Tensor) -> tuple[Gaussian, torch.Tensor]:
        out = self.prior(h)
        mean, log_std, feat = out[:, : self.zdim], out[:, self.zdim : 2 * self.zdim], out[:, 2 * self.zdim :]
        if self.fixed and not is_calibrating():  # integers on the Gaussians' grids, clamped by the layer
            mean_unit, log_std_unit = latent_units(self.latent_grid)
            return Gaussian(mean / mean_unit, log_std / log_std_unit), feat
        return Gaussian(mean, log_std.clamp(LATENT_LOG_STD_MIN, LATENT_LOG_STD_MAX)), feat

    def posterior_params(self, h: torch.Tensor, act: torch.Tensor, prior: Gaussian) -> Gaussian:
        delta = self.posterior(torch.cat([h, act], dim=1))
        d_mean, d_log_std = delta[:, : self.zdim], delta[:, self.zdim :]
        if self.fixed and not is_calibrating():  # sums of numbers on the same grids: exact
            mean_unit, log_std_unit = latent_units(self.latent_grid)
            d_mean, d_log_std = d_mean / mean_unit, d_log_std / log_std_unit
        mean = prior.mean + d_mean
        if self.fixed:
            mean = mean.clamp(-LATENT_RANGE, LATENT_RANGE)
        log_std = (prior.log_std + d_log_std).clamp(LATENT_LOG_STD_MIN, LATENT_LOG_STD_MAX)
        return Gaussian(mean, log_std)

    def update(self, h: torch.Tensor, feat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.fixed and not is_calibrating():  # the latent integers k of z = k * grid
            limit = LATENT_RANGE / self.latent_grid
            z = _round_ste(z / self.latent_grid).clamp(-limit, limit)
        return self.out(h + feat + self.z_proj(z))


class PixelStage(nn.Module):
    """Mixture parameters of one pixel step (`PixelStep`) from features and the pixels
    coded before it.

    Stages 1-3 read the earlier stages (4C context channels, 3x3); a step inside stage 0
    reads stage 0's pixels coded before it (C channels, 3x3 dilated to the step's
    neighbours, zero-initialised so a new step starts as the stage-0 head it was copied
    from). The trunk runs on the whole (H/2, W/2) grid, the middle 3x3 and the head only
    at the step's positions; the output is (N, P, H/2/stride, W/2/stride)."""

    def __init__(self, cfg: ModelConfig, step: PixelStep, first: bool):
        super().__init__()
        c, p = cfg.channels, cfg.pixel_width
        fixed = cfg.fixed_bits is not None
        self.step = step
        self.feat = _conv(p, p, 1, fixed)
        self.context = None
        if step.stage > 0:
            self.context = _conv(4 * c, p, 3, fixed)
        elif not first:
            dilation = step.stride // 2
            self.context = FixedConv2d(c, p, 3, dilation) if fixed else \
                nn.Conv2d(c, p, 3, padding=dilation, dilation=dilation)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)
        self.ring = None
        if self.context is not None and cfg.pixel_halo:
            # The input carries the ring (`HierarchicalVAE.step_raw`): `context` reads the tile
            # (the ring zeroed: what it was trained on), `ring` the ring, from zero weights, so a
            # warm start computes the model without a ring whatever the ring holds.
            self.context.padding = (0, 0)
            cin, dilation = self.context.in_channels, self.context.dilation[0]
            self.ring = FixedConv2d(cin, p, 3, dilation) if fixed else nn.Conv2d(cin, p, 3, dilation=dilation)
            self.ring.padding = (0, 0)
            nn.init.zeros_(self.ring.weight)
            nn.init.zeros_(self.ring.bias)
        self.mid1, self.mid2 = _conv(p, p, 3, fixed), _conv(p, p, 1, fixed)
        self.head = _conv(p, params_per_position(cfg), 1, fixed)
        self.trunk = self.mid_entry = self.head_entry = None
        if fixed:
            act_bits, head_bits, _, stream_bits = cfg.fixed_bits
            self.trunk = Stream(p, stream_bits)
            self.mid_entry = Requant(p, act_bits, relu=True)
            self.mid1.relu = True
            self.head_entry = Requant(p, head_bits, relu=True)

    def _mid1_at(self, h: torch.Tensor) -> torch.Tensor:
        at = self.step.at
        if isinstance(self.mid1, FixedConv2d):
            return self.mid1(h, at)
        h, stride, padding = at_positions(h, self.mid1.padding, at)
        return F.conv2d(h, self.mid1.weight, self.mid1.bias, stride, padding)

    def _at_step(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.step.stride == 1 else h[(..., *self.step.window)]

    def forward(self, features: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.feat(features)
        if self.ring is not None:
            inner = context * _interior(*features.shape[-2:]).to(context.device)
            h = h + self.context(inner) + self.ring(context - inner)
        elif self.context is not None:
            h = h + self.context(context)
        if self.trunk is not None:
            h = self.trunk.observe(h)
            h = self.trunk.observe(self._at_step(h) + self.mid2(self._mid1_at(self.mid_entry(h))))
            return self.head(self.head_entry(h))
        h = self._at_step(h) + self.mid2(_act(self._mid1_at(_act(h))))
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


def head_grid(cfg: ModelConfig) -> tuple[list[float], list[float], list[float], list[float]]:
    """A fixed-point model's head outputs, per output channel: (scale, offset, lo, hi) with
    output integer = clamp(floor(raw * scale + offset + 1/2), lo, hi) on the coding grids:
    logits in 1/LOGIT_STEPS, means in 1/MEAN_STEPS pixel (clamped as version 6 clamps
    them), log-scales in 1/LOG_SCALE_STEPS, coefficients in 1/COEFF_STEPS."""
    k, c = cfg.mixtures, cfg.channels
    mean_lo, mean_hi = (MEAN_STEPS * m for m in versions.get(6).mean_range)
    half = 127.5 * MEAN_STEPS
    kinds = [(LOGIT_STEPS, 0.0, -LOGIT_RANGE * LOGIT_STEPS, LOGIT_RANGE * LOGIT_STEPS)] * k
    kinds += [(half, half, mean_lo, mean_hi)] * (c * k)
    kinds += [(LOG_SCALE_STEPS, 2.0 * LOG_SCALE_STEPS, LOG_SCALE_MIN * LOG_SCALE_STEPS,
               LOG_SCALE_MAX * LOG_SCALE_STEPS)] * (c * k)
    if c == 3:
        kinds += [(COEFF_STEPS, 0.0, -COEFF_RANGE * COEFF_STEPS, COEFF_RANGE * COEFF_STEPS)] * (3 * k)
    return tuple(list(column) for column in zip(*kinds))


def split_params(raw: torch.Tensor, cfg: ModelConfig) -> MixtureParams:
    """Map raw head output (N, P, h, w) to bounded mixture parameters (a fixed-point
    model's head integers, `head_grid`, to the same parameters, exactly)."""
    n, _, h, w = raw.shape
    k, c = cfg.mixtures, cfg.channels
    if cfg.fixed_bits is not None and not is_calibrating():
        steps = [LOGIT_STEPS] * k + [MEAN_STEPS] * (c * k) + [LOG_SCALE_STEPS] * (c * k) + [COEFF_STEPS] * (3 * k if c == 3 else 0)
        value = raw / torch.tensor(steps, dtype=raw.dtype, device=raw.device).view(1, -1, 1, 1)
        return MixtureParams(value[:, :k], value[:, k : k + c * k].reshape(n, c, k, h, w),
                             value[:, k + c * k : k + 2 * c * k].reshape(n, c, k, h, w),
                             value[:, k + 2 * c * k :].reshape(n, 3, k, h, w) if c == 3 else None)
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
    # the edge bins reach to -inf and +inf; the bin mass is computed once
    upper = ((xe + 0.5 - means) * inv_s).masked_fill(xe >= 255, 1e4)
    lower = ((xe - 0.5 - means) * inv_s).masked_fill(xe <= 0, -1e4)
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    log_mass = torch.log(torch.clamp(mass, min=1e-12))
    mid = (xe - means) * inv_s
    log_pdf_mid = mid - p.log_scales - 2 * F.softplus(mid)  # density approx when the bin is tiny
    log_mass = torch.where(mass > 1e-5, log_mass, log_pdf_mid)
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
        self.fixed = config.fixed_bits is not None
        act_bits, _, feature_bits, stream_bits = config.fixed_bits or (None,) * 4
        self.stem = _conv(16 * c, w, 1, self.fixed)
        self.factors = sorted({f for f, _, _ in config.latent_scales} | {4})
        self.encoder = nn.ModuleList([Block(w, mid, w, act_bits=act_bits) for _ in self.factors])
        self.groups = [GroupSpec(f, zdim) for f, n, zdim in config.latent_scales for _ in range(n)]
        active = config.active_latents or (None,) * len(self.groups)
        self.active = [None if a is None else list(a) for a in active]
        self.decoder = nn.ModuleList([TopDownGroup(w, mid, g.channels, act_bits, config.latent_grid)
                                      for g in self.groups])
        self.top_bias = nn.Parameter(torch.zeros(1, w, 1, 1))
        self.to_pixels = _conv(w, 4 * config.pixel_width, 1, self.fixed)
        self.schedule = pixel_schedule(config.stage0_levels)
        self.stages = nn.ModuleList([PixelStage(config, step, k == 0) for k, step in enumerate(self.schedule)])
        """One `PixelStage` per step of `schedule`."""
        if self.fixed:  # the integer grids (`network.fixedpoint`): two residual streams
            self.encoder_stream, self.decoder_stream = Stream(w, stream_bits), Stream(w, stream_bits)
            self.pixel_entry = Requant(w, feature_bits, relu=False)
            self.feature_grid = Stream(config.pixel_width, feature_bits)

    # ---- bottom-up -------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Encoder activations keyed by downsampling factor, for uint8 x (N, C, H, W)."""
        h = self.stem(F.pixel_unshuffle(self._pixel_input(x), 4))
        acts = {}
        for factor, block in zip(self.factors, self.encoder):
            while h.shape[-1] > x.shape[-1] // factor:
                h = F.avg_pool2d(h, 2)
                if self.fixed and not is_calibrating():  # back onto the stream's integers
                    h = torch.floor(h + 0.5)
            h = block(h)
            if self.fixed:
                h = self.encoder_stream.observe(h)
            acts[factor] = h
        return acts

    def _pixel_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values 0..255 as the network reads them: x / 127.5 - 1 (a fixed-point
        model reads the integers 2x - 255, 255 per unit: the same numbers)."""
        if self.fixed and not is_calibrating():
            return 2.0 * x.float() - 255.0
        return x.float() / 127.5 - 1.0

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
        bias = self.top_bias
        if self.fixed and not is_calibrating():
            bias = self.decoder_stream.observe(_round_ste(bias * self.decoder_stream.scale.float().view(1, -1, 1, 1)))
        h = bias.expand(batch, -1, height // first, width // first)
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
            if self.fixed:
                h = self.decoder_stream.observe(h)
        if h.shape[-2:] != (height // 4, width // 4):
            h = F.interpolate(h, size=(height // 4, width // 4), mode="nearest")
        if self.fixed:
            h = self.pixel_entry(h)
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
                     adaptation: Optional["HeadAdaptation"] = None,
                     available: Optional[torch.Tensor] = None) -> MixtureParams:
        """Mixture parameters of sub-lattice `stage` given the stages before it (its steps
        given the steps before them, from `lattice`'s true values).

        Args:
            features: (N, pixel_width, H/2, W/2) from `top_down`.
            lattice: (N, 4, C, H/2, W/2) uint8 pixels split by 2x2 position in
                STAGE_OFFSETS order; only what comes before the stage's positions is read.
                A `pixel_halo` model also takes (N, 4, C, H/2 + 2 HALO, W/2 + 2 HALO): the
                tile with its ring of neighbouring pixels.
            adaptation: per-image changes of the stage heads' outputs (format
                version 5, `vaezip.coding.adapt`), or None.
            available: with a ring, (N, 1, H/2 + 2 HALO, W/2 + 2 HALO) float32, 1 where the
                ring holds a neighbour's pixels (the interior is 1), 0 where it holds nothing;
                None: all of it.
        """
        return self._params(self.stage_raw(features, lattice, stage, available), stage, adaptation)

    def step_params(self, features: torch.Tensor, lattice: torch.Tensor, step: int,
                    adaptation: Optional["HeadAdaptation"] = None,
                    available: Optional[torch.Tensor] = None) -> MixtureParams:
        """Mixture parameters of `schedule[step]` at its positions only, on its own grid
        (N, ., H/2/stride, W/2/stride); `lattice` and `available` as in `stage_params`, read
        only where earlier steps are. What coding runs, one step at a time."""
        return self._params(self.step_raw(features, lattice, step, available), self.schedule[step].stage,
                            adaptation)

    def _params(self, raw: torch.Tensor, stage: int, adaptation: Optional["HeadAdaptation"]) -> MixtureParams:
        if adaptation is not None:
            if self.fixed and not is_calibrating():
                raw = adaptation.apply_integers(raw, stage, head_grid(self.config))
            else:
                raw = adaptation.apply(raw, stage)
        return split_params(raw, self.config)

    def head_raw(self, out: torch.Tensor) -> torch.Tensor:
        """A fixed-point model's head integers (`stage_raw`) as the float head's outputs
        (`split_params` of a float model maps them to the same parameters)."""
        scale, offset, _, _ = (torch.tensor(v, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
                               for v in head_grid(self.config))
        return (out - offset) / scale

    def stage_raw(self, features: torch.Tensor, lattice: torch.Tensor, stage: int,
                  available: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head output (N, `params_per_position`, H/2, W/2) of `stage_params`, before
        any adaptation and before `split_params` bounds it: each of the stage's steps at
        its positions."""
        steps = [k for k, st in enumerate(self.schedule) if st.stage == stage]
        if len(steps) == 1:
            return self.step_raw(features, lattice, steps[0], available)
        out = None
        for k in steps:
            part, st = self.step_raw(features, lattice, k, available), self.schedule[k]
            if out is None:
                n, p = part.shape[:2]
                out = part.new_zeros(n, p, *features.shape[-2:])
            out[(..., *st.window)] = part
        return out

    def step_raw(self, features: torch.Tensor, lattice: torch.Tensor, step: int,
                 available: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head output of `schedule[step]` at its positions only (N, P, H/2/stride, W/2/stride)."""
        st = self.schedule[step]
        ring = 0
        if self.config.pixel_halo:
            lattice, available = self._with_halo(lattice, available, features.shape[-2:])
            ring = HALO
        n, _, c, h, w = lattice.shape
        if st.stage > 0:
            context = torch.zeros(n, 4, c, h, w, dtype=torch.float32, device=features.device)
            context[:, : st.stage] = self._pixel_input(lattice[:, : st.stage])
            context = context.reshape(n, 4 * c, h, w)
        elif self.stages[step].context is not None:  # stage 0's pixels of the steps before
            known = known_before(self.schedule, step, h, w, ring).to(features.device)
            context = self._pixel_input(lattice[:, 0]) * known
        else:
            context = None
        if context is not None and available is not None:
            context = context * available
        return self.stages[step](features, context)

    @staticmethod
    def _with_halo(lattice: torch.Tensor, available: Optional[torch.Tensor],
                   size: tuple[int, int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A `pixel_halo` model's (lattice with its ring, availability): a lattice of the
        features' size gets an empty ring (what models without a halo read as padding)."""
        h, w = size
        if lattice.shape[-2:] == (h + 2 * HALO, w + 2 * HALO):
            return lattice, available
        if lattice.shape[-2:] != (h, w):
            raise ValueError(f"lattice {tuple(lattice.shape[-2:])} fits neither the tile {h}x{w} nor its ring")
        n = lattice.shape[0]
        padded = F.pad(lattice.reshape(n, -1, h, w), (HALO,) * 4).reshape(*lattice.shape[:3], h + 2 * HALO,
                                                                            w + 2 * HALO)
        return padded, _interior(h, w).to(lattice.device)

    # ---- fixed point -----------------------------------------------------
    def calibrated_scales(self) -> set[str]:
        """Names of the buffers `calibrate_fixed` chooses from data (streams' scales, the output
        scales of requantisations and of convolutions into a ReLU); `wire_fixed` derives
        every other grid from them."""
        names = set()
        for name, module in self.named_modules():
            if isinstance(module, Stream):
                names.add(f"{name}.scale")
            elif isinstance(module, Requant) or (isinstance(module, FixedConv2d) and module.relu):
                names.add(f"{name}.out_scale")
        return names

    def calibrate_fixed(self, batches, headroom: float = 2.0) -> None:
        """Choose a fixed-point model's power-of-two activation scales from the ranges its
        float layers reach on `batches` (iterable of uint8 (N, C, H, W)), then `wire_fixed`.
        The weights are the float ones (e.g. a float model's, loaded with strict=False).
        `headroom`: activation ranges are this many times the largest value seen (photos
        beyond the calibration set reach further; clipping costs more than a coarser grid)."""
        with calibrating(), torch.no_grad():
            for x in batches:
                sample = self.sample_posterior(x, latents="mean")
                self.pixel_log_prob(sample.features, x)
        act_hi = (1 << self.config.fixed_bits[0]) - 1
        for module in self.modules():
            if isinstance(module, Stream) and module is not self.feature_grid:
                module.scale.copy_(power_of_two_scale(module.observed, module.limit, 2 * headroom))
            elif isinstance(module, Requant):
                module.out_scale.copy_(power_of_two_scale(module.observed, module.hi, headroom))
            elif isinstance(module, FixedConv2d) and module.relu:
                module.out_scale.copy_(power_of_two_scale(module.observed, act_hi, headroom))
        peak = self.to_pixels.observed.view(-1, 4).amax(dim=1)  # pixel_shuffle: channel c from 4c..4c+3
        self.feature_grid.scale.copy_(power_of_two_scale(peak, self.feature_grid.limit, headroom))
        for module in self.modules():
            if hasattr(module, "observed"):
                module.observed = None
        self.wire_fixed()

    def set_uniform_scales(self, stream: float = 2.0**9, activation: float = 2.0**5) -> None:
        """Fixed-point scales without data: every stream `stream` integers per unit, every
        activation and pixel feature `activation` (powers of two; for seeded test models,
        which must be the same on every machine), then `wire_fixed`."""
        for module in self.modules():
            if isinstance(module, Stream):
                module.scale.fill_(activation if module is self.feature_grid else stream)
            elif isinstance(module, Requant):
                module.out_scale.fill_(activation)
            elif isinstance(module, FixedConv2d) and module.relu:
                module.out_scale.fill_(activation)
        self.wire_fixed()

    def wire_fixed(self) -> None:
        """Give every fixed-point layer its input grid (its producer's output) and the output
        grid it writes (a stream's, an activation's, a Gaussian's or the coding grids)."""
        cfg = self.config
        act_bits = cfg.fixed_bits[0]
        enc, dec, features = self.encoder_stream, self.decoder_stream, self.feature_grid
        stream, feature = enc.limit, features.limit
        self.stem.set_input(255.0, 255.0)
        self.stem.set_output(enc.scale, -stream, stream)
        for block in self.encoder:
            _wire_block(block, enc.scale, enc.scale, -stream, stream, act_bits)
        mean_unit, log_std_unit = latent_units(cfg.latent_grid)
        mean_limit = LATENT_RANGE * mean_unit
        std_lo, std_hi = LATENT_LOG_STD_MIN * log_std_unit, LATENT_LOG_STD_MAX * log_std_unit
        for group in self.decoder:
            z = torch.ones(group.zdim, dtype=torch.float64)
            _wire_block(group.prior, dec.scale, torch.cat([z * mean_unit, z * log_std_unit, dec.scale]),
                        torch.cat([-z * mean_limit, z * std_lo, torch.full_like(dec.scale, -stream)]),
                        torch.cat([z * mean_limit, z * std_hi, torch.full_like(dec.scale, stream)]), act_bits)
            spread = std_hi - std_lo
            _wire_block(group.posterior, torch.cat([dec.scale, enc.scale]),
                        torch.cat([z * mean_unit, z * log_std_unit]),
                        torch.cat([-2 * z * mean_limit, -z * spread]), torch.cat([2 * z * mean_limit, z * spread]),
                        act_bits)
            group.z_proj.set_input(1.0 / cfg.latent_grid, LATENT_RANGE / cfg.latent_grid)
            group.z_proj.set_output(dec.scale, -stream, stream)
            _wire_block(group.out, dec.scale, dec.scale, -stream, stream, act_bits)
        self.pixel_entry.in_scale.copy_(dec.scale)
        self.to_pixels.set_input(self.pixel_entry.out_scale, self.pixel_entry.largest)
        self.to_pixels.set_output(features.scale.repeat_interleave(4), -feature, feature)
        head = head_grid(cfg)
        for stage in self.stages:
            trunk, limit = stage.trunk.scale, stage.trunk.limit
            stage.feat.set_input(features.scale, feature)
            stage.feat.set_output(trunk, -limit, limit)
            for context in (stage.context, stage.ring):
                if context is not None:
                    context.set_input(255.0, 255.0)
                    context.set_output(trunk, -limit, limit)
            stage.mid_entry.in_scale.copy_(trunk)
            stage.mid1.set_input(stage.mid_entry.out_scale, stage.mid_entry.largest)
            stage.mid1.set_output(stage.mid1.out_scale.clone(), 0, (1 << act_bits) - 1)
            stage.mid2.set_input(stage.mid1.out_scale, (1 << act_bits) - 1)
            stage.mid2.set_output(trunk, -limit, limit)
            stage.head_entry.in_scale.copy_(trunk)
            stage.head.set_input(stage.head_entry.out_scale, stage.head_entry.largest)
            scale, offset, lo, hi = (torch.tensor(v, dtype=torch.float64) for v in head)
            stage.head.set_output(scale, lo, hi, offset)

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

    def nelbo(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
              available: Optional[torch.Tensor] = None) -> NelboTerms:
        """Single-sample negative ELBO with analytic KLs, in bits per image.

        Args:
            x: uint8 (N, C, H, W); with `available`, (N, C, H + 4 HALO, W + 4 HALO): the
                tile inside its ring of neighbouring pixels (a `pixel_halo` model).
            mask: optional bool (N, 1, H, W); only True pixels count in the
                reconstruction term (tile padding is not coded).
            available: (N, 1, H/2 + 2 HALO, W/2 + 2 HALO), as in `stage_params`.
        """
        inner = x if available is None else x[..., 2 * HALO : -2 * HALO, 2 * HALO : -2 * HALO]
        sample = self.sample_posterior(inner)
        log_prob = self.pixel_log_prob(sample.features, x, mask, available)
        recon = -log_prob.sum(dim=(1, 2, 3, 4)) / LN2
        kl_bits = torch.stack([kl.sum(dim=(1, 2, 3)) for kl in sample.kl_nats], dim=1) / LN2
        return NelboTerms(recon + kl_bits.sum(1), recon, kl_bits)

    def pixel_log_prob(self, features: torch.Tensor, x: torch.Tensor,
                       mask: Optional[torch.Tensor] = None, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(x | z) in nats, (N, 4, C, H/2, W/2) by sub-lattice stage; 0 where
        `mask` (bool (N, 1, H, W), optional) is False. x and `available` as in `nelbo`."""
        lattice = split_lattice(x)
        inner = lattice if available is None else lattice[..., HALO:-HALO, HALO:-HALO]
        out = []
        for s in range(4):
            params = self.stage_params(features, lattice, s, available=available)
            out.append(mixture_log_prob(params, inner[:, s].float()))
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


def _wire_block(block: Block, in_scale: torch.Tensor, out_scale: torch.Tensor, lo, hi, act_bits: int) -> None:
    """A fixed-point `Block`'s grids: input `in_scale` (a stream's), output `out_scale` in [lo, hi]."""
    act_hi = (1 << act_bits) - 1
    block.entry.in_scale.copy_(in_scale)
    source, largest = block.entry.out_scale, block.entry.largest
    for conv in (block.c1, block.c2, block.c3):
        conv.set_input(source, largest)
        conv.set_output(conv.out_scale.clone(), 0, act_hi)
        source, largest = conv.out_scale, act_hi
    block.c4.set_input(source, largest)
    block.c4.set_output(out_scale, lo, hi)


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
