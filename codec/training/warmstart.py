"""Warm start: begin a new model from an older model's weights, exactly where it stands.

`warm_start(new_model, old_state)` copies every tensor whose name (after an
optional `rename`) and shape match, and embeds a smaller old tensor into the
leading slice of a grown one with zeros elsewhere. Everything else keeps the
new model's own initialisation.

The zero-init convention that makes the new model compute the old function at
step 0 (so its -ELBO equals the old model's on any batch, with the same noise):
  - a new residual branch zero-initialises its last layer (`model.Block(...,
    zero_last=True)`), so it adds exactly 0 until it is trained;
  - a layer that gains input channels keeps the old weights for the old inputs
    and zero weights for the new ones (done here for grown tensors);
  - a layer that gains output channels gives them zero weights and bias, and
    whatever reads them starts with zero weights on them (again a grown tensor);
  - nothing old is removed or reinterpreted: an old tensor the new model does
    not have is reported in `WarmStartReport.unused`, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from vaezip.errors import InputError, ModelError

Rename = Union[Mapping[str, str], Callable[[str], str], None]


@dataclass
class WarmStartReport:
    """What `warm_start` did, by tensor name in the new model.

    copied: old tensor copied unchanged; grown: old tensor embedded in the
    leading slice of a larger new one, zeros elsewhere; new: no old tensor,
    the new model's initialisation kept; unused: old tensors nothing took.
    """

    copied: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"warm start: {len(self.copied)} tensors copied, {len(self.grown)} grown with zeros, "
                f"{len(self.new)} new, {len(self.unused)} old tensors unused")

    def to_dict(self) -> dict:
        return {"copied": len(self.copied), "grown": self.grown, "new": self.new, "unused": self.unused}


def _renamer(rename: Rename) -> Callable[[str], str]:
    """Old name -> new name. A mapping rewrites name prefixes (longest first)."""
    if rename is None:
        return lambda name: name
    if callable(rename):
        return rename
    prefixes = sorted(rename, key=len, reverse=True)

    def apply(name: str) -> str:
        for prefix in prefixes:
            if name.startswith(prefix):
                return rename[prefix] + name[len(prefix):]
        return name

    return apply


def warm_start(model: nn.Module, old_state: Mapping[str, torch.Tensor], rename: Rename = None) -> WarmStartReport:
    """Load `old_state` into `model` where names and shapes allow (see the module docstring).

    Args:
        model: the new model, already initialised (new layers zero-initialised
            where the function must not change).
        old_state: the old model's state dict.
        rename: old name -> new name, as a prefix mapping ({"decoder.0.out.":
            "decoder.0.out.0."}) or a function; None keeps names.
    Returns:
        The report; tensors that exist in both with a shape that neither
        matches nor grows raise `ModelError`.
    """
    to_new = _renamer(rename)
    old = {to_new(name): tensor for name, tensor in old_state.items()}
    report = WarmStartReport()
    state = model.state_dict()
    with torch.no_grad():
        for name, target in state.items():
            source = old.pop(name, None)
            if source is None:
                report.new.append(name)
            elif source.shape == target.shape:
                target.copy_(source)
                report.copied.append(name)
            elif source.dim() == target.dim() and all(a <= b for a, b in zip(source.shape, target.shape)):
                target.zero_()
                target[tuple(slice(0, n) for n in source.shape)] = source
                report.grown.append(name)
            else:
                raise ModelError(f"warm start: {name} has shape {tuple(source.shape)} in the old model "
                                 f"and {tuple(target.shape)} in the new one")
    report.unused = sorted(old)
    return report


def source_state(source: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """The weights a warm start reads, and a description of them.

    Args:
        source: a registered model name (sha256 checked), a weights file OUT.pt
            (a plain state dict) or a training checkpoint OUT.ckpt (its EMA weights).
    """
    path = Path(source)
    if path.suffix in (".pt", ".ckpt") and path.is_file():
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:
            raise InputError(f"cannot read weights {path}: {exc}") from None
        if isinstance(state, dict) and "ema" in state and "format" in state:
            state = state["ema"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path} holds no state dict")
        return dict(state), f"{path}"
    from vaezip.network.registry import load_model

    loaded = load_model(source)
    return {k: v.detach().clone() for k, v in loaded.net.state_dict().items()}, \
        f"registered model {source} (sha256 {loaded.spec.sha256[:16]})"


def remap_pixel_steps(old_state: Mapping[str, torch.Tensor], schedule) -> dict[str, torch.Tensor]:
    """An old model's pixel-step modules laid out for a model with another split of stage 0
    (`model.pixel_schedule`; the old split is read from its number of `stages.N` modules).

    Each new step takes the old module of the same step (same stage, stride and positions:
    it sees the same context); else the base step takes the old base (neither reads pixels);
    else a new stage-0 step starts as a copy of the old base (its context layer, absent
    there, keeps its zero initialisation, so the model computes what the old one did). Old
    steps the new schedule lacks are dropped: a shallower split is the caller's explicit choice.

    Args:
        old_state: the old model's weights.
        schedule: the new model's `schedule` (`PixelStep`s).
    """
    from vaezip.network.model import pixel_schedule

    count = len({int(name.split(".")[1]) for name in old_state if name.startswith("stages.")})
    if count < 4 or (count - 4) % 3:
        raise ModelError(f"warm start: {count} pixel-step modules fit no schedule")
    old_schedule = pixel_schedule((count - 4) // 3)
    if tuple(old_schedule) == tuple(schedule):
        return dict(old_state)
    state = {name: t for name, t in old_state.items() if not name.startswith("stages.")}
    for k, step in enumerate(schedule):
        source = old_schedule.index(step) if step in old_schedule else 0
        prefix = f"stages.{source}."
        for name, t in old_state.items():
            if name.startswith(prefix):
                state[f"stages.{k}." + name[len(prefix):]] = t.clone()
    return state


def zero_residual(block: nn.Module, last: Optional[nn.Module] = None) -> nn.Module:
    """Zero the last layer of a new residual branch (`last`, default `block.c4`) in place,
    so that x + branch(x) == x until it is trained; returns `block`."""
    layer = last if last is not None else getattr(block, "c4")
    nn.init.zeros_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return block
