"""Image-level coding: an image's mode decides its planes, its planes their coder.

One ANS stack per file; ANS is last-in first-out, so what is pushed first is popped last:
  RGB  -> the RGB photo model (bits-back over tiles, `bitsback`);
  L    -> the gray photo model if one is registered, else the plane coder;
  LA / RGBA -> alpha with the plane coder (pushed first: its bits are what the first
          tiles borrow), then the colour planes as above;
  P, 1, L;2, L;4 -> the one plane with the plane coder (`planes`);
  16-bit modes -> the low bits of every channel (`depth`, pushed first), then the high
          bytes as the 8-bit mode above.

`push_image` / `pop_image` code one image, `push_tile_set` / `pop_tile_set` a run of
images that share a model and tile side as one tile sequence (.vzp archives). The public
API (`api`) and the measurements (`rates`) both code through here.
"""

from __future__ import annotations

import platform
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

from vaezip.errors import CorruptFileError, DecodeMismatchError, ModelError, VaezipError
from vaezip.format import container, versions
from vaezip.imaging.images import CHANNELS, Image, bit_depth, colour_mode
from vaezip.network import registry

MAX_TILE = 64
"""Largest tile side, pixels."""
Progress = Callable[[int], None]
"""Called with the number of tiles finished."""

PLANE_MODES = {"P": 256, "1": 2, "L;2": 4, "L;4": 16}
"""Modes coded by the plane coder alone, and their alphabets."""
_MODEL_KEYS = {"RGB": "RGB", "RGBA": "RGB", "L": "L", "LA": "L"}
"""The registry's default-model key of each (8-bit) colour mode a model can code."""


def tile_size(height: int, width: int, downsampling: int) -> int:
    """Square tile side: MAX_TILE, or less for an image smaller than that."""
    side = max(height, width)
    return min(MAX_TILE, -(-side // downsampling) * downsampling)


@dataclass(frozen=True)
class Layout:
    """Which channels of an image's 8-bit part (its high bytes, for a 16-bit mode) go to
    the model and which to the plane coder.

    Attributes:
        model_channels: channel indices coded by the model (may be empty).
        plane_channels: channel indices coded by the plane coder, in push order.
        levels: alphabet of the plane-coded channels.
    """

    model_channels: tuple[int, ...]
    plane_channels: tuple[int, ...]
    levels: int


def layout(mode: str, model_coded: bool) -> Layout:
    """The layout of a `mode` image, coded with a model or (`model_coded` False) without."""
    if mode in PLANE_MODES:
        return Layout((), (0,), PLANE_MODES[mode])
    mode = colour_mode(mode)
    colour = {"RGB": (0, 1, 2), "RGBA": (0, 1, 2), "L": (0,), "LA": (0,)}[mode]
    alpha = {"RGBA": (3,), "LA": (1,)}.get(mode, ())
    if not model_coded:
        return Layout((), alpha + colour, 256)
    return Layout(colour, alpha, 256)


# ---------------------------------------------------------------- choosing the model

LoadedModels = Sequence[registry.LoadedModel]


def format_for(models: Sequence[Optional[registry.LoadedModel]], version: Optional[int] = None) -> versions.Format:
    """The format to write with `models` (None entries: images coded without a model):
    `version` if given, else the newest that every model codes (`versions.newest`: 6 only
    when all of them are fixed-point)."""
    if version is not None:
        return versions.get(version)
    kinds = {m.net.fixed for m in models if m is not None}
    if len(kinds) > 1:
        names = ", ".join(sorted({m.spec.name for m in models if m is not None}))
        raise ModelError(f"models {names} mix fixed-point (format version 6) and float (version 5) networks: "
                         "one file or archive holds one format; pick models of one kind")
    return versions.newest(kinds != {False})


def model_for_mode(mode: str, model: Optional[str] = None, loaded: LoadedModels = ()) -> Optional[registry.LoadedModel]:
    """The model that codes `mode` images; None for the plane coder alone.

    The first of `loaded` that codes the mode's channel count, else the registered
    model `model`, else the registry's default for the mode (None if there is none).

    Raises:
        ModelError: `model` codes another channel count, or is not registered.
    """
    if mode in PLANE_MODES:
        return None
    key = _MODEL_KEYS[colour_mode(mode)]
    fitting = next((lm for lm in loaded if lm.spec.config.channels == len(key)), None)
    if fitting is not None:
        return fitting
    if model is None:
        model = registry.default_model(key)
        if not model:
            return None
    spec = registry.get_spec(model)
    if spec.config.channels != len(key):
        raise ModelError(f"model {model!r} codes {spec.config.channels}-channel images, not mode {mode}")
    return registry.load_model(model)


def model_for_header(header: container.Header, loaded: LoadedModels = ()) -> registry.LoadedModel:
    """The model a file names (one of `loaded`, else the registry's), its weights checked.

    Raises:
        ModelError: the model is missing, or its weights are not the file's.
    """
    model = next((lm for lm in loaded if lm.spec.name == header.model_name), None)
    model = model or registry.load_model(header.model_name)
    if model.spec.hash_prefix != header.model_hash:
        raise ModelError(
            f"file needs model {header.model_name!r} with weights {header.model_hash.hex()}, "
            f"this build has {model.spec.name!r} with {model.spec.hash_prefix.hex()}"
        )
    return model


# ---------------------------------------------------------------- runtime and errors


def runtime() -> str:
    """Library versions and the instruction sets their float kernels dispatch on: what a
    decoder needs to match (docs/PORTABILITY.md). Shown when a checksum fails."""
    import constriction
    import torch

    return (f"torch={torch.__version__} numpy={np.__version__} "
            f"constriction={getattr(constriction, '__version__', '0.5.0')} cpu={_instruction_sets()}")


def _instruction_sets() -> str:
    """torch's CPU capability, numpy's highest x86 SIMD level and the CPU's vendor, e.g.
    "AVX2/X86_V3/AuthenticAMD": MKL and oneDNN also choose kernels by vendor and model, so
    an AVX-512 Intel and an AVX-512 AMD machine can differ (docs/PORTABILITY.md)."""
    import torch

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # pragma: no cover - numpy moved its private module
        features = {}
    level = next((name for name in ("X86_V4", "X86_V3", "X86_V2") if features.get(name)), "baseline")
    return f"{torch.backends.cpu.get_cpu_capability()}/{level}/{cpu_vendor()}"


@lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD"; Linux's /proc/cpuinfo), else
    the machine name (`platform.machine()`, e.g. "arm64")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def mismatch_note(written_by: str, fmt: Optional[versions.Format] = None) -> str:
    """' (written by X; this is Y)' when a file's runtime differs from this one, else '' (and
    for "", not recorded: format versions with `compact_header`); for a file whose network ran
    in a float format (`fmt`, versions 1 to 5), also what that means."""
    notes = [] if written_by in ("", runtime()) else [f"written by {written_by}; this is {runtime()}"]
    if fmt is not None and not fmt.numerics.exact:
        notes.append(f"format version {fmt.version} runs a float network, whose files decode only where the "
                     "float arithmetic matches the writing machine's (docs/PORTABILITY.md)")
    return f" ({'; '.join(notes)})" if notes else ""


@contextmanager
def payload_errors(written_by: str, fmt: Optional[versions.Format] = None):
    """Whatever decoding a damaged payload raises becomes `CorruptFileError`; for a file
    from another build (`written_by`) or of a float format whose network ran (`fmt`) the
    message says so, as the cause may be arithmetic (`mismatch_note`)."""
    try:
        yield
    except CorruptFileError as exc:
        raise CorruptFileError(f"{exc}{mismatch_note(written_by, fmt)}") from None
    except (VaezipError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: B036 - a damaged payload can upset any step, incl. Rust panics
        raise CorruptFileError(f"corrupt payload ({type(exc).__name__}){mismatch_note(written_by, fmt)}") from None


def check_pixels(images: Sequence[Image], checksums: Sequence[bytes], written_by: str,
                 fmt: Optional[versions.Format] = None) -> None:
    """Raises DecodeMismatchError unless every image has its stored pixel checksum."""
    for image, checksum in zip(images, checksums, strict=True):
        if container.pixel_checksum(image) != checksum:
            raise DecodeMismatchError(f"decoded pixels fail the checksum{mismatch_note(written_by, fmt)}")


# ---------------------------------------------------------------- planes


def _model_planes(pixels: np.ndarray, plan: Layout) -> np.ndarray:
    """The model-coded channels of 8-bit `pixels`, (H, W, C) C-contiguous: the pixels
    themselves when those are all the channels (no copy of a large image), else a copy."""
    if plan.model_channels == tuple(range(pixels.shape[2])):
        return np.ascontiguousarray(pixels)
    return np.ascontiguousarray(pixels[:, :, list(plan.model_channels)])


def _push_planes(ans, img: Image, plan: Layout) -> np.ndarray:
    """Push what the plane coder codes: a 16-bit image's low bits (`depth`), then the
    plane-coded channels; returns the 8-bit pixels (the high bytes) for the model.

    Stack before: S. After: S + low bits + planes (the last plane on top).
    """
    from vaezip.entropy import depth, planes

    pixels = img.pixels
    if img.bit_depth == 16:
        pixels = depth.split(img.pixels)
        depth.low_codec(pixels).push(ans, img.pixels)
    for c in plan.plane_channels:
        planes.plane_codec(img.height, img.width, plan.levels).push(ans, pixels[:, :, c])
    return pixels


def _pop_planes(ans, mode: str, plan: Layout, pixels: np.ndarray) -> np.ndarray:
    """Pop what `_push_planes` pushed into the 8-bit `pixels` (model channels filled in);
    returns the image's pixels (uint16 for a 16-bit mode)."""
    from vaezip.entropy import depth, planes

    height, width = pixels.shape[:2]
    for c in reversed(plan.plane_channels):  # reversed: pushed first, popped last
        pixels[:, :, c] = planes.plane_codec(height, width, plan.levels).pop(ans)
    return depth.low_codec(pixels).pop(ans) if bit_depth(mode) == 16 else pixels


def _coding_params(model: registry.LoadedModel, tile: int, fmt: versions.Format):
    from vaezip.coding.bitsback import CodingParams

    return CodingParams(tile=tile, latent_grid=model.spec.config.latent_grid, fmt=fmt)


def _network(model: registry.LoadedModel, fmt: versions.Format):
    """The model set up for coding with `fmt`'s numerics (`inference.coding_network`)."""
    from vaezip.network.inference import coding_network

    return coding_network(model.net, fmt)


def _header(img: Image, model: Optional[registry.LoadedModel], tile: int, schedule: tuple[int, ...],
            fmt: versions.Format, effort: int = versions.DEFAULT_EFFORT) -> container.Header:
    return container.Header(
        mode=img.mode, width=img.width, height=img.height,
        model_name=model.spec.name if model else "", model_hash=model.spec.hash_prefix if model else bytes(8),
        tile_size=tile, schedule=schedule, num_initial_words=0, pixel_checksum=container.pixel_checksum(img),
        palette=img.palette, transparency=img.transparency, icc_profile=img.icc_profile, runtime=runtime(),
        version=fmt.version, effort=effort,
    )


def _check_mode(mode: str, fmt: versions.Format) -> None:
    if mode not in fmt.modes:
        raise ValueError(f"format version {fmt.version} cannot hold mode {mode}")


# ---------------------------------------------------------------- one image


def push_image(ans, img: Image, model: Optional[registry.LoadedModel], fmt: Optional[versions.Format] = None,
               progress: Optional[Progress] = None, effort: int = versions.DEFAULT_EFFORT):
    """Push one image with format `fmt` (None: `format_for` the model), its colour planes
    through `model` (None: the plane coder alone), at encoder `effort` (formats with
    `adaptation`); returns (header, coder).

    Stack before: S (may hold earlier images, whose bits the first tiles borrow).
    After: S + the image: planes, tiles and, with `fmt.adaptation`, on top the adaptation
    of the pixel heads the tiles were coded with (the decoder needs it first). The
    returned coder replaces `ans` (roll-backs).
    """
    fmt = fmt or format_for([model])
    _check_mode(img.mode, fmt)
    if effort != versions.DEFAULT_EFFORT and not fmt.adaptation:
        raise ValueError(f"format version {fmt.version} has no effort levels")
    plan = layout(img.mode, model is not None)
    high = _push_planes(ans, img, plan)
    schedule, tile = (), 0
    if plan.model_channels:
        from vaezip.coding.bitsback import encode_tiles

        tile = tile_size(img.height, img.width, model.spec.config.downsampling)
        params = _coding_params(model, tile, fmt)
        with _network(model, fmt) as net:
            if fmt.adaptation:
                schedule, ans = _push_adapted_tiles(net, ans, _model_planes(high, plan), params, model, effort,
                                                    progress)
            else:
                schedule, ans = encode_tiles(net, ans, _model_planes(high, plan), params, progress or (lambda n: None))
    return _header(img, model if plan.model_channels else None, tile, schedule, fmt, effort), ans


def _push_adapted_tiles(net, ans, pixels: np.ndarray, params, model: registry.LoadedModel, effort: int,
                        progress: Optional[Progress]):
    """Push the tiles coded with the adaptation `adapt.fit` chooses at `effort`, then the
    adaptation; returns (schedule, coder).

    The adaptation is fitted first, then the tiles are coded with the rounded values the
    decoder will pop. Where the effort says so, the tiles are also coded without it
    (`FitSettings.verify`: the fit's estimate, latents at the posterior mean, can be wrong
    on a small image) and with the fits of lower levels (`FitSettings.rivals`); the
    smallest stack is kept (the first of equals: no adaptation before the own fit before
    the rivals').
    Stack before: S. After: S + tiles + adaptation (on top: the decoder needs it first).
    """
    from vaezip.coding import adapt
    from vaezip.coding.bitsback import encode_tiles
    from vaezip.entropy import coders

    config = model.spec.config
    settings = adapt.EFFORT_SETTINGS[effort]
    candidates = [adapt.fit(net, pixels, params.tile, effort)]
    if candidates[0] is not None and settings.verify:
        candidates.insert(0, None)
    for level in settings.rivals:
        rival = adapt.fit(net, pixels, params.tile, level)
        if rival not in candidates:
            candidates.append(rival)
    best, quiet = None, (lambda n: None)
    for index, adaptation in enumerate(candidates):
        trial = ans.clone() if len(candidates) > 1 else ans
        report = (progress or quiet) if index == 0 else quiet  # one progress bar, the first encode's
        schedule, trial = encode_tiles(net.adapted(adaptation), trial, pixels, params, report)
        coders.push_steps(trial, adapt.adaptation_steps(config, adaptation or adapt.Adaptation.zeros(config)))
        if best is None or trial.num_bits() < best[1].num_bits():
            best = (schedule, trial)
    return best


def pop_image(ans, header: container.Header, loaded: LoadedModels = (), progress: Optional[Progress] = None,
              check: bool = True) -> Image:
    """Pop the image `push_image` pushed with this header; checks its pixel checksum
    unless `check` is False (the caller checks it, e.g. an archive's set checksum).

    Stack before: S + the image. After: S.
    Raises:
        CorruptFileError: damaged data; DecodeMismatchError: pixels fail the checksum.
    """
    pixels = np.zeros((header.height, header.width, CHANNELS[header.mode]), dtype=np.uint8)
    plan = layout(header.mode, bool(header.model_name))
    network_fmt = header.fmt if plan.model_channels else None
    with payload_errors(header.runtime, network_fmt):
        if plan.model_channels:
            from vaezip.coding.bitsback import decode_tiles

            model = model_for_header(header, loaded)
            if header.tile_size != tile_size(header.height, header.width, model.spec.config.downsampling):
                raise CorruptFileError("corrupt header: unexpected tile size")
            with _network(model, header.fmt) as net:
                if header.fmt.adaptation:
                    from vaezip.coding import adapt
                    from vaezip.entropy import coders

                    net = net.adapted(coders.pop_steps(ans, adapt.adaptation_steps(model.spec.config)))
                colour = decode_tiles(net, ans, header.height, header.width, len(plan.model_channels),
                                      _coding_params(model, header.tile_size, header.fmt), header.schedule,
                                      progress or (lambda n: None))
            if plan.model_channels == tuple(range(pixels.shape[2])):
                pixels = colour  # every channel: no copy of a large image
            else:
                pixels[:, :, list(plan.model_channels)] = colour
        elif header.schedule or header.model_name:
            raise CorruptFileError("corrupt header: tile schedule without a model")
        pixels = _pop_planes(ans, header.mode, plan, pixels)
    if bit_depth(header.mode) < 8 and pixels.max(initial=0) >= 1 << bit_depth(header.mode):
        raise DecodeMismatchError("decoded pixels fail the checksum")
    image = Image(header.mode, pixels, header.palette, header.transparency, header.icc_profile)
    if check:
        check_pixels([image], [header.pixel_checksum], header.runtime, network_fmt)
    return image


# ---------------------------------------------------------------- tile sets (archives)


def tile_runs(images: Sequence[Image], models: Sequence[Optional[registry.LoadedModel]], join: bool) -> list[range]:
    """Runs of consecutive images coded as one tile sequence: same model and tile side."""
    def key(i: int):
        model = models[i]
        if not join or model is None:
            return None
        return model.spec.name, tile_size(images[i].height, images[i].width, model.spec.config.downsampling)

    runs: list[range] = []
    for i in range(len(images)):
        if runs and key(i) is not None and key(i) == key(runs[-1].stop - 1):
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


def _schedule_per_image(schedule: tuple[int, ...], counts: list[int]) -> list[tuple[int, ...]]:
    """Split a tile-sequence schedule: each batch goes to the image holding its first tile."""
    ends = np.cumsum(counts)
    out: list[list[int]] = [[] for _ in counts]
    position = 0
    for entry in schedule:
        out[int(np.searchsorted(ends, position, side="right"))].append(entry)
        position += entry & ~container.DETERMINISTIC_FLAG
    return [tuple(s) for s in out]


def push_tile_set(ans, imgs: Sequence[Image], model: registry.LoadedModel, fmt: Optional[versions.Format] = None,
                  progress: Optional[Progress] = None):
    """Push images sharing `model` and tile side as one tile sequence (format `fmt`, None:
    `format_for` the model); returns (headers, coder).

    Stack before: S. After: S + every image's plane-coded planes (in order),
    then all their model-coded tiles as one sequence (the last batch on top).
    """
    from vaezip.coding.bitsback import encode_tile_sets

    fmt = fmt or format_for([model])
    for img in imgs:
        _check_mode(img.mode, fmt)
    plans = [layout(img.mode, True) for img in imgs]
    highs = [_push_planes(ans, img, plan) for img, plan in zip(imgs, plans)]
    tile = tile_size(imgs[0].height, imgs[0].width, model.spec.config.downsampling)
    params = _coding_params(model, tile, fmt)
    with _network(model, fmt) as net:
        schedule, ans = encode_tile_sets(net, ans, [_model_planes(h, p) for h, p in zip(highs, plans)], params,
                                         progress or (lambda n: None))
    counts = [-(-img.height // tile) * -(-img.width // tile) for img in imgs]
    headers = [_header(img, model, tile, part, fmt) for img, part in zip(imgs, _schedule_per_image(schedule, counts))]
    return headers, ans


def pop_tile_set(ans, headers: Sequence[container.Header], loaded: LoadedModels = (),
                 progress: Optional[Progress] = None, check: bool = True) -> list[Image]:
    """Pop what `push_tile_set` pushed; checks every image's pixel checksum if `check`.

    Stack before: S + the images. After: S.
    """
    from vaezip.coding.bitsback import decode_tile_sets

    model = model_for_header(headers[0], loaded)
    cfg = model.spec.config
    plans = [layout(h.mode, True) for h in headers]
    if {len(plan.model_channels) for plan in plans} != {cfg.channels}:
        raise CorruptFileError("corrupt header: joined images need the model's channel count")
    for h in headers:
        if h.tile_size != tile_size(h.height, h.width, cfg.downsampling):
            raise CorruptFileError("corrupt header: unexpected tile size")
    fmt = headers[0].fmt
    schedule = tuple(entry for h in headers for entry in h.schedule)
    pixels = [np.zeros((h.height, h.width, CHANNELS[h.mode]), dtype=np.uint8) for h in headers]
    with payload_errors(headers[0].runtime, fmt):
        with _network(model, fmt) as net:
            colour = decode_tile_sets(net, ans, [(h.height, h.width) for h in headers], cfg.channels,
                                      _coding_params(model, headers[0].tile_size, fmt), schedule,
                                      progress or (lambda n: None))
        for k in reversed(range(len(headers))):  # reversed: planes were pushed image by image
            pixels[k][:, :, list(plans[k].model_channels)] = colour[k]
            pixels[k] = _pop_planes(ans, headers[k].mode, plans[k], pixels[k])
    images = [Image(h.mode, p, h.palette, h.transparency, h.icc_profile) for h, p in zip(headers, pixels)]
    if check:
        check_pixels(images, [h.pixel_checksum for h in headers], headers[0].runtime, fmt)
    return images
