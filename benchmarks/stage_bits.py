"""Where the pixel bits go: bits per subpixel of every pixel step, and of a tile's edge ring.

For each model, on the given images cut into coding tiles (latents at the posterior means,
teacher-forced pixel context, as `model_terms` measures): for every step of the model's
pixel schedule (`HierarchicalVAE.schedule`: stage 0's base and sub-lattice steps, then
stages 1-3), -log2 p of its real subpixels, its share of the pixel bits, and the bits of
the pixels within `--ring` pixels of a tile's edge against the interior. Reconstruction
bits only (the latents' KL is not in the table). A model that reads the ring of neighbouring
pixels around each tile (`pixel_halo`) reads it as the coder does (`bitsback.image_rings`,
coding batches of `batch_limit` tiles). Models: registered names or a run's OUT.pt.

    python benchmarks/stage_bits.py --models photo-rgb-exact-2 photo-rgb-steps-1 \
        --images ../shared/data/kodak/kodim0{1..7}.png [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from vaezip.coding.bitsback import batch_limit, image_rings
from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles
from vaezip.imaging.images import read_image
from vaezip.network import registry
from vaezip.network.model import mixture_log_prob, split_lattice


def step_label(step) -> str:
    if step.stage > 0:
        return f"stage {step.stage}"
    if step.stride == 1:
        return "stage 0"
    return f"stage 0 ({step.row},{step.col}) of {step.stride}x{step.stride}"


def measure(loaded: registry.LoadedModel, images: list[np.ndarray], tile: int, ring: int) -> dict:
    """Per step: bits and subpixels; and ring/interior bits and subpixels, summed over `images`."""
    net = loaded.net
    batch = batch_limit(tile)
    steps = net.schedule
    bits, counts = np.zeros(len(steps)), np.zeros(len(steps))
    edge = np.zeros(2)  # bits: ring, interior
    edge_n = np.zeros(2)
    yy, xx = np.mgrid[0:tile, 0:tile]
    in_ring = (np.minimum(yy, tile - 1 - yy) < ring) | (np.minimum(xx, tile - 1 - xx) < ring)
    ring_lattice = split_lattice(torch.from_numpy(in_ring)[None, None])[0, :, 0].numpy()  # (4, T/2, T/2)
    for pixels in images:
        grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
        for start in range(0, grid.count, batch):
            indices = range(start, min(start + batch, grid.count))
            lattice = torch.from_numpy(split_tiles(pixels, grid, indices))
            x = torch.from_numpy(lattice_to_pixels(lattice.numpy()))
            real = split_lattice(torch.from_numpy(grid.pixel_masks(indices)))[:, :, 0].numpy()  # (n, 4, h, w)
            context, available = lattice, None
            if net.config.pixel_halo:
                ringed, available = image_rings(pixels, grid, indices)
                context = torch.from_numpy(ringed)
            with torch.inference_mode():
                features = net.sample_posterior(x, latents="mean").features
                for k, step in enumerate(steps):
                    rows, cols = step.window
                    params = net.step_params(features, context, k, available=available)  # on the step's own grid
                    values = lattice[:, step.stage, :, rows, cols].float()
                    nats = -mixture_log_prob(params, values).sum(1).double().numpy()
                    where = real[:, step.stage, rows, cols]
                    channels = lattice.shape[2]
                    bits[k] += nats[where].sum() / math.log(2)
                    counts[k] += where.sum() * channels
                    ring_step = ring_lattice[step.stage, rows, cols]
                    for j, part in enumerate((ring_step, ~ring_step)):
                        chosen = where & part[None]
                        edge[j] += nats[chosen].sum() / math.log(2)
                        edge_n[j] += chosen.sum() * channels
    total = bits.sum()
    rows = [{"step": step_label(st), "bpd": bits[k] / counts[k], "share": bits[k] / total,
             "subpixels": int(counts[k])} for k, st in enumerate(steps)]
    return {"model": loaded.spec.name, "steps": rows, "pixel_bpd": total / counts.sum(),
            "ring_bpd": edge[0] / edge_n[0], "interior_bpd": edge[1] / edge_n[1], "ring": ring}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--ring", type=int, default=2, help="edge ring width in pixels")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for name in args.models:
        loaded = registry.load_named_or_run(name)
        images = [read_image(p).pixels[:, :, : loaded.spec.config.channels] for p in args.images]
        result = measure(loaded, images, args.tile, args.ring)
        results.append(result)
        print(f"\n{name}: pixel bits {result['pixel_bpd']:.4f} bpd on {len(images)} images "
              f"(tiles {args.tile}, latents at the posterior means)")
        print("| step | bits per subpixel | share of pixel bits |")
        print("|---|---|---|")
        for row in result["steps"]:
            print(f"| {row['step']} | {row['bpd']:.3f} | {100 * row['share']:.1f} % |")
        print(f"ring of {args.ring} px: {result['ring_bpd']:.3f} bpd, interior {result['interior_bpd']:.3f} bpd")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
