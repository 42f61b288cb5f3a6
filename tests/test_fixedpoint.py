"""The fixed-point network (format version 6): integers everywhere, the same integers
whatever the kernel, thread count, memory layout or batch split, and training computes
exactly what coding computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_pixels

from vaezip.network import fixedpoint
from vaezip.network.fixedpoint import (
    ACCUMULATOR_BITS,
    FixedConv2d,
    Requant,
    Stream,
    exact_torch_settings,
    integer_weights,
    power_of_two_scale,
)


def _pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    tiles = [random_pixels("RGB", size, size, seed + i, smooth=True) for i in range(n)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def _outputs(net, x: torch.Tensor) -> list[torch.Tensor]:
    """Encoder activations, pixel features and every stage's head integers, latents at the
    posterior means rounded to the latent grid (as coding chooses them)."""
    with torch.inference_mode():
        acts = net.bottom_up(x)
        grid = net.config.latent_grid
        features = net.top_down(len(x), x.shape[-2], x.shape[-1],
                                lambda g, prior, post: torch.round(post.mean / grid) * grid, acts)
        from vaezip.network.model import split_lattice

        lattice = split_lattice(x)
        heads = [net.stage_raw(features, lattice, s) for s in range(4)]
    return [*acts.values(), features, *heads]


def test_integer_weights_respect_the_accumulator_bound():
    torch.manual_seed(1)
    w, b = torch.randn(8, 5, 3, 3) * 3, torch.randn(8)
    in_scale = torch.full((5,), 32.0, dtype=torch.float64)
    in_max = torch.full((5,), 1023.0, dtype=torch.float64)
    out_scale = torch.tensor([1.0, 2.0, 4.0, 8.0, 4080.0, 16.0, 1.0, 2.0**-3], dtype=torch.float64)
    w_int, b_int, k = integer_weights(w, b, in_scale, in_max, out_scale, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(w_int, torch.round(w_int)) and torch.equal(b_int, torch.round(b_int))
    bound = (w_int.abs() * in_max[None, :, None, None]).flatten(1).sum(1) + b_int.abs()
    assert bool((bound < 2**ACCUMULATOR_BITS).all())
    assert bool((bound >= 2 ** (ACCUMULATOR_BITS - 2)).all()), "the grid is as fine as the bound allows"
    real = w.double() * (out_scale[:, None] / in_scale[None, :])[:, :, None, None]
    approx = w_int * torch.pow(2.0, -k.double())[:, None, None, None]
    relative = (approx - real).flatten(1).norm(dim=1) / real.flatten(1).norm(dim=1)
    assert float(relative.max()) < 5e-3  # about 9 bits per weight with 10-bit inputs and 45 taps


def test_power_of_two_scales():
    scale = power_of_two_scale(torch.tensor([1.0, 3.0, 200.0]), 255)
    assert torch.equal(scale, torch.tensor([128.0, 64.0, 1.0], dtype=torch.float64))
    assert torch.equal(power_of_two_scale(torch.tensor([1.0, 3.0]), 255, headroom=2.0),
                       torch.tensor([64.0, 32.0], dtype=torch.float64))


def test_every_activation_is_an_integer_in_range(tiny_fixed_model):
    net = tiny_fixed_model.net
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, out)))
             for m in net.modules() if isinstance(m, (FixedConv2d, Requant))]
    try:
        outputs = _outputs(net, _pixels(3))
    finally:
        for h in hooks:
            h.remove()
    assert seen
    for module, out in seen:
        assert torch.equal(out, torch.floor(out)), module
        if isinstance(module, FixedConv2d):
            lo, hi = module.out_lo.float().view(1, -1, 1, 1), module.out_hi.float().view(1, -1, 1, 1)
            assert bool(((out >= lo) & (out <= hi)).all())
    for out in outputs:
        assert torch.equal(out, torch.floor(out))


def test_same_integers_under_every_kernel_thread_count_and_split(tiny_fixed_model):
    """Thread counts, oneDNN on and off, channels-last strides and batch splits take torch
    through different kernels and summation orders; the integers may not move."""
    exact_torch_settings()
    net = tiny_fixed_model.net
    x = _pixels(6, seed=3)
    reference = _outputs(net, x)
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    try:
        for n_threads, use_onednn in ((1, True), (2, False), (2, True)):
            torch.set_num_threads(n_threads)
            torch.backends.mkldnn.enabled = use_onednn
            for got, want in zip(_outputs(net, x), reference):
                assert torch.equal(got, want)
            parts = [_outputs(net, x[i : i + 1]) for i in range(len(x))]
            for j, want in enumerate(reference):
                assert torch.equal(torch.cat([p[j] for p in parts]), want)
        torch.set_num_threads(threads)
        for got, want in zip(_outputs(net, x.contiguous(memory_format=torch.channels_last)), reference):
            assert torch.equal(got, want)
        fixedpoint.CODING_LAYOUT = torch.contiguous_format  # NCHW kernels, not coding's channels-last
        for got, want in zip(_outputs(net, x), reference):
            assert torch.equal(got, want)
    finally:
        fixedpoint.CODING_LAYOUT = torch.channels_last
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


def test_training_computes_what_coding_computes(tiny_fixed_model):
    """Quantisation-aware training runs the coded arithmetic: the training forward of a
    fixed-point layer gives the integers its coding forward gives."""
    import copy

    net = copy.deepcopy(tiny_fixed_model.net)
    x = _pixels(2, seed=5)
    coded = _outputs(net, x)
    net.train()
    acts = net.bottom_up(x)
    grid = net.config.latent_grid
    features = net.top_down(len(x), 32, 32, lambda g, prior, post: torch.round(post.mean / grid) * grid, acts)
    from vaezip.network.model import split_lattice

    trained = [*acts.values(), features, *[net.stage_raw(features, split_lattice(x), s) for s in range(4)]]
    assert any(t.requires_grad for t in trained)
    for got, want in zip(trained, coded):
        assert torch.equal(got.detach(), want)
    loss = net.nelbo(x).nelbo_bits.mean()
    loss.backward()
    assert all(p.grad is not None for p in net.stages[1].parameters())


def test_calibration_picks_power_of_two_scales_and_wires_them():
    from vaezip.network.config import ModelConfig
    from vaezip.network.model import HierarchicalVAE

    cfg = ModelConfig(width=16, bottleneck=8, pixel_width=8, mixtures=2, latent_scales=((8, 1, 4), (4, 1, 4)),
                      fixed_bits=(8, 10, 10, 16))
    torch.manual_seed(0)
    net = HierarchicalVAE(cfg).eval()
    net.calibrate_fixed([_pixels(4, seed=9)])
    for module in net.modules():
        scales = [module.scale] if isinstance(module, Stream) else \
            [module.out_scale] if isinstance(module, Requant) or (isinstance(module, FixedConv2d) and module.relu) else []
        for s in scales:
            assert bool((torch.log2(s) == torch.round(torch.log2(s))).all())
    block = net.encoder[0]
    assert torch.equal(block.c2.in_scale, block.c1.out_scale)
    assert torch.equal(block.entry.in_scale, net.encoder_stream.scale)
    assert torch.equal(net.stages[2].head.in_scale, net.stages[2].head_entry.out_scale)
    assert all(torch.equal(out, torch.floor(out)) for out in _outputs(net, _pixels(2, seed=1)))


def test_a_float_model_cannot_code_version_6(tiny_model):
    import vaezip
    from vaezip.errors import ModelError

    with pytest.raises(ModelError, match="fixed-point"):
        vaezip.compress(random_pixels("RGB", 32, 32), loaded=tiny_model, version=6)


@pytest.mark.parametrize("effort", [3, 5])
def test_version_6_round_trips(tiny_fixed_model, tiny_fixed_gray_model, effort):
    import vaezip
    from vaezip.format import container

    for model, mode in ((tiny_fixed_model, "RGB"), (tiny_fixed_gray_model, "L")):
        pixels = random_pixels(mode, 80, 48, seed=effort, smooth=True)
        data = vaezip.compress(pixels, loaded=model, effort=effort, version=6)
        header, _ = container.unpack(data)
        assert header.version == 6 and header.effort == effort
        assert np.array_equal(vaezip.decompress(data, loaded=model), pixels.reshape(80, 48, -1).squeeze())


@pytest.mark.parametrize("bounds", ["per channel", "one for all channels", "clamp"])
def test_floor_clamp_has_the_values_and_gradients_of_the_plain_ops(bounds):
    """The fused floor-and-clamp of training gives the bits of the composition it replaces:
    floor straight through, then torch.minimum/maximum per channel (1/2 at a bound; tensor
    bounds, or the scalars of a layer whose channels share them) or torch.clamp between
    scalars (1 at a bound)."""
    generator = torch.Generator().manual_seed(3)
    lo, hi = (torch.tensor([0.0, -127.0, 3.0]), torch.tensor([255.0, 127.0, 4.0])) if bounds == "per channel" \
        else (-7.0, 9.0)
    # integers at and around the bounds, and fractions, in every channel
    y = torch.cat([torch.arange(-130.0, 260.0).repeat(2, 3, 1, 1),
                   torch.rand(2, 3, 1, 390, generator=generator) * 400 - 140], dim=2).requires_grad_()
    upstream = torch.randn(y.shape, generator=generator)

    straight = y + (torch.floor(y) - y).detach()
    if bounds == "clamp":
        expected = torch.clamp(straight, lo, hi)
        fused = fixedpoint._FloorClamp.apply(y, lo, hi, 1.0)
    else:
        shape = (1, -1, 1, 1)
        rows = [torch.as_tensor(b).expand(3).reshape(shape) for b in (lo, hi)]
        expected = torch.maximum(torch.minimum(straight, rows[1]), rows[0])
        fused = fixedpoint._floor_clamp_rows(y, lo, hi)
    (expected_grad,) = torch.autograd.grad(expected, y, upstream)
    (fused_grad,) = torch.autograd.grad(fused, y, upstream)
    assert torch.equal(fused, expected)
    assert torch.equal(fused_grad, expected_grad)
    assert set(torch.unique(fused_grad / upstream).tolist()) == ({0.0, 1.0} if bounds == "clamp" else {0.0, 0.5, 1.0})


def test_a_layer_whose_channels_share_bounds_trains_through_the_scalar_floor_clamp():
    """`FixedConv2d.output_bounds`: floats when every channel has the same bounds (the fast
    path), else the buffers; recomputed when the buffers change."""
    conv = fixedpoint.FixedConv2d(2, 3, 1)
    conv.set_output(1.0, -5.0, 7.0)
    assert conv.output_bounds() == (-5.0, 7.0)
    conv.out_hi[1] = 9.0  # an in-place change bumps the buffer's version
    lo, hi = conv.output_bounds()
    assert torch.equal(lo, conv.out_lo) and torch.equal(hi, torch.tensor([7.0, 9.0, 7.0], dtype=torch.float64))


def test_training_uses_the_integer_weights_coding_uses():
    """Every weight and bias a training forward uses is the one coding uses, on the shipped
    model (a fold in float32 before rounding once gave 2 of its 1.4 million another integer)."""
    import copy

    from vaezip.network.registry import load_model

    net = copy.deepcopy(load_model("photo-rgb-halo-2").net).train()
    for layer in (m for m in net.modules() if isinstance(m, FixedConv2d)):
        layer.weight.requires_grad_(True)
        trained_w, trained_b = layer._trained_parameters()
        coded_w, coded_b, _ = layer.exact_parameters()
        assert torch.equal(trained_w.detach(), coded_w) and torch.equal(trained_b.detach(), coded_b)
        assert trained_w.requires_grad


def test_snapping_the_weights_to_their_grid_keeps_every_integer(tiny_fixed_model):
    """`snap_network`: float weights equal to their integer weights' values give the same
    integers in every layer, so the same network outputs, and pack smaller; a second snap
    changes nothing."""
    import copy
    import io

    from vaezip.network import packing

    net = copy.deepcopy(tiny_fixed_model.net)
    x = _pixels(2, seed=7)
    layers = [m for m in net.modules() if isinstance(m, FixedConv2d)]
    before = [[t.clone() for t in m.exact_parameters()] for m in layers]
    outputs = _outputs(net, x)

    def packed_size() -> int:
        out = io.BytesIO()
        torch.save(net.state_dict(), out)
        return len(packing.pack(out.getvalue()))

    size = packed_size()
    snapped, total = fixedpoint.snap_network(net)
    assert total == sum(m.out_channels for m in layers) and snapped >= 0.95 * total
    for m, want in zip(layers, before):
        assert all(torch.equal(got, w) for got, w in zip(m.exact_parameters(), want))
    for got, want in zip(_outputs(net, x), outputs):
        assert torch.equal(got, want)
    assert packed_size() < 0.8 * size
    weights = [m.weight.detach().clone() for m in layers]
    fixedpoint.snap_network(net)
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, weights))


def test_a_channel_whose_shift_would_change_keeps_its_weights():
    """A channel whose weight load sits just under a power of two may cross it once its
    weights are rounded: that channel keeps its weights, the others are snapped."""
    layer = FixedConv2d(2, 2, 1)
    with torch.no_grad():
        layer.set_input(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        layer.set_output(1.0, -(2 ** 20), 2 ** 20, offset=-0.5)  # no offset: the load is the weights'
        layer.bias.zero_()
        # channel 0: load 2 - 2^-23, so k = 22, and W = (2^22, 2^22) (the second rounds up);
        # as floats those are (1, 1), load 2, which would give k = 21: not snapped.
        layer.weight[0, :, 0, 0] = torch.tensor([1.0, 1.0 - 2.0 ** -23])
        layer.weight[1, :, 0, 0] = torch.tensor([0.3, 0.123456789])
    before = [t.clone() for t in layer.exact_parameters()]
    assert before[2].tolist() == [22, 24]
    original = layer.weight.detach().clone()
    assert layer.snap_to_grid() == 1
    assert all(torch.equal(got, w) for got, w in zip(layer.exact_parameters(), before))
    assert torch.equal(layer.weight[0], original[0])
    assert torch.equal(layer.weight[1], before[0][1]) and not torch.equal(layer.weight[1], original[1])
