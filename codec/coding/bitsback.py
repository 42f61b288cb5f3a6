"""Hierarchical bits-back coding of an image's tiles, batch by batch.

One batch of tiles is coded as (ANS is last-in first-out):

  encode: bottom-up on x; for each group g, top-down: pop z_g with the
          discretised posterior (borrows bits); push x with p(x | z) stage by
          stage; push each z_g with its discretised prior, last group first.
  decode: for each group g, top-down: pop z_g with the prior; pop x stage by
          stage; bottom-up on x; rebuild the posteriors; push each z_g back with
          its posterior, last group first (returns the borrowed bits).

One description serves both directions: `_batch_steps` yields the batch's coding
steps in decode order (`coders.Steps`); the decoder pops them (`coders.pop_steps`),
the encoder records them with its true values and pushes them reversed
(`coders.record_steps`, `coders.push_recorded`). The encoder's latents are the
values it pops with the posteriors as it walks down (`coders.Borrow`); the
decoder's last steps push them back (`coders.Return`). Both directions run the
network under the format version's numerics (`inference.Network`) with the same
tensor shapes and get every probability table from `quantize`, so the decoder
rebuilds the encoder's integer distributions exactly.

Start-up: a batch can only borrow bits already on the stack. The encoder grows
its batches with the bits available (measured, with a roll-back if a batch would
run the stack dry); a batch that cannot borrow is coded *deterministic*: its
latents are the rounded posterior means, pushed with the prior, borrowing
nothing. Only a batch facing a too-shallow stack is deterministic: a batch
whose cost is unknown or looks too high for the stack (the first batch on a
stack holding an alpha plane or earlier images of a `vaezip pack` archive, the
batch after a deterministic one) tries bits-back on one tile first. The schedule (batch sizes,
deterministic flag) goes into the header.

Tile sets: `encode_tile_sets` codes the tiles of several images of one tile
size as one sequence (image after image, each in raster order), so a batch
may hold tiles of several small images and the network runs on full batches
(a data set of 28x28 digits would otherwise cost one network call per image).
`encode_tiles` is the one-image case.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from vaezip.coding import calibrate, quantize
from vaezip.coding.tiles import TileGrid, lattice_to_pixels, merge_tiles, pad_stage, split_tiles, stage_masks
from vaezip.entropy import coders, exact
from vaezip.entropy.coders import AnsCoder, Codec
from vaezip.errors import CorruptFileError
from vaezip.format.container import DETERMINISTIC_FLAG
from vaezip.format.versions import NEWEST_FLOAT, Format
from vaezip.network.inference import ROW_CHUNK, Later, Network, chunk_slices
from vaezip.network.model import Gaussian, MixtureParams, ring_mask

MAX_BATCH = 24  # tiles per network call: bounds memory by the batch, not the image
MAX_BATCH_PIXELS = MAX_BATCH * 64 * 64  # the same bound for smaller tiles (tile sets of small images)
SAFETY_BITS = 64  # never let the posterior pops bring the stack below this


@dataclass(frozen=True)
class CodingParams:
    """What encoder and decoder must agree on besides the model."""

    tile: int
    latent_grid: float
    fmt: Format = NEWEST_FLOAT
    """Format version: which numerics and probability-table layout apply (a fixed-point
    model codes version 6: `imagecodec.format_for`)."""

    @property
    def radius(self) -> int:
        """Latent integers live in [-radius, radius] (z in [-8, 8])."""
        return int(round(8.0 / self.latent_grid))


def _numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().reshape(-1)


def latent_codec(g: Gaussian, params: CodingParams) -> Codec:
    """Codec for latent integers k (z = k * grid) under a diagonal Gaussian.

    With `numerics.exact` (version 6) the Gaussian's integers (`exact_latent_params`) are
    coded by integer tables (`exact.gaussian_codec`). Else the std is exponentiated in
    numpy (float64), not torch: one code path for every thread count.
    """
    if params.fmt.numerics.exact:
        mean_q, log_std_q, grid_bits = exact_latent_params(g, params)
        return exact.gaussian_codec(mean_q, log_std_q, grid_bits, params.radius)
    means = _numpy64(g.mean) / params.latent_grid
    stds = np.exp(_numpy64(g.log_std)) / params.latent_grid
    return coders.quantized_gaussian(means, stds, params.radius)


def exact_latent_params(g: Gaussian, params: CodingParams) -> tuple[np.ndarray, np.ndarray, int]:
    """The integers of a Gaussian on version 6's grids: means in quarter grid steps and
    log-stds in 1/16 (z units), each (n,) int64, and grid_bits (grid = 2**-grid_bits).

    Raises:
        ValueError: the grid is not a power of two, or a mean or log-std is off its grid
            (the fixed-point network puts them on it exactly).
    """
    mantissa, exponent = math.frexp(params.latent_grid)  # exact, no logarithm
    grid_bits = 1 - exponent
    if mantissa != 0.5:
        raise ValueError(f"exact latent tables need a grid 2**-b, not {params.latent_grid}")
    mean_q = _numpy64(g.mean) * (exact.LATENT_MEAN_STEPS * 2.0**grid_bits)  # exact: a power of two
    log_std_q = _numpy64(g.log_std) * exact.LATENT_LOG_STD_STEPS
    for name, a in (("mean", mean_q), ("log_std", log_std_q)):
        if not np.array_equal(a, np.rint(a)):
            raise ValueError(f"latent {name}s are not on the exact grid")
    return mean_q.astype(np.int64), log_std_q.astype(np.int64), grid_bits


def _start_step(net: Network, features: torch.Tensor, lattice: np.ndarray, step: int,
                ring: Optional["TileRing"] = None) -> Callable[[], MixtureParams]:
    """Start the network of one pixel step on the batch's `lattice` as far as decoded (with a
    `ring`, format version 8, also the neighbouring tiles' pixels around each tile); returns
    the call that waits for its mixture parameters. Reads a copy: `lattice` may change."""
    if ring is None:
        return net.step_params_started(features, torch.from_numpy(lattice.copy()), step)
    return net.step_params_started(features, torch.from_numpy(ring.lattice(lattice)), step, ring.available)


@dataclass(frozen=True)
class _StepPlan:
    """A pixel step's integer mixtures, before its offsets, and on the encoder the offsets
    (`calibrate`) it chose for its true values (None on the decoder)."""

    q: quantize.QuantizedMixture
    offsets: Optional[np.ndarray] = None  # (C,) int64, with `fmt.scale_offsets`
    deltas: Optional[np.ndarray] = None  # (T, C) int64, with `fmt.tile_offsets` (`_tile_counts`)


def _tile_counts(mask: np.ndarray) -> np.ndarray:
    """Positions (T,) of each tile that has any in this step (`mask` (n, h, w)), in row order."""
    counts = mask.reshape(len(mask), -1).sum(axis=1)
    return counts[counts > 0]


def _plan_step(network: Callable[[], MixtureParams], mask: np.ndarray, fmt: Format,
               truth: Optional[np.ndarray] = None) -> _StepPlan:
    """Wait for a step's `network` (`_start_step`) and quantise its mixtures; with its true
    values `truth` (m, C), the encoder's, also choose the step's offsets."""
    q = quantize.quantize_mixture(network(), mask, fmt)
    if truth is None or not fmt.scale_offsets:
        return _StepPlan(q)
    offsets = calibrate.choose_offsets(q, truth)
    counts = _tile_counts(mask)
    deltas = calibrate.tile_deltas(q, truth, offsets, counts) if fmt.tile_offsets and counts.size else None
    return _StepPlan(q, offsets, deltas)


def _stage_steps(net: Network, plan: _StepPlan, mask: np.ndarray, fmt: Format,
                 truth: Optional[np.ndarray] = None) -> coders.Steps:
    """Steps of the real subpixels (m, C) of one pixel step (`HierarchicalVAE.schedule`: a
    sub-lattice stage, or part of stage 0) as `plan`ned, in pop order; returns them (int64).

    With `fmt.scale_offsets` the step's log-scale offsets (`calibrate`) pop first, with
    `fmt.tile_offsets` then each tile's change of them; the encoder's `plan` holds the ones
    it chose for its true values `truth` (None on the decoder).
    """
    q, channels = plan.q, plan.q.means.shape[1]
    if fmt.scale_offsets:
        offsets = yield calibrate.offset_codec(channels), plan.offsets
        counts = _tile_counts(mask)
        if fmt.tile_offsets and counts.size:
            deltas = yield calibrate.delta_codec(counts.size, channels), plan.deltas
            offsets = calibrate.row_offsets(offsets, deltas, counts)
        q = q.with_scale_offsets(offsets)
    return (yield from _subpixel_steps(net, q, channels, truth))


def _subpixel_steps(net: Network, q: quantize.QuantizedMixture, channels: int,
                    truth: Optional[np.ndarray] = None) -> coders.Steps:
    """Steps of the subpixels (m, C) under the mixtures `q`, in pop order; returns them (int64).

    Channels are autoregressive: R, then G given R, then B given R and G. Without
    `binned_tables` (version 1) each subpixel is coded with one 256-entry table; with
    them as its bin, then its value in the bin (`_binned_codec`), by integer arithmetic
    with `numerics.exact` (version 6, `quantize.ExactChannelTables`). Tables are built
    when a step is pushed or popped, from the channels before it, which by then hold
    their values.
    """
    if q.fmt.binned_tables:
        return (yield _binned_codec(net, q, channels), truth)
    values = np.zeros((len(q.logits), channels), dtype=np.int64)
    for c in range(channels):
        values[:, c] = yield _pmf_codec(q, c, values), None if truth is None else truth[:, c]
    return values


def _pmf_codec(q: quantize.QuantizedMixture, channel: int, values: np.ndarray) -> Codec:
    """Version 1: one 256-entry table per subpixel of `channel` (`quantize.channel_pmf`)."""
    return coders.deferred(lambda: coders.categorical(quantize.channel_pmf(q, channel, values)))


ENCODER_TABLES_AHEAD = 8
"""Table chunks the encoder builds ahead of its pushes (bounds their memory)."""


def _binned_codec(net: Network, q: quantize.QuantizedMixture, channels: int) -> Codec:
    """Codec for a step's values (m, C) int64 under binned tables (versions 2 on).

    Pop order: channel by channel, the bins (value // BIN) chunk by chunk of `ROW_CHUNK`
    rows, then the values in their bins chunk by chunk; push the reverse. Every chunk's
    table is built in the pool as soon as what it reads is known, while the caller codes
    the chunks before it: the decoder starts a chunk's in-bin tables once its bins are
    popped and the next channel's bin tables once its values are; the encoder, which
    knows every value, keeps `ENCODER_TABLES_AHEAD` chunks ahead. The same code as one
    table of all rows per channel and kind; tables are built only while pushing or popping.
    """
    count = len(q.logits)
    binned = quantize.ExactChannelTables if q.fmt.numerics.exact else quantize.ChannelTables
    chunks = chunk_slices(count, ROW_CHUNK)

    def table(build: Callable[..., np.ndarray], *args) -> Callable[[], np.ndarray]:
        return lambda: coders.normalized_rows(build(*args))

    def push(ans: AnsCoder, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.int64)
        bins, rest = values // quantize.BIN, values % quantize.BIN
        jobs = []  # in push order: the last channel first, its values in their bins, then its bins
        for c in reversed(range(channels)):
            tables = binned(q, c, values)
            jobs += [(table(tables.fine, bins[:, c], rows), rest[rows, c]) for rows in reversed(chunks)]
            jobs += [(table(tables.coarse, rows), bins[rows, c]) for rows in reversed(chunks)]
        started = [net.later(build) for build, _ in jobs[:ENCODER_TABLES_AHEAD]]
        try:
            for k, (_, symbols) in enumerate(jobs):
                if k + ENCODER_TABLES_AHEAD < len(jobs):
                    started.append(net.later(jobs[k + ENCODER_TABLES_AHEAD][0]))
                coders.categorical(started[k].result(), normalized=True).push(ans, symbols)
        finally:
            for later in started:
                later.cancel()

    def pop(ans: AnsCoder) -> np.ndarray:
        values = np.zeros((count, channels), dtype=np.int64)
        bins = np.zeros((count, channels), dtype=np.int64)
        tables = [binned(q, c, values) for c in range(channels)]  # each reads the channels before it
        coarse = [net.later(table(tables[0].coarse, rows)) for rows in chunks]
        fine: list[Later] = []
        try:
            for c in range(channels):
                fine = []
                for rows, later in zip(chunks, coarse):
                    bins[rows, c] = coders.categorical(later.result(), normalized=True).pop(ans)
                    fine.append(net.later(table(tables[c].fine, bins[:, c], rows)))
                coarse = []
                for rows, later in zip(chunks, fine):
                    rest = coders.categorical(later.result(), normalized=True).pop(ans)
                    values[rows, c] = quantize.BIN * bins[rows, c] + rest
                    if c + 1 < channels:
                        coarse.append(net.later(table(tables[c + 1].coarse, rows)))
        finally:
            for later in coarse + fine:
                later.cancel()
        return values

    return Codec(push, pop)


def _ring_slices(direction: int, half: int) -> tuple[slice, slice]:
    """(in the ring-padded grid, in the neighbour's grid) along one axis, for a neighbour
    before (-1), beside (0) or after (+1) the tile (`HALO` = 1 sample)."""
    return {-1: (slice(0, 1), slice(half - 1, half)), 0: (slice(1, half + 1), slice(0, half)),
            1: (slice(half + 1, half + 2), slice(0, 1))}[direction]


class TileRing:
    """The ring of neighbouring pixels around each tile of a batch (format version 8, a
    `ModelConfig.pixel_halo` model): one sample (two pixels) on every side of the tile's
    (tile/2) grids, holding a neighbour's lattice where the decoder has it when it codes this
    batch: a neighbour in the same batch (decoded in lockstep: its steps before, as the
    tile's own) or in a later one (the decoder pops batches last first: all of it); nothing
    beyond the image or in an earlier batch (`available` is 0 there). The encoder sees the
    same: its rings depend on the batch's first tile, never on the batch's size.

    Args:
        layout: the `TileGrid` or `TileSequence` the batch belongs to.
        indices: the batch's tiles.
        source: global tile index -> its lattice (4, C, tile/2, tile/2) uint8, for tiles of
            later batches (the encoder's image; the decoder's images as decoded so far).
        batch_start: the first tile of the coding batch `indices` belongs to, if it starts
            earlier (the −ELBO of `evaluation.rates` runs a coding batch in several calls).
    """

    def __init__(self, layout: "TileGrid | TileSequence", indices: range, source: Callable[[int], np.ndarray],
                 batch_start: Optional[int] = None):
        batch_start = indices.start if batch_start is None else batch_start
        grids, starts = (layout.grids, layout.starts) if isinstance(layout, TileSequence) else ([layout], [0])
        half = layout.tile // 2
        self._inside: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        self._outside: list[tuple[int, int, int, int]] = []  # (tile, dr, dc, global neighbour)
        neighbours = np.zeros((len(indices), 3, 3), dtype=bool)
        for t, index in enumerate(indices):
            image = int(np.searchsorted(starts, index, side="right")) - 1
            grid = grids[image]
            r, c = divmod(index - starts[image], grid.cols)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if (dr, dc) == (0, 0) or not (0 <= rr < grid.rows and 0 <= cc < grid.cols):
                        continue
                    j = starts[image] + rr * grid.cols + cc
                    if j < batch_start:
                        continue
                    neighbours[t, dr + 1, dc + 1] = True
                    if indices.start <= j < indices.stop:
                        pairs = self._inside.setdefault((dr, dc), ([], []))
                        pairs[0].append(t)
                        pairs[1].append(j - indices.start)
                    else:
                        self._outside.append((t, dr, dc, j))
        self._half, self._source = half, source
        self._static: Optional[np.ndarray] = None
        self.available = ring_mask(torch.from_numpy(neighbours), half, half)
        """(n, 1, tile/2 + 2, tile/2 + 2) float32: 1 inside the tile and where the ring holds a neighbour."""

    def _later_batches(self, shape: tuple[int, ...]) -> np.ndarray:
        """The ring's part from tiles of later batches (fixed for the batch), built once."""
        if self._static is None:
            n, stages, channels, h, w = shape
            static = np.zeros((n, stages, channels, h + 2, w + 2), dtype=np.uint8)
            cache: dict[int, np.ndarray] = {}
            for t, dr, dc, j in self._outside:
                if j not in cache:
                    cache[j] = self._source(j)
                (rows, src_rows), (cols, src_cols) = _ring_slices(dr, self._half), _ring_slices(dc, self._half)
                static[t, :, :, rows, cols] = cache[j][:, :, src_rows, src_cols]
            self._static = static
        return self._static

    def lattice(self, decoded: np.ndarray) -> np.ndarray:
        """The batch's lattices (n, 4, C, tile/2, tile/2), as far as decoded, with their rings:
        (n, 4, C, tile/2 + 2, tile/2 + 2) uint8."""
        out = self._later_batches(decoded.shape).copy()
        half = self._half
        out[..., 1 : half + 1, 1 : half + 1] = decoded
        for (dr, dc), (tiles, sources) in self._inside.items():
            (rows, src_rows), (cols, src_cols) = _ring_slices(dr, half), _ring_slices(dc, half)
            out[tiles, :, :, rows, cols] = decoded[sources][:, :, :, src_rows, src_cols]
        return out


def image_rings(pixels: np.ndarray, grid: TileGrid, indices: range, batch_start: Optional[int] = None
                ) -> tuple[np.ndarray, torch.Tensor]:
    """The tiles `indices` of an (H, W, C) image with their rings, all of every neighbour
    there (`TileRing` of the coding batch that starts at `batch_start`; default: at
    indices.start): (n, 4, C, tile/2 + 2, tile/2 + 2) uint8 and the availability. For
    measuring a `pixel_halo` model as it codes (−ELBO, the encoder's fits): it reads only
    what the decoder has."""
    ring = TileRing(grid, indices, lambda j: split_tiles(pixels, grid, range(j, j + 1))[0], batch_start)
    return ring.lattice(split_tiles(pixels, grid, indices)), ring.available


def _write_step(lattice: np.ndarray, grid: "TileGrid | TileSequence", indices: range, schedule: Sequence,
                k: int, mask: np.ndarray, values: np.ndarray) -> None:
    """Write step k's values (m, C) into the batch's `lattice` (n, 4, C, tile/2, tile/2), in
    place; after the last step of a stage, also the stage's padding."""
    step = schedule[k]
    lattice[:, step.stage][(..., *step.window)].transpose(0, 2, 3, 1)[mask] = values  # a view: writes into it
    if k + 1 == len(schedule) or schedule[k + 1].stage != step.stage:  # the stage is complete
        pad_stage(grid, indices, lattice[:, step.stage], step.stage)


def _stage_values(lattice: np.ndarray, stage: int, mask: np.ndarray) -> np.ndarray:
    """Real subpixels (m, C) of a stage, row-major over (tile, row, col)."""
    return lattice[:, stage].transpose(0, 2, 3, 1)[mask].astype(np.int64)


class _StackTooShallow(Exception):
    """A batch's posterior pops would exhaust the stack; the encoder rolls back."""


class TileSequence:
    """The tiles of several images with one tile side, as one sequence.

    Global tile index i runs over image 0's tiles in raster order, then image 1's,
    and so on. Offers the `TileGrid` methods the batch coders use (`tile`,
    `stage_extent`, `stage_masks`), so a batch may straddle image boundaries.
    """

    def __init__(self, grids: Sequence[TileGrid]):
        if not grids or len({g.tile for g in grids}) != 1:
            raise ValueError("a tile sequence needs at least one grid, all of one tile side")
        self.grids = list(grids)
        self.tile = self.grids[0].tile
        self.starts = np.cumsum([0] + [g.count for g in self.grids]).tolist()  # len(grids) + 1

    @property
    def count(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(image, tile index within that image) of global tile `index`."""
        image = int(np.searchsorted(self.starts, index, side="right")) - 1
        return image, index - self.starts[image]

    def stage_extent(self, index: int, stage: int) -> tuple[int, int]:
        image, local = self.locate(index)
        return self.grids[image].stage_extent(local, stage)

    def stage_masks(self, indices: range, stage: int) -> np.ndarray:
        """(n, tile/2, tile/2) bool: real positions of `stage` in the given tiles."""
        return stage_masks(self, indices, stage)

    def runs(self, indices: range):
        """Yield (image, local range, offset in the batch) for the images a batch touches."""
        position = indices.start
        while position < indices.stop:
            image, local = self.locate(position)
            take = min(indices.stop - position, self.grids[image].count - local)
            yield image, range(local, local + take), position - indices.start
            position += take

    def split(self, images: Sequence[np.ndarray], indices: range) -> np.ndarray:
        """Padded lattices (n, 4, C, tile/2, tile/2) of the given global tiles."""
        parts = [split_tiles(images[i], self.grids[i], local) for i, local, _ in self.runs(indices)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def merge(self, lattice: np.ndarray, indices: range, outs: Sequence[np.ndarray]) -> None:
        """Write the real pixels of the given global tiles into the images `outs`."""
        for i, local, offset in self.runs(indices):
            merge_tiles(lattice[offset : offset + len(local)], self.grids[i], local, outs[i])


def _batch_steps(net: Network, grid: "TileGrid | TileSequence", indices: range, channels: int,
                 params: CodingParams, deterministic: bool, lattice: Optional[np.ndarray] = None,
                 ring_source: Optional[Callable[[int], np.ndarray]] = None) -> coders.Steps:
    """One batch of tiles as steps in decode order (`coders.Steps`), for both directions.

    Decode order: each latent group top-down, popped with its prior; the pixels step by
    step of the model's schedule (`_stage_steps`; a sub-lattice stage, or part of stage 0);
    then, unless deterministic, each latent pushed back with its posterior, last group
    first (`coders.Return`: gives back the borrowed bits). The encoder starts every
    step's network at once (it knows their inputs), so they run while earlier steps code.
    The encoder passes the true `lattice` (n, 4, C, tile/2, tile/2); it knows each
    posterior as it walks down, and its latent is the one it pops with it
    (`coders.Borrow`) or, deterministic, the rounded posterior mean. A `pixel_halo` model
    reads each tile's ring (`TileRing`) from `ring_source` and the batch itself.

    Returns:
        The lattices (n, 4, C, tile/2, tile/2) uint8, and for the encoder of a
        deterministic batch the bits bits-back would have borrowed (posterior entropy
        on the grid, an estimate), else 0.
    """
    encoding = lattice is not None
    n, half = len(indices), grid.tile // 2
    acts = net.bottom_up(torch.from_numpy(lattice_to_pixels(lattice))) if encoding else None
    states: Optional[list] = None if encoding or deterministic else []  # what the decoder's posteriors need
    walk = net.top_down_steps(n, grid.tile, grid.tile, acts, states)
    latents, entropy = [], 0.0
    try:
        _, prior, posterior = next(walk)
        while True:
            truth = None
            if encoding and deterministic:
                truth = np.clip(np.rint(_numpy64(posterior.mean) / params.latent_grid), -params.radius, params.radius)
                truth = truth.astype(np.int32)
                # Entropy of a Gaussian on the grid, in bits: what a pop would borrow.
                bits = np.log2(np.exp(_numpy64(posterior.log_std)) / params.latent_grid) + 2.047
                entropy += float(np.maximum(bits, 0.0).sum())
            elif encoding:
                truth = coders.Borrow(latent_codec(posterior, params))
            k = yield latent_codec(prior, params), truth
            latents.append(k)
            _, prior, posterior = walk.send(_latent_tensor(k, prior.mean.shape, params))
    except StopIteration as done:
        features = done.value
    decoded = np.zeros((n, 4, channels, half, half), dtype=np.uint8)
    ring = None
    if net.model.config.pixel_halo:
        if ring_source is None:
            raise ValueError("a pixel_halo model codes a batch with the tiles around it (ring_source)")
        ring = TileRing(grid, indices, ring_source)
    schedule = net.model.schedule
    # Each step's own grid (n, h/stride, w/stride), and the encoder's values on it.
    masks = [grid.stage_masks(indices, step.stage)[(..., *step.window)] for step in schedule]
    truths = [_stage_values(lattice[(..., *step.window)], step.stage, mask) if encoding else None
              for step, mask in zip(schedule, masks)]
    plans = []
    if encoding:  # every step's input is known: its network and offset search start now, in the pool
        staged = np.zeros_like(decoded)
        for k, truth in enumerate(truths):
            network = _start_step(net, features, staged, k, ring)
            # A plan waits in a worker for its network's sub-batches, submitted before it:
            # the pool takes jobs in order, so they are already running elsewhere or done.
            plans.append(net.later(functools.partial(_plan_step, network, masks[k], params.fmt, truth),
                                   kind="network"))
            _write_step(staged, grid, indices, schedule, k, masks[k], truth)
    for k in range(len(schedule)):
        if encoding:
            plan = plans[k].result()
        else:
            plan = _plan_step(_start_step(net, features, decoded, k, ring), masks[k], params.fmt)
        values = yield from _stage_steps(net, plan, masks[k], params.fmt, truths[k])
        if values.size and (values.min() < 0 or values.max() > 255):
            raise CorruptFileError("corrupt payload: decoded pixel out of range")
        _write_step(decoded, grid, indices, schedule, k, masks[k], values)
    if states is not None:  # decoder only: the encoder popped these values as its Borrows
        acts = net.bottom_up(torch.from_numpy(lattice_to_pixels(decoded)))
        posteriors = net.posteriors(states, acts, grid.tile, grid.tile)
        for k, posterior in zip(reversed(latents), reversed(posteriors)):
            yield coders.Return(latent_codec(posterior, params), k)
    return decoded, entropy


def encode_batch(net: Network, ans: AnsCoder, lattice: np.ndarray, grid: "TileGrid | TileSequence",
                 indices: range, params: CodingParams, deterministic: bool,
                 ring_source: Optional[Callable[[int], np.ndarray]] = None) -> int:
    """Push one batch of tiles (`_batch_steps`); returns the bits its posterior pops borrow.

    For a deterministic batch nothing is borrowed and the return value is the
    estimate of what bits-back would borrow (posterior entropy on the grid), so
    the encoder can size the next batch.
    Stack before: S. After: S minus the borrowed bits plus the batch's code.
    Raises _StackTooShallow when the pops would exhaust the stack; the coder is
    then left half-used and the caller rolls back to its own snapshot.
    """
    bits_before = ans.num_bits()
    steps = _batch_steps(net, grid, indices, lattice.shape[2], params, deterministic, lattice, ring_source)
    recorded, (_, entropy) = coders.record_steps(ans, steps)
    if not deterministic and ans.num_valid_bits() < SAFETY_BITS:
        raise _StackTooShallow
    borrowed = entropy if deterministic else bits_before - ans.num_bits()
    coders.push_recorded(ans, recorded)
    return borrowed


def decode_batch(net: Network, ans: AnsCoder, grid: "TileGrid | TileSequence", indices: range,
                 channels: int, params: CodingParams, deterministic: bool,
                 ring_source: Optional[Callable[[int], np.ndarray]] = None) -> np.ndarray:
    """Pop one batch of tiles (`_batch_steps`); returns lattices (n, 4, C, tile/2, tile/2) uint8.

    Stack before: as `encode_batch` left it. After: as before `encode_batch`.
    """
    steps = _batch_steps(net, grid, indices, channels, params, deterministic, ring_source=ring_source)
    return coders.pop_steps(ans, steps)[0]


def _latent_tensor(k: np.ndarray, shape: torch.Size, params: CodingParams) -> torch.Tensor:
    """The discretised latent the network consumes on both sides: z = k * grid."""
    return torch.from_numpy(k.astype(np.float32) * np.float32(params.latent_grid)).reshape(shape)


def batch_limit(tile: int) -> int:
    """Most tiles in one network call: MAX_BATCH tiles of 64x64, more of smaller tiles
    (the same number of pixels; only tile sets of small images have tiles under 64)."""
    return max(1, min(MAX_BATCH_PIXELS // (tile * tile), DETERMINISTIC_FLAG - 1))


def encode_tiles(net: Network, ans: AnsCoder, pixels: np.ndarray, params: CodingParams,
                 progress: Callable[[int], None] = lambda n: None) -> tuple[tuple[int, ...], AnsCoder]:
    """Push all tiles of an (H, W, C) image.

    Returns:
        The schedule for the header (batches in encode order: tile count, or'ed
        with DETERMINISTIC_FLAG for a batch coded without borrowing) and the
        coder holding the result (a roll-back may replace the one passed in).
    """
    return encode_tile_sets(net, ans, [pixels], params, progress)


def decode_tiles(net: Network, ans: AnsCoder, height: int, width: int, channels: int,
                 params: CodingParams, schedule: tuple[int, ...],
                 progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """Pop all tiles of an image coded by `encode_tiles`; returns (H, W, C) uint8."""
    return decode_tile_sets(net, ans, [(height, width)], channels, params, schedule, progress)[0]


def encode_tile_sets(net: Network, ans: AnsCoder, images: Sequence[np.ndarray], params: CodingParams,
                     progress: Callable[[int], None] = lambda n: None) -> tuple[tuple[int, ...], AnsCoder]:
    """Push the tiles of several (H, W, C) images (same C, any sizes) as one sequence.

    Batches run over the concatenated tile sequence (`TileSequence`), up to
    `batch_limit(tile)` tiles each, so consecutive small images share network calls.
    Stack before: S. After: S + every image (the last batch on top).

    Returns:
        The schedule over the whole sequence (batches in encode order: tile
        count, or'ed with DETERMINISTIC_FLAG for a batch coded without
        borrowing) and the coder holding the result (a roll-back may replace
        the one passed in).
    """
    sequence = TileSequence([TileGrid(p.shape[0], p.shape[1], params.tile) for p in images])
    limit = batch_limit(params.tile)
    schedule: list[int] = []
    start, borrow_per_tile = 0, None
    while start < sequence.count:
        remaining = sequence.count - start
        available = ans.num_valid_bits() - 2 * SAFETY_BITS
        if borrow_per_tile is None or available < borrow_per_tile:
            # Cost unknown or the stack looks shallow: still try one tile with bits-back
            # (the estimate after a deterministic batch is rough); the roll-back below
            # falls back to a deterministic tile only if the stack really runs dry.
            deterministic, size = available <= 0, 1
        else:
            deterministic = False
            size = max(1, int(min(remaining, limit, available // (1.25 * borrow_per_tile))))
        while True:
            indices = range(start, start + size)
            lattice = sequence.split(images, indices)
            snapshot = None if deterministic else ans.clone()
            try:
                borrowed = encode_batch(net, ans, lattice, sequence, indices, params, deterministic,
                                        lambda j: sequence.split(images, range(j, j + 1))[0])
                break
            except _StackTooShallow:
                ans = snapshot  # roll back, retry smaller or without borrowing
                deterministic = size == 1
                size = max(1, size // 2)
        borrow_per_tile = max(borrowed / size, 1.0)
        schedule.append(size | (DETERMINISTIC_FLAG if deterministic else 0))
        start += size
        progress(size)
    return tuple(schedule), ans


def decode_tile_sets(net: Network, ans: AnsCoder, shapes: Sequence[tuple[int, int]], channels: int,
                     params: CodingParams, schedule: tuple[int, ...],
                     progress: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
    """Pop the images `encode_tile_sets` pushed; returns one (H, W, C) uint8 array per shape.

    Stack before: S + the images. After: S.
    Raises:
        CorruptFileError: the schedule does not cover the tiles exactly.
    """
    sequence = TileSequence([TileGrid(h, w, params.tile) for h, w in shapes])
    sizes = [entry & ~DETERMINISTIC_FLAG for entry in schedule]
    if sum(sizes) != sequence.count or min(sizes, default=1) < 1:
        raise CorruptFileError("corrupt header: tile schedule does not cover the image")
    outs = [np.zeros((h, w, channels), dtype=np.uint8) for h, w in shapes]
    starts = np.cumsum([0] + sizes[:-1])
    for entry, start, size in reversed(list(zip(schedule, starts, sizes))):  # LIFO
        indices = range(int(start), int(start) + size)
        if ans.is_empty():  # every batch left a non-empty stack; bounds a hostile file's work
            raise CorruptFileError("corrupt payload: ran out of data")
        lattice = decode_batch(net, ans, sequence, indices, channels, params, bool(entry & DETERMINISTIC_FLAG),
                               lambda j: sequence.split(outs, range(j, j + 1))[0])
        sequence.merge(lattice, indices, outs)
        progress(size)
    return outs
