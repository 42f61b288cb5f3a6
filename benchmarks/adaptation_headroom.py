"""How much can a per-image adaptation of the pixel heads save, and which form? (issue 16)

For each image: the four stage heads' inputs (the last layer's `pixel_width` features) and
the true subpixels of every tile (latents at the posterior mean, teacher-forced context),
then, per stage, a fit by Adam on the image's own positions (8,192 a step) of:

  out           a gain and a bias per head output (format 5/6's `coding.adapt`: 240 values)
  in+out        also a gain and a bias per head input (+ 2 x pixel_width a stage)
  lowrank8+out  a rank-8 update of the head's weights (8 x (inputs + outputs) a stage) + out
  full          every weight and bias of the heads

Reports the pixel bits before and after (on the fitted positions: an upper bound on what
the encoder gains) and the side information at about 8 bits a value. Float model, float fit.

    python benchmarks/adaptation_headroom.py IMAGE... [--model photo-rgb-2] [--steps 80]
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

STAGES = 4
FORMS = {"out": 0.004, "in+out": 0.004, "lowrank8+out": 0.004, "full": 0.001}
"""Adam learning rate of each form."""


def head_data(model, pixels: np.ndarray, tile: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per stage: head inputs (features, M) and true subpixels (C, M) float32 of the real positions."""
    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(STAGES)]
    values: list[list[torch.Tensor]] = [[] for _ in range(STAGES)]
    captured = {}
    hooks = [model.stages[s].head.register_forward_hook(
        lambda module, args, out, s=s: captured.__setitem__(s, args[0].detach())) for s in range(STAGES)]
    try:
        with torch.no_grad():
            for start in range(0, grid.count, 16):
                indices = range(start, min(start + 16, grid.count))
                x = torch.from_numpy(lattice_to_pixels(split_tiles(pixels, grid, indices)))
                features = model.sample_posterior(x, latents="mean").features
                lattice, real = split_lattice(x), split_lattice(torch.from_numpy(grid.pixel_masks(indices)))[:, :, 0]
                for s in range(STAGES):
                    model.stage_raw(features, lattice, s)
                    inputs[s].append(captured[s].permute(1, 0, 2, 3)[:, real[:, s]])
                    values[s].append(lattice[:, s].permute(1, 0, 2, 3)[:, real[:, s]].float())
    finally:
        for hook in hooks:
            hook.remove()
    return [(torch.cat(i, 1), torch.cat(v, 1)) for i, v in zip(inputs, values)]


def nats(config, weight, bias, x, v, p: dict) -> torch.Tensor:
    """-log p of subpixels v (C, M) from head inputs x (F, M) under the adapted head, nats."""
    if "in_gain" in p:
        x = x * (1 + p["in_gain"][:, None]) + p["in_bias"][:, None]
    raw = weight @ x + bias[:, None]
    if "out_gain" in p:
        raw = raw * (1 + p["out_gain"][:, None]) + p["out_bias"][:, None]
    params = split_params(raw.T[:, :, None, None], config)
    return -mixture_log_prob(params, v.T[:, :, None, None]).sum()


def fit(model, data, form: str, steps: int) -> tuple[float, float, int]:
    """(bits before, bits after, fitted values) of one form over the stages."""
    before = after = 0.0
    count = 0
    for s, (x, v) in enumerate(data):
        head = model.stages[s].head
        w0, b0 = head.weight[:, :, 0, 0].detach(), head.bias.detach()
        outputs, features = w0.shape
        p: dict[str, torch.Tensor] = {}
        if "out" in form:
            p["out_gain"], p["out_bias"] = torch.zeros(outputs), torch.zeros(outputs)
        if "in+" in form:
            p["in_gain"], p["in_bias"] = torch.zeros(features), torch.zeros(features)
        if "lowrank8" in form:
            p["u"] = torch.zeros(outputs, 8)
            p["v"] = torch.randn(8, features, generator=torch.Generator().manual_seed(s)) * 0.01
        if form == "full":
            p["w"], p["b"] = w0.clone(), b0.clone()
        for t in p.values():
            t.requires_grad_(True)
        count += sum(t.numel() for t in p.values())

        def head_of(p=p, w0=w0, b0=b0):
            w = p.get("w", w0)
            return (w + p["u"] @ p["v"] if "u" in p else w), p.get("b", b0)

        optimizer = torch.optim.Adam(list(p.values()), lr=FORMS[form])
        rng = np.random.default_rng(0)
        with torch.no_grad():
            before += float(nats(model.config, w0, b0, x, v, {}))
        for _ in range(steps):
            rows = torch.from_numpy(rng.choice(x.shape[1], min(x.shape[1], 8192), replace=False))
            loss = nats(model.config, *head_of(), x[:, rows], v[:, rows], p) / len(rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after += float(nats(model.config, *head_of(), x, v, p))
    return before / math.log(2), after / math.log(2), count


TABLE_HEAD = ("| image | form | pixel bits | after fit | saved | values | side information (8 bits a value) | net |\n"
              "|---|---|---|---|---|---|---|---|")


def table_row(path: str, form: str, before: float, after: float, count: int) -> str:
    """One markdown row of `TABLE_HEAD`: bits before and after a fit of `count` values."""
    side = 8 * count
    return (f"| {str(path).split('/')[-1]} | {form} | {before / 1e6:.4f} Mbit | {after / 1e6:.4f} Mbit | "
            f"{1 - after / before:.2%} | {count} | {side / 1e3:.1f} kbit ({side / before:.2%}) | "
            f"{1 - (after + side) / before:.2%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", default="photo-rgb-2", help="a float model")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = registry.load_model(args.model).net.eval()
    if model.fixed:
        raise SystemExit("give a float model: the fit runs on the float head")
    if len(model.schedule) != STAGES:
        raise SystemExit("give a four-stage model: the fit hooks one head per stage")
    print(TABLE_HEAD)
    for path in args.images:
        data = head_data(model, read_image(path).pixels)
        for form in FORMS:
            before, after, count = fit(model, data, form, args.steps)
            print(table_row(path, form, before, after, count), flush=True)


if __name__ == "__main__":
    main()
