"""Does a model memorise the windows of the travelling photo bank? −ELBO on crops inside the
windows it trained on against crops of the same photos outside them.

The travelling bank (`.carry/photos-gen2.npz`, built to the device upload) keeps one small
window of each photos2 training photo (96x96 at 1x today). For every photo of that split large
enough, one crop is cut inside its window and one outside it (not overlapping); each model is
measured on both sets with the same latent noise (`train.evaluate_bpd`, the crop with the
model's ring). The two sets hold different content, so their levels differ; what a run changes
is the point: a model that gains more inside than outside learns the windows, not photos.

    python benchmarks/window_overfit.py photo-rgb-halo-1 photo-rgb-halo-2 runs/gen2-halo.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vaezip.network import registry
from vaezip.network.model import HALO
from vaezip.training import bank as photo_bank
from vaezip.training.data import PhotoSource, data_root, photos2_validation, read_image
from vaezip.training.train import evaluate_bpd

BANK = Path(".carry/photos-gen2.npz")


def crop_pairs(full_window: int, window: int, side: int, limit: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) crops (n, side, side, 3) uint8 of up to `limit` photos2 training photos:
    the bank drew a `full_window` region of each and kept its central `window`."""
    rng = np.random.default_rng(seed)
    source = PhotoSource(data_root() / "photos2", exclude=tuple(photos2_validation()))
    paths = source.paths()
    inside, outside = [], []
    for path in paths[:: max(1, len(paths) // limit)][:limit]:
        image = read_image(path, 3, 1)
        h, w = image.shape[:2]
        if h < 3 * side or w < 3 * side:
            continue
        top, left = photo_bank.window_origin(h, w, full_window, f"{path.parent.name}/{path.name}@1")
        top, left = top + (full_window - window) // 2, left + (full_window - window) // 2
        margin = (window - side) // 2
        for _ in range(200):
            t, l = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            if t + side <= top or t >= top + window or l + side <= left or l >= left + window:
                inside.append(image[top + margin: top + margin + side, left + margin: left + margin + side])
                outside.append(image[t: t + side, l: l + side])
                break
    return np.stack(inside), np.stack(outside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="registered names or runs' OUT.pt (with OUT.json)")
    parser.add_argument("--photos", type=int, default=160, help="photos2 training photos to cut from")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    manifest = json.loads(BANK.with_name(BANK.name + ".json").read_text())
    full_window = photo_bank.gen2_bank_recipe().parts[0].window  # photos2 at 1x
    window = max(h for key, h, w, _ in manifest["images"] if key.startswith("photos2/") and key.endswith("@1"))
    side = 64 + 4 * HALO
    inside, outside = crop_pairs(full_window, window, side, args.photos)
    print(f"{len(inside)} photos2 training photos: crops of {side} inside their {window}x{window} window, and outside")
    as_tensor = lambda crops: torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))  # noqa: E731
    rows = []
    for name in args.models:
        net = registry.load_named_or_run(name).net
        ring = bool(net.config.pixel_halo)
        cut = slice(None) if ring else slice(2 * HALO, -2 * HALO)
        a, b = (evaluate_bpd(net, as_tensor(c[:, cut, cut]), 32, torch.device("cpu"), ring=ring)
                for c in (inside, outside))
        rows.append({"model": name, "inside": a, "outside": b, "gap_percent": (a / b - 1) * 100})
        print(f"{name:32s} inside {a:.4f}  outside {b:.4f}  inside/outside {(a / b - 1) * 100:+.2f} %", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"window": window, "crops": len(inside), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
