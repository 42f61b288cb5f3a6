"""The ring around each tile (`ModelConfig.pixel_halo`, format version 8): an empty ring is
the model without one, a step reads the ring only where a neighbour is there and only what
was coded before it, the ring holds the neighbours the decoder has, and files round-trip."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_pixels

from vaezip.coding.bitsback import TileRing
from vaezip.coding.tiles import TileGrid, split_tiles
from vaezip.network import registry
from vaezip.network.model import HALO, known_before, ring_mask, split_lattice


def _without_ring(loaded: registry.LoadedModel) -> registry.LoadedModel:
    """The same weights as a model that reads no ring (without the layers that read it)."""
    spec = replace(loaded.spec, name=loaded.spec.name + "-plain", config=replace(loaded.spec.config, pixel_halo=False))
    state = {k: v for k, v in loaded.net.state_dict().items() if ".ring." not in k}
    return registry.model_from_weights(spec, state)


def _tiles_with_rings(net, size: int = 32, seed: int = 0):
    """(features, lattice with its ring (2, 4, 3, size/2 + 2, size/2 + 2)) of two random tiles."""
    x = torch.from_numpy(np.stack([random_pixels("RGB", size + 4 * HALO, size + 4 * HALO, seed + i, smooth=True)
                                   for i in range(2)])).permute(0, 3, 1, 2).contiguous()
    inner = x[..., 2 * HALO : -2 * HALO, 2 * HALO : -2 * HALO]
    with torch.inference_mode():
        return net.sample_posterior(inner, latents="mean").features, split_lattice(x)


def _ring_only(shape) -> torch.Tensor:
    """(N, 4, C, h, w) bool: the ring of a lattice with a ring."""
    ring = torch.ones(shape, dtype=torch.bool)
    ring[..., HALO:-HALO, HALO:-HALO] = False
    return ring


def test_an_empty_ring_is_the_model_without_one(tiny_halo_model):
    plain = _without_ring(tiny_halo_model).net
    net = tiny_halo_model.net
    features, ringed = _tiles_with_rings(net)
    lattice = ringed[..., HALO:-HALO, HALO:-HALO]
    h, w = lattice.shape[-2:]
    nobody = ring_mask(torch.zeros(2, 3, 3, dtype=torch.bool), h, w)
    with torch.inference_mode():
        for k in range(len(net.schedule)):
            expected = plain.step_raw(features, lattice, k)
            assert torch.equal(net.step_raw(features, lattice, k), expected), k
            assert torch.equal(net.step_raw(features, ringed, k, nobody), expected), k


def test_a_step_reads_the_ring_where_a_neighbour_is_and_only_what_was_coded_before_it(tiny_halo_model):
    net = tiny_halo_model.net
    features, ringed = _tiles_with_rings(net)
    h, w = ringed.shape[-2] - 2 * HALO, ringed.shape[-1] - 2 * HALO
    neighbours = torch.zeros(2, 3, 3, dtype=torch.bool)
    neighbours[:, 1, 2] = neighbours[:, 2, :] = True  # right and the row below
    available = ring_mask(neighbours, h, w)
    noise = torch.randint(0, 256, ringed.shape, dtype=torch.uint8)
    ring = _ring_only(ringed.shape)
    absent = ring & (available[:, None] == 0).expand_as(ringed)
    with torch.inference_mode():
        for k, step in enumerate(net.schedule):
            out = net.step_raw(features, ringed, k, available)
            changed = torch.where(absent, noise, ringed)
            assert torch.equal(out, net.step_raw(features, changed, k, available)), k
            later = torch.zeros(ringed.shape, dtype=torch.bool)  # what the ring holds from this step on
            later[:, step.stage:] = True
            if step.stage == 0:  # but the positions of stage 0's earlier steps
                known = known_before(net.schedule, k, h + 2 * HALO, w + 2 * HALO, HALO)[0, 0].bool()
                later[:, 0] &= ~known
            changed = torch.where(ring & later, noise, ringed)
            assert torch.equal(out, net.step_raw(features, changed, k, available)), k
            if k > 0:  # and it does read the neighbours' pixels coded before it
                there = ring & ~absent
                earlier = torch.where(there & ~later, ringed ^ 0x55, ringed)
                assert not torch.equal(out, net.step_raw(features, earlier, k, available)), k


@pytest.mark.parametrize("start", [0, 4, 7])
def test_a_ring_holds_the_neighbours_of_the_same_and_later_batches(start):
    pixels = random_pixels("RGB", 150, 130, seed=3)
    grid = TileGrid(150, 130, 32)  # 5 x 5 tiles, the last row and column padded
    indices = range(start, min(start + 6, grid.count))
    lattice = split_tiles(pixels, grid, indices)
    ring = TileRing(grid, indices, lambda j: split_tiles(pixels, grid, range(j, j + 1))[0])
    ringed = ring.lattice(lattice)
    half = grid.tile // 2
    whole = split_tiles(pixels, grid, range(grid.count))  # every tile's padded lattice
    for t, index in enumerate(indices):
        r, c = divmod(index, grid.cols)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                inside = 0 <= rr < grid.rows and 0 <= cc < grid.cols
                there = (dr, dc) == (0, 0) or (inside and rr * grid.cols + cc >= indices.start)
                rows = {-1: slice(0, 1), 0: slice(1, half + 1), 1: slice(half + 1, half + 2)}
                region = ringed[t, :, :, rows[dr], rows[dc]]
                assert ring.available[t, 0, rows[dr], rows[dc]].eq(float(there)).all()
                if not there:
                    assert not region.any()
                    continue
                source = whole[rr * grid.cols + cc] if inside else None
                src = {-1: slice(half - 1, half), 0: slice(0, half), 1: slice(0, 1)}
                assert np.array_equal(region, source[:, :, src[dr], src[dc]]), (index, dr, dc)


@pytest.mark.parametrize("version", [8, 9])
def test_versions_8_and_9_round_trip_and_read_the_rings(tiny_halo_model, tiny_halo_gray_model, version):
    import vaezip
    from vaezip.format import container

    for model, mode, (height, width) in ((tiny_halo_model, "RGB", (150, 130)), (tiny_halo_gray_model, "L", (70, 97))):
        pixels = random_pixels(mode, height, width, seed=2, smooth=True)
        data = vaezip.compress(pixels, loaded=model, version=version)
        header, words = container.unpack(data)
        assert header.version == version and len(header.schedule) > 1
        assert np.array_equal(vaezip.decompress(data, loaded=model), pixels.reshape(height, width, -1).squeeze())
        plain = vaezip.compress(pixels, loaded=_without_ring(model), version=version)
        assert container.unpack(plain)[1].tobytes() != words.tobytes()  # the rings changed the code


def test_an_adapted_file_round_trips_with_rings(tiny_halo_model):
    import vaezip
    from vaezip.format import container

    pixels = random_pixels("RGB", 100, 90, seed=4, smooth=True)
    data = vaezip.compress(pixels, loaded=tiny_halo_model, effort=5)
    assert container.unpack(data)[0].effort == 5
    assert np.array_equal(vaezip.decompress(data, loaded=tiny_halo_model), pixels)


def test_a_tile_set_round_trips_with_rings(tiny_halo_model):
    import vaezip

    items = [(f"{i}.png", random_pixels("RGB", h, w, seed=i, smooth=True))
             for i, (h, w) in enumerate([(40, 70), (33, 33), (64, 130)])]
    data = vaezip.pack(items, loaded=tiny_halo_model)
    for (name, pixels), (back_name, back) in zip(items, vaezip.unpack(data, loaded=tiny_halo_model)):
        assert name == back_name and np.array_equal(np.asarray(back.pixels), pixels)


def test_version_7_refuses_a_model_that_reads_rings(tiny_halo_model):
    import vaezip
    from vaezip.errors import ModelError

    with pytest.raises(ModelError, match="ring"):
        vaezip.compress(random_pixels("RGB", 32, 32), loaded=tiny_halo_model, version=7)


def test_the_elbo_reads_the_rings_as_the_coder_does(tiny_halo_model):
    from vaezip import api

    pixels = random_pixels("RGB", 96, 96, seed=5, smooth=True)
    with_ring = api.model_bits(tiny_halo_model, pixels, 32)[0]
    without = api.model_bits(_without_ring(tiny_halo_model), pixels, 32)[0]
    assert np.isfinite(with_ring) and with_ring != without
    single = random_pixels("RGB", 32, 32, seed=5, smooth=True)  # one tile: no neighbours
    assert api.model_bits(tiny_halo_model, single, 32)[0] == api.model_bits(_without_ring(tiny_halo_model), single, 32)[0]


def test_a_warm_start_reads_the_ring_from_zero(tiny_steps_gray_model):
    """A model without a ring starts one with it at exactly its own numbers, whatever the ring holds."""
    from vaezip.network.model import HierarchicalVAE
    from vaezip.training.warmstart import warm_start

    old = tiny_steps_gray_model.net
    new = HierarchicalVAE(replace(old.config, pixel_halo=True))
    report = warm_start(new, old.state_dict())
    assert report.new and all(".ring." in name for name in report.new) and not report.unused
    new.wire_fixed()
    x = torch.from_numpy(np.stack([random_pixels("L", 36, 36, i, smooth=True) for i in range(2)])).permute(0, 3, 1, 2)
    inner = x[..., 2:-2, 2:-2].contiguous()
    ringed = split_lattice(x.contiguous())
    everyone = ring_mask(torch.ones(2, 3, 3, dtype=torch.bool), 16, 16)
    with torch.inference_mode():
        features = old.sample_posterior(inner, latents="mean").features
        for k in range(len(old.schedule)):
            assert torch.equal(new.step_raw(features, ringed, k, everyone),
                               old.step_raw(features, split_lattice(inner), k)), k


def test_a_halo_model_needs_at_most_one_level_of_stage_0():
    from vaezip.errors import ModelError
    from vaezip.network.config import ModelConfig

    with pytest.raises(ModelError, match="pixel_halo"):
        ModelConfig(stage0_levels=2, pixel_halo=True)
    assert "pixel_halo" not in ModelConfig().to_dict() and ModelConfig(pixel_halo=True).to_dict()["pixel_halo"]


def test_version_8_codes_a_model_without_rings_as_version_7(tiny_steps_gray_model):
    import vaezip
    from vaezip.format import container

    pixels = random_pixels("L", 70, 40, seed=6, smooth=True)
    v8, v7 = (vaezip.compress(pixels, loaded=tiny_steps_gray_model, version=v) for v in (8, 7))
    assert container.unpack(v8)[0].version == 8
    assert container.unpack(v8)[1].tobytes() == container.unpack(v7)[1].tobytes()
    assert np.array_equal(vaezip.decompress(v8, loaded=tiny_steps_gray_model), pixels[:, :, 0])


def test_version_9_codes_each_tiles_change_of_the_offsets(tiny_halo_model, monkeypatch):
    """Tiles of one batch with different grain: the encoder codes changes of the batch's
    scale offsets for them, and the decoder reproduces the image from them."""
    import vaezip
    from vaezip.coding import calibrate

    chosen = []
    choose = calibrate.tile_deltas
    monkeypatch.setattr(calibrate, "tile_deltas", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    pixels = random_pixels("RGB", 128, 192, seed=5, smooth=True)
    grain = np.random.default_rng(5).integers(-40, 41, (128, 64, 3))
    pixels[:, 128:] = np.clip(pixels[:, 128:].astype(np.int64) + grain, 0, 255).astype(np.uint8)
    data = vaezip.compress(pixels, loaded=tiny_halo_model, version=9)
    assert chosen and any(d.any() for d in chosen)
    assert np.array_equal(vaezip.decompress(data, loaded=tiny_halo_model), pixels)
