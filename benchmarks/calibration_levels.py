"""What scale calibration can save, by granularity, estimated from the model's −ELBO.

For each image, the single-sample −ELBO (tiles as coded, one posterior sample, seed 0)
is recomputed with the pixel decoder's log-scales shifted by an offset from a grid
(in nats: -0.5 to +1.75 in steps of 1/8), and the best offset is taken

  per image        one offset for everything,
  per channel      one per colour channel,
  per stage        one per (sub-lattice stage, channel): 12 for RGB,
  per batch        one per (coding batch of 24 tiles, stage, channel): format version 3's,
  per tile         one per (tile, stage, channel).

The last two pay for their offsets (`calibrate.offset_bits`, chosen to minimise bits
plus cost); the first three cost next to nothing. Format version 3 chooses its
offsets on a sample of positions; its real file sizes come from `kodak.py`.
Tiles are coded with their rings (a `pixel_halo` model) as the coder fills them.

    .venv/bin/python benchmarks/calibration_levels.py IMAGE... [--json-out FILE]

Prints one line per image and the totals (total bits / total subpixels) of each group
of images given (files in the same folder form a group).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vaezip.coding import imagecodec
from vaezip.coding.bitsback import batch_limit
from vaezip.coding.calibrate import offset_bits
from vaezip.coding.quantize import LOG_SCALE_STEPS
from vaezip.coding.tiles import TileGrid
from vaezip.evaluation import rates
from vaezip.imaging.images import as_image
from vaezip.network import registry
from vaezip.network.model import HALO, LOG_SCALE_MAX, LOG_SCALE_MIN, MixtureParams, mixture_log_prob, split_lattice

OFFSETS = [-0.5 + 0.125 * i for i in range(19)]


def stage_channel_bits(loaded: registry.LoadedModel, pixels: np.ndarray, tile: int = 64
                       ) -> tuple[np.ndarray, float, int]:
    """(reconstruction bits (offsets, tiles, 4 stages, C), KL bits, tiles per coding batch) of one image."""
    net = loaded.net
    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    generator = torch.Generator().manual_seed(0)
    recon = np.zeros((len(OFFSETS), grid.count, 4, pixels.shape[2]))
    kl = 0.0
    limit = batch_limit(tile)
    with torch.inference_mode():
        for indices in rates._batches(grid.count, limit):
            tiles = rates._tile_tensors(pixels, grid, indices, indices.start if net.config.pixel_halo else None)
            sample = net.sample_posterior(tiles.x, generator=generator)
            lattice, real = split_lattice(tiles.pixels()), split_lattice(tiles.mask)
            inner = lattice if tiles.available is None else lattice[..., HALO:-HALO, HALO:-HALO]
            for s in range(4):
                p = net.stage_params(sample.features, lattice, s, available=tiles.available)
                for i, offset in enumerate(OFFSETS):
                    shifted = MixtureParams(p.logits, p.means,
                                            (p.log_scales + offset).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX), p.coeffs)
                    log_prob = mixture_log_prob(shifted, inner[:, s].float()) * real[:, s]
                    recon[i, indices.start : indices.stop, s] -= log_prob.double().sum(dim=(2, 3)).numpy() / math.log(2)
            kl += sum(float(k.double().sum()) for k in sample.kl_nats) / math.log(2)
    return recon, kl, limit


def paid_minimum(recon: np.ndarray) -> float:
    """Bits of (offsets, ...) with the best offset per entry chosen with its code's cost."""
    cost = offset_bits(np.rint(np.array(OFFSETS) * LOG_SCALE_STEPS).astype(np.int64))
    return float((recon + cost.reshape(-1, *([1] * (recon.ndim - 1)))).min(axis=0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    results = {}
    for path in args.images:
        image = as_image(path)
        loaded = imagecodec.model_for_mode(image.mode)
        recon, kl, limit = stage_channel_bits(loaded, image.pixels)
        n = image.pixels.size
        per_stage = recon.sum(axis=1)  # (offsets, 4, C)
        batches = [recon[:, b : b + limit].sum(axis=1) for b in range(0, recon.shape[1], limit)]
        levels = {
            "none": per_stage[OFFSETS.index(0.0)].sum(),
            "per image": per_stage.sum(axis=(1, 2)).min(),
            "per channel": per_stage.sum(axis=1).min(axis=0).sum(),
            "per stage": per_stage.min(axis=0).sum(),
            "per batch": sum(paid_minimum(b) for b in batches),
            "per tile": paid_minimum(recon),
        }
        results[str(path)] = {"subpixels": n, "folder": path.parent.name,
                              "bpd": {k: (v + kl) / n for k, v in levels.items()},
                              "best_per_stage_nats": np.array(OFFSETS)[per_stage.argmin(axis=0)].tolist()}
        print(path.name, " ".join(f"{k} {v:.4f}" for k, v in results[str(path)]["bpd"].items()), flush=True)
    groups = defaultdict(list)
    for r in results.values():
        groups[r["folder"]].append(r)
    totals = {}
    for folder, rows in groups.items():
        n = sum(r["subpixels"] for r in rows)
        totals[folder] = {k: sum(r["bpd"][k] * r["subpixels"] for r in rows) / n for k in rows[0]["bpd"]}
        print(f"total {folder} ({len(rows)} images):", " ".join(f"{k} {v:.4f}" for k, v in totals[folder].items()))
    if args.json_out:
        args.json_out.write_text(json.dumps({"offsets_nats": OFFSETS, "images": results, "totals": totals}, indent=1))


if __name__ == "__main__":
    main()
