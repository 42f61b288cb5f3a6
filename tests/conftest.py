"""Shared fixtures: tiny seeded random-weight models and random images of every mode.

The tiny models code a tile far faster than the shipped ones, so coder and bits-back
tests do not pay for the shipped models; tests that are about the shipped
models load them through `registry.load_model`.

The shared data sets are found in $VAEZIP_DATA, else in ../shared/data beside the
checkout; tests that need them skip when they are absent (`require_data`).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from vaezip.imaging.images import CHANNELS, Image

DATA = Path(os.environ.get("VAEZIP_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
os.environ["VAEZIP_DATA"] = str(DATA)  # vaezip.training.data.data_root() looks where the tests look
KODAK = DATA / "kodak"


def require_data(*parts: str) -> Path:
    """DATA / parts; skips the calling test if it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (set VAEZIP_DATA)")
    return path

TINY_SCALES = ((16, 1, 4), (4, 1, 2))


def _state_sha256(state: dict) -> str:
    """sha256 of the state dict as `torch.save` writes it (what a weights file would hash to)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def make_tiny_model(channels: int, name: str):
    """A `LoadedModel` with seeded random weights (torch.manual_seed(0)).

    Built with `registry.model_from_weights`, so the strict load path is the
    one the shipped models take.
    """
    import torch

    from vaezip.network import registry
    from vaezip.network.config import ModelConfig
    from vaezip.network.model import HierarchicalVAE

    cfg = ModelConfig(channels=channels, width=16, bottleneck=8, pixel_width=8, mixtures=2, latent_scales=TINY_SCALES)
    torch.manual_seed(0)
    state = HierarchicalVAE(cfg).state_dict()
    mode = "RGB" if channels == 3 else "L"
    spec = registry.ModelSpec(name, f"{name}.pt", _state_sha256(state), cfg, (mode,))
    return registry.model_from_weights(spec, state)


def make_tiny_fixed_model(channels: int, name: str, stage0_levels: int = 0, pixel_halo: bool = False):
    """A fixed-point (format version 6) `LoadedModel`: seeded random weights, activation
    scales set to powers of two without data (`set_uniform_scales`), so the model is the
    same on every machine. With `stage0_levels` (format version 7) the stage-0 steps'
    context layers, zero-initialised in a new model, get seeded random weights too; with
    `pixel_halo` (format version 8) so do the layers that read the ring around the tile."""
    import torch

    from vaezip.network import registry
    from vaezip.network.config import ModelConfig
    from vaezip.network.model import HierarchicalVAE

    cfg = ModelConfig(channels=channels, width=16, bottleneck=8, pixel_width=8, mixtures=2, latent_scales=TINY_SCALES,
                      fixed_bits=(8, 10, 10, 16), stage0_levels=stage0_levels, pixel_halo=pixel_halo)
    torch.manual_seed(0)
    net = HierarchicalVAE(cfg)
    with torch.no_grad():
        for stage, step in zip(net.stages, net.schedule):
            if step.stage == 0 and stage.context is not None:
                stage.context.weight.normal_(0.0, 0.05)
            if stage.ring is not None:
                stage.ring.weight.normal_(0.0, 0.05)
    net.set_uniform_scales()
    state = net.state_dict()
    mode = "RGB" if channels == 3 else "L"
    spec = registry.ModelSpec(name, f"{name}.pt", _state_sha256(state), cfg, (mode,))
    return registry.model_from_weights(spec, state)


@pytest.fixture(scope="session")
def tiny_fixed_model():
    """Tiny fixed-point RGB model (format version 6)."""
    return make_tiny_fixed_model(3, "tiny-fixed-test")


@pytest.fixture(scope="session")
def tiny_fixed_gray_model():
    """Tiny fixed-point gray model (format version 6)."""
    return make_tiny_fixed_model(1, "tiny-fixed-gray-test")


@pytest.fixture(scope="session")
def tiny_steps_model():
    """Tiny fixed-point RGB model whose stage 0 is split two levels deep (format version 7)."""
    return make_tiny_fixed_model(3, "tiny-steps-test", stage0_levels=2)


@pytest.fixture(scope="session")
def tiny_steps_gray_model():
    """Tiny fixed-point gray model whose stage 0 is split one level deep (format version 7)."""
    return make_tiny_fixed_model(1, "tiny-steps-gray-test", stage0_levels=1)


@pytest.fixture(scope="session")
def tiny_halo_model():
    """Tiny fixed-point RGB model, stage 0 split one level, reading the ring around each
    tile (format version 8)."""
    return make_tiny_fixed_model(3, "tiny-halo-test", stage0_levels=1, pixel_halo=True)


@pytest.fixture(scope="session")
def tiny_halo_gray_model():
    """Tiny fixed-point gray model reading the ring around each tile (format version 8)."""
    return make_tiny_fixed_model(1, "tiny-halo-gray-test", stage0_levels=1, pixel_halo=True)


@pytest.fixture(scope="session")
def tiny_model():
    """Tiny 3-channel (RGB) model, seeded random weights."""
    return make_tiny_model(3, "tiny-test")


@pytest.fixture(scope="session")
def tiny_gray_model():
    """Tiny 1-channel (L) model, seeded random weights."""
    return make_tiny_model(1, "tiny-gray-test")


def random_pixels(mode: str, height: int, width: int, seed: int = 0, *, smooth: bool = False) -> np.ndarray:
    """uint8 (H, W, C) pixels valid for `mode` (P: indices < 40, 1: 0/1).

    smooth: a low-frequency pattern plus a little noise (photo-like), else i.i.d. noise.
    """
    rng = np.random.default_rng(seed)
    channels = CHANNELS[mode]
    high = {"1": 2, "P": 40}.get(mode, 256)
    if not smooth:
        return rng.integers(0, high, size=(height, width, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((height, width, channels), dtype=np.uint8)
    for c in range(channels):
        field = np.sin(xx / (9.0 + 3 * c) + seed) + np.cos(yy / (7.0 + 2 * c)) + 0.1 * rng.standard_normal((height, width))
        out[:, :, c] = np.clip((field + 2.2) / 4.4 * high, 0, high - 1).astype(np.uint8)
    return out


def random_image(mode: str, height: int, width: int, seed: int = 0, *, smooth: bool = False,
                 transparency: bytes = b"", icc_profile: bytes = b"") -> Image:
    """A random `Image` of `mode`; mode P gets a random 40-colour palette."""
    pixels = random_pixels(mode, height, width, seed, smooth=smooth)
    palette = b""
    if mode == "P":
        palette = np.random.default_rng(seed + 1).integers(0, 256, size=40 * 3, dtype=np.uint8).tobytes()
    return Image(mode, pixels, palette, transparency, icc_profile)


def kodak_crop(name: str, top: int, left: int, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 crop of a Kodak image; skips the test if the data is absent."""
    from PIL import Image as PILImage

    path = require_data("kodak", name)
    with PILImage.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[top : top + height, left : left + width])


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) uint8 with Pillow's L conversion."""
    from PIL import Image as PILImage

    return np.asarray(PILImage.fromarray(rgb, "RGB").convert("L"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks: they are all overhead, and on a
    shared 2-core machine a second thread's spin-waits made them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
