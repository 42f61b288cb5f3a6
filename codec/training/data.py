"""Training and evaluation data: dataset readers, random crops and crop banks.

Every reader returns uint8 pixels in (H, W, C) layout, C = 1 (gray) or 3 (RGB):
a list of arrays for photos of varying sizes, or one (N, H, W, C) array for
fixed-size sets (MNIST, CIFAR-10, crop banks). `load_dataset` dispatches on a
spec string; see its docstring for the grammar.

Nothing here trains; torch is imported only where a sampler hands out tensors.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from vaezip.errors import InputError
from vaezip.files import atomic_write
from vaezip.training import bankfile

# Where the shared data sets live; override with VAEZIP_DATA (e.g. on a GPU machine).
DEFAULT_DATA_ROOT = Path("/work/shared/data")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif"}
HELDOUT_WIKIPHOTOS = 9  # the last 9 wikiphotos in sorted order never enter training
NPZ_PREFERRED_KEYS = ("test_x", "train_x", "crops")
CROP_BANK_KEY = "crops"


def data_root() -> Path:
    """The folder holding kodak/, bsds500/, wikiphotos/, mnist/, cifar10/."""
    return Path(os.environ.get("VAEZIP_DATA", str(DEFAULT_DATA_ROOT)))


# ---------------------------------------------------------------- conversions


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert (..., H, W, C) uint8 to `channels` (1 or 3) channels.

    RGB -> gray uses Pillow's integer luma (ITU-R 601-2, same rounding as
    `Image.convert("L")`); gray -> RGB repeats the plane.
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 3 and channels == 1:
        rgb = image.astype(np.uint32)
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[..., None]
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    raise InputError(f"cannot convert {have} channels to {channels}")


def reduce_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Downscale (H, W, C) uint8 by an integer factor with Pillow's box filter
    (`Image.reduce`), which averages away JPEG block and chroma artefacts."""
    if factor == 1:
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    reduced = Image.fromarray(image[..., 0] if mode == "L" else image, mode).reduce(factor)
    return _as_hwc(np.asarray(reduced))


def pad_to_multiple(image: np.ndarray, multiple: int = 16, minimum: int = 0) -> np.ndarray:
    """Pad (H, W, C) at the bottom and right by edge replication so that both
    sides are multiples of `multiple` and at least `minimum` (MNIST 28 -> 32)."""
    h, w = image.shape[:2]
    th = max(-(-h // multiple) * multiple, minimum)
    tw = max(-(-w // multiple) * multiple, minimum)
    if (th, tw) == (h, w):
        return image
    return np.pad(image, ((0, th - h), (0, tw - w), (0, 0)), mode="edge")


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[..., None] if array.ndim == 2 else array


# -------------------------------------------------------------------- readers


def read_image(path: str | Path, channels: int = 3, downscale: int = 1) -> np.ndarray:
    """One image file as (H, W, channels) uint8, optionally reduced by `downscale`."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if downscale > 1:
                im = im.reduce(downscale)
            return _as_hwc(np.asarray(im))
    except (OSError, ValueError) as exc:  # Pillow's UnidentifiedImageError is an OSError
        raise InputError(f"cannot read image {path}: {exc}") from None


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted path order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(
    folder: str | Path, channels: int = 3, downscale: int = 1, limit: int | None = None, exclude: Sequence[str] = (),
    include: Sequence[str] = (),
) -> list[np.ndarray]:
    """All images under `folder` (recursive, sorted), minus file names in `exclude`;
    only the file names in `include` when it is not empty."""
    paths = [p for p in list_images(folder) if p.name not in set(exclude) and (not include or p.name in set(include))]
    if not paths:
        raise InputError(f"no images found under {folder}")
    return [read_image(p, channels, downscale) for p in paths[:limit]]


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a uint8 array of its dims.

    Big-endian: magic 0x0000 0x08 ndim, then ndim uint32 sizes, then the bytes.
    """
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise InputError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if len(raw) - header != int(np.prod(dims, dtype=np.int64)):
        raise InputError(f"{path}: IDX data size does not match dims {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """An IDX image file (N, H, W) as (N, H, W, 1) uint8."""
    array = read_idx(path)
    if array.ndim != 3:
        raise InputError(f"{path}: IDX file has shape {array.shape}, not (N, H, W) images")
    return array[..., None]


def _frombuffer(buffer, dtype, shape, order):
    """What numpy's protocol-5 pickles call to rebuild an array (a copy, never a view)."""
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape, order=order).copy()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds what a CIFAR-10 batch holds.

    Unpickling runs whatever callables the file names, so a crafted file could
    execute code. This refuses every global except numpy's array
    reconstruction and bytes decoding; a CIFAR batch needs nothing else.
    The risk left is numpy's own array-unpickling code on hostile input.
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise InputError(f"refusing to unpickle {module}.{name}: not a CIFAR-10 batch")


def read_cifar_batch(path: str | Path) -> np.ndarray:
    """A CIFAR-10 python batch (`data_batch_N`, `test_batch`) as (N, 32, 32, 3) uint8.

    The file is a pickled dict with b"data": (N, 3072) uint8 in CHW order.
    Read through `_CifarUnpickler`, which refuses arbitrary objects.
    """
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except InputError:
        raise
    except Exception as exc:  # a damaged pickle raises almost anything
        raise InputError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(f"{path}: not a CIFAR-10 batch (need b'data' as (N, 3072) uint8)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _check_image_array(array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InputError(f"{source}: images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        return array[..., None]
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array
    raise InputError(f"{source}: need (N, H, W) or (N, H, W, C) with C 1 or 3, got {array.shape}")


def read_npz(path: str | Path, key: str | None = None) -> np.ndarray:
    """Images from an .npz: `key`, else the first of test_x / train_x / crops
    present, else the only array. Never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if key is None:
                key = next((k for k in NPZ_PREFERRED_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None or key not in keys:
                raise InputError(f"{path}: choose an array with {path}:KEY, one of {keys}")
            array = archive[key]
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    return _check_image_array(array, f"{path}:{key}")


def read_npy(path: str | Path) -> np.ndarray:
    """Images from an .npy file (no pickles)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    return _check_image_array(array, str(path))


# ------------------------------------------------------------- named sources


@dataclass(frozen=True)
class PhotoSource:
    """A folder of photos, reduced by `downscale`, without the files in `exclude`
    (and only those in `include`, when given)."""

    folder: Path
    downscale: int = 1
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()

    def describe(self) -> str:
        text = str(self.folder)
        if self.include:
            text += f" ({len(self.include)} chosen files)"
        if self.downscale > 1:
            text += f" (reduced {self.downscale}x, box filter)"
        if self.exclude:
            shown = ", ".join(self.exclude) if len(self.exclude) <= 12 else f"{self.exclude[0]} ... {self.exclude[-1]}"
            text += f" minus {len(self.exclude)} held out: {shown}"
        return text

    def paths(self) -> list[Path]:
        """The files this source reads, sorted."""
        return [p for p in list_images(self.folder)
                if p.name not in set(self.exclude) and (not self.include or p.name in set(self.include))]

    def load(self, channels: int = 3, limit: int | None = None) -> list[np.ndarray]:
        return read_folder(self.folder, channels, self.downscale, limit, self.exclude, self.include)


def heldout_wikiphotos() -> list[Path]:
    """The wikiphotos never used for training (the last 9 in sorted order):
    held-out validation and "never seen" evaluation."""
    return list_images(data_root() / "wikiphotos")[-HELDOUT_WIKIPHOTOS:]


def default_photo_sources() -> list[PhotoSource]:
    """The default photo training set: BSDS500 train+val+test reduced 2x (they
    are JPEGs) plus wikiphotos minus `heldout_wikiphotos()`. Never Kodak."""
    root = data_root()
    bsds = [PhotoSource(root / "bsds500" / split, downscale=2) for split in ("train", "val", "test")]
    held = tuple(p.name for p in heldout_wikiphotos())
    return bsds + [PhotoSource(root / "wikiphotos", exclude=held)]


def _load_photo_sources(sources: Sequence[PhotoSource], channels: int, limit: int | None) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for source in sources:
        if limit is not None and len(images) >= limit:
            break
        images += source.load(channels, None if limit is None else limit - len(images))
    return images


NAMED_SPECS = {
    "photos": "default photo training set: " + "BSDS500 train+val+test reduced 2x + wikiphotos minus held-out",
    "heldout": "the held-out wikiphotos (last 9 in sorted order)",
    "mnist": "MNIST training images (60,000, 28x28 gray)",
    "mnist-test": "MNIST test images (10,000, 28x28 gray)",
    "cifar10": "partial CIFAR-10 training images (npz train_x)",
    "cifar10-test": "partial CIFAR-10 test images (first 1,000; npz test_x)",
}


# ------------------------------------------------------------------ dispatch


def load_dataset(spec: str, limit: int | None = None, channels: int = 3) -> list[np.ndarray]:
    """Load the images a spec names, as a list of (H, W, channels) uint8 arrays.

    Spec grammar:
      - a name from `NAMED_SPECS` (`photos` = the default training set,
        `heldout`, `mnist`, `mnist-test`, `cifar10`, `cifar10-test`);
      - a folder: its images, recursively, sorted; a folder holding CIFAR-10
        `data_batch_*` files reads those batches instead;
      - an image file; an `.npz` (optionally `file.npz:KEY`), an `.npy`;
      - an IDX file (`*-ubyte`, `*.idx*`, optionally `.gz`);
      - a CIFAR-10 python batch (`data_batch_N`, `test_batch`).
    A suffix `@N` on a folder or image file reduces each image N x (box filter).

    Args:
        spec: what to load.
        limit: keep only the first `limit` images (None: all).
        channels: 1 (gray) or 3 (RGB); images are converted as needed.
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    root = data_root()
    if spec == "photos":
        return _load_photo_sources(default_photo_sources(), channels, limit)
    if spec == "heldout":
        return [read_image(p, channels) for p in heldout_wikiphotos()[:limit]]
    named_files = {
        "mnist": str(root / "mnist" / "train-images-idx3-ubyte.gz"),
        "mnist-test": str(root / "mnist" / "t10k-images-idx3-ubyte.gz"),
        "cifar10": str(root / "cifar10" / "cifar10_partial.npz") + ":train_x",
        "cifar10-test": str(root / "cifar10" / "cifar10_partial.npz") + ":test_x",
    }
    if spec in named_files:
        return load_dataset(named_files[spec], limit, channels)

    downscale = 1
    match = re.fullmatch(r"(.+)@(\d+)", spec)
    if match and not Path(spec).exists():
        spec, downscale = match.group(1), int(match.group(2))
        if downscale < 1:
            raise InputError(f"downscale factor must be >= 1 in {spec}@{downscale}")

    key = None
    match = re.fullmatch(r"(.+\.npz):([^:/\\]+)", spec)
    if match and not Path(spec).exists():
        spec, key = match.group(1), match.group(2)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"no such data set: {spec} (names: {', '.join(NAMED_SPECS)})")

    array: np.ndarray | None = None
    name = path.name.lower()
    if path.is_dir():
        batches = sorted(path.glob("data_batch_*"))
        if batches:
            array = np.concatenate([read_cifar_batch(b) for b in batches])
        else:
            images = read_folder(path, channels, downscale, limit)
            return [to_channels(im, channels) for im in images]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        return [read_image(path, channels, downscale)][:limit]
    elif name.endswith(".npz") and bankfile.is_photo_bank(path):
        if key not in (None, "train", "heldout"):
            raise InputError(f"{path} is a photo bank: use it as it is (training images) or with :heldout")
        bank = bankfile.read_photo_bank(path)
        images = list(bank.heldout) if key == "heldout" else bank.images
        images = [to_channels(im, channels) for im in images[:limit]]
        return [reduce_image(im, downscale) for im in images]
    elif name.endswith(".npz"):
        array = read_npz(path, key)
    elif name.endswith(".npy"):
        array = read_npy(path)
    elif "ubyte" in name or ".idx" in name:
        array = read_idx_images(path)
    elif re.fullmatch(r"(data_batch_\d+|test_batch)", name):
        array = read_cifar_batch(path)
    else:
        raise InputError(f"do not know how to read {spec}")
    array = to_channels(array[:limit], channels)
    images = list(array)
    if downscale > 1:
        images = [reduce_image(im, downscale) for im in images]
    return images


def is_evaluation_only(spec: str) -> bool:
    """True when a spec points into the Kodak folder (evaluation only, never training)."""
    if spec in NAMED_SPECS:
        return False
    base = re.sub(r"(@\d+|:[^:/\\]+)$", "", spec)
    try:
        resolved = Path(base).resolve()
    except OSError:
        return False
    kodak = (data_root() / "kodak").resolve()
    return resolved == kodak or kodak in resolved.parents or resolved.name.lower().startswith("kodim")


# ------------------------------------------------------------------ sampling


class RandomCrops:
    """Random square crops with random horizontal flips, from images of any size.

    Images smaller than the crop are padded at the bottom/right by edge
    replication. With `weighting="area"` every pixel is equally likely to be in
    a crop (a big photo gives more crops than a small one); with "image" every
    image is equally likely. The generator state (`state`) is checkpointable.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        crop: int,
        *,
        seed: int = 0,
        flip: bool = True,
        downscale: int = 1,
        weighting: str = "area",
    ):
        if crop < 1:
            raise InputError(f"crop size must be positive, got {crop}")
        if not len(images):
            raise InputError("no images to crop from")
        if weighting not in ("area", "image"):
            raise InputError(f"weighting must be 'area' or 'image', got {weighting!r}")
        channels = {im.shape[-1] for im in images}
        if len(channels) != 1 or any(im.ndim != 3 or im.dtype != np.uint8 for im in images):
            raise InputError("images must all be (H, W, C) uint8 with the same C")
        self.crop = crop
        self.flip = flip
        self.channels = channels.pop()
        self.images = [pad_to_multiple(reduce_image(im, downscale), 1, crop) for im in images]
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum() if weighting == "area" else np.full(len(areas), 1 / len(areas))
        self.rng = np.random.default_rng(seed)

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value

    def crop_at(self, index: int, top: int, left: int, flip: bool) -> np.ndarray:
        s = self.crop
        out = self.images[index][top : top + s, left : left + s]
        return out[:, ::-1] if flip else out

    def _random_crop(self, index: int) -> np.ndarray:
        h, w = self.images[index].shape[:2]
        top = int(self.rng.integers(0, h - self.crop + 1))
        left = int(self.rng.integers(0, w - self.crop + 1))
        flip = bool(self.flip and self.rng.random() < 0.5)
        return self.crop_at(index, top, left, flip)

    def sample_numpy(self, n: int) -> np.ndarray:
        """`n` crops as (n, S, S, C) uint8."""
        indices = self.rng.choice(len(self.images), size=n, p=self.weights)
        return np.stack([self._random_crop(int(i)) for i in indices])

    def sample(self, n: int):
        """`n` crops as a torch uint8 tensor (n, C, S, S)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.sample_numpy(n).transpose(0, 3, 1, 2)))


def build_crop_bank(
    photos: Sequence[np.ndarray], crop: int, per_image: int, seed: int = 0, *, area_weighted: bool = False
) -> np.ndarray:
    """A fixed set of training crops, (N, S, S, C) uint8, without flips
    (the sampler flips at training time).

    Args:
        photos: (H, W, C) uint8 images; smaller ones are edge-padded.
        crop: crop side S.
        per_image: crops taken from each photo; with `area_weighted` the same
            total, len(photos) * per_image, drawn with every pixel equally likely.
        seed: generator seed.
    """
    sampler = RandomCrops(photos, crop, seed=seed, flip=False, weighting="area")
    if area_weighted:
        return sampler.sample_numpy(per_image * len(photos))
    return np.stack([sampler._random_crop(i) for i in range(len(photos)) for _ in range(per_image)])


def evaluation_crops(images: Sequence[np.ndarray], crop: int, count: int, seed: int) -> np.ndarray:
    """Fixed held-out crops (n, S, S, C) uint8, no flips, n <= count.

    Images that already are S x S (a crop bank, padded MNIST) are taken as they
    are, evenly spaced and without repeats, so a bank saved from this
    function's output gives back the same crops.
    """
    if all(im.shape[:2] == (crop, crop) for im in images):
        picks = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
        return np.stack([images[i] for i in picks])
    return RandomCrops(images, crop, seed=seed, flip=False, weighting="image").sample_numpy(count)


def save_crop_bank(path: str | Path, crops: np.ndarray, description: str = "") -> Path:
    """Write crops to a compressed .npz under key `crops` (read back with
    `load_dataset("file.npz:crops")`); `description` goes under key `description`."""
    crops = _check_image_array(np.asarray(crops), "crop bank")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name
        np.savez_compressed(f, **{CROP_BANK_KEY: crops, "description": np.array(description)})
    return path


class TensorCrops:
    """Random square crops with random horizontal flips, cut by one gather on `device`
    from all images packed into one flat uint8 tensor that lives there.

    The torch counterpart of `RandomCrops` (same padding of small images and
    area weighting) for training: no per-step host-to-device copy of crops, and
    the crops come out as (n, C, S, S) uint8 with channels-last strides. The
    generator lives on `device`; its state (`state`) is checkpointable.
    """

    def __init__(self, images: Sequence[np.ndarray], crop: int, *, device="cpu", seed=0, flip: bool = True,
                 weighting: str = "area"):
        import torch

        sampler = RandomCrops(images, crop, seed=0, flip=flip, weighting=weighting)  # checks and pads
        self.crop, self.flip, self.channels = crop, flip, sampler.channels
        self.device = torch.device(device)
        shapes = np.array([im.shape[:2] for im in sampler.images], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1] * self.channels)[:-1]])
        self.pixels = torch.from_numpy(np.concatenate([im.reshape(-1) for im in sampler.images])).to(self.device)
        self.heights = torch.from_numpy(shapes[:, 0]).to(self.device)
        self.widths = torch.from_numpy(shapes[:, 1]).to(self.device)
        self.offsets = torch.from_numpy(offsets).to(self.device)
        self.weights = torch.from_numpy(sampler.weights).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._steps = torch.arange(crop, device=self.device)
        self._channel_steps = torch.arange(self.channels, device=self.device)

    @property
    def state(self):
        """The generator state (a CPU uint8 tensor)."""
        return self.generator.get_state()

    @state.setter
    def state(self, value) -> None:
        self.generator.set_state(value.cpu())

    def sample(self, n: int):
        """`n` crops as a uint8 tensor (n, C, S, S) on `device`, channels-last strides."""
        import torch

        g, s = self.generator, self.crop
        index = torch.multinomial(self.weights, n, replacement=True, generator=g)
        heights, widths = self.heights[index], self.widths[index]
        top = (torch.rand(n, generator=g, device=self.device, dtype=torch.float64) * (heights - s + 1)).long()
        left = (torch.rand(n, generator=g, device=self.device, dtype=torch.float64) * (widths - s + 1)).long()
        cols = left[:, None] + self._steps
        if self.flip:
            flip = torch.rand(n, generator=g, device=self.device) < 0.5
            cols = torch.where(flip[:, None], left[:, None] + (s - 1 - self._steps), cols)
        rows = top[:, None] + self._steps
        pixel = rows[:, :, None] * widths[:, None, None] + cols[:, None, :]  # (n, S, S)
        flat = (self.offsets[index][:, None, None] + pixel * self.channels)[..., None] + self._channel_steps
        return self.pixels[flat].permute(0, 3, 1, 2)


# ------------------------------------------------------------- photos2 split

PHOTOS2_VALIDATION_PREFIXES = ("0", "1")  # photos2/SOURCE.md: sha256 starting with 0 or 1


def photos2_validation() -> list[str]:
    """File names of the suggested photos2 validation split (sha256 in SHA256SUMS
    starting with 0 or 1, about 1/8): held out for model selection, never trained on."""
    sums = data_root() / "photos2" / "SHA256SUMS"
    try:
        lines = sums.read_text().split("\n")
    except OSError as exc:
        raise InputError(f"cannot read {sums}: {exc}") from None
    return sorted(line.split()[1] for line in lines
                  if line.strip() and line.split()[0].startswith(PHOTOS2_VALIDATION_PREFIXES))
