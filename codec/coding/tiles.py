"""Cutting an image into square tiles split into 2x2 sub-lattices, and back.

A tile at the right or bottom border is padded; the padding is never coded.
Each sub-lattice is padded on its own by repeating its last real row and column
(a constant 128 when it has no real pixel at all), so the decoder can rebuild
the padding of stage s from the pixels of stage s alone, before later stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vaezip.network.model import STAGE_OFFSETS

EMPTY_FILL = 128


@dataclass(frozen=True)
class TileGrid:
    """Raster-order tiles of side `tile` covering a height x width image."""

    height: int
    width: int
    tile: int

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def real_size(self, index: int) -> tuple[int, int]:
        """(rows, cols) of real pixels in tile `index`."""
        r, c = divmod(index, self.cols)
        return min(self.tile, self.height - r * self.tile), min(self.tile, self.width - c * self.tile)

    def stage_extent(self, index: int, stage: int) -> tuple[int, int]:
        """(rows, cols) of real positions of sub-lattice `stage` in tile `index`."""
        hr, wr = self.real_size(index)
        i, j = STAGE_OFFSETS[stage]
        return (hr - i + 1) // 2, (wr - j + 1) // 2

    def stage_masks(self, indices: range, stage: int) -> np.ndarray:
        """(n, tile/2, tile/2) bool: real positions of `stage` in the given tiles."""
        return stage_masks(self, indices, stage)

    def pixel_masks(self, indices: range) -> np.ndarray:
        """(n, 1, tile, tile) bool: real pixels of the given tiles."""
        masks = np.zeros((len(indices), 1, self.tile, self.tile), dtype=bool)
        for k, index in enumerate(indices):
            hr, wr = self.real_size(index)
            masks[k, :, :hr, :wr] = True
        return masks


def stage_masks(layout, indices: range, stage: int) -> np.ndarray:
    """(n, tile/2, tile/2) bool: real positions of `stage` in the given tiles of a
    `TileGrid` or any layout with `tile` and `stage_extent(index, stage)`."""
    half = layout.tile // 2
    masks = np.zeros((len(indices), half, half), dtype=bool)
    for k, index in enumerate(indices):
        rr, cc = layout.stage_extent(index, stage)
        masks[k, :rr, :cc] = True
    return masks


def pad_stage(grid: TileGrid, indices: range, stage_values: np.ndarray, stage: int) -> None:
    """Fill, in place, the padding of one sub-lattice (n, C, tile/2, tile/2)."""
    for k, index in enumerate(indices):
        rr, cc = grid.stage_extent(index, stage)
        block = stage_values[k]
        if rr == 0 or cc == 0:
            block[...] = EMPTY_FILL
            continue
        block[:, rr:, :cc] = block[:, rr - 1 : rr, :cc]
        block[:, :, cc:] = block[:, :, cc - 1 : cc]


def split_tiles(pixels: np.ndarray, grid: TileGrid, indices: range) -> np.ndarray:
    """Tiles of an (H, W, C) uint8 image as padded lattices (n, 4, C, tile/2, tile/2)."""
    channels, half, t = pixels.shape[2], grid.tile // 2, grid.tile
    lattice = np.zeros((len(indices), 4, channels, half, half), dtype=np.uint8)
    for k, index in enumerate(indices):
        r, c = divmod(index, grid.cols)
        block = pixels[r * t : (r + 1) * t, c * t : (c + 1) * t].transpose(2, 0, 1)
        for s, (i, j) in enumerate(STAGE_OFFSETS):
            part = block[:, i::2, j::2]
            lattice[k, s, :, : part.shape[1], : part.shape[2]] = part
    for s in range(4):
        pad_stage(grid, indices, lattice[:, s], s)
    return lattice


def merge_tiles(lattice: np.ndarray, grid: TileGrid, indices: range, out: np.ndarray) -> None:
    """Write the real pixels of lattices (n, 4, C, tile/2, tile/2) into out (H, W, C)."""
    t = grid.tile
    for k, index in enumerate(indices):
        r, c = divmod(index, grid.cols)
        hr, wr = grid.real_size(index)
        block = np.zeros((lattice.shape[2], t, t), dtype=np.uint8)
        for s, (i, j) in enumerate(STAGE_OFFSETS):
            block[:, i::2, j::2] = lattice[k, s]
        out[r * t : r * t + hr, c * t : c * t + wr] = block[:, :hr, :wr].transpose(1, 2, 0)


def lattice_to_pixels(lattice: np.ndarray) -> np.ndarray:
    """(n, 4, C, h, w) lattices -> (n, C, 2h, 2w) padded tiles, for the bottom-up pass."""
    n, _, c, h, w = lattice.shape
    x = np.empty((n, c, 2 * h, 2 * w), dtype=lattice.dtype)
    for s, (i, j) in enumerate(STAGE_OFFSETS):
        x[:, :, i::2, j::2] = lattice[:, s]
    return x
