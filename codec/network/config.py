"""`ModelConfig`: the frozen architecture description stored with every set of weights."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from vaezip.errors import ModelError


def unknown_keys(cls, data: dict) -> list[str]:
    """Keys of `data` that are not fields of the dataclass `cls`, sorted."""
    return sorted(set(data) - {f.name for f in fields(cls)})


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a `HierarchicalVAE`.

    Attributes:
        channels: image channels the model codes (3 for RGB, 1 for gray).
        width: trunk channels of the bottom-up and top-down ResNets.
        bottleneck: inner channels of each residual block.
        latent_scales: (downsampling factor, latent groups, channels per group),
            coarsest first; factors are powers of two >= 4 (the stem folds 4x4 pixels).
        pixel_width: channels of the sub-lattice pixel decoder (runs at 1/2 resolution).
        mixtures: logistic mixture components per subpixel.
        latent_grid: width of the latent discretisation grid used for coding.
        active_latents: per latent group, the channels that are coded; the others
            collapsed in training (KL ~ 0) and are fixed to the prior mean. None
            keeps every channel (before pruning).
        fixed_bits: a fixed-point network (`network.fixedpoint`, format version 6):
            (ReLU activations, pixel-head inputs, pixel features, residual streams), the
            bits of each kind of integer activation; None: a float network (versions 1-5).
        stage0_levels: sub-lattice stage 0 (a quarter of the pixels) is itself coded in
            2x2 sub-lattice stages this many levels deep (`model.pixel_schedule`), so only
            1/4^(levels+1) of the pixels are coded from the latents alone; 0: the whole
            quarter is (format versions 1-6 code only such models).
        pixel_halo: the pixel steps' context layers also read a ring one sample wide (two
            pixels) around the tile: the neighbouring tiles' pixels of the steps before, where
            the decoder already has them (`model.HALO`; format version 8); False: zeros
            there, as in versions 1-7. Needs stage0_levels <= 1 (wider dilations).
    """

    channels: int = 3
    width: int = 96
    bottleneck: int = 32
    latent_scales: tuple[tuple[int, int, int], ...] = ((16, 2, 16), (8, 2, 16), (4, 1, 8))
    pixel_width: int = 48
    mixtures: int = 3
    latent_grid: float = 1.0 / 64
    active_latents: Optional[tuple[tuple[int, ...], ...]] = None
    fixed_bits: Optional[tuple[int, int, int, int]] = None
    stage0_levels: int = 0
    pixel_halo: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_scales", tuple(tuple(s) for s in self.latent_scales))
        if self.active_latents is not None:
            object.__setattr__(self, "active_latents", tuple(tuple(a) for a in self.active_latents))
            groups = [zdim for _, n, zdim in self.latent_scales for _ in range(n)]
            if len(self.active_latents) != len(groups) or any(
                sorted(set(a)) != list(a) or (a and (a[0] < 0 or a[-1] >= z)) for a, z in zip(self.active_latents, groups)
            ):
                raise ModelError("active_latents must list sorted channel indices for every latent group")
        if self.fixed_bits is not None:
            object.__setattr__(self, "fixed_bits", tuple(self.fixed_bits))
            grid_exponent = math.log2(self.latent_grid)
            if len(self.fixed_bits) != 4 or not all(2 <= b <= 16 for b in self.fixed_bits) \
                    or grid_exponent != round(grid_exponent):
                raise ModelError("fixed_bits needs four bit widths in 2..16 and a power-of-two latent grid")
        if self.stage0_levels not in (0, 1, 2, 3):
            raise ModelError(f"stage0_levels must be 0..3, got {self.stage0_levels}")
        if self.pixel_halo and self.stage0_levels > 1:
            raise ModelError("pixel_halo needs stage0_levels 0 or 1 (a one-sample ring)")
        if self.channels not in (1, 3):
            raise ModelError(f"channels must be 1 or 3, got {self.channels}")
        factors = [s[0] for s in self.latent_scales]
        if factors != sorted(factors, reverse=True) or min(factors) < 4:
            raise ModelError(f"latent scales must be coarsest first and >= 4, got {factors}")

    @property
    def downsampling(self) -> int:
        """Tile sides must be multiples of this (the coarsest latent factor, and the
        period of stage 0's sub-lattices)."""
        return max(self.latent_scales[0][0], 4, 2 ** (self.stage0_levels + 1))

    def to_dict(self) -> dict:
        """The fields as a dict; `fixed_bits`, `stage0_levels` and `pixel_halo` only when set, so an
        older model's dict (and the model identity in its files,
        `registry.ModelSpec.hash_prefix`) is as before."""
        data = asdict(self)
        if data["fixed_bits"] is None:
            del data["fixed_bits"]
        if data["stage0_levels"] == 0:
            del data["stage0_levels"]
        if not data["pixel_halo"]:
            del data["pixel_halo"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        unknown = unknown_keys(cls, data)
        if unknown:
            raise ModelError(f"unknown model config keys: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
