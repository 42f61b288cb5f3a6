"""Format 6's integer tables (`entropy.exact`) against version 5's float ones, on real parameters.

Loads photo-rgb-1, takes 64x64 tiles of a few Kodak images, runs the posterior walk on the
posterior means (`sample_posterior(latents="mean")`) and compares ideal code lengths,
-log2 of the normalised probability each table gives the true symbol (before
constriction's 24-bit quantisation, the same for both):

  pixels: each stage's mixtures rounded with version 5's grids (`quantize_mixture`, no scale
      offsets), coded with `ChannelTables` (float32) vs `ExactChannelTables` (integers);
  latents: k drawn from each posterior on the grid (seeded), under its prior and its
      posterior: the float discretised Gaussian (what `coders.quantized_gaussian` models,
      truncated to [-radius, radius]) with the network's mean/log-std, the same with them
      rounded onto the exact grids (means 1/4 grid step, log-stds 1/16), and
      `exact.LatentTables` (integers). Net latent bits = prior bits - posterior bits.

Also times building the pixel tables (coarse + fine, chunks of 4096 rows) on the real rows
and on 1M random subpixels, and pushing the latents with constriction's QuantizedGaussian
vs `exact.gaussian_codec`.

    python benchmarks/exact_tables.py [--images 1 5 13] [--tiles 4] [--json-out /tmp/vaezip-exact-tables.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from vaezip.coding import quantize
from vaezip.coding.bitsback import _stage_values
from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles, stage_masks
from vaezip.entropy import coders, exact
from vaezip.format import versions
from vaezip.network import registry

DATA = Path(os.environ.get("VAEZIP_DATA", "/work/shared/data"))
CHUNK = 4096


def _pixel_bits(tables, values: np.ndarray) -> tuple[float, float]:
    """(ideal bits of `values` (m,) under coarse + fine tables, seconds to build them)."""
    start = time.perf_counter()
    rows = [slice(a, a + CHUNK) for a in range(0, len(values), CHUNK)]
    bins = values // quantize.BIN
    coarse = np.concatenate([tables.coarse(r) for r in rows])
    fine = np.concatenate([tables.fine(bins, r) for r in rows])
    seconds = time.perf_counter() - start
    m = np.arange(len(values))
    bits = -np.log2(coders.normalized_rows(coarse)[m, bins]).sum()
    bits -= np.log2(coders.normalized_rows(fine)[m, values % quantize.BIN]).sum()
    return float(bits), seconds


def _gaussian_bits(k: np.ndarray, mean: np.ndarray, std: np.ndarray, radius: int) -> np.ndarray:
    """Bits of integers k under N(mean, std) (grid units) discretised on k +- 1/2 and truncated
    to [-radius, radius], in float64 (erfc, accurate in both tails)."""
    def mass(a, b):
        a = torch.from_numpy((a - mean) / (std * np.sqrt(2.0)))
        b = torch.from_numpy((b - mean) / (std * np.sqrt(2.0)))
        upper = 0.5 * (torch.special.erfc(a) - torch.special.erfc(b))
        lower = 0.5 * (torch.special.erfc(-b) - torch.special.erfc(-a))
        return torch.where(a > 0, upper, lower).numpy()

    return -np.log2(mass(k - 0.5, k + 0.5) / mass(-radius - 0.5 + 0 * k, radius + 0.5 + 0 * k))


def _random_mixture(n: int, fmt, rng: np.random.Generator) -> quantize.QuantizedMixture:
    lo, hi = quantize.mean_range(fmt)
    return quantize.QuantizedMixture(
        logits=rng.integers(-quantize.LOGIT_LIMIT, quantize.LOGIT_LIMIT + 1, (n, 3)).astype(np.int32),
        means=rng.integers(-2000, 10000, (n, 3, 3)).clip(lo, hi).astype(np.int32),
        log_scales=rng.integers(quantize.SCALE_LO, quantize.SCALE_HI + 1, (n, 3, 3)).astype(np.int32),
        coeffs=rng.integers(-4096, 4097, (n, 3, 3)).astype(np.int32), fmt=fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 5, 13], help="Kodak image numbers")
    parser.add_argument("--tiles", type=int, default=4, help="64x64 tiles per image (spread over it)")
    parser.add_argument("--json-out", default="/tmp/vaezip-exact-tables.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    loaded = registry.load_model("photo-rgb-1")
    net, cfg = loaded.net, loaded.spec.config
    v5, v6 = versions.get(5), versions.get(6)
    grid_bits = -int(round(np.log2(cfg.latent_grid)))
    radius = int(round(8.0 / cfg.latent_grid))
    exact.constants()
    pix = {"float": 0.0, "exact": 0.0, "float_s": 0.0, "exact_s": 0.0, "subpixels": 0}
    lat = {name: {"prior": 0.0, "posterior": 0.0} for name in ("float", "rounded", "exact")}
    lat_count, lat_time = 0, {"constriction": 0.0, "exact": 0.0}
    for number in args.images:
        pixels = np.asarray(PILImage.open(DATA / "kodak" / f"kodim{number:02d}.png").convert("RGB"))
        grid = TileGrid(pixels.shape[0], pixels.shape[1], 64)
        picks = np.linspace(0, grid.count - 1, args.tiles).round().astype(int)
        for index in picks:
            indices = range(int(index), int(index) + 1)
            lattice = split_tiles(pixels, grid, indices)
            with torch.no_grad():
                sample = net.sample_posterior(torch.from_numpy(lattice_to_pixels(lattice)), latents="mean")
                for stage in range(4):
                    mask = stage_masks(grid, indices, stage)
                    params = net.stage_params(sample.features, torch.from_numpy(lattice), stage)
                    q5 = quantize.quantize_mixture(params, mask, v5)
                    q6 = quantize.QuantizedMixture(q5.logits, q5.means, q5.log_scales, q5.coeffs, v6)
                    values = _stage_values(lattice, stage, mask)
                    for c in range(values.shape[1]):
                        bits, seconds = _pixel_bits(quantize.ChannelTables(q5, c, values), values[:, c])
                        pix["float"] += bits
                        pix["float_s"] += seconds
                        bits, seconds = _pixel_bits(quantize.ExactChannelTables(q6, c, values), values[:, c])
                        pix["exact"] += bits
                        pix["exact_s"] += seconds
                    pix["subpixels"] += values.size
            for prior, posterior in zip(sample.priors, sample.posteriors):
                post_mean = posterior.mean.double().numpy().reshape(-1) / cfg.latent_grid
                post_std = np.exp(posterior.log_std.double().numpy().reshape(-1)) / cfg.latent_grid
                k = np.clip(np.rint(post_mean + post_std * rng.standard_normal(len(post_mean))), -radius, radius)
                lat_count += len(k)
                for which, g in (("prior", prior), ("posterior", posterior)):
                    mean = g.mean.double().numpy().reshape(-1) / cfg.latent_grid
                    log_std = g.log_std.double().numpy().reshape(-1)
                    lat["float"][which] += _gaussian_bits(k, mean, np.exp(log_std) / cfg.latent_grid, radius).sum()
                    mean_q = np.clip(np.rint(mean * exact.LATENT_MEAN_STEPS), -4 * radius, 4 * radius)
                    log_std_q = np.clip(np.rint(log_std * exact.LATENT_LOG_STD_STEPS), exact.LATENT_LOG_STD_LO,
                                        exact.LATENT_LOG_STD_HI)
                    lat["rounded"][which] += _gaussian_bits(
                        k, mean_q / exact.LATENT_MEAN_STEPS,
                        np.exp(log_std_q / exact.LATENT_LOG_STD_STEPS) / cfg.latent_grid, radius).sum()
                    lat["exact"][which] += exact.LatentTables(mean_q, log_std_q, grid_bits, radius).bits_of(k).sum()
                    start = time.perf_counter()
                    coders.quantized_gaussian(mean, np.exp(log_std) / cfg.latent_grid, radius).push(
                        coders.new_coder(), k.astype(np.int32))
                    lat_time["constriction"] += time.perf_counter() - start
                    start = time.perf_counter()
                    exact.gaussian_codec(mean_q, log_std_q, grid_bits, radius).push(coders.new_coder(), k)
                    lat_time["exact"] += time.perf_counter() - start
    # 1M random subpixels: table building alone, both layouts, same rows.
    n = 1 << 20
    q6 = _random_mixture(n, v6, rng)
    q5 = quantize.QuantizedMixture(q6.logits, q6.means, q6.log_scales, q6.coeffs, v5)
    previous = rng.integers(0, 256, (n, 3))
    synthetic = {"float": [], "exact": [], "float+normalise": [], "exact+normalise": []}
    bins = previous[:, 1] // quantize.BIN
    for _ in range(3):  # interleaved, the minimum of three: the machine is shared
        for name, cls, q in (("float", quantize.ChannelTables, q5), ("exact", quantize.ExactChannelTables, q6)):
            for normalise in (False, True):
                tables = cls(q, 1, previous)
                start = time.perf_counter()
                for a in range(0, n, CHUNK):
                    rows = slice(a, a + CHUNK)
                    coarse, fine = tables.coarse(rows), tables.fine(bins, rows)
                    if normalise:  # what `bitsback._binned_codec` hands the coder
                        coders.normalized_rows(coarse), coders.normalized_rows(fine)
                synthetic[name + ("+normalise" if normalise else "")].append(time.perf_counter() - start)
    synthetic = {name: min(times) for name, times in synthetic.items()}

    out = {"images": args.images, "tiles_per_image": args.tiles, "pixels": pix, "latents": lat,
           "latent_count": lat_count, "latent_push_seconds": lat_time, "synthetic_1M_seconds": synthetic,
           "load": os.getloadavg()}
    net_bits = {name: v["prior"] - v["posterior"] for name, v in lat.items()}
    print(f"pixels: {pix['subpixels']} subpixels, float {pix['float'] / pix['subpixels']:.5f} bits each, exact "
          f"{pix['exact'] / pix['subpixels']:.5f}: {100 * (pix['exact'] / pix['float'] - 1):+.4f} %")
    print(f"  table building, real rows: float {pix['float_s']:.2f} s, exact {pix['exact_s']:.2f} s")
    print(f"  table building, 1M random subpixels (coarse + fine, min of 3): float {synthetic['float']:.2f} s, "
          f"exact {synthetic['exact']:.2f} s; with float64 normalisation: float {synthetic['float+normalise']:.2f} s, "
          f"exact {synthetic['exact+normalise']:.2f} s")
    print(f"latents: {lat_count}")
    for name in ("float", "rounded", "exact"):
        print(f"  {name:<8} prior {lat[name]['prior']:.1f} bits  posterior {lat[name]['posterior']:.1f} bits  "
              f"net {net_bits[name]:.1f} bits ({100 * (net_bits[name] / net_bits['float'] - 1):+.3f} % vs float)")
    print(f"  exact vs rounded: net {100 * (net_bits['exact'] / net_bits['rounded'] - 1):+.4f} %, prior "
          f"{100 * (lat['exact']['prior'] / lat['rounded']['prior'] - 1):+.4f} %")
    print(f"  push time: constriction QuantizedGaussian {lat_time['constriction']:.3f} s, exact {lat_time['exact']:.3f} s")
    print(f"load {os.getloadavg()}")
    Path(args.json_out).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
