"""How much more than the heads' biases would a per-image fit of every pixel-step bias save? (issue 16)

For each image: the features of every 64x64 tile (latents at the posterior means) and
the tiles with their rings as the coder fills them (`bitsback.image_rings`), then two
fits by Adam on the image's own tiles (16 random tiles a step), each from the shipped
model:

  head     the bias of each pixel step's head (its P outputs), the part of format 5's
           adaptation (`coding.adapt`) that needs no gain
  steps    the biases of every layer of every pixel step whose bias is not redundant
           (`feat`, `mid1`, `mid2`, `head`; the context and ring layers add into `feat`)
  pixel    every weight and bias of every pixel step (biases at --lr, weights at
           --weight-lr): no side information could pay for it; it bounds what any
           per-image adaptation of the pixel decoder can save

The fit runs the fixed-point model's training arithmetic (rounding straight through)
and costs a forward and backward pass of the pixel steps a step. Reports the
reconstruction bits before and after on all tiles (what the fit saw: an upper bound)
and the side information at 8 bits a value.

    python benchmarks/stage_bias_headroom.py IMAGE... [--model photo-rgb-halo-2] [--steps 80] [--lr 0.003]
        [--forms head,steps,pixel] [--weight-lr 0.0001]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from adaptation_headroom import TABLE_HEAD, table_row

from vaezip.coding.bitsback import batch_limit, image_rings
from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles
from vaezip.imaging.images import read_image
from vaezip.network import registry
from vaezip.network.model import HALO, mixture_log_prob, split_lattice

TILE = 64
BATCH = 16
FORMS = ("head", "steps", "pixel")


def tile_data(model, pixels: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
    """Per batch of tiles: (features, lattice with ring, availability, real-pixel lattice mask)."""
    grid = TileGrid(pixels.shape[0], pixels.shape[1], TILE)
    limit = batch_limit(TILE)
    batches = []
    model.eval()
    with torch.no_grad():
        for start in range(0, grid.count, BATCH):
            indices = range(start, min(start + BATCH, grid.count))
            x = torch.from_numpy(lattice_to_pixels(split_tiles(pixels, grid, indices)))
            features = model.sample_posterior(x, latents="mean").features
            rings = [image_rings(pixels, grid, range(i, i + 1), i // limit * limit) for i in indices]
            lattice = torch.from_numpy(np.concatenate([r[0] for r in rings]))
            available = torch.cat([r[1] for r in rings])
            real = split_lattice(torch.from_numpy(grid.pixel_masks(indices)))
            batches.append((features, lattice, available, real))
    return batches


def bits(model, batch) -> torch.Tensor:
    """Reconstruction bits of one batch's real subpixels."""
    features, lattice, available, real = batch
    inner = lattice[..., HALO:-HALO, HALO:-HALO]
    total = 0.0
    for s in range(4):
        log_prob = mixture_log_prob(model.stage_params(features, lattice, s, available=available), inner[:, s].float())
        total = total + (log_prob * real[:, s]).sum()
    return -total / math.log(2)


def fitted_groups(model, form: str, lr: float, weight_lr: float) -> list[dict]:
    """The optimiser's parameter groups of one form."""
    if form == "pixel":
        named = list(model.stages.named_parameters())
        return [{"params": [p for n, p in named if n.endswith("bias")], "lr": lr},
                {"params": [p for n, p in named if not n.endswith("bias")], "lr": weight_lr}]
    layers = ("head",) if form == "head" else ("feat", "mid1", "mid2", "head")
    return [{"params": [getattr(stage, name).bias for stage in model.stages for name in layers], "lr": lr}]


def fit(model, batches, form: str, steps: int, lr: float, weight_lr: float) -> tuple[float, float, int, float]:
    """(bits before, bits after, values fitted, seconds) of one form; restores the model."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(False)
    # The fixed-point layers take the training path (rounding straight through) only while
    # their weights want gradients; the optimiser holds the biases alone.
    for module in model.stages.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.requires_grad_(True)
    groups = fitted_groups(model, form, lr, weight_lr)
    fitted = [p for g in groups for p in g["params"]]
    for p in fitted:
        p.requires_grad_(True)
    model.train()
    with torch.no_grad():
        before = sum(float(bits(model, b)) for b in batches)
    tiles = [(i, j) for i, b in enumerate(batches) for j in range(len(b[0]))]
    optimizer = torch.optim.Adam(groups)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        chosen = [tiles[k] for k in rng.choice(len(tiles), min(BATCH, len(tiles)), replace=False)]
        batch = tuple(torch.cat([batches[i][part][j : j + 1] for i, j in chosen]) for part in range(4))
        loss = bits(model, batch) / max(1.0, float(batch[3].sum()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        after = sum(float(bits(model, b)) for b in batches)
    count = sum(p.numel() for p in fitted)
    model.load_state_dict(saved)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return before, after, count, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", default="photo-rgb-halo-2", help="a fixed-point model with a ring")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.003, help="Adam learning rate, in the float biases' units")
    parser.add_argument("--weight-lr", type=float, default=1e-4, help="Adam learning rate of the weights (form pixel)")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = registry.load_model(args.model).net
    if not (model.fixed and model.config.pixel_halo):
        raise SystemExit("give a fixed-point model with a ring (format version 8)")
    head, rule = TABLE_HEAD.split("\n")
    print(f"{head} fit s |\n{rule}---|")
    for path in args.images:
        batches = tile_data(model, read_image(path).pixels)
        for form in args.forms.split(","):
            if form not in FORMS:
                raise SystemExit(f"unknown form {form!r} (known: {', '.join(FORMS)})")
            before, after, count, seconds = fit(model, batches, form, args.steps, args.lr, args.weight_lr)
            print(f"{table_row(path, form, before, after, count)} {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
