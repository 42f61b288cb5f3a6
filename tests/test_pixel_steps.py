"""Stage 0 split into sub-lattice steps (`ModelConfig.stage0_levels`, format version 7): the
schedule covers every pixel once, a step reads only pixels coded before it, a warm start
from a four-stage model computes the old model's numbers, and files round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_pixels

from vaezip.network.model import HierarchicalVAE, pixel_schedule, split_lattice


@pytest.mark.parametrize("levels", [0, 1, 2, 3])
def test_schedule_codes_every_position_once(levels):
    schedule = pixel_schedule(levels)
    assert len(schedule) == 4 + 3 * levels
    assert [st.stage for st in schedule] == [0] * (1 + 3 * levels) + [1, 2, 3]
    count = np.zeros((16, 16), dtype=int)
    for st in schedule:
        if st.stage == 0:
            count += st.positions(16, 16)
    assert (count == 1).all()
    assert schedule[0].positions(16, 16).sum() == 256 // 4**levels  # the base: 1/4^(levels+1) of all pixels


def _inputs(net: HierarchicalVAE, size: int = 32, seed: int = 0):
    x = torch.from_numpy(np.stack([random_pixels("RGB", size, size, seed + i, smooth=True) for i in range(2)]))
    x = x.permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        return net.sample_posterior(x, latents="mean").features, split_lattice(x)


def test_a_step_reads_only_the_pixels_coded_before_it(tiny_steps_model):
    net = tiny_steps_model.net
    features, lattice = _inputs(net)
    h, w = lattice.shape[-2:]
    with torch.inference_mode():
        for k, step in enumerate(net.schedule):
            later = np.zeros((4, h, w), dtype=bool)  # every position coded at or after step k
            later[step.stage + 1:] = True
            for st in net.schedule[k:]:
                if st.stage == step.stage:
                    later[st.stage] |= st.positions(h, w)
            changed = lattice.clone()
            noise = torch.randint(0, 256, lattice.shape, dtype=torch.uint8)
            where = torch.from_numpy(later)[None, :, None].expand_as(lattice)
            changed[where] = noise[where]
            a = net.step_raw(features, lattice, k)
            assert a.shape[-2:] == (h // step.stride, w // step.stride)
            assert torch.equal(a, net.step_raw(features, changed, k)), k
            if step.stage == 0 and k > 0:  # and does read the ones before it
                earlier = lattice.clone()
                earlier[:, 0][~torch.from_numpy(later[0])[None, None].expand_as(lattice[:, 0])] ^= 0x55
                assert not torch.equal(a, net.step_raw(features, earlier, k)), k


def test_stage_raw_is_its_steps_at_their_positions(tiny_steps_model):
    net = tiny_steps_model.net
    features, lattice = _inputs(net)
    with torch.inference_mode():
        merged = net.stage_raw(features, lattice, 0)
        for k, step in enumerate(net.schedule):
            if step.stage == 0:
                at = merged[(..., *step.window)]
                assert torch.equal(at, net.step_raw(features, lattice, k))


def test_warm_start_from_four_stages_computes_the_old_numbers(tiny_fixed_model):
    from dataclasses import replace

    from vaezip.training.warmstart import remap_pixel_steps, warm_start

    old = tiny_fixed_model.net
    new = HierarchicalVAE(replace(old.config, stage0_levels=2))
    report = warm_start(new, remap_pixel_steps(old.state_dict(), new.schedule))
    assert not report.unused and all(".context." in name for name in report.new)
    new.wire_fixed()
    features, lattice = _inputs(old)
    with torch.inference_mode():
        for stage in range(4):
            assert torch.equal(old.stage_raw(features, lattice, stage), new.stage_raw(features, lattice, stage))


def test_a_shallower_split_keeps_the_steps_it_shares(tiny_steps_model):
    """Two levels to one: the base and the level-1 steps keep their modules (the same
    context), the level-2 steps are left out."""
    from dataclasses import replace

    from vaezip.training.warmstart import remap_pixel_steps, warm_start

    old = tiny_steps_model.net
    new = HierarchicalVAE(replace(old.config, stage0_levels=1))
    report = warm_start(new, remap_pixel_steps(old.state_dict(), new.schedule))
    assert not report.new and not report.unused and len(new.stages) == len(old.stages) - 3
    features, lattice = _inputs(old)
    with torch.inference_mode():
        for k, step in enumerate(new.schedule):
            same = old.schedule.index(step) if step in old.schedule else 0
            assert same > 0 or k == 0
            assert torch.equal(new.stages[k].head.weight, old.stages[same].head.weight)
        for stage in (1, 2, 3):
            assert torch.equal(old.stage_raw(features, lattice, stage), new.stage_raw(features, lattice, stage))


@pytest.mark.parametrize("effort", [3, 5])
def test_version_7_round_trips(tiny_steps_model, tiny_steps_gray_model, effort):
    import vaezip
    from vaezip.format import container

    for model, mode, (height, width) in ((tiny_steps_model, "RGB", (83, 50)), (tiny_steps_gray_model, "L", (40, 97))):
        pixels = random_pixels(mode, height, width, seed=effort, smooth=True)
        data = vaezip.compress(pixels, loaded=model, effort=effort, version=7)
        header, _ = container.unpack(data)
        assert header.version == 7 and header.effort == effort
        assert np.array_equal(vaezip.decompress(data, loaded=model), pixels.reshape(height, width, -1).squeeze())


def test_version_7_round_trips_a_four_stage_model(tiny_fixed_model):
    import vaezip
    from vaezip.format import container

    pixels = random_pixels("RGB", 40, 40, seed=1, smooth=True)
    v7, v6 = (vaezip.compress(pixels, loaded=tiny_fixed_model, version=v) for v in (7, 6))
    assert container.unpack(v7)[0].version == 7
    assert container.unpack(v7)[1].tobytes() == container.unpack(v6)[1].tobytes()  # the same payload
    assert np.array_equal(vaezip.decompress(v7, loaded=tiny_fixed_model), pixels)


def test_version_6_refuses_a_split_stage_0(tiny_steps_model):
    import vaezip
    from vaezip.errors import ModelError

    with pytest.raises(ModelError, match="stage 0"):
        vaezip.compress(random_pixels("RGB", 32, 32), loaded=tiny_steps_model, version=6)


def test_a_split_stage_0_needs_tiles_of_its_period():
    from vaezip.network.config import ModelConfig

    assert ModelConfig(latent_scales=((4, 1, 8),), stage0_levels=3).downsampling == 16
