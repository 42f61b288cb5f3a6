"""Training loop: fit a `HierarchicalVAE` to random crops by its negative ELBO.

`train(TrainOptions(...))` writes three files next to `options.out`:
  OUT.ckpt  model, EMA, optimiser, step, RNG states and options (resumable;
            written atomically every `checkpoint_every` steps and at the end);
  OUT.pt    the EMA weights as a plain state_dict (`torch.load(...,
            weights_only=True)`, `load_state_dict(strict=True)`);
  OUT.json  {"config": ModelConfig.to_dict(), "training": record of the run}.

The objective is the exact rate, -ELBO in bits per subpixel, with a linear KL
weight 0.2 -> 1 over the first `kl_warmup_fraction` of the steps and no free
bits. AdamW with linear warm-up then cosine decay to 10 %, gradient clipping
and update skipping (VDVAE), EMA weights for evaluation and output. float32
throughout (TF32 allowed on CUDA); no torch.compile.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from vaezip.errors import InputError, OutputExistsError, VaezipError
from vaezip.network.config import ModelConfig, unknown_keys
from vaezip.network.model import HierarchicalVAE
from vaezip.training import data as datasets

CHECKPOINT_FORMAT = "vaezip-train-checkpoint-1"
EVAL_SEED = 20240601  # fixed, so held-out crops and eval noise match across runs
HELDOUT_FRACTION = 0.05  # share of the images carved off when no held-out set is named


@dataclass
class TrainOptions:
    """Everything that defines a training run (stored in checkpoints and OUT.json).

    Attributes:
        config: model architecture; `config.channels` picks gray or RGB data.
        data: dataset specs (see `vaezip.training.data.load_dataset`); "photos" is the
            default photo training set.
        heldout: spec of the held-out evaluation images; None: the held-out
            wikiphotos when training on "photos", else the last 5 % of the
            training images are carved off.
        data_limit: at most this many images per data spec (None: all).
        crop: crop side in pixels, a multiple of `config.downsampling`.
        batch: crops per step.
        steps: total optimiser steps (the lr schedule spans them).
        lr: peak learning rate; warmup_steps: linear warm-up length.
        weight_decay: AdamW decoupled weight decay.
        ema_decay: EMA decay (ramped up as (1+t)/(10+t) early on, so short runs work).
        grad_clip: gradient norm clip; skip_threshold: skip the update when the
            norm (before clipping) exceeds this or is not finite.
        kl_warmup_fraction, kl_start: the KL weight rises linearly from
            `kl_start` to 1 over this fraction of `steps`.
        eval_every: evaluate the EMA weights on the held-out crops every N steps.
        eval_crops: number of fixed held-out crops.
        checkpoint_every: write OUT.ckpt every N steps (and at the end).
        seed: seeds model init, crop sampling and latent noise.
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        out: output path without suffix (OUT.pt, OUT.json, OUT.ckpt).
        resume: checkpoint to continue from, or None.
        time_limit: stop cleanly after this many seconds of this invocation.
        stop_step: stop this invocation after this step (the schedule still
            spans `steps`; resume later to go on).
    """

    config: ModelConfig = field(default_factory=ModelConfig)
    data: tuple[str, ...] = ("photos",)
    heldout: Optional[str] = None
    data_limit: Optional[int] = None
    crop: int = 64
    batch: int = 16
    steps: int = 20000
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float = 200.0
    skip_threshold: float = 1000.0
    kl_warmup_fraction: float = 0.1
    kl_start: float = 0.2
    eval_every: int = 500
    eval_crops: int = 64
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    out: str = "runs/model"
    resume: Optional[str] = None
    time_limit: Optional[float] = None
    stop_step: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = (self.data,)
        self.data = tuple(self.data)
        if not self.data:
            raise InputError("no training data given")
        for name in ("crop", "batch", "steps", "eval_every", "eval_crops", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.crop % self.config.downsampling:
            raise InputError(f"crop {self.crop} is not a multiple of the model's downsampling {self.config.downsampling}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["data"] = list(self.data)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "TrainOptions":
        unknown = unknown_keys(cls, values)
        if unknown:
            raise VaezipError(f"unknown training options: {unknown}")
        values = dict(values)
        if "config" in values:
            values["config"] = ModelConfig.from_dict(values["config"])
        if "data" in values:
            values["data"] = tuple(values["data"])
        return cls(**values)


@dataclass
class TrainEvent:
    """What the progress callback receives after every step (kind "step"),
    evaluation ("eval"), checkpoint ("checkpoint") and at the end ("done")."""

    kind: str
    step: int
    steps: int
    train_bpd: float  # -ELBO of the last batch, bits per subpixel
    heldout_bpd: Optional[float]  # latest held-out -ELBO (EMA weights), bits per subpixel
    crops_per_s: float
    lr: float
    elapsed_s: float
    skipped: int


@dataclass
class TrainResult:
    """Paths written and the final numbers of a run."""

    weights: Path
    record: Path
    checkpoint: Path
    steps: int
    heldout_bpd: float
    wall_time_s: float


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(OUT.pt, OUT.json, OUT.ckpt) for an output path given with or without a suffix."""
    base = str(out)
    for suffix in (".pt", ".json", ".ckpt"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return Path(base + ".pt"), Path(base + ".json"), Path(base + ".ckpt")


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise VaezipError(f"bad device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VaezipError("device cuda requested but CUDA is not available")
    return resolved


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def learning_rate(options: TrainOptions, step: int, seconds: float = 0.0) -> float:
    """Linear warm-up to `lr`, then cosine decay to 10 % of it at `steps`, or
    at `time_limit` if that comes first (`seconds` into this invocation)."""
    if step <= options.warmup_steps:
        return options.lr * step / max(options.warmup_steps, 1)
    progress = min(1.0, (step - options.warmup_steps) / max(options.steps - options.warmup_steps, 1))
    if options.time_limit:
        progress = max(progress, min(1.0, seconds / options.time_limit))
    return options.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def kl_weight(options: TrainOptions, step: int) -> float:
    """Linear KL warm-up from `kl_start` to 1 over the first `kl_warmup_fraction` of steps."""
    ramp = options.kl_warmup_fraction * options.steps
    if ramp <= 0 or step >= ramp:
        return 1.0
    return options.kl_start + (1.0 - options.kl_start) * step / ramp


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A training checkpoint (tensors, numbers, strings only: loaded with weights_only)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"no such checkpoint: {path}") from None
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a vaezip training checkpoint")
    return state


def checkpoint_options(path: str | Path) -> TrainOptions:
    """The options a checkpoint was trained with (to resume it)."""
    return TrainOptions.from_dict(load_checkpoint(path)["options"])


def _log_stdout(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _describe_data(specs: tuple[str, ...]) -> list[str]:
    out = []
    for spec in specs:
        if spec == "photos":
            out += [s.describe() for s in datasets.default_photo_sources()]
        elif spec in datasets.NAMED_SPECS:
            out.append(f"{spec}: {datasets.NAMED_SPECS[spec]}")
        else:
            out.append(spec)
    return out


def _load_data(options: TrainOptions) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Training images, held-out images and a description of the held-out set."""
    channels = options.config.channels
    for spec in options.data:
        if datasets.is_evaluation_only(spec):
            raise InputError(f"{spec}: Kodak is for evaluation only, never training")
    images: list[np.ndarray] = []
    for spec in options.data:
        images += datasets.load_dataset(spec, options.data_limit, channels)
    heldout_spec = options.heldout
    if heldout_spec is None and set(options.data) == {"photos"}:
        heldout_spec = "heldout"
    if heldout_spec is not None:
        heldout = datasets.load_dataset(heldout_spec, None, channels)
        return images, heldout, " ".join(_describe_data((heldout_spec,)))
    if len(images) < 2:
        raise InputError("too few images to carve off a held-out set: name one with heldout")
    carve = max(1, int(len(images) * HELDOUT_FRACTION))
    return images[:-carve], images[-carve:], f"last {carve} of the {len(images)} training images (not trained on)"


def _heldout_crops(images: list[np.ndarray], options: TrainOptions) -> torch.Tensor:
    """Fixed evaluation crops (n, C, S, S) uint8, the same for every run with this crop size."""
    array = datasets.evaluation_crops(images, options.crop, options.eval_crops, EVAL_SEED)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


@torch.no_grad()
def evaluate_bpd(model: HierarchicalVAE, crops: torch.Tensor, batch: int, device: torch.device) -> float:
    """-ELBO of `crops` (n, C, S, S) uint8 in bits per subpixel, with fixed latent noise
    (the global RNG is forked, so training's random stream is untouched)."""
    model.eval()
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        for start in range(0, len(crops), batch):
            x = crops[start : start + batch].to(device)
            total += float(model.nelbo(x).nelbo_bits.double().sum())
    model.train()
    return total / crops.numel()


def _update_ema(ema: HierarchicalVAE, model: HierarchicalVAE, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1.0 - decay)
            else:
                e.copy_(p)


@dataclass
class _Data:
    """Training images, their crop sampler and the fixed held-out crops."""

    images: list[np.ndarray]
    sampler: datasets.RandomCrops
    eval_crops: torch.Tensor
    heldout_text: str


def _setup_data(options: TrainOptions, device: torch.device, log: Callable[[str], None]) -> _Data:
    t_load = time.monotonic()
    images, heldout_images, heldout_text = _load_data(options)
    data = _Data(images, datasets.RandomCrops(images, options.crop, seed=options.seed),
                 _heldout_crops(heldout_images, options), heldout_text)
    log(
        f"data: {len(images)} training images, {sum(im.shape[0] * im.shape[1] for im in images) / 1e6:.1f} Mpx; "
        f"held-out: {heldout_text}, {len(data.eval_crops)} crops of {options.crop}; "
        f"loaded in {time.monotonic() - t_load:.1f} s; device {hardware_name(device)}"
    )
    return data


@dataclass
class _RunState:
    """Everything a checkpoint restores: weights, optimiser, counters and the held-out curve
    (rows [step, mean train bpd, held-out bpd])."""

    model: HierarchicalVAE
    ema: HierarchicalVAE
    optimizer: torch.optim.Optimizer
    step: int = 0
    crops_seen: int = 0
    skipped: int = 0
    elapsed_before: float = 0.0
    curve: list[list[float]] = field(default_factory=list)


def _new_run(options: TrainOptions, device: torch.device) -> _RunState:
    """A seeded fresh model, its EMA copy and the AdamW optimiser."""
    torch.manual_seed(options.seed)
    model = HierarchicalVAE(options.config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=(0.9, 0.99), weight_decay=options.weight_decay)
    return _RunState(model, ema, optimizer)


def _resume(run: _RunState, sampler: datasets.RandomCrops, options: TrainOptions, device: torch.device) -> None:
    """Restore `run`, the sampler and the RNGs from the checkpoint `options.resume`."""
    state = load_checkpoint(options.resume, device)
    saved = TrainOptions.from_dict(state["options"])
    if saved.config != options.config:
        raise VaezipError(f"{options.resume} was trained with a different model config")
    run.model.load_state_dict(state["model"], strict=True)
    run.ema.load_state_dict(state["ema"], strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    sampler.state = state["sampler_state"]
    torch.set_rng_state(state["torch_rng"].cpu())
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    run.step, run.crops_seen, run.skipped = int(state["step"]), int(state["crops_seen"]), int(state["skipped"])
    run.elapsed_before = float(state["elapsed_s"])
    run.curve = [list(row) for row in state["curve"]]


def _save_checkpoint(run: _RunState, sampler: datasets.RandomCrops, options: TrainOptions, device: torch.device,
                     elapsed_s: float, path: Path) -> None:
    _atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "options": options.to_dict(),
            "step": run.step,
            "model": run.model.state_dict(),
            "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "sampler_state": sampler.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "crops_seen": run.crops_seen,
            "skipped": run.skipped,
            "elapsed_s": elapsed_s,
            "curve": run.curve,
        },
        path,
    )


def _train_step(run: _RunState, x: torch.Tensor, options: TrainOptions, lr: float, beta: float) -> tuple[float, bool]:
    """One optimiser step on the crops x at learning rate `lr` and KL weight `beta`.

    Returns:
        -ELBO of the batch in bits per subpixel, and whether the update was applied
        (it is skipped when the gradient norm or the loss is not finite or too large).
    """
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    dims = options.config.channels * options.crop * options.crop
    terms = run.model.nelbo(x)
    loss = (terms.recon_bits + beta * terms.kl_bits.sum(1)).mean() / dims
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), options.grad_clip))
    train_bpd = float(terms.nelbo_bits.detach().mean()) / dims
    if math.isfinite(grad_norm) and math.isfinite(train_bpd) and grad_norm <= options.skip_threshold:
        run.optimizer.step()
        _update_ema(run.ema, run.model, min(options.ema_decay, (1 + run.step) / (10 + run.step)))
        return train_bpd, True
    run.skipped += 1
    return train_bpd, False


class _Window:
    """Throughput and mean training bpd since the last evaluation."""

    def __init__(self) -> None:
        self.start, self.crops, self.bpd, self.steps = time.monotonic(), 0, 0.0, 0

    def rate(self) -> float:
        """Crops per second."""
        return self.crops / max(time.monotonic() - self.start, 1e-9)

    def mean_bpd(self) -> float:
        return self.bpd / self.steps if self.steps else float("nan")


def _eval_line(run: _RunState, options: TrainOptions, window: _Window, heldout_bpd: float,
               before: str, after: str) -> str:
    """The log line of an evaluation: step, training and held-out bpd, with `before` and `after` inserted."""
    return (f"step {run.step}/{options.steps}  {before}train {window.mean_bpd():.4f} bpd  "
            f"held-out {heldout_bpd:.4f} bpd (EMA){after}")


def _write_outputs(run: _RunState, data: _Data, options: TrainOptions, device: torch.device, wall: float,
                   heldout_bpd: float, weights_path: Path, record_path: Path) -> None:
    """OUT.pt (the EMA weights) and OUT.json (config and the record of the run)."""
    _atomic_save({k: v.detach().cpu().clone() for k, v in run.ema.state_dict().items()}, weights_path)
    record = {
        "config": options.config.to_dict(),
        "training": {
            "data": _describe_data(options.data),
            "data_specs": list(options.data),
            "training_images": len(data.images),
            "heldout": data.heldout_text,
            "heldout_crops": len(data.eval_crops),
            "steps": run.step,
            "crops_seen": run.crops_seen,
            "batch": options.batch,
            "crop": options.crop,
            "skipped_updates": run.skipped,
            "wall_time_s": round(wall, 1),
            "hardware": hardware_name(device),
            "torch_version": torch.__version__,
            "final_heldout_bpd": heldout_bpd,
            "heldout_bpd_meaning": "-ELBO bits per subpixel of the held-out crops, EMA weights, 1 latent sample",
            "curve": [[v if isinstance(v, int) or math.isfinite(v) else None for v in row] for row in run.curve],
            "options": options.to_dict(),
        },
    }
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, record_path)


def train(
    options: TrainOptions,
    progress: Optional[Callable[[TrainEvent], None]] = None,
    *,
    log: Optional[Callable[[str], None]] = _log_stdout,
    overwrite: bool = False,
) -> TrainResult:
    """Run (or resume) training as `options` says; see the module docstring.

    Args:
        options: the run; `options.resume` names a checkpoint to continue,
            whose config must equal `options.config`.
        progress: called with a `TrainEvent` after every step and event.
        log: receives one line per evaluation / checkpoint (default: stdout, flushed).
        overwrite: allow replacing existing OUT.pt / OUT.ckpt of a fresh run.
    """
    log = log or (lambda line: None)
    weights_path, record_path, ckpt_path = output_paths(options.out)
    if options.resume is None and not overwrite:
        for path in (weights_path, ckpt_path):
            if path.exists():
                raise OutputExistsError(f"{path} exists: resume it or allow overwriting")
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = _setup_data(options, device, log)
    run = _new_run(options, device)
    if options.resume is not None:
        _resume(run, data.sampler, options, device)
        log(f"resumed from {options.resume} at step {run.step}")

    heldout_bpd = run.curve[-1][2] if run.curve else None
    start = time.monotonic()
    window = _Window()
    lr = learning_rate(options, run.step)

    def elapsed() -> float:
        return run.elapsed_before + time.monotonic() - start

    def emit(kind: str, train_bpd: float, rate: float) -> None:
        if progress is not None:
            progress(TrainEvent(kind, run.step, options.steps, train_bpd, heldout_bpd, rate, lr, elapsed(), run.skipped))

    def evaluate() -> float:
        """Held-out -ELBO of the EMA weights, added to the curve."""
        bpd = evaluate_bpd(run.ema, data.eval_crops, options.batch, device)
        run.curve.append([run.step, window.mean_bpd(), bpd])
        return bpd

    train_bpd, rate = float("nan"), 0.0
    last_eval_step = run.step if run.curve and run.curve[-1][0] == run.step else -1
    run.model.train()
    while run.step < options.steps:
        if options.time_limit is not None and time.monotonic() - start >= options.time_limit:
            log(f"time limit of {options.time_limit:g} s reached at step {run.step}")
            break
        if options.stop_step is not None and run.step >= options.stop_step:
            break
        run.step += 1
        lr = learning_rate(options, run.step, time.monotonic() - start)
        beta = kl_weight(options, run.step)
        x = data.sampler.sample(options.batch).to(device, non_blocking=True)
        train_bpd, applied = _train_step(run, x, options, lr, beta)
        if applied:
            window.bpd += train_bpd
            window.steps += 1
        run.crops_seen += options.batch
        window.crops += options.batch
        rate = window.rate()
        emit("step", train_bpd, rate)

        if run.step % options.eval_every == 0 or run.step == options.steps:
            heldout_bpd = evaluate()
            last_eval_step = run.step
            log(_eval_line(run, options, window, heldout_bpd, f"{rate:.1f} crops/s  ",
                           f"  lr {lr:.2e}  kl weight {beta:.2f}  skipped {run.skipped}  {elapsed():.0f} s"))
            emit("eval", train_bpd, rate)
            window = _Window()
        if run.step % options.checkpoint_every == 0:
            _save_checkpoint(run, data.sampler, options, device, elapsed(), ckpt_path)
            emit("checkpoint", train_bpd, rate)

    if last_eval_step != run.step:
        heldout_bpd = evaluate()
        log(_eval_line(run, options, window, heldout_bpd, "", "  final"))
    _save_checkpoint(run, data.sampler, options, device, elapsed(), ckpt_path)
    wall = elapsed()
    _write_outputs(run, data, options, device, wall, heldout_bpd, weights_path, record_path)
    log(f"wrote {weights_path} (EMA weights), {record_path}, {ckpt_path}")
    emit("done", train_bpd, rate)
    return TrainResult(weights_path, record_path, ckpt_path, run.step, float(heldout_bpd), wall)
