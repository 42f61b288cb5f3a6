"""Measuring a model as a code: what an image costs in bits, and where the bits go.

Every rate here is in bits per subpixel ("bpd": one subpixel is one channel of
one pixel; an RGB image of H x W has 3HW) unless a name says otherwise; `heatmap`
is in bits per *pixel* (channels summed).

For one image `measure` reports
  nelbo_bpd   −ELBO: one posterior sample per latent group, analytic KLs;
  iwae_bpd    the importance-weighted bound with K samples (K = `samples`),
              an estimate of −log2 p(x) that approaches it from above as K grows;
  coded_bpd   the payload of the real .vz file;
  file_bpd    the whole file (payload + header);
and splits the overhead file − nelbo exactly into
  header_bpd          the container header;
  startup_bpd         coded − coded_seeded: what the first tiles pay because an
                      empty stack has no bits to lend (coded_seeded is the same
                      image pushed onto a stack pre-filled with pseudo-random
                      words, minus those words);
  discretisation_bpd  coded_seeded − nelbo: the latent grid, integer probability
                      tables, ANS precision, and the noise of a single sample.

The IWAE of an image is the sum over its tiles (tiles are independent under the
model). Each tile's K log-weights are computed in chunks and combined with
logsumexp, so memory depends on `SAMPLE_PIXELS`, not on K or the image size.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from vaezip.errors import InputError, VaezipError
from vaezip.files import atomic_write
from vaezip.network import registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vaezip.imaging.images import Image, ImageLike

LN2 = math.log(2.0)
NELBO_BATCH = 16  # tiles per network call for −ELBO and the heatmap
SAMPLE_PIXELS = 32 * 64 * 64  # tile pixels x importance samples per network call: bounds IWAE memory
SEED_WORDS = 4096  # pseudo-random words under a seeded stack, before the per-batch allowance
BASELINE_NAMES = ("png", "webp", "jpegxl")


@dataclass
class Report:
    """Rate of one image (or, from `measure_dataset`, of a set), in bits per subpixel
    unless named otherwise.

    Attributes:
        model: model name, "planes" when only the plane coder is used.
        subpixels: pixels x channels; every *_bpd is bits divided by this.
        nelbo_bpd: −ELBO (model-coded planes, one posterior sample) plus plane-coder bits.
        coded_bpd: payload of the .vz file; file_bpd: the whole file.
        iwae_bpd: importance-weighted bound with `samples` samples (None if not asked).
        header_bpd: header bits; file_bpd = header_bpd + coded_bpd.
        startup_bpd: coded − coded with a pre-filled stack (None without breakdown).
        discretisation_bpd: coded with a pre-filled stack − nelbo (None without breakdown):
            the parameter grids and table floors, less what the scale offsets of format
            version 3 save (`calibrate`), so it can be negative;
            header_bpd + startup_bpd + discretisation_bpd == file_bpd − nelbo_bpd.
        recon_bpd: −log2 p(x | z) part of nelbo_bpd (model-coded planes only).
        kl_bpd: per latent group (coarsest first), KL bits per subpixel.
        kl_share: per latent group, its fraction of the total KL.
        latent_groups: per latent group, (downsampling factor, coded channels).
        baselines: with compare, {codec: bpd or None when the codec is missing}.
        images: how many images the figures cover.
        encode_seconds: time of the real compression; seconds: of the whole measurement.
    """

    model: str
    mode: str
    width: int
    height: int
    subpixels: int
    nelbo_bpd: float
    coded_bpd: float
    file_bpd: float
    file_bytes: int
    header_bytes: int
    iwae_bpd: Optional[float] = None
    samples: int = 0
    encode_seconds: float = 0.0
    header_bpd: float = 0.0
    startup_bpd: Optional[float] = None
    discretisation_bpd: Optional[float] = None
    recon_bpd: Optional[float] = None
    kl_bpd: tuple[float, ...] = ()
    kl_share: tuple[float, ...] = ()
    latent_groups: tuple[tuple[int, int], ...] = ()
    baselines: dict = field(default_factory=dict)
    images: int = 1
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """File bits over −ELBO bits, minus one (0.01 = 1% overhead)."""
        return self.file_bpd / self.nelbo_bpd - 1.0 if self.nelbo_bpd else float("nan")

    @property
    def overhead_bpd(self) -> float:
        """file_bpd − nelbo_bpd, bits per subpixel."""
        return self.file_bpd - self.nelbo_bpd

    def to_dict(self) -> dict:
        """JSON-ready fields plus `gap` and `overhead_bpd`."""
        out = asdict(self)
        out["kl_bpd"], out["kl_share"] = list(self.kl_bpd), list(self.kl_share)
        out["latent_groups"] = [list(g) for g in self.latent_groups]
        out["gap"], out["overhead_bpd"] = self.gap, self.overhead_bpd
        return out


@dataclass
class DatasetReport:
    """Per-image reports and their total (total bits over total subpixels)."""

    images: list[Report]
    total: Report


@dataclass
class ModelTerms:
    """Bits of the model-coded planes of one image (all tiles summed).

    recon_bits: −log2 p(x | z), real pixels only; kl_bits: (groups,) KL per latent
    group; iwae_bits: −log2 of the K-sample importance-weighted estimate, or None.
    """

    recon_bits: float
    kl_bits: np.ndarray
    iwae_bits: Optional[float] = None

    @property
    def nelbo_bits(self) -> float:
        return self.recon_bits + float(self.kl_bits.sum())


# ------------------------------------------------------------------ estimators


def log_mean_exp(chunks: Iterable["torch.Tensor"]) -> "torch.Tensor":
    """log((1/K) Σ_k exp(w_k)) per row, from chunks of log-weights.

    Args:
        chunks: tensors (N, k_i) of log-weights in nats; K = Σ k_i. Only one chunk
            is held at a time.
    Returns:
        (N,) float64, nats.
    """
    import torch

    total, count = None, 0
    for w in chunks:
        lse = torch.logsumexp(w.to(torch.float64), dim=1)
        total = lse if total is None else torch.logaddexp(total, lse)
        count += w.shape[1]
    if total is None:
        raise ValueError("no importance samples")
    return total - math.log(count)


def chunked_iwae(log_weights: Callable[[int], "torch.Tensor"], samples: int, chunk: int) -> "torch.Tensor":
    """Importance-weighted log-likelihood estimate, drawing samples `chunk` at a time.

    Args:
        log_weights: called with k, returns (N, k) fresh log-weights
            log p(x, z_k) − log q(z_k | x) in nats.
        samples: K, the total number of samples per row.
        chunk: most samples drawn per call.
    Returns:
        (N,) float64: log (1/K) Σ_k w_k, nats (a lower bound on log p(x) in expectation).
    """
    if samples < 1 or chunk < 1:
        raise ValueError("samples and chunk must be positive")
    sizes = [min(chunk, samples - s) for s in range(0, samples, chunk)]
    return log_mean_exp(log_weights(k) for k in sizes)


# ------------------------------------------------------------- model passes


def _batches(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


def _calls(net, count: int, size: int, tile: int) -> Iterator[tuple[range, Optional[int]]]:
    """(tiles of one network call, first tile of its coding batch): calls of at most `size`
    tiles. Only a `pixel_halo` model's rings depend on the coding batches: for it the calls
    lie inside batches of `bitsback.batch_limit(tile)` tiles (a file's schedule starts with
    smaller ones); for any other model the batch is None."""
    from vaezip.coding.bitsback import batch_limit

    if not net.config.pixel_halo:
        yield from ((indices, None) for indices in _batches(count, size))
        return
    limit = batch_limit(tile)
    for batch in _batches(count, limit):
        for start in range(batch.start, batch.stop, size):
            yield range(start, min(start + size, batch.stop)), batch.start


@dataclass
class _Tiles:
    """Network inputs of some tiles, as coded: x uint8 (n, C, T, T), mask bool (n, 1, T, T);
    for a `pixel_halo` model also the tiles with their rings (n, C, T + 4, T + 4) and
    availability (n, 1, T/2 + 2, T/2 + 2) (`bitsback.TileRing`), else None."""

    x: "torch.Tensor"
    mask: "torch.Tensor"
    x_ring: Optional["torch.Tensor"] = None
    available: Optional["torch.Tensor"] = None

    def pixels(self) -> "torch.Tensor":
        """What `pixel_log_prob` reads: the tiles, with their rings if they have them."""
        return self.x if self.x_ring is None else self.x_ring

    def repeated(self, k: int) -> "_Tiles":
        """Each tile `k` times in a row (importance samples)."""
        def rep(t):
            return None if t is None else t.repeat_interleave(k, 0)

        return _Tiles(rep(self.x), rep(self.mask), rep(self.x_ring), rep(self.available))


def _tile_tensors(pixels: np.ndarray, grid, indices: range, batch_start: Optional[int] = None) -> _Tiles:
    """The tiles `indices` as coded; with their rings (a `pixel_halo` model) when
    `batch_start`, the first tile of their coding batch, is given."""
    import torch

    from vaezip.coding.bitsback import image_rings
    from vaezip.coding.tiles import lattice_to_pixels, split_tiles
    from vaezip.network.model import merge_lattice

    lattice = split_tiles(pixels, grid, indices)
    tiles = _Tiles(torch.from_numpy(lattice_to_pixels(lattice)), torch.from_numpy(grid.pixel_masks(indices)))
    if batch_start is not None:
        ringed, tiles.available = image_rings(pixels, grid, indices, batch_start)
        tiles.x_ring = merge_lattice(torch.from_numpy(ringed))
    return tiles


def _elbo_pass(net, tiles: _Tiles, latents: str, generator):
    """One top-down pass (`HierarchicalVAE.sample_posterior`); returns (log p(x|z) nats
    (n, 4, C, T/2, T/2) masked, list over groups of KL maps in nats (n, coded channels, T/f, T/f)).

    latents: "sample" (one posterior sample, the usual −ELBO) or "mean" (posterior means).
    """
    sample = net.sample_posterior(tiles.x, latents=latents, generator=generator)
    return net.pixel_log_prob(sample.features, tiles.pixels(), tiles.mask, tiles.available), sample.kl_nats


def _log_weights(net, tiles: _Tiles, acts: dict, k: int, generator) -> "torch.Tensor":
    """(n, k) log-weights log p(x, z) − log q(z | x) in nats, z drawn from the posterior."""
    import torch

    rep = tiles.repeated(k)
    acts_r = {f: a.repeat_interleave(k, 0) for f, a in acts.items()}
    sample = net.sample_posterior(rep.x, generator=generator, acts=acts_r)
    log_ratio = torch.zeros(rep.x.shape[0], dtype=torch.float64)
    for ratio in sample.log_ratios():
        log_ratio = log_ratio + ratio.to(torch.float64)
    log_prob = net.pixel_log_prob(sample.features, rep.pixels(), rep.mask, rep.available).sum(dim=(1, 2, 3, 4))
    return (log_prob.to(torch.float64) + log_ratio).reshape(tiles.x.shape[0], k)


def model_terms(loaded: registry.LoadedModel, pixels: np.ndarray, tile: int, *, samples: int = 0,
                seed: int = 0, latents: str = "sample") -> ModelTerms:
    """Reconstruction and per-group KL bits (and the K-sample IWAE) of an image, tiled as coded.

    Args:
        loaded: the model; pixels: (H, W, C) uint8, C = the model's channels ((H, W): gray).
        tile: tile side (as in the .vz header).
        samples: IWAE samples K (0: skip); any K runs in bounded memory.
        seed: seeds a private torch generator (no global RNG state is touched).
        latents: "sample" for the usual single-sample −ELBO, "mean" for posterior means.
    """
    import torch

    from vaezip.coding.tiles import TileGrid

    net = loaded.net
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    generator = torch.Generator().manual_seed(seed)
    recon, kl = 0.0, np.zeros(len(net.groups))
    with torch.inference_mode():
        for indices, batch_start in _calls(net, grid.count, NELBO_BATCH, tile):
            log_prob, kls = _elbo_pass(net, _tile_tensors(pixels, grid, indices, batch_start), latents, generator)
            recon -= float(log_prob.to(torch.float64).sum()) / LN2
            kl += np.array([float(k.to(torch.float64).sum()) for k in kls]) / LN2
        iwae = None
        if samples:
            iwae_gen = torch.Generator().manual_seed(seed + 1)
            per_call = max(1, SAMPLE_PIXELS // (tile * tile))  # (tile, sample) pairs per network call
            chunk = min(samples, per_call)
            iwae = 0.0
            for indices, batch_start in _calls(net, grid.count, max(1, per_call // chunk), tile):
                tiles = _tile_tensors(pixels, grid, indices, batch_start)
                acts = net.bottom_up(tiles.x)
                log_px = chunked_iwae(lambda k: _log_weights(net, tiles, acts, k, iwae_gen), samples, chunk)
                iwae -= float(log_px.sum()) / LN2  # tiles are independent: log p(image) = Σ log p(tile)
    return ModelTerms(recon, kl, iwae)


def tile_log_weights(loaded: registry.LoadedModel, pixels: np.ndarray, tile: int, samples: int,
                     seed: int = 0) -> np.ndarray:
    """All importance log-weights of an image: (tiles, samples) float64, nats.

    Row t holds log p(x_t, z_k) − log q(z_k | x_t) for K = `samples` posterior
    draws z_k of tile t, drawn in the same bounded-memory chunks as `model_terms`;
    log_mean_exp of a row is that tile's IWAE. For curves over K (the benchmark
    averages disjoint groups of the columns); `model_terms` streams instead.
    """
    import torch

    from vaezip.coding.tiles import TileGrid

    net = loaded.net
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    generator = torch.Generator().manual_seed(seed)
    per_call = max(1, SAMPLE_PIXELS // (tile * tile))
    chunk = min(samples, per_call)
    rows = []
    with torch.inference_mode():
        for indices, batch_start in _calls(net, grid.count, max(1, per_call // chunk), tile):
            tiles = _tile_tensors(pixels, grid, indices, batch_start)
            acts = net.bottom_up(tiles.x)
            sizes = [min(chunk, samples - s) for s in range(0, samples, chunk)]
            rows.append(torch.cat([_log_weights(net, tiles, acts, k, generator) for k in sizes], dim=1))
    return torch.cat(rows).numpy()


def model_bits(loaded: registry.LoadedModel, pixels: np.ndarray, tile: int, samples: int = 0,
               seed: int = 0) -> tuple[float, Optional[float]]:
    """−ELBO (and IWAE with `samples` samples) in bits for the whole image, tiled as coded."""
    terms = model_terms(loaded, pixels, tile, samples=samples, seed=seed)
    return terms.nelbo_bits, terms.iwae_bits


# ------------------------------------------------------------- coded sizes


def seed_words(loaded: Optional[registry.LoadedModel], tile: int) -> np.ndarray:
    """Deterministic pseudo-random uint32 words (numpy PCG64, seed 0) for a pre-filled stack.

    SEED_WORDS plus what one full batch of tiles could borrow at most (every
    coded latent at log2 of the grid's size), so no batch runs the stack dry.
    """
    from vaezip.coding.bitsback import MAX_BATCH, CodingParams

    count = SEED_WORDS
    if loaded is not None:
        cfg = loaded.spec.config
        params = CodingParams(tile=tile, latent_grid=cfg.latent_grid)
        per_tile = sum((tile // g.factor) ** 2 * (g.channels if keep is None else len(keep))
                       for g, keep in zip(loaded.net.groups, loaded.net.active))
        count += math.ceil(MAX_BATCH * per_tile * math.log2(2 * params.radius + 1) / 32)
    words = np.random.Generator(np.random.PCG64(0)).integers(0, 2**32, size=count, dtype=np.uint32)
    words[-1] |= 1  # an unsealed stack must not end in a zero word
    return words


def seeded_payload_bits(img: "Image", model: Optional[registry.LoadedModel]) -> int:
    """Payload bits of `img` pushed (`imagecodec.push_image`) onto a stack pre-filled with
    `seed_words`, minus the pre-fill: the image's cost once start-up is paid, since
    with that many bits on the stack every batch of tiles borrows its latents.
    """
    from vaezip.coding import imagecodec
    from vaezip.entropy import coders

    tile = imagecodec.tile_size(img.height, img.width, model.spec.config.downsampling) if model else 0
    ans = coders.new_coder(seed_words(model, tile))
    before = len(ans.get_compressed())
    _, ans = imagecodec.push_image(ans, img, model)
    return 32 * (len(ans.get_compressed()) - before)


def _baseline_bytes(img: "Image") -> dict[str, Optional[int]]:
    """Baseline codec sizes in bytes; every codec "missing" (None) if the module is absent."""
    try:
        from vaezip.evaluation import baselines
    except ImportError:
        return {name: None for name in BASELINE_NAMES}
    try:
        return dict(baselines.baseline_sizes(img))
    except baselines.BaselineNotLosslessError as exc:
        raise VaezipError(f"baseline codec is not lossless: {exc}") from None


# ------------------------------------------------------------------ measure


def measure(image: "ImageLike", model: Optional[str] = None, *, samples: int = 0,
            loaded: Optional[registry.LoadedModel] = None, breakdown: bool = True, compare: bool = False,
            seed: int = 0) -> Report:
    """Compress `image` and report its rates in bits per subpixel.

    Args:
        image: `Image`, uint8 array, PIL image or path.
        model: registered model name (default: the one for the image mode).
        samples: IWAE samples K (0: skip). Memory stays bounded for any K.
        loaded: an already loaded model (overrides `model`).
        breakdown: also code the image onto a pre-filled stack to split the
            overhead into start-up and discretisation (one more encode).
        compare: also size the image with PNG, WebP and JPEG-XL (bits per subpixel,
            None for a codec that is missing or cannot hold the mode).
        seed: seeds the latent samples of −ELBO and IWAE.
    Returns:
        A `Report`; see its attributes.
    """
    from vaezip.coding import imagecodec
    from vaezip.entropy import coders, depth, planes
    from vaezip.format import container
    from vaezip.imaging.images import as_image

    begin = time.perf_counter()
    img = as_image(image)
    loaded = imagecodec.model_for_mode(img.mode, model, () if loaded is None else (loaded,))
    start = time.perf_counter()
    header, ans = imagecodec.push_image(coders.new_coder(), img, loaded)
    data = container.pack(header, ans.get_compressed())
    encode_seconds = time.perf_counter() - start
    words = ans.get_compressed()
    n = img.num_subpixels
    layout = imagecodec.layout(img.mode, loaded is not None)
    high, plane_bits = img.pixels, 0.0
    if img.bit_depth == 16:  # the model sees the high bytes; the low bits are plane-coded
        high, plane_bits = depth.split(img.pixels), depth.estimate_low_bits(img.pixels)
    plane_bits += sum(planes.estimate_bits(high[:, :, c], layout.levels) for c in layout.plane_channels)
    # The plane coder's estimate is an exact likelihood: it is its own IWAE for any K.
    nelbo_bits, iwae_bits, recon_bits = plane_bits, (plane_bits if samples else None), None
    kl_bits, groups = np.zeros(0), ()
    if layout.model_channels:
        pixels = np.ascontiguousarray(high[:, :, list(layout.model_channels)])
        terms = model_terms(loaded, pixels, header.tile_size, samples=samples, seed=seed)
        nelbo_bits += terms.nelbo_bits
        recon_bits, kl_bits = terms.recon_bits, terms.kl_bits
        iwae_bits = None if terms.iwae_bits is None else terms.iwae_bits + plane_bits
        groups = tuple((g.factor, g.channels if keep is None else len(keep))
                       for g, keep in zip(loaded.net.groups, loaded.net.active))
    coded_bits = 32 * len(words)
    header_bits = 8 * (len(data) - 4 * len(words))
    startup = discretisation = None
    if breakdown:
        seeded = seeded_payload_bits(img, loaded)
        startup, discretisation = (coded_bits - seeded) / n, (seeded - nelbo_bits) / n
    baselines = {}
    if compare:
        baselines = {k: None if v is None else 8 * v / n for k, v in _baseline_bytes(img).items()}
    kl_total = float(kl_bits.sum())
    return Report(
        model=header.model_name or "planes", mode=img.mode, width=img.width, height=img.height, subpixels=n,
        nelbo_bpd=nelbo_bits / n, coded_bpd=coded_bits / n, file_bpd=8 * len(data) / n,
        file_bytes=len(data), header_bytes=header_bits // 8,
        iwae_bpd=None if iwae_bits is None else iwae_bits / n, samples=samples, encode_seconds=encode_seconds,
        header_bpd=header_bits / n, startup_bpd=startup, discretisation_bpd=discretisation,
        recon_bpd=None if recon_bits is None else recon_bits / n,
        kl_bpd=tuple(float(k) / n for k in kl_bits),
        kl_share=tuple(float(k) / kl_total if kl_total else 0.0 for k in kl_bits),
        latent_groups=groups, baselines=baselines, seconds=time.perf_counter() - begin,
    )


def measure_dataset(images: Iterable["ImageLike"], model: Optional[str] = None, samples: int = 0,
                    limit: Optional[int] = None, progress: Optional[Callable[[int], None]] = None, *,
                    loaded: Optional[registry.LoadedModel] = None, breakdown: bool = True,
                    compare: bool = False, seed: int = 0) -> DatasetReport:
    """Measure each image on its own (one .vz file each) and total the bits.

    Totals are total bits over total subpixels, never a mean of ratios. Image i
    uses seed `seed + i`. `progress` is called with 1 after each image.
    """
    reports = []
    for i, image in enumerate(images):
        if limit is not None and i >= limit:
            break
        reports.append(measure(image, model, samples=samples, loaded=loaded, breakdown=breakdown,
                               compare=compare, seed=seed + i))
        if progress is not None:
            progress(1)
    if not reports:
        raise InputError("no images to measure")
    return DatasetReport(reports, total_report(reports))


def total_report(reports: Sequence[Report]) -> Report:
    """One `Report` for several: every rate is Σ bits / Σ subpixels."""
    n = sum(r.subpixels for r in reports)

    def total(attr: str) -> Optional[float]:
        values = [getattr(r, attr) for r in reports]
        return None if any(v is None for v in values) else sum(v * r.subpixels for v, r in zip(values, reports)) / n

    same_groups = all(r.latent_groups == reports[0].latent_groups for r in reports)
    kl = np.zeros(len(reports[0].kl_bpd)) if same_groups else np.zeros(0)
    if same_groups:
        for r in reports:
            kl += np.asarray(r.kl_bpd) * r.subpixels
    baselines = {}
    for name in reports[0].baselines:
        values = [r.baselines.get(name) for r in reports]
        baselines[name] = None if any(v is None for v in values) else sum(
            v * r.subpixels for v, r in zip(values, reports)) / n
    models, modes = {r.model for r in reports}, {r.mode for r in reports}
    return Report(
        model=reports[0].model if len(models) == 1 else "+".join(sorted(models)),
        mode=reports[0].mode if len(modes) == 1 else "mixed",
        width=0, height=0, subpixels=n,
        nelbo_bpd=total("nelbo_bpd"), coded_bpd=total("coded_bpd"), file_bpd=total("file_bpd"),
        file_bytes=sum(r.file_bytes for r in reports), header_bytes=sum(r.header_bytes for r in reports),
        iwae_bpd=total("iwae_bpd"), samples=reports[0].samples,
        encode_seconds=sum(r.encode_seconds for r in reports), header_bpd=total("header_bpd"),
        startup_bpd=total("startup_bpd"), discretisation_bpd=total("discretisation_bpd"),
        recon_bpd=total("recon_bpd"), kl_bpd=tuple(float(k) / n for k in kl),
        kl_share=tuple(float(k / kl.sum()) if kl.sum() else 0.0 for k in kl),
        latent_groups=reports[0].latent_groups if same_groups else (), baselines=baselines,
        images=len(reports), seconds=sum(r.seconds for r in reports),
    )


# ------------------------------------------------------------------ heatmap


def _spread(kl: np.ndarray, factor: int, rows: int, cols: int) -> np.ndarray:
    """Bits per pixel (rows, cols) from one group's per-position bits (h, w) at `factor`.

    Each position's bits are spread evenly over the real pixels it covers; a
    position that covers only tile padding hands its bits to the nearest
    position that covers real pixels, so no bit is lost when the padding is cut.
    """
    cells_r, cells_c = (rows - 1) // factor + 1, (cols - 1) // factor + 1
    folded = np.zeros((cells_r, cells_c))
    ii = np.minimum(np.arange(kl.shape[0]), cells_r - 1)[:, None]
    jj = np.minimum(np.arange(kl.shape[1]), cells_c - 1)[None, :]
    np.add.at(folded, (np.broadcast_to(ii, kl.shape), np.broadcast_to(jj, kl.shape)), kl)
    height = np.minimum(factor, rows - np.arange(cells_r) * factor)
    width = np.minimum(factor, cols - np.arange(cells_c) * factor)
    per_pixel = folded / (height[:, None] * width[None, :])
    return np.repeat(np.repeat(per_pixel, factor, axis=0), factor, axis=1)[:rows, :cols]


def heatmap(image: "ImageLike", model: Optional[str] = None, *,
            loaded: Optional[registry.LoadedModel] = None) -> np.ndarray:
    """Where the bits go: (H, W) float64 bits per pixel (channels summed).

    Each pixel gets −log2 p(x | z) of its model-coded subpixels with z the
    posterior means, plus, for every latent group, the KL of the latent position
    above it spread evenly over the pixels that position covers (factor x
    factor). The map sums to −ELBO at the posterior means (`model_terms(...,
    latents="mean")`). Plane-coded planes (alpha, palette, bilevel, the low bits of
    16-bit samples) are not shown.
    """
    import torch

    from vaezip.coding import imagecodec
    from vaezip.coding.tiles import TileGrid
    from vaezip.entropy import depth
    from vaezip.imaging.images import as_image
    from vaezip.network.model import merge_lattice

    img = as_image(image)
    loaded = imagecodec.model_for_mode(img.mode, model, () if loaded is None else (loaded,))
    layout = imagecodec.layout(img.mode, loaded is not None)
    if not layout.model_channels:
        raise InputError(f"mode {img.mode} images are coded without a model: no heatmap")
    high = depth.split(img.pixels) if img.bit_depth == 16 else img.pixels
    pixels = np.ascontiguousarray(high[:, :, list(layout.model_channels)])
    net = loaded.net
    tile = imagecodec.tile_size(img.height, img.width, loaded.spec.config.downsampling)
    grid = TileGrid(img.height, img.width, tile)
    out = np.zeros((img.height, img.width))
    with torch.inference_mode():
        for indices, batch_start in _calls(net, grid.count, NELBO_BATCH, tile):
            log_prob, kls = _elbo_pass(net, _tile_tensors(pixels, grid, indices, batch_start), "mean", None)
            recon = -merge_lattice(log_prob).to(torch.float64).sum(dim=1).numpy() / LN2  # (n, T, T)
            kl_maps = [k.to(torch.float64).sum(dim=1).numpy() / LN2 for k in kls]
            for k, index in enumerate(indices):
                rows, cols = grid.real_size(index)
                bits = recon[k, :rows, :cols].copy()
                for spec, kl in zip(net.groups, kl_maps):
                    bits += _spread(kl[k], spec.factor, rows, cols)
                r, c = divmod(index, grid.cols)
                out[r * tile : r * tile + rows, c * tile : c * tile + cols] = bits
    return out


def colormap(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 sequential colour map, dark violet -> red -> pale yellow.

    Perceptual: CIE L* rises linearly from 12 to 95 (so brightness alone reads as
    the value, also in gray print), while the hue turns through 150 degrees;
    built in CIELAB and converted to sRGB (D65), out-of-gamut values clipped.
    """
    t = np.linspace(0.0, 1.0, n)
    lightness = 12.0 + 83.0 * t
    hue = np.deg2rad(300.0 + 150.0 * t)
    chroma = 35.0 + 30.0 * np.sin(np.pi * t)
    a, b = chroma * np.cos(hue), chroma * np.sin(hue)
    fy = (lightness + 16.0) / 116.0
    f = np.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=1)
    delta = 6.0 / 29.0
    xyz = np.where(f > delta, f**3, 3 * delta**2 * (f - 4.0 / 29.0)) * np.array([0.95047, 1.0, 1.08883])
    to_rgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    linear = np.clip(xyz @ to_rgb.T, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.rint(255 * srgb).astype(np.uint8)


def render_heatmap(image: "ImageLike", bits: np.ndarray, path: "str | os.PathLike") -> None:
    """Write a PNG: the image and its bits-per-pixel map side by side, with a scale bar.

    Colours run linearly from the map's minimum to its 99.5th percentile (brighter
    pixels above it saturate); the bar is labelled with the minimum, that level
    and the maximum, in bits per pixel. Small images are enlarged (nearest
    neighbour) so the labels fit. Written to a temporary name, then renamed.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    from vaezip.imaging.images import as_image, to_pil

    img = as_image(image)
    bits = np.asarray(bits, dtype=np.float64)
    if bits.shape != (img.height, img.width):
        raise InputError(f"heatmap shape {bits.shape} does not match the image {img.height}x{img.width}")
    lo, top, hi = float(bits.min()), float(np.percentile(bits, 99.5)), float(bits.max())
    scale = max(1, math.ceil(160 / max(img.height, img.width)))
    level = np.clip((bits - lo) / max(top - lo, 1e-12), 0.0, 1.0)
    cmap = colormap()
    heat = cmap[np.rint(level * 255).astype(np.int64)]
    photo = np.asarray(to_pil(img).convert("RGB"))
    enlarge = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)  # noqa: E731
    photo, heat = enlarge(photo), enlarge(heat)
    h, w, gap, margin = photo.shape[0], photo.shape[1], 8, 8
    font = ImageFont.load_default()
    bar_h, text_h = 12, 14
    width = max(2 * w + gap + 2 * margin, 320)
    canvas = PILImage.new("RGB", (width, h + 2 * margin + bar_h + 2 * text_h + 8), "white")
    canvas.paste(PILImage.fromarray(photo), (margin, margin))
    canvas.paste(PILImage.fromarray(heat), (margin + w + gap, margin))
    bar_w = width - 2 * margin
    bar = np.repeat(cmap[np.linspace(0, 255, bar_w).astype(np.int64)][None], bar_h, axis=0)
    y = h + 2 * margin
    canvas.paste(PILImage.fromarray(bar), (margin, y))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, y + bar_h + 2), f"{lo:.2f}", fill="black", font=font)
    right = f"{top:.2f}" + (f" (max {hi:.2f})" if hi > top else "")
    draw.text((margin + bar_w - draw.textlength(right, font=font), y + bar_h + 2), right, fill="black", font=font)
    caption = f"bits per pixel: mean {bits.mean():.2f}, total {bits.sum():.0f} bits"
    draw.text((margin, y + bar_h + 2 + text_h), caption, fill="black", font=font)
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such folder")
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")
