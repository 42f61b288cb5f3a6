"""Pruning collapsed latent channels after training.

A channel whose posterior equals its prior (average KL ~ 0) carries no
information but still costs coding time and, in bits-back coding, borrows bits
that the first tiles of an image pay in full. Pruned channels are fixed to the
prior mean and never coded; the surviving channels are recorded in the model
config (`active_latents`), so the weights file is unchanged.

    vaezip prune WEIGHTS.pt META.json OUT.json --data heldout [--threshold 0.01]
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vaezip.network.config import ModelConfig
from vaezip.network.model import HierarchicalVAE


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
            walk = net.sample_posterior(x, latents="mean")
            kls = [kl.mean(dim=(2, 3)).sum(0).numpy() / math.log(2) for kl in walk.kl_nats]
            totals = kls if not totals else [t + k for t, k in zip(totals, kls)]
            count += x.shape[0]
    return [t / count for t in totals]


def active_channels(kl_bits: list[np.ndarray], threshold: float) -> tuple[tuple[int, ...], ...]:
    """Channels whose average KL exceeds `threshold` bits per dimension."""
    return tuple(tuple(int(c) for c in np.flatnonzero(k > threshold)) for k in kl_bits)


def prune(weights: str | Path, meta: dict, data: str = "heldout", threshold: float = 0.01, crops: int = 256,
          crop: int = 64) -> tuple[dict, tuple[tuple[int, ...], ...], list[np.ndarray]]:
    """Measure each latent channel's KL on `data` and keep those above `threshold`.

    Args:
        weights: The trained weights file (the EMA weights `vaezip train` writes).
        meta: The training run's JSON record (config + training record); not modified.
        data: `load_dataset` spec of the images to measure on (never the test set).
        threshold: Bits per latent dimension a channel must exceed to be kept.
        crops: Number of evaluation crops.
        crop: Crop side; smaller images are edge-padded to it.

    Returns:
        (the record with the pruned config and `training.pruning`, for `vaezip registry add`;
        the kept channels per group; the KL per channel per group, bits per dimension).
    """
    from vaezip.training.data import evaluation_crops, load_dataset, pad_to_multiple

    config = ModelConfig.from_dict({**meta["config"], "active_latents": None})
    net = HierarchicalVAE(config)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    images = [pad_to_multiple(im, 16, minimum=crop) for im in load_dataset(data, channels=config.channels)]
    sample = evaluation_crops(images, crop, crops, seed=20240601)
    kl = channel_kl_bits(net, sample)
    active = active_channels(kl, threshold)
    record = json.loads(json.dumps(meta))
    record["config"] = replace(config, active_latents=active).to_dict()
    record.setdefault("training", {})["pruning"] = {
        "data": data, "crops": len(sample), "threshold_bits_per_dim": threshold,
        "kl_bits_per_dim": [np.round(k, 4).tolist() for k in kl],
        "kept": sum(len(a) for a in active), "of": sum(len(k) for k in kl),
    }
    return record, active, kl
