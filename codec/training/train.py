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
and update skipping (VDVAE), EMA weights for evaluation and output.

One code path on a laptop, a GPU and a cluster: the training images are packed
once into device memory and crops are cut there (`data.TensorCrops`); the model
can run channels-last, under bf16 autocast (CUDA; convolutions compute in bf16,
their outputs and everything after them, the latent Gaussians and the pixel
likelihood, in float32) and `torch.compile`. Under `torchrun` every rank trains
on its own crop stream with DistributedDataParallel (gloo on CPU, NCCL on CUDA)
and only rank 0 evaluates and writes. A run can start from another model's
weights (`init_from`, see `vaezip.training.warmstart`).

SIGINT (Ctrl-C) or SIGTERM (`timeout`, a scheduler's pre-emption) ends a run as its time
limit does: after the current step, with the final evaluation, the checkpoint and the
outputs (`_StopSignals`); a second signal interrupts at once.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import platform
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from vaezip.errors import InputError, OutputExistsError, VaezipError
from vaezip.files import atomic_write
from vaezip.network.config import ModelConfig, unknown_keys
from vaezip.network.model import HALO, RING_EVALUATION_NEIGHBOURS, HierarchicalVAE, random_ring_mask, ring_mask
from vaezip.training import bankfile
from vaezip.training import data as datasets
from vaezip.training.warmstart import remap_pixel_steps, source_state, warm_start

CHECKPOINT_FORMAT = "vaezip-train-checkpoint-1"
EVAL_SEED = 20240601  # fixed, so held-out crops and eval noise match across runs
HELDOUT_FRACTION = 0.05  # share of the images carved off when no held-out set is named
PRECISIONS = ("fp32", "bf16")
FLOAT32_LAYERS = ("head",)  # convolutions kept in float32 under bf16 (their outputs are mixture parameters)
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 seeds its crops and latent noise with seed + r * this


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
        lr_scales: (name pattern, factor) pairs: parameters whose name matches a pattern
            (`re.match`, first match) train at that multiple of the learning rate
            (`parameter_groups`), e.g. new layers faster than warm-started ones.
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
        checkpoint_seconds: also write OUT.ckpt every this many seconds.
        precision: "fp32", or "bf16" (CUDA only: autocast for the convolutions,
            float32 for everything else; evaluation always float32).
        channels_last: keep weights and activations in channels-last layout.
        compile: run the training step's model through `torch.compile`.
        init_from: start a fresh run from these weights (a registered model
            name, OUT.pt or OUT.ckpt) by `warmstart.warm_start`.
        campaign: the name of the campaign this run belongs to (recorded).
    """

    config: ModelConfig = field(default_factory=ModelConfig)
    data: tuple[str, ...] = ("photos",)
    heldout: Optional[str] = None
    data_limit: Optional[int] = None
    crop: int = 64
    batch: int = 16
    steps: int = 20000
    lr: float = 5e-4
    lr_scales: tuple[tuple[str, float], ...] = ()
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
    checkpoint_seconds: Optional[float] = None
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    init_from: Optional[str] = None
    campaign: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = (self.data,)
        self.data = tuple(self.data)
        self.lr_scales = tuple((str(pattern), float(scale)) for pattern, scale in self.lr_scales)
        if not self.data:
            raise InputError("no training data given")
        for name in ("crop", "batch", "steps", "eval_every", "eval_crops", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.crop % self.config.downsampling:
            raise InputError(f"crop {self.crop} is not a multiple of the model's downsampling {self.config.downsampling}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["data"] = list(self.data)
        out["lr_scales"] = [list(pair) for pair in self.lr_scales]
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
    """torch.save `obj` to `path` whole or not at all (`files.atomic_write`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _describe_data(specs: tuple[str, ...]) -> list[str]:
    out = []
    for spec in specs:
        if spec == "photos":
            out += [s.describe() for s in datasets.default_photo_sources()]
        elif spec in datasets.NAMED_SPECS:
            out.append(f"{spec}: {datasets.NAMED_SPECS[spec]}")
        elif re.sub(r":heldout$", "", spec).endswith(".npz") and bankfile.is_photo_bank(re.sub(r":heldout$", "", spec)):
            spec = re.sub(r":heldout$", "", spec)
            out.append(f"{spec}: {bankfile.describe_photo_bank(spec)}")
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


def crop_side(options: TrainOptions) -> int:
    """Side of the crops a run cuts: the tile, with a `pixel_halo` model's two-pixel ring around it."""
    return options.crop + (4 * HALO if options.config.pixel_halo else 0)


def _heldout_crops(images: list[np.ndarray], options: TrainOptions) -> torch.Tensor:
    """Fixed evaluation crops (n, C, S, S) uint8 (`crop_side`), the same for every run with this side."""
    array = datasets.evaluation_crops(images, crop_side(options), options.eval_crops, EVAL_SEED)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


@torch.no_grad()
def evaluate_bpd(model: HierarchicalVAE, crops: torch.Tensor, batch: int, device: torch.device,
                 ring: bool = False) -> float:
    """-ELBO of `crops` (n, C, S, S) uint8 in bits per subpixel, with fixed latent noise
    (the global RNG is forked, so training's random stream is untouched). float32; the
    model's train/eval mode is left as it was (a cached registry model stays in eval).

    ring: the crops carry a two-pixel ring around the tile; a `pixel_halo` model reads it
    with RING_EVALUATION_NEIGHBOURS there, any other model codes the tile alone. Bits are
    per subpixel of the tile."""
    was_training = model.training
    model.eval()
    total = 0.0
    margin = 2 * HALO if ring else 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        for start in range(0, len(crops), batch):
            x = crops[start : start + batch].to(device)
            available = None
            if ring and model.config.pixel_halo:
                half = (x.shape[-1] - 2 * margin) // 2
                neighbours = torch.tensor(RING_EVALUATION_NEIGHBOURS, device=device).expand(len(x), 3, 3)
                available = ring_mask(neighbours, half, half)
            elif ring:
                x = x[..., margin:-margin, margin:-margin]
            total += float(model.nelbo(x, available=available).nelbo_bits.double().sum())
    model.train(was_training)
    inner = crops.shape[-1] - 2 * margin
    return total / (crops.shape[0] * crops.shape[1] * inner * inner)


def _update_ema(ema: HierarchicalVAE, model: HierarchicalVAE, decay: float) -> None:
    """EMA of the floating-point tensors in one fused call per list (few kernels on a GPU)."""
    with torch.no_grad():
        pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
        floats = [(e, p) for e, p in pairs if e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - decay)
        for e, p in pairs:
            if not e.dtype.is_floating_point:
                e.copy_(p)


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Ranks:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """Rank 0 keeps `seed` (a one-process run is unchanged); the others get their own."""
        return seed + self.rank * RANK_SEED_STRIDE


def _ranks_from_env() -> _Ranks:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them."""
    try:
        return _Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise VaezipError(f"bad torchrun environment: {exc}") from None


def _start_distributed(ranks: _Ranks, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU); True if this call started it."""
    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _gather(obj, ranks: _Ranks) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


class _StopSignals:
    """SIGINT and SIGTERM while training: `received` names the first, and the loop stops after
    its current step as at the time limit. The handlers are installed only in the main thread
    (where Python delivers signals) and give the previous ones back on the first signal, so a
    second signal acts at once (Ctrl-C again: KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def _agree(flags: list[bool], ranks: _Ranks, device: torch.device) -> list[bool]:
    """Rank 0's decisions (stop, checkpoint: they depend on its clock) on every rank."""
    if not ranks.distributed:
        return flags
    import torch.distributed as dist

    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.broadcast(tensor, 0)
    return [bool(v) for v in tensor.tolist()]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes): equal weights, equal hash."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------- run


@dataclass
class _Data:
    """Training images, their crop sampler (on the device) and the fixed held-out crops."""

    images: list[np.ndarray]
    sampler: datasets.TensorCrops
    eval_crops: torch.Tensor
    heldout_text: str


def _setup_data(options: TrainOptions, device: torch.device, ranks: _Ranks, log: Callable[[str], None]) -> _Data:
    t_load = time.monotonic()
    images, heldout_images, heldout_text = _load_data(options)
    sampler = datasets.TensorCrops(images, crop_side(options), device=device, seed=ranks.seed(options.seed))
    data = _Data(images, sampler, _heldout_crops(heldout_images, options).to(device), heldout_text)
    log(
        f"data: {len(images)} training images, {sum(im.shape[0] * im.shape[1] for im in images) / 1e6:.1f} Mpx "
        f"({sampler.pixels.numel() / 1e6:.1f} MB on {device}); "
        f"held-out: {heldout_text}, {len(data.eval_crops)} crops of {crop_side(options)}; "
        f"loaded in {time.monotonic() - t_load:.1f} s; device {hardware_name(device)}"
        + (f"; {ranks.world} ranks" if ranks.distributed else "")
    )
    return data


@dataclass
class _RunState:
    """Everything a checkpoint restores: weights, optimiser, counters, the held-out curve
    (rows [step, mean train bpd, held-out bpd]) and one row per invocation (`sessions`)."""

    model: HierarchicalVAE
    ema: HierarchicalVAE
    optimizer: torch.optim.Optimizer
    step: int = 0
    crops_seen: int = 0
    skipped: int = 0
    elapsed_before: float = 0.0
    curve: list[list[float]] = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)
    warm_start: Optional[dict] = None


def _new_run(options: TrainOptions, device: torch.device, log: Callable[[str], None]) -> _RunState:
    """A seeded fresh model (warm-started from `options.init_from`), its EMA copy and AdamW."""
    torch.manual_seed(options.seed)
    model = HierarchicalVAE(options.config)
    warm, sessions = None, []
    if options.init_from is not None and options.resume is None:
        state, source = source_state(options.init_from)
        report = warm_start(model, remap_pixel_steps(state, model.schedule))
        log(f"{report.summary()} from {source}")
        warm = {"from": source, **report.to_dict()}
        sessions = _earlier_sessions(options.init_from)
    model = model.to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(parameter_groups(model, options.lr_scales), lr=options.lr, betas=(0.9, 0.99),
                                  weight_decay=options.weight_decay, **fused)
    return _RunState(model, ema, optimizer, sessions=sessions, warm_start=warm)


def parameter_groups(model: torch.nn.Module, lr_scales: tuple[tuple[str, float], ...]) -> list[dict]:
    """AdamW parameter groups: a parameter whose name matches (`re.match`) the first pattern of
    `lr_scales` trains at that multiple of the learning rate, the others at 1x (groups in
    the order of the patterns, then the rest; empty groups left out)."""
    groups: dict[float, list] = {}
    order = [scale for _, scale in lr_scales] + [1.0]
    for name, parameter in model.named_parameters():
        scale = next((s for pattern, s in lr_scales if re.match(pattern, name)), 1.0)
        groups.setdefault(scale, []).append(parameter)
    return [{"params": groups[s], "lr_scale": s} for s in dict.fromkeys(order) if s in groups]


CALIBRATION_CROPS = 256
"""Training crops whose ranges set a new fixed-point model's activation scales."""


def _calibrate_fixed(run: _RunState, data: _Data, options: TrainOptions, log: Callable[[str], None]) -> None:
    """A new fixed-point run: activation scales from the (warm-started) float layers' ranges on
    training crops (`HierarchicalVAE.calibrate_fixed`), the same in the EMA copy; a run
    warm-started from a fixed-point model keeps that model's scales (a new layer whose grids
    the wiring derives, e.g. a stage-0 step's context, is wired to them)."""
    new = run.warm_start.get("new", []) if run.warm_start is not None else None
    if new is not None and not run.model.calibrated_scales() & set(new):
        run.model.wire_fixed()
        run.ema.load_state_dict(run.model.state_dict())
        log("fixed point: activation scales kept from the warm-start model")
        return
    t = time.monotonic()
    batches = [data.sampler.sample(options.batch) for _ in range(max(1, CALIBRATION_CROPS // options.batch))]
    if options.config.pixel_halo:  # the ranges of the tiles, without their rings
        batches = [b[..., 2 * HALO : -2 * HALO, 2 * HALO : -2 * HALO] for b in batches]
    run.model.calibrate_fixed(batches)
    run.ema.load_state_dict(run.model.state_dict())
    log(f"fixed point: activation scales from {len(batches) * options.batch} training crops "
        f"in {time.monotonic() - t:.0f} s")


def _earlier_sessions(source: str) -> list[dict]:
    """The `sessions` of the run whose weights `source` (OUT.pt beside OUT.json) are,
    each marked as before this warm start; [] for a registered model or no record."""
    record = output_paths(source)[1]
    if not source.endswith(".pt") or not record.is_file():
        return []
    try:
        earlier = json.loads(record.read_text()).get("training", {}).get("sessions", [])
    except (OSError, ValueError):
        return []
    return [{**row, "before_warm_start": True} for row in earlier if isinstance(row, dict)]


def _rank_state(sampler: datasets.TensorCrops, device: torch.device) -> dict:
    """The random streams of one rank: crops, latent noise (CPU and CUDA generators)."""
    return {"sampler": sampler.state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _resume(run: _RunState, sampler: datasets.TensorCrops, options: TrainOptions, device: torch.device,
            ranks: _Ranks, log: Callable[[str], None]) -> None:
    """Restore `run`, the sampler and the RNGs from the checkpoint `options.resume`."""
    state = load_checkpoint(options.resume, device)
    saved = TrainOptions.from_dict(state["options"])
    if saved.config != options.config:
        raise VaezipError(f"{options.resume} was trained with a different model config")
    run.model.load_state_dict(state["model"], strict=True)
    run.ema.load_state_dict(state["ema"], strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.crops_seen, run.skipped = int(state["step"]), int(state["crops_seen"]), int(state["skipped"])
    run.elapsed_before = float(state["elapsed_s"])
    run.curve = [list(row) for row in state["curve"]]
    run.sessions = list(state.get("sessions", []))
    if state.get("open_session"):  # that session was killed after this checkpoint: its row ends here
        run.sessions.append({**state["open_session"], "note": "ended without writing its outputs (killed); "
                                                               "its row runs to its last checkpoint"})
    run.warm_start = state.get("warm_start")
    rank_states = state.get("rank_states") or []
    if len(rank_states) == ranks.world:
        mine = rank_states[ranks.rank]
        sampler.state = mine["sampler"]
        torch.set_rng_state(mine["torch_rng"].cpu())
        if device.type == "cuda" and mine.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(mine["cuda_rng"].cpu(), device)
    else:  # another number of ranks (or an older checkpoint): fresh streams, never a repeated one
        sampler.generator.manual_seed(ranks.seed(options.seed) + 7919 * run.step)
        torch.manual_seed(ranks.seed(options.seed) + 7919 * run.step)
        log(f"{options.resume} was written by {len(rank_states) or 'an unknown number of'} ranks, this run has "
            f"{ranks.world}: crop and noise streams restart from new seeds")


def _session_row(options: TrainOptions, device: torch.device, ranks: _Ranks, steps: list[int], seconds: float,
                 crops: int) -> dict:
    """One invocation's row of the training record's `sessions`."""
    return {
        "steps": steps, "seconds": round(seconds, 1), "crops_per_s": round(crops / max(seconds, 1e-9), 1),
        "data": list(options.data),
        "hardware": hardware_name(device), "ranks": ranks.world, "batch_per_rank": options.batch,
        "precision": options.precision, "channels_last": options.channels_last, "compile": options.compile,
        "torch_version": str(torch.__version__),
    }


def _save_checkpoint(run: _RunState, sampler: datasets.TensorCrops, options: TrainOptions, device: torch.device,
                     ranks: _Ranks, elapsed_s: float, path: Path, open_session: Optional[dict] = None) -> None:
    """Rank 0 writes OUT.ckpt with every rank's random streams; every rank must call this.
    `open_session`: the row of the session still running (a resume of a run killed after
    this checkpoint closes it), None once its row is in `run.sessions`."""
    rank_states = _gather(_rank_state(sampler, device), ranks)
    if not ranks.writer:
        return
    _atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "options": options.to_dict(),
            "step": run.step,
            "model": run.model.state_dict(),
            "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "rank_states": rank_states,
            "crops_seen": run.crops_seen,
            "skipped": run.skipped,
            "elapsed_s": elapsed_s,
            "curve": run.curve,
            "sessions": run.sessions,
            "open_session": open_session,
            "warm_start": run.warm_start,
        },
        path,
    )


class _Objective(torch.nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel and
    `torch.compile` see one call: (rate-weighted loss, -ELBO bits per image)."""

    def __init__(self, model: HierarchicalVAE, dims: int):
        super().__init__()
        self.model, self.dims = model, dims

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        available = None
        if self.model.config.pixel_halo:  # x carries the ring: random neighbours there
            half = (x.shape[-1] - 4 * HALO) // 2
            available = random_ring_mask(x.shape[0], half, half, device=x.device)
        terms = self.model.nelbo(x, available=available)
        loss = (terms.recon_bits + beta * terms.kl_bits.sum(1)).mean() / self.dims
        return loss, terms.nelbo_bits.detach()


def _float_outputs(module, inputs, output):
    """Forward hook: a bf16 convolution hands float32 on, so that only the convolutions
    run in bf16 and the residual sums, Gaussians and the pixel likelihood stay float32."""
    return output.float() if output.dtype == torch.bfloat16 else output


def _float32_forward(layer: torch.nn.Module, device_type: str) -> None:
    """Run `layer` in float32 even inside autocast (its outputs are distribution parameters)."""
    inner = layer.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, enabled=False):
            return inner(x.float())

    layer.forward = forward


def _precision_context(options: TrainOptions, device: torch.device, model: HierarchicalVAE) -> Callable:
    """A context factory for the training forward pass.

    fp32: nothing (TF32 matmuls on CUDA). bf16 (CUDA only): autocast; every convolution
    computes in bf16 and hands float32 on, except those named in `FLOAT32_LAYERS` (the
    layers that output mixture parameters), which run in float32. Measured on
    photo-rgb-1 and 64 held-out crops (CPU autocast): -ELBO +0.009 bpd against
    float32, where plain autocast costs +0.034. Evaluation is always float32.
    """
    if options.precision == "fp32":
        return nullcontext
    if device.type != "cuda":
        raise InputError("precision bf16 needs a CUDA device (on a CPU, train in fp32)")
    return bf16_layers(model, device.type)


def bf16_layers(model: torch.nn.Module, device_type: str) -> Callable:
    """Prepare `model`'s convolutions for bf16 autocast as `_precision_context` describes
    (in place; use a copy for evaluation) and return the autocast context factory."""
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Conv2d):
            if name.rsplit(".", 1)[-1] in FLOAT32_LAYERS:
                _float32_forward(layer, device_type)
            else:
                layer.register_forward_hook(_float_outputs)
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)


def _train_step(run: _RunState, objective: torch.nn.Module, autocast: Callable, x: torch.Tensor,
                options: TrainOptions, lr: float, beta: float) -> tuple[float, bool]:
    """One optimiser step on the crops x at learning rate `lr` and KL weight `beta`.

    Returns:
        -ELBO of the batch in bits per subpixel (this rank's crops), and whether the
        update was applied (skipped when the gradient norm, identical on every rank
        after DDP's averaging, is not finite or too large). One host sync per step.
    """
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # a checkpoint from before lr_scales has none
    with autocast():
        loss, nelbo_bits = objective(x, torch.tensor(beta, device=x.device))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), options.grad_clip)
    dims = options.config.channels * options.crop * options.crop
    grad_norm, train_bpd = torch.stack([grad_norm.float(), nelbo_bits.float().mean() / dims]).tolist()
    if math.isfinite(grad_norm) and grad_norm <= options.skip_threshold:
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
        """Crops per second (all ranks)."""
        return self.crops / max(time.monotonic() - self.start, 1e-9)

    def mean_bpd(self) -> float:
        return self.bpd / self.steps if self.steps else float("nan")


def _eval_line(run: _RunState, options: TrainOptions, window: _Window, heldout_bpd: float,
               before: str, after: str) -> str:
    """The log line of an evaluation: step, training and held-out bpd, with `before` and `after` inserted."""
    return (f"step {run.step}/{options.steps}  {before}train {window.mean_bpd():.4f} bpd  "
            f"held-out {heldout_bpd:.4f} bpd (EMA){after}")


def _write_outputs(run: _RunState, data: _Data, options: TrainOptions, device: torch.device, ranks: _Ranks,
                   wall: float, heldout_bpd: float, weights_path: Path, record_path: Path,
                   rank_weights: list[str]) -> None:
    """OUT.pt (the EMA weights) and OUT.json (config and the record of the run)."""
    _atomic_save({k: v.detach().cpu().contiguous().clone() for k, v in run.ema.state_dict().items()}, weights_path)
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
            "batch": options.batch * ranks.world,
            "crop": options.crop,
            "skipped_updates": run.skipped,
            "wall_time_s": round(wall, 1),
            "hardware": hardware_name(device) + (f" x {ranks.world} ranks" if ranks.distributed else ""),
            "torch_version": torch.__version__,
            "final_heldout_bpd": heldout_bpd,
            "heldout_bpd_meaning": "-ELBO bits per subpixel of the held-out crops, EMA weights, 1 latent sample",
            "curve": [[v if isinstance(v, int) or math.isfinite(v) else None for v in row] for row in run.curve],
            "sessions": run.sessions,
            "options": options.to_dict(),
        },
    }
    if options.campaign:
        record["training"]["campaign"] = options.campaign
    if run.warm_start:
        record["training"]["warm_start"] = run.warm_start
    if ranks.distributed:
        record["training"]["rank_weights_sha256"] = rank_weights
    with atomic_write(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")


def train(
    options: TrainOptions,
    progress: Optional[Callable[[TrainEvent], None]] = None,
    *,
    log: Optional[Callable[[str], None]] = _log_stdout,
    overwrite: bool = False,
) -> TrainResult:
    """Run (or resume) training as `options` says; see the module docstring.

    Under torchrun (WORLD_SIZE > 1) every rank calls this with the same options;
    `options.batch` is per rank, rank 0 alone logs, evaluates and writes, and the
    others return a result whose `heldout_bpd` is nan.

    Args:
        options: the run; `options.resume` names a checkpoint to continue,
            whose config must equal `options.config`.
        progress: called with a `TrainEvent` after every step and event (rank 0).
        log: receives one line per evaluation / checkpoint (default: stdout, flushed; rank 0).
        overwrite: allow replacing existing OUT.pt / OUT.ckpt of a fresh run.
    """
    ranks = _ranks_from_env()
    log = (log or (lambda line: None)) if ranks.writer else (lambda line: None)
    progress = progress if ranks.writer else None
    weights_path, record_path, ckpt_path = output_paths(options.out)
    if options.resume is None and not overwrite and ranks.writer:
        for path in (weights_path, ckpt_path):
            if path.exists():
                raise OutputExistsError(f"{path} exists: resume it or allow overwriting")
    device = resolve_device(options.device)
    if device.type == "cuda" and ranks.distributed and device.index is None:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started_group = _start_distributed(ranks, device)
    try:
        result = _train(options, progress, log, ranks, device, weights_path, record_path, ckpt_path)
        if started_group:  # every rank done before the group goes: gloo aborts a rank whose peer left first
            import torch.distributed as dist

            # DDP's reducer sits in reference cycles that hold the group: free them now, so that
            # destroying the group joins gloo's threads here and not during interpreter shutdown
            # (a rank aborted there once: "terminate called without an active exception").
            gc.collect()
            dist.barrier()
        return result
    finally:
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(options: TrainOptions, progress, log, ranks: _Ranks, device: torch.device,
           weights_path: Path, record_path: Path, ckpt_path: Path) -> TrainResult:
    data = _setup_data(options, device, ranks, log)
    run = _new_run(options, device, log)
    if options.config.fixed_bits is not None and options.resume is None:
        _calibrate_fixed(run, data, options, log)
    if options.resume is not None:
        _resume(run, data.sampler, options, device, ranks, log)
        log(f"resumed from {options.resume} at step {run.step}")
    elif ranks.rank:
        torch.manual_seed(ranks.seed(options.seed))  # this rank's own latent noise

    objective: torch.nn.Module = _Objective(run.model, options.config.channels * options.crop * options.crop)
    autocast = _precision_context(options, device, run.model)
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if options.compile:
        objective = torch.compile(objective)

    heldout_bpd = run.curve[-1][2] if run.curve else None
    start = time.monotonic()
    last_checkpoint = start
    window = _Window()
    lr = learning_rate(options, run.step)
    first_step, first_crops = run.step, run.crops_seen

    def elapsed() -> float:
        return run.elapsed_before + time.monotonic() - start

    def emit(kind: str, train_bpd: float, rate: float) -> None:
        if progress is not None:
            progress(TrainEvent(kind, run.step, options.steps, train_bpd, heldout_bpd, rate, lr, elapsed(), run.skipped))

    def evaluate() -> float:
        """Held-out -ELBO of the EMA weights, added to the curve (rank 0; nan elsewhere)."""
        if not ranks.writer:
            return float("nan")
        bpd = evaluate_bpd(run.ema, data.eval_crops, options.batch, device, ring=options.config.pixel_halo)
        run.curve.append([run.step, window.mean_bpd(), bpd])
        return bpd

    train_bpd, rate = float("nan"), 0.0
    last_eval_step = run.step if run.curve and run.curve[-1][0] == run.step else -1
    run.model.train()
    with _StopSignals() as signals:  # until the outputs are written: a first signal never cuts them short
        while run.step < options.steps:
            now = time.monotonic()
            stop = (options.time_limit is not None and now - start >= options.time_limit) or (
                options.stop_step is not None and run.step >= options.stop_step) or signals.received is not None
            due = options.checkpoint_seconds is not None and now - last_checkpoint >= options.checkpoint_seconds
            stop, due = _agree([stop, due], ranks, device)
            if stop:
                if signals.received is not None:
                    log(f"{signals.received} received: stopped at step {run.step}, writing the outputs")
                elif options.time_limit is not None and now - start >= options.time_limit:
                    log(f"time limit of {options.time_limit:g} s reached at step {run.step}")
                break
            run.step += 1
            lr = learning_rate(options, run.step, now - start)
            beta = kl_weight(options, run.step)
            x = data.sampler.sample(options.batch)
            train_bpd, applied = _train_step(run, objective, autocast, x, options, lr, beta)
            if applied:
                window.bpd += train_bpd
                window.steps += 1
            run.crops_seen += options.batch * ranks.world
            window.crops += options.batch * ranks.world
            rate = window.rate()
            emit("step", train_bpd, rate)

            if run.step % options.eval_every == 0 or run.step == options.steps:
                heldout_bpd = evaluate()
                last_eval_step = run.step
                log(_eval_line(run, options, window, heldout_bpd, f"{rate:.1f} crops/s  ",
                               f"  lr {lr:.2e}  kl weight {beta:.2f}  skipped {run.skipped}  {elapsed():.0f} s"))
                emit("eval", train_bpd, rate)
                window = _Window()
            if run.step % options.checkpoint_every == 0 or due:
                running = _session_row(options, device, ranks, [first_step, run.step], time.monotonic() - start,
                                       run.crops_seen - first_crops)
                _save_checkpoint(run, data.sampler, options, device, ranks, elapsed(), ckpt_path, running)
                last_checkpoint = time.monotonic()
                emit("checkpoint", train_bpd, rate)

        seconds = time.monotonic() - start  # training only: the final evaluation is not in crops/s
        if last_eval_step != run.step:
            heldout_bpd = evaluate()
            log(_eval_line(run, options, window, heldout_bpd, "", "  final"))
        if run.step > first_step or not run.sessions:  # a resume that only writes the outputs adds no row
            row = _session_row(options, device, ranks, [first_step, run.step], seconds, run.crops_seen - first_crops)
            run.sessions.append({**row, "note": f"stopped by {signals.received}"} if signals.received else row)
        _save_checkpoint(run, data.sampler, options, device, ranks, elapsed(), ckpt_path)
        rank_weights = _gather(weights_sha256(run.model), ranks)
        if len(set(rank_weights)) != 1:
            raise VaezipError(f"ranks diverged: their weights differ ({rank_weights})")
        wall = elapsed()
        if ranks.writer:
            _write_outputs(run, data, options, device, ranks, wall, heldout_bpd, weights_path, record_path, rank_weights)
            log(f"wrote {weights_path} (EMA weights), {record_path}, {ckpt_path}")
        emit("done", train_bpd, rate)
    return TrainResult(weights_path, record_path, ckpt_path, run.step, float(heldout_bpd), wall)
