"""Library API: `compress`, `decompress`, `pack`, `unpack`, `measure`, `load_model`.

A thin façade: images are turned into `Image`s (`images.as_image`), coded by
`imagecodec` onto one ANS stack, and stored by `container` (.vz) or `archive` (.vzp).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from vaezip.coding import imagecodec
from vaezip.coding.imagecodec import Progress
from vaezip.errors import CorruptFileError, DecodeMismatchError, InputError, ModelError
from vaezip.format import container, versions
from vaezip.imaging.images import Image, ImageLike, as_image, to_pil
from vaezip.network import registry

load_model = registry.load_model
LoadedModels = Union[registry.LoadedModel, Sequence[registry.LoadedModel], None]


def _candidates(loaded: LoadedModels) -> tuple[registry.LoadedModel, ...]:
    return (loaded,) if isinstance(loaded, registry.LoadedModel) else tuple(loaded or ())


def compress(image: ImageLike, model: Optional[str] = None, *, loaded: LoadedModels = None,
             progress: Optional[Progress] = None, version: Optional[int] = None,
             effort: int = versions.DEFAULT_EFFORT) -> bytes:
    """Compress an image losslessly to the bytes of a .vz file.

    Args:
        image: `Image`, uint8 or uint16 array ((H, W) gray, (H, W, 2|3|4)), PIL image or path.
        model: registered model name; default: the registered model for the mode.
        loaded: already loaded model(s): the first that fits the mode is used (tests).
        progress: called with the number of tiles finished.
        version: format version to write (`versions.KNOWN_VERSIONS`; older ones for
            compatibility tests); None: the newest the model codes (`versions.newest`:
            `CURRENT` for a fixed-point model, 5 for a float one).
        effort: encoder effort 1..9 (`versions.EFFORTS`, like cjxl's -e): a higher one
            encodes more slowly into a smaller file (`coding.adapt.EFFORT_SETTINGS`);
            decoding time does not depend on it.

    Raises:
        InputError: effort outside 1..9.
    """
    from vaezip.entropy import coders

    if effort not in versions.EFFORTS:
        raise InputError(f"effort must be {versions.EFFORTS.start}..{versions.EFFORTS.stop - 1}, got {effort}")
    img = as_image(image)
    model_used = imagecodec.model_for_mode(img.mode, model, _candidates(loaded))
    fmt = imagecodec.format_for([model_used], version)
    header, ans = imagecodec.push_image(coders.new_coder(), img, model_used, fmt, progress, effort)
    return container.pack(header, ans.get_compressed())


def decompress_image(data: bytes, *, loaded: LoadedModels = None, progress: Optional[Progress] = None) -> Image:
    """Decode .vz bytes to an `Image` (mode, palette, transparency, ICC profile).

    Raises:
        CorruptFileError: damaged, truncated or foreign data.
        DecodeMismatchError: pixels fail the stored checksum (never returned).
        ModelError: the file's model is missing, has other weights, or is not among `loaded`.
    """
    from vaezip.entropy import coders

    header, words = container.unpack(bytes(data))
    candidates = _candidates(loaded)
    if candidates and header.model_name and header.model_name not in {lm.spec.name for lm in candidates}:
        raise ModelError(f"file needs model {header.model_name!r}, given "
                         f"{', '.join(repr(lm.spec.name) for lm in candidates)}")
    try:
        ans = coders.new_coder(words)
    except Exception:
        raise CorruptFileError("corrupt payload") from None
    image = imagecodec.pop_image(ans, header, candidates, progress)
    if not ans.is_empty():
        raise CorruptFileError("corrupt payload: data left over after decoding")
    return image


def decompress(data: bytes, **kwargs) -> np.ndarray:
    """Decode .vz bytes to a numpy array shaped as Pillow would give it: (H, W) for L and P
    (palette indices), bool (H, W) for mode 1, else (H, W, C); uint16 for 16-bit modes,
    and 2- and 4-bit gray scaled to 0..255 as Pillow reads them."""
    image = decompress_image(data, **kwargs)
    if image.mode == "1":
        return image.pixels[:, :, 0].astype(bool)
    if image.mode in ("L;2", "L;4"):
        return image.pixels[:, :, 0] * np.uint8(255 // ((1 << image.bit_depth) - 1))
    return image.pixels[:, :, 0] if image.channels == 1 else image.pixels


def decompress_pil(data: bytes, **kwargs):
    """Decode .vz bytes to a PIL image with palette, transparency and ICC profile
    (`images.to_pil`: not for LA;16, RGB;16 and RGBA;16, which Pillow cannot hold)."""
    return to_pil(decompress_image(data, **kwargs))


# Measurement lives in rates.py; these names stay importable from here.
from vaezip.evaluation.rates import Report, measure, model_bits  # noqa: E402,F401

# ---- archives (.vzp): many images on one bits-back stack -----------------------

ArchiveItem = tuple[str, ImageLike]


def pack(items: Sequence[ArchiveItem], model: Optional[str] = None, *, loaded: LoadedModels = None,
         join: bool = True, progress: Optional[Progress] = None, version: Optional[int] = None) -> bytes:
    """Compress named images into the bytes of one .vzp archive.

    The images are pushed in order onto ONE ANS stack, so only the first pays
    a start-up cost: every later image borrows its latents from the bits of
    the images before it. With `join`, consecutive images that share model and
    tile side are coded as one tile sequence whose network batches straddle
    image boundaries (`imagecodec.push_tile_set`): the same code, far fewer
    network calls for small images. Without it each image is pushed alone.

    Args:
        items: (name, image) pairs; a name is a relative "/"-separated path
            (`archive.name_problem`), unique; an image is anything `compress` takes.
        model: registered model name for every image; default: each image gets
            the registered model for its mode, as `compress` does.
        loaded: already loaded model(s) (tests): each image takes the first
            whose channel count fits its mode, else falls back to `model`.
        join: code runs of images as shared tile sequences (see above).
        progress: called with the number of tiles finished.
        version: format version to write (`versions.KNOWN_VERSIONS`); None: the newest
            every model used codes (`imagecodec.format_for`).

    Raises:
        InputError: no items, a bad or duplicate name. VaezipError: as `compress`.
    """
    from vaezip.entropy import coders
    from vaezip.format import archive

    items = list(items)
    if not items:
        raise InputError("nothing to pack")
    names = [name for name, _ in items]
    for name in names:
        problem = archive.name_problem(name)
        if problem:
            raise InputError(f"cannot store {name!r}: {problem}")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise InputError(f"duplicate name {duplicate!r}")
    images = [as_image(image) for _, image in items]
    models = [imagecodec.model_for_mode(img.mode, model, _candidates(loaded)) for img in images]
    fmt = imagecodec.format_for(models, version)
    ans = coders.new_coder()
    entries: list = [None] * len(images)
    for run in imagecodec.tile_runs(images, models, join):
        if len(run) == 1:
            header, ans = imagecodec.push_image(ans, images[run.start], models[run.start], fmt, progress)
            entries[run.start] = archive.Entry(names[run.start], header)
            continue
        headers, ans = imagecodec.push_tile_set(ans, images[run.start:run.stop], models[run.start], fmt, progress)
        for k, (i, header) in enumerate(zip(run, headers)):
            entries[i] = archive.Entry(names[i], header, joined=k > 0)
    return archive.pack(entries, ans.get_compressed())


def unpack(data: bytes, *, loaded: LoadedModels = None,
           progress: Optional[Progress] = None) -> list[tuple[str, Image]]:
    """Decode .vzp bytes to the (name, `Image`) pairs `pack` was given, in order.

    Pops the images in reverse order (ANS is last-in first-out), checks each
    image's pixel checksum and that the stack ends empty.

    Raises:
        CorruptFileError: damaged, truncated or foreign data.
        DecodeMismatchError: an image fails its checksum (never returned).
        ModelError: a model the archive names is missing or has other weights.
    """
    from vaezip.entropy import coders
    from vaezip.format import archive

    contents = archive.read(bytes(data))
    entries, check = contents.entries, contents.checksum is None  # records: checked per image
    try:
        ans = coders.new_coder(contents.words)
    except Exception:
        raise CorruptFileError("corrupt payload") from None
    candidates = _candidates(loaded)
    images: list = [None] * len(entries)
    for run in reversed(archive.tile_sets(entries)):  # reversed: the last pushed is on top
        headers = [entries[i].header for i in run]
        try:
            if len(run) == 1:
                images[run.start] = imagecodec.pop_image(ans, headers[0], candidates, progress, check)
            else:
                images[run.start:run.stop] = imagecodec.pop_tile_set(ans, headers, candidates, progress, check)
        except DecodeMismatchError as exc:
            names = ", ".join(entries[i].name for i in run)
            raise DecodeMismatchError(f"{names}: {exc}") from None
    if not ans.is_empty():
        raise CorruptFileError("corrupt payload: data left over after decoding")
    if not check:
        checksums = [container.pixel_checksum(image) for image in images]
        if archive.set_checksum(checksums) != contents.checksum:
            network_fmt = entries[0].header.fmt if any(e.header.model_name for e in entries) else None
            raise DecodeMismatchError("decoded images fail the archive's checksum"
                                      f"{imagecodec.mismatch_note(entries[0].header.runtime, network_fmt)}")
    return [(entry.name, image) for entry, image in zip(entries, images)]
