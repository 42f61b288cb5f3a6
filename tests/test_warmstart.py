"""Warm start: a new model with zero-initialised additions starts exactly where the old one stands."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaezip.errors import ModelError
from vaezip.network.config import ModelConfig
from vaezip.network.model import Block, HierarchicalVAE
from vaezip.training.warmstart import warm_start

TINY = ModelConfig(width=16, bottleneck=8, pixel_width=8, latent_scales=((16, 1, 4), (4, 1, 2)))


def _nelbo(model, x):
    torch.manual_seed(3)
    with torch.no_grad():
        return model.nelbo(x).nelbo_bits


def test_warm_start_with_a_zero_initialised_block_keeps_the_elbo():
    torch.manual_seed(0)
    old = HierarchicalVAE(TINY).eval()
    torch.manual_seed(1)
    new = HierarchicalVAE(TINY).eval()
    for group in new.decoder:  # an extra residual block after each group's update, last layer zeroed
        group.out = nn.Sequential(group.out, Block(16, 8, 16, zero_last=True))
    rename = {f"decoder.{g}.out.": f"decoder.{g}.out.0." for g in range(len(new.decoder))}
    report = warm_start(new, old.state_dict(), rename)
    assert not report.unused and not report.grown
    assert report.new and all(".out.1." in name for name in report.new)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(_nelbo(new, x), _nelbo(old, x))
    assert not torch.equal(_nelbo(HierarchicalVAE(TINY).eval(), x), _nelbo(old, x))


def test_warm_start_grows_tensors_with_zeros_and_refuses_shrinking():
    old, new = nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1)  # two more input channels
    report = warm_start(new, old.state_dict())
    assert report.grown == ["weight"] and report.copied == ["bias"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(new(torch.cat([x, torch.randn(2, 2, 4, 4)], 1)), old(x), rtol=0, atol=0)
    with pytest.raises(ModelError):
        warm_start(nn.Conv2d(2, 4, 1), old.state_dict())
