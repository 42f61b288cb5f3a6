"""Format version 5 (`Format.adaptation`): per-image gains and biases of the pixel heads.

The photo model is fitted to many photos; on one photo its pixel heads are a
little off (too narrow, too wide, means biased, mixture weights). At a high
effort the encoder fits, for each of the four sub-lattice stages, a gain and a
bias for every output of the stage head's last layer (`HierarchicalVAE.stage_raw`,
`params_per_position` outputs: 30 for the RGB model, 240 numbers in all):

    raw' = raw * (1 + gain / GRID) + bias / GRID

by a few Adam steps on the image's own subpixels (latents at the posterior mean,
teacher-forced context: the outputs of the head are computed once, only the
affine map on them is fitted, so a step costs no network call). The coder then
calibrates the log-scales per tile (`calibrate`, versions 3 and 9), so the fit
does too: every fitted tile, stage and channel gets a free log-scale offset,
searched first alone (the calibrated baseline) and then with the gains and biases,
which so learn only what calibration cannot do; the adaptation is kept only if
it beats that baseline by more than its own bits. The fitted
values are rounded to the integer grid, coded in the payload
(`adaptation_steps`: a flag, then the integers) and counted in the file; the
encoder then codes the tiles with exactly the rounded values, which the decoder
pops before its first tile and applies (`Adaptation.apply`, float32, elementwise:
the same numbers on both sides whatever the threads). Decoding costs one
multiply-add per head output more, whatever the effort.

The fit is the encoder's alone (the decoder only reads its result), so it may use
any estimate; it is still made deterministic (fixed samples, one torch thread per
worker, gradients summed in a fixed order) so that a file is the same whatever
the thread count, as the golden tests demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from vaezip.entropy import coders
from vaezip.entropy.coders import Steps
from vaezip.network.config import ModelConfig
from vaezip.network.model import HierarchicalVAE, mixture_log_prob, params_per_position, split_lattice, split_params

GRID = 256
"""Gains and biases are integers k meaning k / GRID (exact in float32)."""
LIMIT = 512
"""|k| <= LIMIT: gains and biases in [-2, 2]."""
SPREAD = 16
"""The integers' code: P(k) proportional to 2^(-|k| / SPREAD): 0 costs 5.5 bits, |k| = 16 costs 6.5."""
STAGES = 4
OFFSET_GRID = tuple(np.arange(-2.0, 3.01, 1.0))
"""Log-scale offsets (nats) the fit's calibration tries per tile, stage and channel
before refining to 1/8 nat."""
OFFSET_LR = 0.05
"""Adam learning rate of those offsets while the adaptation is fitted, in nats."""


@dataclass(frozen=True)
class FitSettings:
    """What the encoder spends at one effort level.

    Attributes:
        steps: Adam steps (0: no adaptation, the file codes the model as shipped).
        tiles: at most this many tiles (evenly spread) give the fit its subpixels, and as
            many others (where the image has them) judge whether it pays.
        positions: positions of each stage per step (a fixed random sample).
        lr: Adam learning rate, in units of the fitted values (a gain of 1 doubles an output).
        verify: also code the tiles without the adaptation and keep the smaller
            (`imagecodec`; one more encode of the tiles).
        rivals: lower effort levels whose fits are also coded; the smallest file wins
            (one more fit and encode each), so this level is never larger than those.
    """

    steps: int = 0
    tiles: int = 0
    positions: int = 0
    lr: float = 0.004
    verify: bool = False
    rivals: tuple[int, ...] = ()


EFFORT_SETTINGS: dict[int, FitSettings] = {
    1: FitSettings(), 2: FitSettings(), 3: FitSettings(),
    4: FitSettings(steps=80, tiles=16, positions=1024),
    5: FitSettings(steps=160, tiles=32, positions=2048),
    6: FitSettings(steps=240, tiles=64, positions=2048),
    7: FitSettings(steps=320, tiles=128, positions=4096),
    8: FitSettings(steps=400, tiles=256, positions=4096, verify=True, rivals=(6,)),
    9: FitSettings(steps=600, tiles=1024, positions=4096, verify=True, rivals=(6,)),
}
"""By `versions.EFFORTS` level. 1 to 3 (the default, `versions.DEFAULT_EFFORT`) are the
version 4 encoder: no faster lever exists yet. Efforts 8 and 9 fit every tile of most
photos, with no other tiles to judge the fit on; their fit was measured larger than effort
6's on some photos (0.1-0.2 %), so they also code effort 6's fit (docs/RESULTS.md)."""


@dataclass(frozen=True)
class Adaptation:
    """Integer gains and biases (STAGES, P) int64 of the stage heads' P outputs."""

    gains: np.ndarray
    biases: np.ndarray
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def apply(self, raw: torch.Tensor, stage: int) -> torch.Tensor:
        """raw (N, P, h, w) float32 -> raw * (1 + gain / GRID) + bias / GRID of `stage`."""
        if stage not in self._tensors:  # one tensor pair per stage, shared by the pool's threads
            factor = (1.0 + self.gains[stage] / GRID).astype(np.float32)
            shift = (self.biases[stage] / GRID).astype(np.float32)
            self._tensors[stage] = (torch.from_numpy(factor).view(1, -1, 1, 1),
                                    torch.from_numpy(shift).view(1, -1, 1, 1))
        factor, shift = self._tensors[stage]
        return raw * factor + shift

    def apply_integers(self, out: torch.Tensor, stage: int, grid) -> torch.Tensor:
        """A fixed-point model's head integers (N, P, h, w) (`model.head_grid`: out = raw *
        scale + offset, rounded, in [lo, hi]) under the same map, in integers: with
        d = out - offset, out' = clamp(floor((d * (GRID + gain) + bias * scale) / GRID
        + offset + 1/2), lo, hi), each step exact in float64 (|numerator| < 2^40)."""
        scale, offset, lo, hi = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in grid)
        gain = torch.from_numpy(self.gains[stage].astype(np.float64)).view(1, -1, 1, 1)
        bias = torch.from_numpy(self.biases[stage].astype(np.float64)).view(1, -1, 1, 1)
        numerator = (out.double() - offset) * (GRID + gain) + bias * scale + GRID * offset + GRID // 2
        adapted = torch.floor(numerator / GRID)
        return torch.maximum(torch.minimum(adapted, hi), lo).to(out.dtype)

    @staticmethod
    def zeros(config: ModelConfig) -> "Adaptation":
        """No change: what the encoder codes when it adapts nothing (the flag alone)."""
        zeros = np.zeros((STAGES, params_per_position(config)), dtype=np.int64)
        return Adaptation(zeros, zeros)

    @property
    def active(self) -> bool:
        """Whether it changes anything (else only the flag is coded)."""
        return bool(self.gains.any() or self.biases.any())

    def bits(self) -> float:
        """What `adaptation_steps` codes this in, bits (flag included)."""
        if not self.active:
            return 1.0
        values = np.concatenate([self.gains.reshape(-1), self.biases.reshape(-1)])
        return 1.0 + float(-np.log2(_probabilities()[values + LIMIT]).sum())

    def __eq__(self, other) -> bool:
        return (isinstance(other, Adaptation) and np.array_equal(self.gains, other.gains)
                and np.array_equal(self.biases, other.biases))


@lru_cache(maxsize=1)
def _probabilities() -> np.ndarray:
    """(2 * LIMIT + 1,) float64, integer k at index k + LIMIT."""
    p = 2.0 ** (-np.abs(np.arange(-LIMIT, LIMIT + 1)) / SPREAD)
    return p / p.sum()


def adaptation_steps(config: ModelConfig, truth: Optional[Adaptation] = None) -> Steps:
    """The per-image adaptation of a model with `config`, as steps in pop order
    (`coders.Steps`); returns it, or None (the model as shipped).

    A flag (uniform, 1 bit), then, if set, the gains and the biases, stage by stage,
    each integer coded with `SPREAD`'s two-sided geometric code. The encoder passes its
    `truth` (all zeros, `Adaptation.zeros`, codes the flag clear), the decoder nothing.
    """
    outputs = params_per_position(config)
    encoding = truth is not None
    if encoding and truth.gains.shape != (STAGES, outputs):
        raise ValueError(f"adaptation of shape {truth.gains.shape} for a model with {outputs} head outputs")
    flag = yield coders.uniform(2, 1), np.array([int(truth.active)]) if encoding else None
    if not int(np.asarray(flag)[0]):
        return None
    values = coders.iid_categorical(_probabilities(), 2 * STAGES * outputs)
    coded = yield values, (np.concatenate([truth.gains.reshape(-1), truth.biases.reshape(-1)]) + LIMIT
                           if encoding else None)
    coded = np.asarray(coded, dtype=np.int64).reshape(2, STAGES, outputs) - LIMIT
    return Adaptation(coded[0], coded[1])


# ---- the encoder's fit ------------------------------------------------------------


@dataclass
class _Stage:
    """One stage's fitting data: head outputs (P, M) float32, true values (C, M) float32
    and the fitted tile (M,) int64 (0..tiles-1) each position belongs to."""

    raw: torch.Tensor
    values: torch.Tensor
    tiles: torch.Tensor


def _tile_choice(count: int, settings: FitSettings) -> tuple[np.ndarray, np.ndarray]:
    """The tiles (indices of `count`, raster order) the fit uses and the other tiles its
    result is judged on: evenly spread, alternating, up to `settings.tiles` each; nothing
    to judge on (judged in-sample) when the image has no more tiles than that."""
    if count <= settings.tiles:
        return np.arange(count), np.arange(0)
    spread = np.unique(np.linspace(0, count - 1, min(count, 2 * settings.tiles)).round().astype(np.int64))
    return spread[0::2], spread[1::2]


def _stage_data(net, pixels: np.ndarray, tile: int, chosen: np.ndarray) -> list[_Stage]:
    """Head outputs and true values of the real positions of tiles `chosen`, latents at
    the posterior mean, computed with the coding network `net` (`inference.Network`)."""
    from vaezip.coding.bitsback import batch_limit, image_rings
    from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles

    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    limit = batch_limit(tile)  # a tile's coding batch, roughly: its rings' neighbours (`pixel_halo`)
    raws: list[list[torch.Tensor]] = [[] for _ in range(STAGES)]
    values: list[list[torch.Tensor]] = [[] for _ in range(STAGES)]
    tiles: list[list[torch.Tensor]] = [[] for _ in range(STAGES)]
    for start in range(0, len(chosen), 16):
        indices = chosen[start : start + 16]
        x = torch.from_numpy(np.concatenate([lattice_to_pixels(split_tiles(pixels, grid, range(i, i + 1))) for i in indices]))
        masks = torch.from_numpy(np.concatenate([grid.pixel_masks(range(i, i + 1)) for i in indices]))
        acts = net.bottom_up(x)
        walk = net.top_down_steps(len(x), tile, tile, acts)
        try:
            _, _, posterior = next(walk)
            while True:
                _, _, posterior = walk.send(posterior.mean)
        except StopIteration as done:
            features = done.value
        lattice, real = split_lattice(x), split_lattice(masks)[:, :, 0]  # (n, 4, C, h, w), (n, 4, h, w)
        context, available = lattice, None
        if net.model.config.pixel_halo:  # with the rings the coder reads (`bitsback.image_rings`)
            rings = [image_rings(pixels, grid, range(i, i + 1), i // limit * limit) for i in indices]
            context = torch.from_numpy(np.concatenate([r[0] for r in rings]))
            available = torch.cat([r[1] for r in rings])
        for s in range(STAGES):
            raw = net.stage_raw(features, context, s, available)  # (n, P, h, w)
            if net.model.fixed:  # integers -> the float head's outputs
                raw = net.model.head_raw(raw)
            keep = real[:, s]
            raws[s].append(raw.permute(1, 0, 2, 3)[:, keep])
            values[s].append(lattice[:, s].permute(1, 0, 2, 3)[:, keep].float())
            tiles[s].append((start + torch.arange(len(indices)))[:, None, None].expand_as(keep)[keep])
    with torch.inference_mode(False):  # normal tensors: autograd may save them
        return [_Stage(torch.cat(r, dim=1).clone(), torch.cat(v, dim=1).clone(), torch.cat(t).clone())
                for r, v, t in zip(raws, values, tiles)]


def _position_nats(model: HierarchicalVAE, stage: _Stage, gain: torch.Tensor, bias: torch.Tensor,
                   offsets: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """−log p (C, m) in nats of the stage's values at positions `rows` (all when None), with
    the head outputs mapped by `gain` and `bias` (P,) and each position's log-scales shifted
    by its tile's `offsets` (tiles, C), in nats."""
    raw, values, tiles = (stage.raw, stage.values, stage.tiles) if rows is None else (
        stage.raw[:, rows], stage.values[:, rows], stage.tiles[rows])
    adapted = raw * (1.0 + gain[:, None]) + bias[:, None]
    float_config = replace(model.config, fixed_bits=None)  # the fit is float (the file holds integers)
    params = split_params(adapted.T[:, :, None, None], float_config)  # positions as a batch of 1x1 images
    params = replace(params, log_scales=params.log_scales + offsets[tiles][:, :, None, None, None])
    return -mixture_log_prob(params, values.T[:, :, None, None])[:, :, 0, 0].T


def _nats(model: HierarchicalVAE, stage: _Stage, gain: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor,
          rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`_position_nats` summed."""
    return _position_nats(model, stage, gain, bias, offsets, rows).sum()


def _calibrated_offsets(model: HierarchicalVAE, stage: _Stage, tiles: int, rows: torch.Tensor,
                        gain: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each tile's best log-scale offsets (tiles, C) on positions `rows` with the head
    outputs mapped by `gain` and `bias` (`_affine`), and their nats there: a walk over
    `OFFSET_GRID` (each channel's cost depends on its own offset only), then halves of its
    step around the best, as the coder's calibration searches."""
    channels = model.config.channels
    where = stage.tiles[rows]

    def costs(candidates: torch.Tensor) -> torch.Tensor:  # (K, tiles, C) -> nats (K, tiles, C)
        out = torch.zeros_like(candidates)
        for k, offsets in enumerate(candidates):
            out[k].index_add_(0, where, _position_nats(model, stage, gain, bias, offsets, rows).T)
        return out

    grid = torch.tensor(OFFSET_GRID)[:, None, None].expand(-1, tiles, channels)
    cost = costs(grid)
    best = grid.gather(0, cost.argmin(0, keepdim=True))[0]
    step = float(OFFSET_GRID[1] - OFFSET_GRID[0])
    for _ in range(3):  # to 1/8 nat
        step /= 2
        around = torch.stack([best - step, best, best + step])
        cost = costs(around)
        best = around.gather(0, cost.argmin(0, keepdim=True))[0]
    return best, float(cost.min(0).values.sum())


def _affine(adaptation: Adaptation, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage `stage`'s gains and biases (P,) float32 of `adaptation`, as fractions."""
    return (torch.from_numpy(adaptation.gains[stage] / GRID).float(),
            torch.from_numpy(adaptation.biases[stage] / GRID).float())


def _sample_rows(stage: _Stage, positions: int) -> torch.Tensor:
    """A strided sample of at most about `positions` of the stage's positions."""
    return torch.arange(0, stage.values.shape[1], max(1, stage.values.shape[1] // positions))


def fit(net, pixels: np.ndarray, tile: int, effort: int) -> Optional[Adaptation]:
    """The encoder's adaptation for an (H, W, C) uint8 image at `effort`, or None (none
    fitted, or the rounded fit would not pay for its own bits against the calibrated
    model, judged on tiles it was not fitted on where the image has them, scaled to the
    image).

    Args:
        net: the coding network (`inference.coding_network` of the format version).
        tile: the tile side the image is coded with.
    """
    from vaezip.coding.tiles import TileGrid

    settings = EFFORT_SETTINGS[effort]
    if settings.steps == 0:
        return None
    fitted_tiles, judge_tiles = _tile_choice(TileGrid(pixels.shape[0], pixels.shape[1], tile).count, settings)
    data = _stage_data(net, pixels, tile, fitted_tiles)
    if not sum(d.values.shape[1] for d in data):
        return None
    adaptation, saved_nats, judged = _fit(net.model, data, settings, net.map_threads)
    if not adaptation.active:
        return None
    if len(judge_tiles):
        data = _stage_data(net, pixels, tile, judge_tiles)
        saved_nats, judged = _judged_saving(net.model, data, adaptation, settings.positions)
    scale = pixels.shape[0] * pixels.shape[1] / 4 / max(1, judged / STAGES)  # judged positions -> image
    if saved_nats * scale / np.log(2) <= adaptation.bits():
        return None
    return adaptation


def _judged_saving(model: HierarchicalVAE, data: list[_Stage], adaptation: Adaptation,
                   positions: int) -> tuple[float, int]:
    """The nats `adaptation` saves on a sample of about `positions` a stage of `data`
    (tiles it was not fitted on), each side with its own best per-tile offsets, and the
    number of positions judged."""
    saved, judged = 0.0, 0
    with torch.no_grad():
        for s, d in enumerate(data):
            if not len(d.tiles):
                continue
            tiles, rows = 1 + int(d.tiles.max()), _sample_rows(d, positions)
            saved += _calibrated_offsets(model, d, tiles, rows, *_affine(Adaptation.zeros(model.config), s))[1]
            saved -= _calibrated_offsets(model, d, tiles, rows, *_affine(adaptation, s))[1]
            judged += len(rows)
    return saved, judged


def _fit(model: HierarchicalVAE, data: list[_Stage], settings: FitSettings,
         map_stages) -> tuple[Adaptation, float, int]:
    """The rounded adaptation fitted to `data`, the nats it saves there against the
    calibrated baseline (the per-tile offsets searched alone) and the positions of `data`.

    `map_stages(fn, stages)` runs `fn` on each stage (`inference.Network.map_threads`);
    the gradients are summed in stage order, so the result does not depend on it.
    """
    outputs = params_per_position(model.config)
    tiles = 1 + max(int(d.tiles.max()) for d in data if len(d.tiles))
    rng = np.random.default_rng(0)
    with torch.inference_mode(False), torch.enable_grad():
        gains = torch.zeros(STAGES, outputs, requires_grad=True)
        biases = torch.zeros(STAGES, outputs, requires_grad=True)
        offsets = torch.zeros(STAGES, tiles, model.config.channels, requires_grad=True)

        def total_nats(adaptation: Adaptation) -> float:
            with torch.no_grad():
                return sum(float(_nats(model, d, *_affine(adaptation, s), offsets[s])) for s, d in enumerate(data))

        none = Adaptation.zeros(model.config)
        with torch.no_grad():
            for s, d in enumerate(data):
                offsets[s] = _calibrated_offsets(model, d, tiles, _sample_rows(d, settings.positions),
                                                 *_affine(none, s))[0]
        baseline = total_nats(none)
        fitted = [gains, biases, offsets]
        optimizer = _Adam(fitted, [settings.lr, settings.lr, OFFSET_LR])
        for _ in range(settings.steps):
            samples = [torch.from_numpy(rng.choice(d.values.shape[1], min(settings.positions, d.values.shape[1]),
                                                   replace=False)) for d in data]

            def stage_grads(s: int, samples: list[torch.Tensor] = samples):
                loss = _nats(model, data[s], gains[s], biases[s], offsets[s], samples[s]) / max(1, len(samples[s]))
                return torch.autograd.grad(loss, fitted)

            grads = map_stages(stage_grads, list(range(STAGES)))
            for i, tensor in enumerate(fitted):
                tensor.grad = sum(g[i] for g in grads)  # summed in stage order: the same on any thread count
            optimizer.step()
        adaptation = Adaptation(_rounded(gains), _rounded(biases))
        # The offsets moved with the adaptation: the baseline is the better of both sets.
        saved = min(baseline, total_nats(none)) - total_nats(adaptation)
        return adaptation, saved, sum(d.values.shape[1] for d in data)


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's update, no weight decay) on a few tensors, each
    with its own learning rate. Not torch.optim: its first optimizer of a process imports
    torch._dynamo and sympy, 1.3 s of an effort-4 compress that fits in about 1 s."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, tensors: list[torch.Tensor], rates: list[float]):
        self.tensors, self.rates, self.count = tensors, rates, 0
        self.first = [torch.zeros_like(t) for t in tensors]
        self.second = [torch.zeros_like(t) for t in tensors]

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        beta1, beta2 = self.BETAS
        correction1, correction2 = 1 - beta1 ** self.count, 1 - beta2 ** self.count
        for tensor, rate, first, second in zip(self.tensors, self.rates, self.first, self.second):
            first.lerp_(tensor.grad, 1 - beta1)
            second.mul_(beta2).addcmul_(tensor.grad, tensor.grad, value=1 - beta2)
            denominator = (second.sqrt() / correction2 ** 0.5).add_(self.EPS)
            tensor.addcdiv_(first, denominator, value=-rate / correction1)


def _rounded(values: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(values.detach().double().numpy() * GRID), -LIMIT, LIMIT).astype(np.int64)
