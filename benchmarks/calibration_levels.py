"""What scale calibration can save, by granularity, estimated from the model's −ELBO.

For each image, the single-sample −ELBO (tiles as coded, one posterior sample, seed 0)
is recomputed with the pixel decoder's log-scales shifted by an offset from a grid
(in nats: -0.5 to +1.75 in steps of 1/8), and the best offset is taken

  per image        one offset for everything,
  per channel      one per colour channel,
  per stage        one per (sub-lattice stage, channel): 12 for RGB.

Format version 3 goes one step further (one set per batch of tiles, chosen by the
encoder on a sample of positions); its real file sizes come from `kodak.py`.

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
from vaezip.coding.tiles import TileGrid
from vaezip.evaluation import rates
from vaezip.imaging.images import as_image
from vaezip.network import registry
from vaezip.network.model import LOG_SCALE_MAX, LOG_SCALE_MIN, MixtureParams, mixture_log_prob, split_lattice

OFFSETS = [-0.5 + 0.125 * i for i in range(19)]


def stage_channel_bits(loaded: registry.LoadedModel, pixels: np.ndarray, tile: int = 64) -> tuple[np.ndarray, float]:
    """(reconstruction bits (offsets, 4 stages, C), KL bits) of one image."""
    net = loaded.net
    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    generator = torch.Generator().manual_seed(0)
    recon = np.zeros((len(OFFSETS), 4, pixels.shape[2]))
    kl = 0.0
    with torch.inference_mode():
        for indices in rates._batches(grid.count, rates.NELBO_BATCH):
            x, mask = rates._tile_tensors(pixels, grid, indices)
            sample = net.sample_posterior(x, generator=generator)
            features, kls = sample.features, sample.kl_nats
            lattice, real = split_lattice(x), split_lattice(mask)
            for s in range(4):
                p = net.stage_params(features, lattice, s)
                for i, offset in enumerate(OFFSETS):
                    shifted = MixtureParams(p.logits, p.means,
                                            (p.log_scales + offset).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX), p.coeffs)
                    log_prob = mixture_log_prob(shifted, lattice[:, s].float()) * real[:, s]
                    recon[i, s] -= log_prob.double().sum(dim=(0, 2, 3)).numpy() / math.log(2)
            kl += sum(float(k.double().sum()) for k in kls) / math.log(2)
    return recon, kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    results = {}
    for path in args.images:
        image = as_image(path)
        loaded = imagecodec.model_for_mode(image.mode)
        recon, kl = stage_channel_bits(loaded, image.pixels)
        n = image.pixels.size
        levels = {
            "none": recon[OFFSETS.index(0.0)].sum(),
            "per image": recon.sum(axis=(1, 2)).min(),
            "per channel": recon.sum(axis=1).min(axis=0).sum(),
            "per stage": recon.min(axis=0).sum(),
        }
        results[str(path)] = {"subpixels": n, "folder": path.parent.name,
                              "bpd": {k: (v + kl) / n for k, v in levels.items()},
                              "best_per_stage_nats": np.array(OFFSETS)[recon.argmin(axis=0)].tolist()}
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
