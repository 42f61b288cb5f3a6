"""Library API: `compress`, `decompress`, `measure`, `load_model`.

How an image's planes are coded (one ANS stack per file; ANS is last-in
first-out, so what is pushed first is popped last):
  RGB  -> the RGB photo model (bits-back over tiles);
  L    -> the gray photo model if one is registered, else the plane coder;
  LA / RGBA -> alpha with the plane coder (pushed first: its bits are what the
          first tiles borrow), then the colour planes as above;
  P    -> palette indices with the plane coder, palette in the header;
  1, L;2, L;4 -> the one plane with the plane coder;
  16-bit modes -> the low bits of every channel (`depth`, pushed first), then the
          high bytes as the 8-bit mode above.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from . import container, registry
from .errors import CorruptFileError, DecodeMismatchError, ModelError, VaezipError
from .images import CHANNELS, Image, bit_depth, colour_mode, from_array, from_pil, read_image, to_pil

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


_PLANE_MODES = {"P": 256, "1": 2, "L;2": 4, "L;4": 16}
"""Modes coded by the plane coder alone, and their alphabets."""
_MODEL_BASES = {"RGB": "RGB", "RGBA": "RGB", "L": "L", "LA": "L"}
"""The registry's default-model key of each (8-bit) colour mode a model can code."""


def _layout(mode: str, model_name: str) -> _Layout:
    """The layout of an image's 8-bit part (its high bytes, for a 16-bit mode)."""
    if mode in _PLANE_MODES:
        return _Layout((), (0,), _PLANE_MODES[mode])
    mode = colour_mode(mode)
    colour = {"RGB": (0, 1, 2), "RGBA": (0, 1, 2), "L": (0,), "LA": (0,)}[mode]
    alpha = {"RGBA": (3,), "LA": (1,)}.get(mode, ())
    if not model_name:
        return _Layout((), alpha + colour, 256)
    return _Layout(colour, alpha, 256)


def choose_model(mode: str, model: Optional[str]) -> str:
    """The model name for an image mode ('' for none); an explicit name must fit."""
    base = None if mode in _PLANE_MODES else _MODEL_BASES[colour_mode(mode)]
    if base is None:
        return ""
    if model is None:
        return registry.default_model(base) or ""
    spec = registry.get_spec(model)
    if spec.config.channels != len(base):
        raise ModelError(f"model {model!r} codes {spec.config.channels}-channel images, not mode {mode}")
    return model


def _runtime() -> str:
    """Library versions and the instruction sets their float kernels dispatch on: what a
    decoder needs to match (docs/PORTABILITY.md). Shown when a checksum fails."""
    import constriction
    import torch

    return (f"torch={torch.__version__} numpy={np.__version__} "
            f"constriction={getattr(constriction, '__version__', '0.5.0')} cpu={_instruction_sets()}")


def _instruction_sets() -> str:
    """torch's CPU capability and numpy's highest x86 SIMD level, e.g. "AVX2/X86_V3"."""
    import torch

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # pragma: no cover - numpy moved its private module
        features = {}
    level = next((name for name in ("X86_V4", "X86_V3", "X86_V2") if features.get(name)), "baseline")
    return f"{torch.backends.cpu.get_cpu_capability()}/{level}"


@contextmanager
def _payload_errors(runtime: str):
    """Whatever decoding a damaged payload raises becomes `CorruptFileError`; for a file
    from another build (`runtime`) the message names both, as the cause may be arithmetic."""
    try:
        yield
    except CorruptFileError as exc:
        raise CorruptFileError(f"{exc}{_mismatch_note(runtime)}") from None
    except (VaezipError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: B036 - a damaged payload can upset any step, incl. Rust panics
        raise CorruptFileError(f"corrupt payload ({type(exc).__name__}){_mismatch_note(runtime)}") from None


def _mismatch_note(runtime: str) -> str:
    """' (written by X; this is Y)' when the file's runtime differs from this one, else ''."""
    return "" if runtime == _runtime() else f" (written by {runtime}; this is {_runtime()})"


def _coding_params(loaded: registry.LoadedModel, height: int, width: int, version: int):
    from .bitsback import CodingParams

    cfg = loaded.spec.config
    return CodingParams(tile=tile_size(height, width, cfg.downsampling), latent_grid=cfg.latent_grid, version=version)


def _network(loaded: registry.LoadedModel, version: int):
    """The model set up for coding with format `version`'s numerics (`inference.coding_network`)."""
    from .inference import coding_network

    return coding_network(loaded.net, version)


def _resolve_model(mode: str, model: Optional[str], loaded: Optional[registry.LoadedModel]):
    """(name, loaded model or None) for an image mode."""
    if loaded is not None:
        return loaded.spec.name, loaded
    name = choose_model(mode, model)
    return name, (registry.load_model(name) if name else None)


def _model_planes(pixels: np.ndarray, layout: _Layout) -> np.ndarray:
    """The model-coded channels of 8-bit `pixels`, (H, W, C) C-contiguous: the pixels
    themselves when those are all the channels (no copy of a large image), else a copy."""
    if layout.model_channels == tuple(range(pixels.shape[2])):
        return np.ascontiguousarray(pixels)
    return np.ascontiguousarray(pixels[:, :, list(layout.model_channels)])


def _push_planes(ans, img: Image, layout: _Layout) -> np.ndarray:
    """Push what the plane coder codes: a 16-bit image's low bits (`depth`), then the
    plane-coded channels; returns the 8-bit pixels (the high bytes) for the model.

    Stack before: S. After: S + low bits + planes (the last plane on top).
    """
    from . import depth, planes

    pixels = img.pixels
    if img.bit_depth == 16:
        pixels = depth.split(img.pixels)
        depth.low_codec(pixels).push(ans, img.pixels)
    for c in layout.plane_channels:
        planes.plane_codec(img.height, img.width, layout.levels).push(ans, pixels[:, :, c])
    return pixels


def _pop_planes(ans, mode: str, layout: _Layout, pixels: np.ndarray) -> np.ndarray:
    """Pop what `_push_planes` pushed into the 8-bit `pixels` (model channels filled in);
    returns the image's pixels (uint16 for a 16-bit mode)."""
    from . import depth, planes

    height, width = pixels.shape[:2]
    for c in reversed(layout.plane_channels):  # reversed: pushed first, popped last
        pixels[:, :, c] = planes.plane_codec(height, width, layout.levels).pop(ans)
    return depth.low_codec(pixels).pop(ans) if bit_depth(mode) == 16 else pixels


def push_image(ans, img: Image, name: str, loaded: Optional[registry.LoadedModel],
               progress: Optional[Progress] = None, version: int = container.FORMAT_VERSION,
               effort: int = container.DEFAULT_EFFORT):
    """Push one image onto the stack with format `version` at encoder `effort` (version 5);
    returns (header fields, coder).

    Stack before: S (may hold earlier images, whose bits the first tiles borrow).
    After: S + the image; in version 5 the model-coded tiles, then on top the
    adaptation of the pixel decoder they were coded with (`adapt`), which the
    decoder needs first. The returned coder replaces `ans` (roll-backs).
    """
    layout = _layout(img.mode, name)
    if version < 4 and img.mode not in container.EIGHT_BIT_MODES:
        raise ValueError(f"format version {version} cannot hold mode {img.mode}")
    high = _push_planes(ans, img, layout)
    schedule, tile = (), 0
    if layout.model_channels:
        from .bitsback import encode_tiles

        params = _coding_params(loaded, img.height, img.width, version)
        tile = params.tile
        pixels = _model_planes(high, layout)
        with _network(loaded, version) as net:
            if version < 5:
                schedule, ans = encode_tiles(net, ans, pixels, params, progress or (lambda n: None))
            else:
                schedule, ans = _push_adapted_tiles(net, ans, pixels, params, loaded.spec.config, effort, progress)
    header = container.Header(
        mode=img.mode, width=img.width, height=img.height,
        model_name=name, model_hash=loaded.spec.hash_prefix if loaded else bytes(8),
        tile_size=tile, schedule=schedule, num_initial_words=0,
        pixel_checksum=container.pixel_checksum(img), palette=img.palette,
        transparency=img.transparency, icc_profile=img.icc_profile, runtime=_runtime(), version=version,
        effort=effort,
    )
    return header, ans


def _push_adapted_tiles(net, ans, pixels: np.ndarray, params, config, effort: int, progress: Optional[Progress]):
    """Version 5: push the tiles coded with the adaptation `adapt.fit` chooses at `effort`,
    then the adaptation; returns (schedule, coder).

    The adaptation is fitted first, then the tiles are coded with the rounded values
    the decoder will pop. Where the effort says so (`FitSettings.verify`), the tiles
    are also coded without it and the smaller stack is kept: the fit's estimate
    (latents at the posterior mean) can be wrong on a small image.
    Stack before: S. After: S + tiles + adaptation (on top: the decoder needs it first).
    """
    from . import adapt, coders
    from .bitsback import encode_tiles

    adaptation = adapt.fit(net, pixels, params.tile, effort)
    plain = ans.clone() if adaptation is not None and adapt.EFFORT_SETTINGS[effort].verify else None
    schedule, ans = encode_tiles(net.adapted(adaptation), ans, pixels, params, progress or (lambda n: None))
    coders.push_steps(ans, adapt.adaptation_steps(config, adaptation or adapt.Adaptation.zeros(config)))
    if plain is not None:
        plain_schedule, plain = encode_tiles(net, plain, pixels, params, lambda n: None)
        coders.push_steps(plain, adapt.adaptation_steps(config, adapt.Adaptation.zeros(config)))
        if plain.num_bits() <= ans.num_bits():
            return plain_schedule, plain
    return schedule, ans


def compress(image: ImageLike, model: Optional[str] = None, *, loaded: Optional[registry.LoadedModel] = None,
             progress: Optional[Progress] = None, version: int = container.FORMAT_VERSION,
             effort: int = container.DEFAULT_EFFORT) -> bytes:
    """Compress an image losslessly to the bytes of a .vz file.

    Args:
        image: `Image`, uint8 array ((H, W) gray, (H, W, 2|3|4)), PIL image or path.
        model: registered model name; default: the registered model for the mode.
        loaded: an already loaded model (overrides `model`; used by tests).
        progress: called with the number of tiles finished.
        version: format version to write (`container.KNOWN_VERSIONS`; older ones for compatibility tests).
        effort: encoder effort 1..9 (`container.EFFORTS`, like cjxl's -e): a higher one
            encodes more slowly into a smaller file (`adapt.EFFORT_SETTINGS`); decoding
            time does not depend on it. Version 5 only.

    Raises:
        InputError: effort outside 1..9.
    """
    from . import coders
    from .errors import InputError

    if version not in container.KNOWN_VERSIONS:
        raise ValueError(f"unknown format version {version}")
    if effort not in container.EFFORTS:
        raise InputError(f"effort must be {container.EFFORTS.start}..{container.EFFORTS.stop - 1}, got {effort}")
    if version < 5 and effort != container.DEFAULT_EFFORT:
        raise ValueError(f"format version {version} has no effort levels")
    img = as_image(image)
    name, loaded = _resolve_model(img.mode, model, loaded)
    if not _layout(img.mode, name).model_channels:  # P and 1: the plane coder alone
        name, loaded = "", None
    header, ans = push_image(coders.new_coder(), img, name, loaded, progress, version, effort)
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
              progress: Optional[Progress] = None, check: bool = True) -> Image:
    """Pop the image `push_image` pushed with this header; checks its pixel checksum
    unless `check` is False (the caller checks it, e.g. an archive's set checksum).

    Stack before: S + the image. After: S.
    Raises:
        CorruptFileError: damaged data; DecodeMismatchError: pixels fail the checksum.
    """
    channels = CHANNELS[header.mode]
    pixels = np.zeros((header.height, header.width, channels), dtype=np.uint8)
    layout = _layout(header.mode, header.model_name)
    with _payload_errors(header.runtime):
        if layout.model_channels:
            from .bitsback import CodingParams, decode_tiles

            model = _model_for(header, loaded)
            params = CodingParams(tile=header.tile_size, latent_grid=model.spec.config.latent_grid,
                                  version=header.version)
            if params.tile != tile_size(header.height, header.width, model.spec.config.downsampling):
                raise CorruptFileError("corrupt header: unexpected tile size")
            with _network(model, header.version) as net:
                if header.version >= 5:
                    from . import adapt, coders

                    net = net.adapted(coders.pop_steps(ans, adapt.adaptation_steps(model.spec.config)))
                colour = decode_tiles(net, ans, header.height, header.width, len(layout.model_channels),
                                      params, header.schedule, progress or (lambda n: None))
            if layout.model_channels == tuple(range(channels)):
                pixels = colour  # every channel: no copy of a large image
            else:
                pixels[:, :, list(layout.model_channels)] = colour
        elif header.schedule or header.model_name:
            raise CorruptFileError("corrupt header: tile schedule without a model")
        pixels = _pop_planes(ans, header.mode, layout, pixels)
    if bit_depth(header.mode) < 8 and pixels.max(initial=0) >= 1 << bit_depth(header.mode):
        raise DecodeMismatchError("decoded pixels fail the checksum")
    image = Image(header.mode, pixels, header.palette, header.transparency, header.icc_profile)
    if check:
        _check_pixels([image], [header.pixel_checksum], header.runtime)
    return image


def _check_pixels(images: list[Image], checksums: list[bytes], runtime: str) -> None:
    """Raises DecodeMismatchError unless every image has its stored pixel checksum."""
    for image, checksum in zip(images, checksums, strict=True):
        if container.pixel_checksum(image) != checksum:
            raise DecodeMismatchError(f"decoded pixels fail the checksum{_mismatch_note(runtime)}")


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


# Measurement lives in measure.py; these names stay importable from here.
from .rates import Report, measure, model_bits  # noqa: E402,F401


def _padded_tiles(pixels: np.ndarray, grid, indices) -> np.ndarray:
    from .tiles import lattice_to_pixels, split_tiles

    return lattice_to_pixels(split_tiles(pixels, grid, indices))


# ---- archives (.vzp): many images on one bits-back stack -----------------------

ArchiveItem = tuple[str, ImageLike]
LoadedModels = Union[registry.LoadedModel, "Sequence[registry.LoadedModel]", None]


def pack(items: "Sequence[ArchiveItem]", model: Optional[str] = None, *, loaded: LoadedModels = None,
         join: bool = True, progress: Optional[Progress] = None, version: int = container.FORMAT_VERSION) -> bytes:
    """Compress named images into the bytes of one .vzp archive.

    The images are pushed in order onto ONE ANS stack, so only the first pays
    a start-up cost: every later image borrows its latents from the bits of
    the images before it. With `join`, consecutive images that share model and
    tile side are coded as one tile sequence whose network batches straddle
    image boundaries (`bitsback.encode_tile_sets`): the same code, far fewer
    network calls for small images. Without it each image is `push_image`d.

    Args:
        items: (name, image) pairs; a name is a relative "/"-separated path
            (`archive.name_problem`), unique; an image is anything `compress` takes.
        model: registered model name for every image; default: each image gets
            the registered model for its mode, as `compress` does.
        loaded: already loaded model(s) (tests): each image takes the first
            whose channel count fits its mode, else falls back to `model`.
        join: code runs of images as shared tile sequences (see above).
        progress: called with the number of tiles finished.
        version: format version to write (`archive.KNOWN_VERSIONS`).

    Raises:
        InputError: no items, a bad or duplicate name. VaezipError: as `compress`.
    """
    from . import archive, coders
    from .errors import InputError

    if version not in archive.KNOWN_VERSIONS:
        raise ValueError(f"unknown format version {version}")
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
    models = [_archive_model(img.mode, model, loaded) for img in images]
    ans = coders.new_coder()
    entries: list = [None] * len(images)
    for run in _tile_runs(images, models, join):
        name, lm = models[run.start]
        if len(run) == 1:
            header, ans = push_image(ans, images[run.start], name, lm, progress, version)
            entries[run.start] = archive.Entry(names[run.start], header)
            continue
        headers, ans = _push_tile_set(ans, images[run.start:run.stop], name, lm, progress, version)
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
    from . import archive, coders

    contents = archive.read(bytes(data))
    entries, check = contents.entries, contents.checksum is None  # version 1: per image
    try:
        ans = coders.new_coder(contents.words)
    except Exception:
        raise CorruptFileError("corrupt payload") from None
    images: list = [None] * len(entries)
    for run in reversed(archive.tile_sets(entries)):  # reversed: the last pushed is on top
        headers = [entries[i].header for i in run]
        lm = _archive_loaded(headers[0].model_name, loaded)
        try:
            if len(run) == 1:
                images[run.start] = pop_image(ans, headers[0], lm, progress, check)
            else:
                images[run.start:run.stop] = _pop_tile_set(ans, headers, lm, progress, check)
        except DecodeMismatchError as exc:
            names = ", ".join(entries[i].name for i in run)
            raise DecodeMismatchError(f"{names}: {exc}") from None
    if not ans.is_empty():
        raise CorruptFileError("corrupt payload: data left over after decoding")
    if not check:
        checksums = [container.pixel_checksum(image) for image in images]
        if archive.set_checksum(checksums) != contents.checksum:
            raise DecodeMismatchError(
                f"decoded images fail the archive's checksum{_mismatch_note(entries[0].header.runtime)}")
    return [(entry.name, image) for entry, image in zip(entries, images)]


def _archive_model(mode: str, model: Optional[str], loaded: LoadedModels):
    """(name, loaded model or None) for one image of an archive."""
    if mode in _PLANE_MODES:
        return "", None  # plane-coded, whatever model is asked for
    channels = len(_MODEL_BASES[colour_mode(mode)])
    candidates = [loaded] if isinstance(loaded, registry.LoadedModel) else list(loaded or ())
    for lm in candidates:
        if lm.spec.config.channels == channels:
            return lm.spec.name, lm
    return _resolve_model(mode, model, None)


def _archive_loaded(name: str, loaded: LoadedModels) -> Optional[registry.LoadedModel]:
    """The given loaded model called `name`, or None (the registry loads it)."""
    candidates = [loaded] if isinstance(loaded, registry.LoadedModel) else list(loaded or ())
    return next((lm for lm in candidates if lm.spec.name == name), None)


def _tile_runs(images, models, join: bool) -> list[range]:
    """Runs of consecutive images coded as one tile sequence: same model and tile side."""
    def key(i: int):
        name, lm = models[i]
        if not join or not name:
            return None
        return name, tile_size(images[i].height, images[i].width, lm.spec.config.downsampling)

    runs: list[range] = []
    for i in range(len(images)):
        if runs and key(i) is not None and key(i) == key(runs[-1].stop - 1):
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


def _schedule_per_image(schedule: tuple[int, ...], counts: list[int]) -> list[tuple[int, ...]]:
    """Split a tile-sequence schedule: each batch goes to the image holding its first tile."""
    from .bitsback import DETERMINISTIC_FLAG

    ends = np.cumsum(counts)
    out: list[list[int]] = [[] for _ in counts]
    position = 0
    for entry in schedule:
        out[int(np.searchsorted(ends, position, side="right"))].append(entry)
        position += entry & ~DETERMINISTIC_FLAG
    return [tuple(s) for s in out]


def _push_tile_set(ans, imgs: list[Image], name: str, loaded: registry.LoadedModel,
                   progress: Optional[Progress], version: int):
    """Push images sharing model and tile side; returns (headers, coder).

    Stack before: S. After: S + every image's plane-coded planes (in order),
    then all their model-coded tiles as one sequence (the last batch on top).
    """
    from .bitsback import encode_tile_sets

    layouts = [_layout(img.mode, name) for img in imgs]
    highs = [_push_planes(ans, img, layout) for img, layout in zip(imgs, layouts)]
    params = _coding_params(loaded, imgs[0].height, imgs[0].width, version)
    pixels = [_model_planes(high, layout) for high, layout in zip(highs, layouts)]
    with _network(loaded, version) as net:
        schedule, ans = encode_tile_sets(net, ans, pixels, params, progress or (lambda n: None))
    counts = [-(-img.height // params.tile) * -(-img.width // params.tile) for img in imgs]
    headers = [
        container.Header(
            mode=img.mode, width=img.width, height=img.height, model_name=name,
            model_hash=loaded.spec.hash_prefix, tile_size=params.tile, schedule=part, num_initial_words=0,
            pixel_checksum=container.pixel_checksum(img), palette=img.palette,
            transparency=img.transparency, icc_profile=img.icc_profile, runtime=_runtime(), version=version,
        )
        for img, part in zip(imgs, _schedule_per_image(schedule, counts))
    ]
    return headers, ans


def _pop_tile_set(ans, headers: list[container.Header], loaded: Optional[registry.LoadedModel],
                  progress: Optional[Progress], check: bool = True) -> list[Image]:
    """Pop what `_push_tile_set` pushed; checks every image's pixel checksum if `check`.

    Stack before: S + the images. After: S.
    """
    from .bitsback import CodingParams, decode_tile_sets

    model = _model_for(headers[0], loaded)
    cfg = model.spec.config
    layouts = [_layout(h.mode, h.model_name) for h in headers]
    if {len(layout.model_channels) for layout in layouts} != {cfg.channels}:
        raise CorruptFileError("corrupt header: joined images need the model's channel count")
    for h in headers:
        if h.tile_size != tile_size(h.height, h.width, cfg.downsampling):
            raise CorruptFileError("corrupt header: unexpected tile size")
    params = CodingParams(tile=headers[0].tile_size, latent_grid=cfg.latent_grid, version=headers[0].version)
    schedule = tuple(entry for h in headers for entry in h.schedule)
    pixels = [np.zeros((h.height, h.width, CHANNELS[h.mode]), dtype=np.uint8) for h in headers]
    with _payload_errors(headers[0].runtime):
        with _network(model, params.version) as net:
            colour = decode_tile_sets(net, ans, [(h.height, h.width) for h in headers], cfg.channels,
                                      params, schedule, progress or (lambda n: None))
        for k in reversed(range(len(headers))):  # reversed: planes were pushed image by image
            pixels[k][:, :, list(layouts[k].model_channels)] = colour[k]
            pixels[k] = _pop_planes(ans, headers[k].mode, layouts[k], pixels[k])
    images = [Image(h.mode, p, h.palette, h.transparency, h.icc_profile) for h, p in zip(headers, pixels)]
    if check:
        _check_pixels(images, [h.pixel_checksum for h in headers], headers[0].runtime)
    return images
