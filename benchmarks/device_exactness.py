"""The fixed-point network on another device against the CPU: the same numbers, or where not.

Runs a registered fixed-point model on held-out crops of the photo bank, each crop one tile
(latents at the posterior means, every pixel step's mixture parameters, teacher-forced
context, as `benchmarks/stage_bits.py` measures), once on the CPU and once on `--device`,
and compares every output bit for bit: the encoder's latent features and each step's
logits, means, log-scales and coefficients. Needs no entropy coder (the GPU machine has no
constriction), so it checks the arithmetic a GPU encode or decode would run (issue 14).
Writes a JSON report; exit status 1 if anything differs.

    python benchmarks/device_exactness.py --device cuda --json-out $OUT/exactness.json
    python benchmarks/device_exactness.py --device cpu --crops 8     # a dry run here
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vaezip.coding.bitsback import image_rings
from vaezip.coding.tiles import TileGrid, lattice_to_pixels, split_tiles
from vaezip.network import registry
from vaezip.network.fixedpoint import exact_torch_settings
from vaezip.training import bankfile


def outputs(net, crops: list[np.ndarray], device: torch.device) -> dict[str, np.ndarray]:
    """Every output the check compares, as float64 arrays on the CPU, keyed by name."""
    out: dict[str, list[np.ndarray]] = {}
    for pixels in crops:
        grid = TileGrid(pixels.shape[0], pixels.shape[1], pixels.shape[0])
        indices = range(0, 1)
        lattice = torch.from_numpy(split_tiles(pixels, grid, indices))
        x = torch.from_numpy(lattice_to_pixels(lattice.numpy())).to(device)
        context, available = lattice, None
        if net.config.pixel_halo:
            ringed, available = image_rings(pixels, grid, indices)
            context, available = torch.from_numpy(ringed), available.to(device)
        context = context.to(device)
        with torch.inference_mode():
            features = net.sample_posterior(x, latents="mean").features
            out.setdefault("features", []).append(features.double().cpu().numpy())
            for k in range(len(net.schedule)):
                params = net.step_params(features, context, k, available=available)
                for name in ("logits", "means", "log_scales", "coeffs"):
                    value = getattr(params, name)
                    if value is not None:
                        out.setdefault(f"step{k}.{name}", []).append(value.double().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="default: the registry's RGB model")
    parser.add_argument("--bank", default=".carry/photos-gen2.npz", help="its held-out crops are the inputs")
    parser.add_argument("--crops", type=int, default=64)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    exact_torch_settings()
    name = args.model or registry.default_model("RGB")
    loaded = registry.load_model(name)
    if loaded.spec.config.fixed_bits is None:
        raise SystemExit(f"{name} is a float model: only fixed-point models are exact across devices")
    crops = list(bankfile.read_photo_bank(args.bank).heldout[: args.crops])
    net = loaded.net
    timings = {}
    t = time.perf_counter()
    reference = outputs(net.to("cpu"), crops, torch.device("cpu"))
    timings["cpu_s"] = time.perf_counter() - t
    device = torch.device(args.device)
    t = time.perf_counter()
    other = outputs(net.to(device), crops, device)
    timings[f"{device.type}_s"] = time.perf_counter() - t
    net.to("cpu")
    report = {"model": name, "device": str(device), "crops": len(crops), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "timings": timings, "outputs": {}}
    for key, value in reference.items():
        differ = int(np.count_nonzero(value != other[key]))
        report["outputs"][key] = {"values": int(value.size), "differ": differ}
    report["identical"] = all(o["differ"] == 0 for o in report["outputs"].values())
    text = json.dumps(report, indent=1)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
