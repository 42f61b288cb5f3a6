"""Pruning collapsed latent channels after training.

A channel whose posterior equals its prior (average KL ~ 0) carries no
information but still costs coding time and, in bits-back coding, borrows bits
that the first tiles of an image pay in full. Pruned channels are fixed to the
prior mean and never coded; the surviving channels are recorded in the model
config (`active_latents`), so the weights file is unchanged.

    python -m vaezip.prune WEIGHTS.pt META.json OUT.json --data heldout [--threshold 0.01]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import torch

from .config import ModelConfig
from .model import HierarchicalVAE, gaussian_kl


def channel_kl_bits(net: HierarchicalVAE, crops: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    """Average KL per latent channel, in bits per latent dimension, per group.

    Args:
        crops: (N, S, S, C) uint8 evaluation crops.
    """
    totals: list[np.ndarray] = []
    count = 0
    with torch.inference_mode():
        for start in range(0, len(crops), batch):
            x = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch].transpose(0, 3, 1, 2)))
            kls = []

            def choose(g, prior, posterior):
                kls.append(gaussian_kl(posterior, prior).mean(dim=(2, 3)).sum(0).numpy() / math.log(2))
                return posterior.mean

            net.top_down(x.shape[0], x.shape[2], x.shape[3], choose, net.bottom_up(x))
            totals = kls if not totals else [t + k for t, k in zip(totals, kls)]
            count += x.shape[0]
    return [t / count for t in totals]


def active_channels(kl_bits: list[np.ndarray], threshold: float) -> tuple[tuple[int, ...], ...]:
    """Channels whose average KL exceeds `threshold` bits per dimension."""
    return tuple(tuple(int(c) for c in np.flatnonzero(k > threshold)) for k in kl_bits)


def main(argv=None) -> int:
    from .data import evaluation_crops, load_dataset, pad_to_multiple

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("meta", help="the training run's JSON (config + training record)")
    parser.add_argument("out", help="JSON with the pruned config, for `python -m vaezip.registry add`")
    parser.add_argument("--data", default="heldout", help="images to measure KL on (never the test set)")
    parser.add_argument("--threshold", type=float, default=0.01, help="bits per latent dimension")
    parser.add_argument("--crops", type=int, default=256)
    parser.add_argument("--crop", type=int, default=64, help="crop side; smaller images are edge-padded to it")
    args = parser.parse_args(argv)
    meta = json.loads(open(args.meta).read())
    config = ModelConfig.from_dict({**meta["config"], "active_latents": None})
    net = HierarchicalVAE(config)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    images = [pad_to_multiple(im, 16, minimum=args.crop) for im in load_dataset(args.data, channels=config.channels)]
    crops = evaluation_crops(images, args.crop, args.crops, seed=20240601)
    kl = channel_kl_bits(net, crops)
    active = active_channels(kl, args.threshold)
    meta["config"] = replace(config, active_latents=active).to_dict()
    meta.setdefault("training", {})["pruning"] = {
        "data": args.data, "crops": len(crops), "threshold_bits_per_dim": args.threshold,
        "kl_bits_per_dim": [np.round(k, 4).tolist() for k in kl],
        "kept": sum(len(a) for a in active), "of": sum(len(k) for k in kl),
    }
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"kept {sum(len(a) for a in active)} of {sum(len(k) for k in kl)} latent channels: {active}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
