"""The training likelihood of a pixel: `model.mixture_log_prob` (discretised logistic mixture)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vaezip.network.model import MixtureParams, autoregressive_means, mixture_log_prob


def _reference(p: MixtureParams, x: torch.Tensor) -> torch.Tensor:
    """The textbook form: edge bins open to +-inf by `where`, log(sigmoid(u) - sigmoid(l)),
    the density at the centre where the bin's mass underflows."""
    means = autoregressive_means(p, x)
    xe = x.unsqueeze(2)
    inv_s = torch.exp(-p.log_scales)
    upper = torch.where(xe >= 255, torch.full_like(xe, 1e4), (xe + 0.5 - means) * inv_s)
    lower = torch.where(xe <= 0, torch.full_like(xe, -1e4), (xe - 0.5 - means) * inv_s)
    log_mass = torch.log(torch.clamp(torch.sigmoid(upper) - torch.sigmoid(lower), min=1e-12))
    mid = (xe - means) * inv_s
    log_pdf_mid = mid - p.log_scales - 2 * F.softplus(mid)
    log_mass = torch.where(torch.sigmoid(upper) - torch.sigmoid(lower) > 1e-5, log_mass, log_pdf_mid)
    return torch.logsumexp(log_mass + torch.log_softmax(p.logits, dim=1).unsqueeze(1), dim=2)


def _random_params(generator: torch.Generator, n: int, channels: int, k: int, size: int) -> list[torch.Tensor]:
    shape = (n, channels, k, size, size)
    params = [torch.randn(n, k, size, size, generator=generator),
              torch.rand(shape, generator=generator) * 300 - 20,  # means, some beyond the edges
              torch.randn(shape, generator=generator) * 3 - 2]  # log-scales, some bins underflow
    if channels == 3:
        params.append(torch.randn(n, 3, k, size, size, generator=generator) * 0.5)
    return params


def test_values_and_gradients_are_the_reference_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        raw = _random_params(generator, 4, channels, 3, 16)
        x = torch.randint(0, 256, (4, channels, 16, 16), generator=generator).float()
        x[0, :, :4], x[1, :, :4] = 0, 255  # the edge bins
        results = []
        for function in (_reference, mixture_log_prob):
            leaves = [r.clone().requires_grad_() for r in raw]
            log_prob = function(MixtureParams(*leaves, *([None] * (4 - len(leaves)))), x)
            log_prob.sum().backward()
            results.append((log_prob.detach(), [leaf.grad for leaf in leaves]))
        (reference, reference_grads), (value, grads) = results
        assert torch.equal(value, reference)
        assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))


def test_probabilities_of_every_value_sum_to_one():
    generator = torch.Generator().manual_seed(1)
    logits, means, log_scales = _random_params(generator, 1, 1, 3, 1)
    means, log_scales = means.clamp(-10, 265), log_scales.clamp(min=-1.0)  # bins wide enough to be exact
    values = torch.arange(256.0).view(256, 1, 1, 1)
    p = MixtureParams(logits.expand(256, -1, -1, -1), means.expand(256, -1, -1, -1, -1),
                      log_scales.expand(256, -1, -1, -1, -1), None)
    total = mixture_log_prob(p, values).double().exp().sum()
    assert abs(float(total) - 1.0) < 1e-5
