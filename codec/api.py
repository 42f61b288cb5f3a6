"""Library API: `compress`, `decompress`, `measure`, `load_model`.

How an image's planes are coded (one ANS stack per file; ANS is last-in
first-out, so what is pushed first is popped last):
  RGB  -> the RGB photo model (bits-back over tiles);
  L    -> the gray photo model if one is registered, else the plane coder;
  LA / RGBA -> alpha with the plane coder (pushed first: its bits are what the
          first tiles borrow), then the colour planes as above;
  P    -> palette indices with the plane coder, palette in the header;
  1    -> the bilevel plane with the plane coder.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

from . import container, registry
from .errors import CorruptFileError, DecodeMismatchError, ModelError, VaezipError
from .images import Image, from_array, from_pil, read_image, to_pil

MAX_TILE = 64
ImageLike = Union[Image, np.ndarray, "os.PathLike", str, "PIL.Image.Image"]
Progress = Callable[[int], None]

load_model = registry.load_model


def as_image(image: ImageLike) -> Image:
    """Accept an `Image`, a numpy array, a PIL image or a path."""
    if isinstance(image, Image):
        return image
    if isinstance(image, np.ndarray):
        return from_array(image)
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if hasattr(image, "getbands"):
        return from_pil(image)
    raise VaezipError(f"cannot compress an object of type {type(image).__name__}")


def tile_size(height: int, width: int, downsampling: int) -> int:
    """Square tile side: MAX_TILE, or less for an image smaller than that."""
    side = max(height, width)
    return min(MAX_TILE, -(-side // downsampling) * downsampling)


@dataclass(frozen=True)
class _Layout:
    """Which planes of an image go to the model and which to the plane coder."""

    model_channels: tuple[int, ...]  # channel indices coded by the VAE (may be empty)
    plane_channels: tuple[int, ...]  # channel indices coded by the plane coder, in push order
    levels: int  # alphabet of the plane-coded planes


def _layout(mode: str, model_name: str) -> _Layout:
    colour = {"RGB": (0, 1, 2), "RGBA": (0, 1, 2), "L": (0,), "LA": (0,)}.get(mode, ())
    alpha = {"RGBA": (3,), "LA": (1,)}.get(mode, ())
    if mode == "P":
        return _Layout((), (0,), 256)
    if mode == "1":
        return _Layout((), (0,), 2)
    if not model_name:
        return _Layout((), alpha + colour, 256)
    return _Layout(colour, alpha, 256)


def choose_model(mode: str, model: Optional[str]) -> str:
    """The model name for an image mode ('' for none); an explicit name must fit."""
    base = {"RGB": "RGB", "RGBA": "RGB", "L": "L", "LA": "L"}.get(mode)
    if base is None:
        return ""
    if model is None:
        return registry.default_model(base) or ""
    spec = registry.get_spec(model)
    if spec.config.channels != len(base):
        raise ModelError(f"model {model!r} codes {spec.config.channels}-channel images, not mode {mode}")
    return model


def _runtime() -> str:
    import constriction
    import torch

    return f"torch={torch.__version__} numpy={np.__version__} constriction={getattr(constriction, '__version__', '0.5.0')}"


def _coding_params(loaded: registry.LoadedModel, height: int, width: int):
    from .bitsback import CodingParams

    cfg = loaded.spec.config
    return CodingParams(tile=tile_size(height, width, cfg.downsampling), latent_grid=cfg.latent_grid)


@contextmanager
def _deterministic_torch():
    """Network settings both directions share: inference mode, and native
    convolutions instead of oneDNN, whose results change with the thread count."""
    import torch

    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _resolve_model(mode: str, model: Optional[str], loaded: Optional[registry.LoadedModel]):
    """(name, loaded model or None) for an image mode."""
    if loaded is not None:
        return loaded.spec.name, loaded
    name = choose_model(mode, model)
    return name, (registry.load_model(name) if name else None)


def push_image(ans, img: Image, name: str, loaded: Optional[registry.LoadedModel],
               progress: Optional[Progress] = None):
    """Push one image onto the stack; returns (header fields, coder).

    Stack before: S (may hold earlier images, whose bits the first tiles borrow).
    After: S + the image. The returned coder replaces `ans` (roll-backs).
    """
    from . import planes

    layout = _layout(img.mode, name)
    for c in layout.plane_channels:
        planes.plane_codec(img.height, img.width, layout.levels).push(ans, img.pixels[:, :, c])
    schedule, tile = (), 0
    if layout.model_channels:
        from .bitsback import encode_tiles

        params = _coding_params(loaded, img.height, img.width)
        tile = params.tile
        pixels = np.ascontiguousarray(img.pixels[:, :, list(layout.model_channels)])
        with _deterministic_torch():
            schedule, ans = encode_tiles(loaded.net, ans, pixels, params, progress or (lambda n: None))
    header = container.Header(
        mode=img.mode, width=img.width, height=img.height,
        model_name=name, model_hash=loaded.spec.hash_prefix if loaded else bytes(8),
        tile_size=tile, schedule=schedule, num_initial_words=0,
        pixel_checksum=container.pixel_checksum(img), palette=img.palette,
        transparency=img.transparency, icc_profile=img.icc_profile, runtime=_runtime(),
    )
    return header, ans


def compress(image: ImageLike, model: Optional[str] = None, *, loaded: Optional[registry.LoadedModel] = None,
             progress: Optional[Progress] = None) -> bytes:
    """Compress an image losslessly to the bytes of a .vz file.

    Args:
        image: `Image`, uint8 array ((H, W) gray, (H, W, 2|3|4)), PIL image or path.
        model: registered model name; default: the registered model for the mode.
        loaded: an already loaded model (overrides `model`; used by tests).
        progress: called with the number of tiles finished.
    """
    from . import coders

    img = as_image(image)
    name, loaded = _resolve_model(img.mode, model, loaded)
    header, ans = push_image(coders.new_coder(), img, name, loaded, progress)
    return container.pack(header, ans.get_compressed())


def _model_for(header: container.Header, loaded: Optional[registry.LoadedModel]) -> registry.LoadedModel:
    if loaded is None:
        loaded = registry.load_model(header.model_name)
    if loaded.spec.name != header.model_name or loaded.spec.hash_prefix != header.model_hash:
        raise ModelError(
            f"file needs model {header.model_name!r} with weights {header.model_hash.hex()}, "
            f"this build has {loaded.spec.name!r} with {loaded.spec.hash_prefix.hex()}"
        )
    return loaded


def pop_image(ans, header: container.Header, loaded: Optional[registry.LoadedModel] = None,
              progress: Optional[Progress] = None) -> Image:
    """Pop the image `push_image` pushed with this header; checks its pixel checksum.

    Stack before: S + the image. After: S.
    Raises:
        CorruptFileError: damaged data; DecodeMismatchError: pixels fail the checksum.
    """
    from . import planes

    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 1, "1": 1}[header.mode]
    pixels = np.zeros((header.height, header.width, channels), dtype=np.uint8)
    layout = _layout(header.mode, header.model_name)
    try:
        if layout.model_channels:
            from .bitsback import CodingParams, decode_tiles

            model = _model_for(header, loaded)
            params = CodingParams(tile=header.tile_size, latent_grid=model.spec.config.latent_grid)
            if params.tile != tile_size(header.height, header.width, model.spec.config.downsampling):
                raise CorruptFileError("corrupt header: unexpected tile size")
            with _deterministic_torch():
                colour = decode_tiles(model.net, ans, header.height, header.width, len(layout.model_channels),
                                      params, header.schedule, progress or (lambda n: None))
            pixels[:, :, list(layout.model_channels)] = colour
        elif header.schedule or header.model_name:
            raise CorruptFileError("corrupt header: tile schedule without a model")
        for c in reversed(layout.plane_channels):  # reversed: pushed first, popped last
            pixels[:, :, c] = planes.plane_codec(header.height, header.width, layout.levels).pop(ans)
    except VaezipError:
        raise
    except Exception as exc:  # a damaged payload can upset any decoding step
        raise CorruptFileError(f"corrupt payload ({type(exc).__name__})") from None
    if header.mode == "1" and pixels.max(initial=0) > 1:
        raise DecodeMismatchError("decoded pixels fail the checksum")
    image = Image(header.mode, pixels, header.palette, header.transparency, header.icc_profile)
    if container.pixel_checksum(image) != header.pixel_checksum:
        note = "" if header.runtime == _runtime() else f" (written by {header.runtime}; this is {_runtime()})"
        raise DecodeMismatchError(f"decoded pixels fail the checksum{note}")
    return image


def decompress_image(data: bytes, *, loaded: Optional[registry.LoadedModel] = None,
                     progress: Optional[Progress] = None) -> Image:
    """Decode .vz bytes to an `Image` (mode, palette, transparency, ICC profile).

    Raises:
        CorruptFileError: damaged, truncated or foreign data.
        DecodeMismatchError: pixels fail the stored checksum (never returned).
    """
    from . import coders

    header, words = container.unpack(bytes(data))
    try:
        ans = coders.new_coder(words)
    except Exception:
        raise CorruptFileError("corrupt payload") from None
    image = pop_image(ans, header, loaded, progress)
    if not ans.is_empty():
        raise CorruptFileError("corrupt payload: data left over after decoding")
    return image


def decompress(data: bytes, **kwargs) -> np.ndarray:
    """Decode .vz bytes to a numpy array shaped as Pillow would give it:
    (H, W) for L and P (palette indices), bool (H, W) for mode 1, else (H, W, C)."""
    image = decompress_image(data, **kwargs)
    if image.mode == "1":
        return image.pixels[:, :, 0].astype(bool)
    return image.pixels[:, :, 0] if image.channels == 1 else image.pixels


def decompress_pil(data: bytes, **kwargs):
    """Decode .vz bytes to a PIL image with palette, transparency and ICC profile."""
    return to_pil(decompress_image(data, **kwargs))


@dataclass
class Report:
    """Rate of one image, all in bits per subpixel unless named otherwise.

    nelbo_bpd: the model's −ELBO (model-coded planes plus plane-coder bits);
    iwae_bpd: importance-weighted estimate with `samples` samples (None if not asked);
    coded_bpd: payload bits; file_bpd: whole file including the header.
    """

    model: str
    mode: str
    width: int
    height: int
    subpixels: int
    nelbo_bpd: float
    coded_bpd: float
    file_bpd: float
    file_bytes: int
    header_bytes: int
    iwae_bpd: Optional[float] = None
    samples: int = 0
    encode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """File bits over −ELBO bits, minus one (0.01 = 1% overhead)."""
        return self.file_bpd / self.nelbo_bpd - 1.0 if self.nelbo_bpd else float("nan")


def model_bits(loaded: registry.LoadedModel, pixels: np.ndarray, tile: int, samples: int = 0,
               seed: int = 0) -> tuple[float, Optional[float]]:
    """−ELBO (and IWAE with `samples` samples) in bits for the whole image, tiled as coded."""
    import torch

    from .tiles import TileGrid

    grid = TileGrid(pixels.shape[0], pixels.shape[1], tile)
    torch.manual_seed(seed)
    nelbo = iwae = 0.0
    net = loaded.net
    batch = 16
    with torch.inference_mode():
        for start in range(0, grid.count, batch):
            indices = range(start, min(start + batch, grid.count))
            x = torch.from_numpy(_padded_tiles(pixels, grid, indices))
            mask = torch.from_numpy(grid.pixel_masks(indices))
            nelbo += float(net.nelbo(x, mask).nelbo_bits.sum())
            if samples:
                iwae += float(net.iwae_bits(x, samples, mask).sum())
    return nelbo, (iwae if samples else None)


def _padded_tiles(pixels: np.ndarray, grid, indices) -> np.ndarray:
    from .tiles import lattice_to_pixels, split_tiles

    return lattice_to_pixels(split_tiles(pixels, grid, indices))


def measure(image: ImageLike, model: Optional[str] = None, *, samples: int = 0,
            loaded: Optional[registry.LoadedModel] = None) -> Report:
    """Compress `image` and report −ELBO, IWAE (if samples > 0) and the real file size."""
    from . import planes

    img = as_image(image)
    start = time.perf_counter()
    data = compress(img, model, loaded=loaded)
    seconds = time.perf_counter() - start
    header, words = container.unpack(data)
    n = img.num_subpixels
    layout = _layout(img.mode, header.model_name)
    plane_bits = sum(planes.estimate_bits(img.pixels[:, :, c], layout.levels) for c in layout.plane_channels)
    nelbo_bits, iwae_bits = plane_bits, None
    if layout.model_channels:
        lm = _model_for(header, loaded)
        pixels = np.ascontiguousarray(img.pixels[:, :, list(layout.model_channels)])
        bits, iwae = model_bits(lm, pixels, header.tile_size, samples)
        nelbo_bits += bits
        iwae_bits = None if iwae is None else iwae + plane_bits
    coded_bits = 32 * len(words)
    return Report(
        model=header.model_name or "planes", mode=img.mode, width=img.width, height=img.height, subpixels=n,
        nelbo_bpd=nelbo_bits / n, coded_bpd=coded_bits / n, file_bpd=8 * len(data) / n,
        file_bytes=len(data), header_bytes=len(data) - 4 * len(words),
        iwae_bpd=None if iwae_bits is None else iwae_bits / n, samples=samples, encode_seconds=seconds,
    )
