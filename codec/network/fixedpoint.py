"""Fixed-point layers: a network whose every activation is an integer and whose every
convolution is exact, so its outputs are the same bits on any CPU, kernel and thread count.

The arithmetic (format version 6, `versions.Numerics.exact`):

  tensors  every activation between layers is an integer-valued float32 tensor, with a
      scale per channel (integers per unit of the float model's value) and a range:
      ReLU outputs [0, 2^bits - 1], signed ones [-(2^(bits-1) - 1), 2^(bits-1) - 1].
  convolutions  `FixedConv2d` folds the input scales, the output scale and offset into
      its weights and bias and rounds them to a grid of 2^-k per output channel
      (`integer_weights`): every product and every partial sum is then an integer
      multiple of 2^-k below 2^24 * 2^-k (the bound is checked per output channel, in
      integers, from the weights and the inputs' range), so float32 sums them exactly in
      any order, with or without FMA. The output is floor(sum) (the bias holds the +1/2
      of rounding), clamped to the output range: the next layer's integers, no separate
      rescaling pass.
  requantisation  where a wide tensor (a residual stream) feeds a convolution, `Requant`
      shifts it to fewer bits: floor(x * 2^s + 1/2), exact because every activation scale
      is a power of two.

The same modules run in training (quantisation-aware: rounding and floors pass
gradients straight through), so a model is trained in the arithmetic it is coded
with; `calibrating` mode runs them as plain float layers that record each tensor's
range, from which `calibrate` picks the power-of-two scales of a new fixed-point model.

Kernels that never compute a float32 sum exactly (Winograd, FFT, TF32, bf16) must stay
off: `exact_torch_settings`. The weight grid needs only IEEE basic operations and
`frexp` (float64, exact), so every machine derives the same integers from the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

ACCUMULATOR_BITS = 24
"""float32 holds every integer below 2^24 exactly."""
MAX_WEIGHT_SHIFT = 60
"""The finest weight grid, 2^-60 of an output integer (far above float32's smallest normal)."""
CODING_LAYOUT = torch.channels_last
"""Memory layout of coding convolutions: oneDNN's fastest on the CPU (5-8 % less network time
than NCHW on 4-tile sub-batches, docs/RESULTS.md); any layout sums exactly, so it is a speed
setting only."""

_calibrating = False


@contextmanager
def calibrating() -> Iterator[None]:
    """Run fixed-point modules as float layers that record their tensors' ranges."""
    global _calibrating
    previous, _calibrating = _calibrating, True
    try:
        yield
    finally:
        _calibrating = previous


def is_calibrating() -> bool:
    return _calibrating


def signed_limit(bits: int) -> int:
    """The largest magnitude of a signed `bits`-bit activation (symmetric range)."""
    return (1 << (bits - 1)) - 1


def exact_torch_settings() -> None:
    """Keep torch off the kernels that do not sum float32 exactly: NNPACK's Winograd
    (CPU, batches of 16 and more), TF32 and reduced-precision float32 matmuls, cuDNN's
    non-deterministic algorithm choice."""
    torch.backends.nnpack.set_flags(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")


def at_positions(x: torch.Tensor, padding: tuple[int, int], at: Optional[tuple[int, int, int]]
                 ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """A convolution's input, stride and padding that evaluate it only at the output
    positions (row + stride * a, col + stride * b), `at` = (stride, row, col): the input
    zero-padded as the convolution pads it and cropped to start at (row, col). None: the
    input, stride 1 and `padding` as they are."""
    if at is None:
        return x, (1, 1), padding
    stride, row, col = at
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))[:, :, row:, col:]
    return x, (stride, stride), (0, 0)


class _FloorClamp(torch.autograd.Function):
    """clamp(floor(y), lo, hi) in two passes, with a straight-through gradient: 1 where
    lo < floor(y) < hi, `at_bound` where floor(y) is lo or hi, 0 beyond. lo < hi are
    integers (scalars or per-channel tensors that broadcast).

    `at_bound` 1/2 gives torch.maximum(torch.minimum(.)) 's gradient, 1 torch.clamp's:
    the same bits as those compositions (tests/test_fixedpoint.py) in fewer passes, which
    makes a CPU training step 1.3-1.4x faster (docs/RESULTS.md). With scalar bounds (most
    layers) the backward is one fused hardtanh_backward (strictly inside (lo - 1/2, hi + 1/2):
    lo <= z <= hi) per gradient weight; with tensor bounds the factor is
    clamp(min(z - lo, hi - z) + at_bound, 0, 1) with z = floor(y)."""

    @staticmethod
    def forward(ctx, y, lo, hi, at_bound):
        scalar = not (isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor))
        if not scalar:
            lo, hi = (torch.as_tensor(t, dtype=y.dtype, device=y.device) for t in (lo, hi))
        z = torch.floor(y)
        ctx.save_for_backward(z, *(() if scalar else (lo, hi)))
        ctx.bounds = (float(lo), float(hi)) if scalar else None
        ctx.at_bound = at_bound
        return torch.clamp(z, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        if ctx.bounds is not None:
            (z,) = ctx.saved_tensors
            lo, hi = ctx.bounds
            within = torch.ops.aten.hardtanh_backward(grad, z, lo - 0.5, hi + 0.5)  # 1 at a bound too
            if ctx.at_bound == 1.0:
                return within, None, None, None
            if ctx.at_bound != 0.5:
                raise ValueError(f"scalar bounds take at_bound 1/2 or 1, not {ctx.at_bound}")
            inside = torch.ops.aten.hardtanh_backward(grad, z, lo, hi)  # 0 at a bound
            return within.add_(inside).mul_(0.5), None, None, None
        z, lo, hi = ctx.saved_tensors
        margin = z - lo
        torch.minimum(margin, hi - z, out=margin)
        factor = margin.add_(ctx.at_bound).clamp_(0, 1)
        return grad * factor, None, None, None


def _floor_clamp_rows(y: torch.Tensor, lo: "torch.Tensor | float", hi: "torch.Tensor | float") -> torch.Tensor:
    """floor(y) clamped per channel (dim 1) to [lo, hi] (or to scalars); the gradient 1/2 at a bound."""
    if isinstance(lo, torch.Tensor):
        shape = (1, -1) + (1,) * (y.dim() - 2)
        lo, hi = lo.to(y.dtype).view(shape), hi.to(y.dtype).view(shape)
    return _FloorClamp.apply(y, lo, hi, 0.5)


def _folded(weight: torch.Tensor, bias: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor,
            out_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias with the scales folded in (input integers -> output units), in the
    weight's dtype: w * out_scale / in_scale and b * out_scale + out_offset."""
    ratio = (out_scale[:, None] / in_scale[None, :]).to(weight.dtype)[:, :, None, None]
    return weight * ratio, bias * out_scale.to(bias.dtype) + out_offset.to(bias.dtype)


def integer_weights(weight: torch.Tensor, bias: torch.Tensor, in_scale: torch.Tensor, in_max: torch.Tensor,
                    out_scale: torch.Tensor, out_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer weights, bias and grid exponent of a fixed-point convolution.

    Output channel c computes floor(2^-k[c] * (sum_i W[c, i] * x_i + B[c])) with
    W = rint(w * out_scale / in_scale * 2^k), B = rint((b * out_scale + out_offset) * 2^k),
    both integers, and the largest k <= `MAX_WEIGHT_SHIFT` for which
    sum |W[c]| * in_max + |B[c]| < 2^24, checked in int64.

    Args:
        weight: (cout, cin, kh, kw) float weights; bias: (cout,).
        in_scale: (cin,) float64, input integers per unit; in_max: (cin,) float64, the
            inputs' largest magnitude in integers.
        out_scale, out_offset: (cout,) float64: output integer = value * out_scale + offset.
    Returns:
        W (cout, cin, kh, kw) and B (cout,) as float64 integers, k (cout,) int64.
    """
    with torch.no_grad():
        real_w, real_b = _folded(weight.detach().double(), bias.detach().double(), in_scale.double(),
                                 out_scale.double(), out_offset.double())
        load = (real_w.abs() * in_max.double()[None, :, None, None]).flatten(1).sum(1) + real_b.abs()
        _, exponent = torch.frexp(load)  # load < 2^exponent
        k = (ACCUMULATOR_BITS - 1 - exponent.long()).clamp(max=MAX_WEIGHT_SHIFT)
        limit = 1 << ACCUMULATOR_BITS
        while True:
            step = torch.pow(torch.tensor(2.0, dtype=torch.float64), k.double())
            w_int = torch.round(real_w * step[:, None, None, None])
            b_int = torch.round(real_b * step)
            bound = (w_int.abs().long() * in_max.long()[None, :, None, None]).flatten(1).sum(1) + b_int.abs().long()
            over = bound >= limit
            if not bool(over.any()):
                return w_int, b_int, k
            k = torch.where(over, k - 1, k)


class FixedConv2d(nn.Conv2d):
    """A convolution from integer activations to integer activations (module docstring).

    Buffers (float64, set by `calibrate` and the model's wiring, saved with the weights):
    in_scale, in_max (cin,): the input's integers per unit and largest magnitude;
    out_scale, out_offset, out_lo, out_hi (cout,): output integer =
    clamp(floor(value * out_scale + out_offset), out_lo, out_hi). The float weights stay
    the trained parameters; the integer ones are derived from them (`integer_weights`),
    once per change of the weights.
    """

    def __init__(self, cin: int, cout: int, k: int, dilation: int = 1):
        super().__init__(cin, cout, k, padding=dilation * (k // 2), dilation=dilation)
        for name, size in (("in_scale", cin), ("in_max", cin), ("out_scale", cout)):
            self.register_buffer(name, torch.ones(size, dtype=torch.float64))
        for name in ("out_offset", "out_lo", "out_hi"):
            self.register_buffer(name, torch.zeros(cout, dtype=torch.float64))
        self.relu = False
        """Calibration only: the output feeds a ReLU (its range starts at 0)."""
        self.observed: Optional[torch.Tensor] = None
        self._cache: Optional[tuple] = None
        self._bounds: Optional[tuple] = None

    def output_bounds(self) -> "tuple[float, float] | tuple[torch.Tensor, torch.Tensor]":
        """(lo, hi) of the output integers: two floats when every channel has the same (most
        layers: the fast floor-and-clamp), else the (cout,) buffers; cached per change of them."""
        key = tuple((t.data_ptr(), t._version) for t in (self.out_lo, self.out_hi))
        if self._bounds is None or self._bounds[0] != key:
            lo, hi = self.out_lo.detach().cpu(), self.out_hi.detach().cpu()
            uniform = bool((lo == lo[0]).all() and (hi == hi[0]).all())
            self._bounds = (key, (float(lo[0]), float(hi[0])) if uniform else None)
        return self._bounds[1] or (self.out_lo, self.out_hi)

    def set_output(self, scale, lo, hi, offset=0.0) -> None:
        """Output integer = clamp(floor(value * scale + offset + 1/2), lo, hi) (broadcast per channel)."""
        n = self.out_channels
        self.out_scale.copy_(torch.as_tensor(scale, dtype=torch.float64).expand(n))
        self.out_offset.copy_(torch.as_tensor(offset, dtype=torch.float64).expand(n) + 0.5)
        self.out_lo.copy_(torch.as_tensor(lo, dtype=torch.float64).expand(n))
        self.out_hi.copy_(torch.as_tensor(hi, dtype=torch.float64).expand(n))

    def set_input(self, scale: torch.Tensor, largest: torch.Tensor) -> None:
        """The input's integers per unit and largest magnitude, per input channel."""
        self.in_scale.copy_(torch.as_tensor(scale, dtype=torch.float64).expand(self.in_channels))
        self.in_max.copy_(torch.as_tensor(largest, dtype=torch.float64).expand(self.in_channels))

    def _key(self) -> tuple:
        tensors = (self.weight, self.bias, self.in_scale, self.in_max, self.out_scale, self.out_offset,
                   self.out_lo, self.out_hi)
        return (CODING_LAYOUT,) + tuple((t.data_ptr(), t._version) for t in tensors)

    def exact_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W * 2^-k, B * 2^-k, k) as float32, float32, int64 (`integer_weights`), cached."""
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            w_int, b_int, k = integer_weights(self.weight, self.bias, self.in_scale, self.in_max,
                                              self.out_scale, self.out_offset)
            unit = torch.pow(torch.tensor(2.0, dtype=torch.float64), -k.double())
            w = (w_int * unit[:, None, None, None]).float().contiguous(memory_format=CODING_LAYOUT)
            b = (b_int * unit).float()
            bounds = self.output_bounds()
            if isinstance(bounds[0], torch.Tensor):
                bounds = tuple(t.float().view(1, -1, 1, 1) for t in bounds)
            self._cache = (key, w, b, k, bounds)
        return self._cache[1], self._cache[2], self._cache[3]

    def snap_to_grid(self) -> int:
        """Set the float weights to the values of their integer weights, W * 2^-k / (out_scale /
        in_scale) in float32, in every output channel where that gives back the same W and k
        (a channel whose weight load then crosses a power of two keeps its weights). The layer
        computes the same bits as before; the weights have at most ~15 significant bits, so a
        registered model packs to under half the size. Returns the channels snapped; raises
        RuntimeError if the integers changed (never expected)."""
        with torch.no_grad():
            w_int, b_int, k = integer_weights(self.weight, self.bias, self.in_scale, self.in_max,
                                              self.out_scale, self.out_offset)
            ratio = (self.out_scale[:, None] / self.in_scale[None, :])[:, :, None, None]
            unit = torch.pow(torch.tensor(2.0, dtype=torch.float64), -k.double())[:, None, None, None]
            snapped = (w_int * unit / ratio).to(self.weight.dtype)
            w2, _, k2 = integer_weights(snapped, self.bias, self.in_scale, self.in_max, self.out_scale,
                                         self.out_offset)
            same = (w2 == w_int).flatten(1).all(1) & (k2 == k)  # same k, same bias, same B
            self.weight.copy_(torch.where(same[:, None, None, None], snapped, self.weight))
            after = integer_weights(self.weight, self.bias, self.in_scale, self.in_max, self.out_scale,
                                    self.out_offset)
            if not all(torch.equal(a, b) for a, b in zip(after, (w_int, b_int, k))):
                raise RuntimeError("snapping the weights to their grid changed the integer weights")
        return int(same.sum())

    def forward(self, x: torch.Tensor, at: Optional[tuple[int, int, int]] = None) -> torch.Tensor:
        """The output at every position, or only at those `at` names (`at_positions`)."""
        x, stride, padding = at_positions(x, self.padding, at)
        if _calibrating:
            y = F.conv2d(x, self.weight, self.bias, stride, padding, self.dilation)
            y = F.relu(y) if self.relu else y
            peak = y.detach().abs().amax(dim=(0, 2, 3))
            self.observed = peak if self.observed is None else torch.maximum(self.observed, peak)
            return y
        if self.training and self.weight.requires_grad:
            w, b = self._trained_parameters()
            y = F.conv2d(x, w.to(x.dtype), b.to(x.dtype), stride, padding, self.dilation)
            return _floor_clamp_rows(y, *self.output_bounds())
        w, b, _ = self.exact_parameters()
        y = F.conv2d(x.contiguous(memory_format=CODING_LAYOUT), w, b, stride, padding, self.dilation)
        if y.requires_grad:  # frozen weights, gradients to the input (e.g. a fit of latents)
            return _floor_clamp_rows(y, *self.output_bounds())
        lo, hi = self._cache[4]
        return y.floor_().clamp_(lo, hi)  # in place: two passes over the output

    def _trained_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact parameters (`integer_weights`, the integers coding uses) with gradients
        to the float ones, straight through the rounding."""
        w_int, b_int, k = integer_weights(self.weight, self.bias, self.in_scale, self.in_max,
                                          self.out_scale, self.out_offset)
        unit = torch.pow(torch.tensor(2.0, dtype=torch.float64, device=k.device), -k.double())
        real_w, real_b = _folded(self.weight, self.bias, self.in_scale, self.out_scale, self.out_offset)
        w = real_w + ((w_int * unit[:, None, None, None]).float() - real_w).detach()
        b = real_b + ((b_int * unit).float() - real_b).detach()
        return w, b


class Requant(nn.Module):
    """Re-scales integer activations by a power of two per channel: clamp(floor(x * 2^s + 1/2),
    lo, hi), with ReLU's range [0, 2^bits - 1] or a signed one; where a wide stream feeds a layer.

    Buffers: in_scale, out_scale (channels,) float64, their ratio a power of two.
    """

    def __init__(self, channels: int, bits: int, relu: bool):
        super().__init__()
        self.bits, self.relu = bits, relu
        self.register_buffer("in_scale", torch.ones(channels, dtype=torch.float64))
        self.register_buffer("out_scale", torch.ones(channels, dtype=torch.float64))
        self.observed: Optional[torch.Tensor] = None

    @property
    def lo(self) -> int:
        return 0 if self.relu else -signed_limit(self.bits)

    @property
    def hi(self) -> int:
        return (1 << self.bits) - 1 if self.relu else signed_limit(self.bits)

    @property
    def largest(self) -> int:
        return max(-self.lo, self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _calibrating:
            y = F.relu(x) if self.relu else x
            peak = y.detach().abs().amax(dim=(0, 2, 3))
            self.observed = peak if self.observed is None else torch.maximum(self.observed, peak)
            return y
        ratio = (self.out_scale / self.in_scale).to(x.dtype).view(1, -1, 1, 1)
        if x.requires_grad:
            return _FloorClamp.apply(x * ratio + 0.5, self.lo, self.hi, 1.0)
        return (x * ratio).add_(0.5).floor_().clamp_(self.lo, self.hi)


class Stream(nn.Module):
    """A residual stream's integer grid: scale per channel (a power of two) and signed range.

    In calibration it records the stream's largest magnitude per channel (`observe`)."""

    def __init__(self, channels: int, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.ones(channels, dtype=torch.float64))
        self.observed: Optional[torch.Tensor] = None

    @property
    def limit(self) -> int:
        return signed_limit(self.bits)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """x, recorded when calibrating, else clamped to the stream's range."""
        if _calibrating:
            peak = x.detach().abs().amax(dim=(0, 2, 3))
            self.observed = peak if self.observed is None else torch.maximum(self.observed, peak)
            return x
        return torch.clamp(x, -self.limit, self.limit)


def snap_network(net: nn.Module) -> tuple[int, int]:
    """`FixedConv2d.snap_to_grid` on every fixed-point convolution of `net`: the same network
    outputs, weights that pack small. Returns (output channels snapped, output channels)."""
    layers = [m for m in net.modules() if isinstance(m, FixedConv2d)]
    return sum(m.snap_to_grid() for m in layers), sum(m.out_channels for m in layers)


def power_of_two_scale(observed: torch.Tensor, largest: int, headroom: float = 1.0) -> torch.Tensor:
    """Per channel, the largest power-of-two scale s with observed * headroom * s <= largest
    (channels never seen non-zero get the scale of the largest channel's)."""
    peak = observed.double().clamp(min=float(observed.max()) * 2.0**-12 + 1e-12) * headroom
    _, exponent = torch.frexp(torch.as_tensor(float(largest), dtype=torch.float64) / peak)
    return torch.pow(torch.tensor(2.0, dtype=torch.float64), (exponent - 1).double())
