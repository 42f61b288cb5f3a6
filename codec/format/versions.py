"""The table of format versions: one frozen record per version, the only place its facts live.

A .vz file or .vzp archive names its version; everything that codes or reads it takes
that version's `Format` (`get`), never the bare number, so a new version is one new row
here plus the code its new fields switch on. `CURRENT` is what this build writes.
Torch-free: the byte-level format (`container`, `archive`) reads it too.

    version  numerics                      pixel tables   scale offsets  modes         .vzp table
    1        native convolutions, 1 call   256 per value  no             8-bit         a record per image
    2        oneDNN, 4-tile sub-batches    bin, then rest no             8-bit         columns, set checksum
    3        as 2                          as 2           yes            8-bit         as 2
    4        as 2                          as 2           yes            + other depths as 2
    5        as 2                          as 2           yes            as 4          as 2
             + the encoder effort in the header, a per-image adaptation of the pixel heads
    6        fixed-point network, exact   as 2, integer  yes            as 4          as 2
             in any kernel order; tables
             by integer arithmetic
    7        as 6, and the pixels in the model's schedule: stage 0 split into sub-lattice
             steps when the model has them (`ModelConfig.stage0_levels`), a step at a time
    8        as 7, and a model with `ModelConfig.pixel_halo` reads the ring of neighbouring
             pixels around each tile (the neighbours in the same or a later batch)
    9        as 8, and each tile of a batch codes its own change to the batch's scale offsets
    10       as 9 in a compact header: no runtime string (the fixed-point numbers do not depend
             on it), counts, sizes and lengths as LEB128 varints; a .vzp table without runtime
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from vaezip.errors import UnsupportedVersionError

EIGHT_BIT_MODES: tuple[str, ...] = ("L", "LA", "RGB", "RGBA", "P", "1")
OTHER_DEPTH_MODES: tuple[str, ...] = ("L;2", "L;4", "L;16", "LA;16", "RGB;16", "RGBA;16")


@dataclass(frozen=True)
class Numerics:
    """How coding runs the network (`inference.coding_network`).

    Attributes:
        onednn: oneDNN convolutions (else PyTorch's native ones, MKL).
        sub_batch_pixels: tile pixels per network call, each call on one thread, the calls
            side by side (so any thread count gives the same numbers); None: the whole
            batch in one call.
        exact: the network is fixed-point (`network.fixedpoint`): every activation is an
            integer, every convolution exact in float32, so any kernel, thread count and
            instruction set gives the same numbers; the probability tables are built by
            integer arithmetic (`entropy.exact`).
    """

    onednn: bool
    sub_batch_pixels: Optional[int]
    exact: bool = False


@dataclass(frozen=True)
class Format:
    """The facts of one format version.

    Attributes:
        version: the number files carry (u16).
        numerics: how the network runs (`Numerics`).
        mean_range: clamp of the quantised mixture means, in pixels (`quantize`).
        binned_tables: a subpixel is coded as its 16-value bin, then its place in the bin
            (else with one 256-entry table).
        scale_offsets: each batch's stages code log-scale offsets chosen by the encoder
            (`calibrate`) above their pixels.
        modes: the image modes it holds.
        archive_columns: a .vzp table is stored column by column, deflated, with one
            checksum over the set (else a record per image, each with its own checksum).
        adaptation: the header records the encoder effort (`EFFORTS`) and the payload, above
            the tiles, a per-image adaptation of the pixel heads (`coding.adapt`).
        stage0_steps: the pixels are coded in the model's schedule (`model.pixel_schedule`),
            stage 0 in several steps when the model splits it (else the model must not).
        pixel_halo: a model's pixel steps may read the ring around each tile
            (`ModelConfig.pixel_halo`, `bitsback.TileRing`; else the model must not).
        tile_offsets: each tile codes, after its batch's scale offsets of a pixel step, a
            change to them for its own positions (`calibrate.tile_deltas`).
        compact_header: a .vz header stores no `runtime` string and its counts, sizes and
            lengths as LEB128 varints (`container`); a .vzp table stores no runtime either.
    """

    version: int
    numerics: Numerics
    mean_range: tuple[int, int]
    binned_tables: bool
    scale_offsets: bool
    modes: tuple[str, ...]
    archive_columns: bool
    adaptation: bool = False
    stage0_steps: bool = False
    pixel_halo: bool = False
    tile_offsets: bool = False
    compact_header: bool = False


_NATIVE = Numerics(onednn=False, sub_batch_pixels=None)
_ONEDNN_SUB_BATCHES = Numerics(onednn=True, sub_batch_pixels=4 * 64 * 64)
_EXACT = Numerics(onednn=True, sub_batch_pixels=4 * 64 * 64, exact=True)  # the split is for speed only

_V1 = Format(1, _NATIVE, (-64, 319), binned_tables=False, scale_offsets=False, modes=EIGHT_BIT_MODES,
             archive_columns=False)
_V2 = Format(2, _ONEDNN_SUB_BATCHES, (-1024, 1279), binned_tables=True, scale_offsets=False,
             modes=EIGHT_BIT_MODES, archive_columns=True)
_V3 = Format(3, _ONEDNN_SUB_BATCHES, (-1024, 1279), binned_tables=True, scale_offsets=True,
             modes=EIGHT_BIT_MODES, archive_columns=True)
_V4 = Format(4, _ONEDNN_SUB_BATCHES, (-1024, 1279), binned_tables=True, scale_offsets=True,
             modes=EIGHT_BIT_MODES + OTHER_DEPTH_MODES, archive_columns=True)
_V5 = Format(5, _ONEDNN_SUB_BATCHES, (-1024, 1279), binned_tables=True, scale_offsets=True,
             modes=EIGHT_BIT_MODES + OTHER_DEPTH_MODES, archive_columns=True, adaptation=True)

_V6 = Format(6, _EXACT, (-1024, 1279), binned_tables=True, scale_offsets=True,
             modes=EIGHT_BIT_MODES + OTHER_DEPTH_MODES, archive_columns=True, adaptation=True)

_V7 = Format(7, _EXACT, (-1024, 1279), binned_tables=True, scale_offsets=True,
             modes=EIGHT_BIT_MODES + OTHER_DEPTH_MODES, archive_columns=True, adaptation=True, stage0_steps=True)

_V8 = Format(8, _EXACT, (-1024, 1279), binned_tables=True, scale_offsets=True,
             modes=EIGHT_BIT_MODES + OTHER_DEPTH_MODES, archive_columns=True, adaptation=True, stage0_steps=True,
             pixel_halo=True)

_V9 = replace(_V8, version=9, tile_offsets=True)

_V10 = replace(_V9, version=10, compact_header=True)

FORMATS: dict[int, Format] = {f.version: f for f in (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10)}
"""Every version this build reads, by number."""
KNOWN_VERSIONS: tuple[int, ...] = tuple(FORMATS)
CURRENT: Format = _V10
"""The version this build writes with a fixed-point model (`ModelConfig.fixed_bits`)."""
NEWEST_FLOAT: Format = _V5
"""The version this build writes with a float model (versions 1-5 run float networks)."""
EFFORTS = range(1, 10)
"""Encoder effort levels of the versions with `adaptation` (`coding.adapt.EFFORT_SETTINGS`),
like cjxl's -e."""
DEFAULT_EFFORT = 3
"""The default effort: version 4's encoder (no adaptation), its time and its bits."""


def newest(exact: bool) -> Format:
    """What this build writes by default: `CURRENT` for a fixed-point model, `NEWEST_FLOAT`
    for a float one."""
    return CURRENT if exact else NEWEST_FLOAT


def get(version: int) -> Format:
    """The record of `version`.

    Raises:
        UnsupportedVersionError: a version this build does not know.
    """
    try:
        return FORMATS[version]
    except (KeyError, TypeError):
        known = ", ".join(str(v) for v in KNOWN_VERSIONS)
        raise UnsupportedVersionError(f"format version {version} is not supported (this build reads: {known})") from None
