"""Would a four-stage model gain from its neighbours' pixels at a tile's edge, untrained? (issue 15)

Every tile's stages 1-3 are run twice, latents at the posterior means, teacher-forced context:
as coded (the context convolution zero-pads at the tile's edge) and with a halo (the context
convolution reads the neighbouring tiles' pixels of the same earlier stages, all neighbours
available: the upper bound of decoding a batch's tiles in lockstep). Prints the pixel bits of
both, by stage, and of the edge ring (the outermost position of each stage's grid: 2 pixels).
The image is cropped to whole tiles.

    python benchmarks/tile_edge_probe.py --model photo-rgb-exact-2 IMAGE...
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles
from vaezip.imaging.images import read_image
from vaezip.network import registry
from vaezip.network.model import mixture_log_prob, split_lattice, split_params

TILE = 64
BATCH = 16


def with_halo(net, features, contexts, step: int) -> torch.Tensor:
    """The step's head output when its context convolution reads `contexts`, each one
    position wider on every side, without zero padding."""
    stage = net.stages[step]
    conv = stage.context
    padding = conv.padding
    conv.padding = (0, 0)
    try:
        return torch.cat([stage(features[i : i + BATCH], contexts[i : i + BATCH])
                          for i in range(0, len(features), BATCH)])
    finally:
        conv.padding = padding


def probe(net, pixels: np.ndarray) -> dict:
    height, width = pixels.shape[0] // TILE * TILE, pixels.shape[1] // TILE * TILE
    pixels = pixels[:height, :width].copy()
    grid = TileGrid(height, width, TILE)
    lattice = torch.from_numpy(split_tiles(pixels, grid, range(grid.count)))
    whole = split_lattice(torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous())[0]  # (4, C, H/2, W/2)
    x = torch.from_numpy(lattice_to_pixels(lattice.numpy()))
    half, channels = TILE // 2, pixels.shape[2]
    bits = {"padded": np.zeros(4), "halo": np.zeros(4)}
    ring = {"padded": 0.0, "halo": 0.0}
    with torch.inference_mode():
        features = torch.cat([net.sample_posterior(x[i : i + BATCH], latents="mean").features
                              for i in range(0, len(x), BATCH)])
        for step, st in enumerate(net.schedule):
            padded = torch.cat([net.step_raw(features[i : i + BATCH], lattice[i : i + BATCH], step)
                                for i in range(0, len(x), BATCH)])
            outputs = {"padded": padded, "halo": padded}
            if st.stage > 0:
                canvas = torch.zeros(4, channels, height // 2 + 2, width // 2 + 2)
                canvas[: st.stage, :, 1:-1, 1:-1] = net._pixel_input(whole[: st.stage])
                contexts = torch.stack([
                    canvas[:, :, r * half : r * half + half + 2, c * half : c * half + half + 2].reshape(
                        4 * channels, half + 2, half + 2)
                    for r, c in (divmod(i, grid.cols) for i in range(grid.count))])
                outputs["halo"] = with_halo(net, features, contexts, step)
            for name, raw in outputs.items():
                nats = -mixture_log_prob(split_params(raw, net.config), lattice[:, st.stage].float()).sum(1)
                bits[name][st.stage] += float(nats.sum()) / math.log(2)
                edge = nats[:, [0, -1], :].sum() + nats[:, 1:-1][:, :, [0, -1]].sum()
                ring[name] += float(edge) / math.log(2)
    return {"subpixels": pixels.size, "bits": bits, "ring": ring}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", default="photo-rgb-exact-2")
    args = parser.parse_args()
    net = registry.load_model(args.model).net
    if len(net.schedule) != 4:
        raise SystemExit("give a four-stage model")
    print("| image | pixel bpd, zero-padded | with the halo | change | edge ring, padded | with the halo |")
    print("|---|---|---|---|---|---|")
    for path in args.images:
        r = probe(net, read_image(path).pixels)
        pad, halo = r["bits"]["padded"].sum(), r["bits"]["halo"].sum()
        print(f"| {path.split('/')[-1]} | {pad / r['subpixels']:.4f} | {halo / r['subpixels']:.4f} | "
              f"{halo / pad - 1:+.2%} | {r['ring']['padded'] / 1e3:.0f} kbit | {r['ring']['halo'] / 1e3:.0f} kbit |",
              flush=True)


if __name__ == "__main__":
    main()
