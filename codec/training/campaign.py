"""Training campaigns: one command that continues a model's training from what the
repository holds, for the time a session has, on whatever device it has.

    vaezip train --campaign gen2 --prepare                      # CPU: bank + 2-step smoke run
    vaezip train --campaign gen2 --seconds 540 --device cuda    # the device session
    vaezip registry add photo-rgb-2 runs/gen2.pt runs/gen2.json RGB --only-if-better-than photo-rgb-1

A campaign run continues, in this order: the checkpoint OUT.ckpt if it is there
(left by a background CPU run, or carried); else the weights OUT.pt of an earlier
session of this campaign (a device session brings back OUT.pt and OUT.json: a
checkpoint is larger than what comes back from the device); else the newest
registered model that an earlier run of this campaign produced; else the
campaign's base model. Starting from weights is a warm start (`vaezip.training.warmstart`:
fresh optimiser, learning-rate warm-up, the earlier sessions kept in the record),
so a new architecture in `Campaign.config` also begins where the old model
stands. Run it from the repository root: the bank lives in the ignored `.carry/`
folder there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from vaezip.errors import InputError, VaezipError
from vaezip.network.config import ModelConfig
from vaezip.training import bank as photo_bank
from vaezip.training import bankfile
from vaezip.training import data as datasets


@dataclass(frozen=True)
class Campaign:
    """A named, resumable training run.

    Attributes:
        name: recorded in every training record it writes ("campaign").
        base_model: registered model to warm-start from when nothing newer exists.
        bank: photo bank path, relative to the repository root: the bank that travels
            (a device session carries it, so it is built to the upload budget).
        recipe: builds the bank's `BankRecipe` (from `data.data_root()`).
        local_bank, local_recipe: the bank a CPU session trains on instead, where the data
            is: the same sources and held-out crops in larger windows (it never travels;
            built on the first CPU session that finds it missing). None: `bank`.
        config: the architecture to train; None: the starting model's own.
        stage0_levels: if set, the starting model's architecture with stage 0 split this
            many levels (`ModelConfig.stage0_levels`; the new steps warm-start as copies
            of its stage-0 module, `warmstart.remap_pixel_steps`).
        pixel_halo: if set, the starting model's architecture with this `ModelConfig.pixel_halo`
            (the same tensors: a model without the ring reads it as empty).
        batch, precision, channels_last: per device type ("cuda", "cpu").
        lr_scales: per-parameter multiples of `lr` (`TrainOptions.lr_scales`).
        lr, warmup_steps, steps: peak learning rate, warm-up (of a fresh start only)
            and the horizon of the step schedule; each session's `--seconds` also ends
            a cosine cycle, so every session decays its learning rate by its end.
    """

    name: str
    base_model: str
    bank: str
    recipe: Callable[[], photo_bank.BankRecipe]
    local_bank: Optional[str] = None
    local_recipe: Optional[Callable[[], photo_bank.BankRecipe]] = None
    config: Optional[ModelConfig] = None
    stage0_levels: Optional[int] = None
    pixel_halo: Optional[bool] = None
    crop: int = 64
    batch: dict = field(default_factory=lambda: {"cuda": 512, "cpu": 16})
    precision: dict = field(default_factory=lambda: {"cuda": "bf16", "cpu": "fp32"})
    channels_last: dict = field(default_factory=lambda: {"cuda": True, "cpu": True})
    lr: float = 5e-4
    lr_scales: tuple[tuple[str, float], ...] = ()
    warmup_steps: int = 200
    steps: int = 1_000_000
    eval_every: int = 500
    eval_crops: int = 256
    checkpoint_every: int = 2000
    checkpoint_seconds: float = 120.0


GEN2_BANKS = dict(bank=".carry/photos-gen2.npz", recipe=photo_bank.gen2_bank_recipe,
                  local_bank="runs/photos-gen2-local.npz",
                  local_recipe=partial(photo_bank.gen2_bank_recipe, window_scale=3.0))
"""The generation-2 photo banks: 12.7 Mpx in windows that fit the device upload (18 MiB),
and for CPU sessions the same sources in 3x larger windows (102.1 Mpx in 130 MB, nearly every
pixel of photos2 and BSDS500: 8x the pixels, the same held-out crops)."""

CAMPAIGNS = {
    "gen2": Campaign("gen2", base_model="photo-rgb-1", **GEN2_BANKS),
    # the gray model on the same bank, converted to gray (Pillow's luma) as it is read
    "gen2-gray": Campaign("gen2-gray", base_model="photo-gray-1", **GEN2_BANKS),
    # the fixed-point photo model (format version 6) trained on: float32 on every device, since
    # bf16 and TF32 would train other arithmetic than the exact one it codes with. lr 1e-4 moved
    # the held-out -ELBO by 0.002 in 1,000 CPU steps (3.3626 -> 3.3607); the float gen2 run was
    # still falling 0.03 a 1,000 steps at 5e-4, so the sessions run at 2.5e-4
    "gen2-exact": Campaign("gen2-exact", base_model="photo-rgb-exact-1", **GEN2_BANKS, lr=2.5e-4,
                           warmup_steps=100, precision={"cuda": "fp32", "cpu": "fp32"}),
    # generation 2's pixel decoder: stage 0 coded in a level of 2x2 sub-lattice steps (1/16
    # of the pixels from the latents alone), from the fixed-point photo model. At 2.5e-4 the
    # restart cost the held-out -ELBO 0.035 in 500 steps (3.3117 -> 3.3469, as gen2-exact's
    # restart did); at 1e-4 there is no such bump, but the new context layers learnt slowly:
    # the stage-0 steps train 3x faster and their context layers 10x. Its first sessions
    # trained two levels (1/64 from the latents); a second level saved 0.1 % of the pixel
    # bits for 14 % more decode time, so `photo-rgb-pyramid-1` keeps one (docs/RESULTS.md)
    "gen2-pyramid": Campaign("gen2-pyramid", base_model="photo-rgb-exact-2", **GEN2_BANKS,
                             stage0_levels=1, lr=1e-4, warmup_steps=100,
                             lr_scales=((r"stages\.[0-3]\.context\.", 10.0), (r"stages\.[0-3]\.", 3.0)),
                             precision={"cuda": "fp32", "cpu": "fp32"}),
    # the same decoder for the fixed-point gray model, on the bank read as gray
    "gen2-gray-pyramid": Campaign("gen2-gray-pyramid", base_model="photo-gray-exact-1", **GEN2_BANKS,
                                  stage0_levels=1, lr=1e-4, warmup_steps=100,
                                  lr_scales=((r"stages\.[0-3]\.context\.", 10.0), (r"stages\.[0-3]\.", 3.0)),
                                  precision={"cuda": "fp32", "cpu": "fp32"}),
    # the RGB default's pixel steps reading the ring of neighbouring pixels around each tile
    # (format version 8, issue 15's tile edges); the layers that read the ring start at zero and
    # learn 10x faster. A first try read the ring with the context layers themselves: it started
    # far above the model without a ring and was still 1.9 % above it after 500 steps.
    "gen2-halo": Campaign("gen2-halo", base_model="photo-rgb-pyramid-1", **GEN2_BANKS,
                          stage0_levels=1, pixel_halo=True, lr=1e-4,
                          warmup_steps=100, lr_scales=((r"stages\.\d+\.ring\.", 10.0),),
                          precision={"cuda": "fp32", "cpu": "fp32"}),
    # the same ring for the gray model
    "gen2-gray-halo": Campaign("gen2-gray-halo", base_model="photo-gray-pyramid-1", **GEN2_BANKS,
                               stage0_levels=1, pixel_halo=True, lr=1e-4,
                               warmup_steps=100, lr_scales=((r"stages\.\d+\.ring\.", 10.0),),
                               precision={"cuda": "fp32", "cpu": "fp32"}),
}


def get_campaign(name: str) -> Campaign:
    try:
        return CAMPAIGNS[name]
    except KeyError:
        raise InputError(f"unknown campaign {name!r} (known: {', '.join(CAMPAIGNS)})") from None


def starting_model(campaign: Campaign) -> str:
    """The newest registered model an earlier run of `campaign` produced (and whose
    config is the campaign's, if it names one), else its base model."""
    from vaezip.network import registry

    newest = campaign.base_model
    for spec in registry.specs().values():
        if spec.training.get("campaign") == campaign.name and campaign.config in (None, spec.config) \
                and campaign.stage0_levels in (None, spec.config.stage0_levels) \
                and campaign.pixel_halo in (None, spec.config.pixel_halo):
            newest = spec.name
    return newest


def training_bank(campaign: Campaign, kind: str, log: Callable[[str], None] = print) -> str:
    """The bank a session on a device of type `kind` trains on: on the CPU the campaign's
    `local_bank`, built here if it is missing and the shared data is there (minutes); else,
    and on every other device, the bank that travels."""
    local = campaign.local_bank
    if kind != "cpu" or local is None:
        return campaign.bank
    if not Path(local).is_file():
        if not datasets.data_root().is_dir():
            log(f"{local} is missing and {datasets.data_root()} is not there: training on {campaign.bank}")
            return campaign.bank
        log(f"building {local}, the bank CPU sessions train on, from {datasets.data_root()} ...")
        photo_bank.build_photo_bank(local, campaign.local_recipe(), log=log)
    return local


def campaign_options(name: str, *, seconds: Optional[float], device: str = "auto", out: Optional[str] = None,
                     local_bank: bool = True, log: Callable[[str], None] = print, **overrides):
    """The `TrainOptions` of the next session of campaign `name`.

    Args:
        seconds: this session's time limit (None: until `steps`).
        device: "auto", "cpu", "cuda", ...; picks the per-device batch, precision and bank.
        out: output path (default runs/NAME); OUT.ckpt, if present, is resumed (on the
            bank this device trains on: a session may read another bank than the last).
        local_bank: False: train on the travelling bank on the CPU too (`training_bank`).
        overrides: TrainOptions fields to set (batch, precision, compile, stop_step, ...).
    """
    from vaezip.training.train import TrainOptions, checkpoint_options, output_paths, resolve_device

    campaign = get_campaign(name)
    out = out or f"runs/{campaign.name}"
    kind = resolve_device(device).type
    per_device = {"batch": campaign.batch[kind], "precision": campaign.precision[kind],
                  "channels_last": campaign.channels_last[kind]}
    bank = training_bank(campaign, kind, log) if local_bank else campaign.bank
    weights, record, checkpoint = output_paths(out)
    if checkpoint.exists():
        options = checkpoint_options(checkpoint)
        if options.campaign != campaign.name:
            raise VaezipError(f"{checkpoint} is not a checkpoint of campaign {campaign.name}")
        if options.data != (bank,):  # the banks hold the same held-out crops
            log(f"this session trains on {bank} ({checkpoint} was trained on {', '.join(options.data)})")
            options = replace(options, data=(bank,), heldout=bank + ":heldout")
        options = replace(options, resume=str(checkpoint), out=out, device=device, time_limit=seconds,
                          stop_step=None, checkpoint_seconds=campaign.checkpoint_seconds, **per_device)
    else:
        if not Path(bank).is_file():
            raise InputError(f"{bank} is missing: build it with `vaezip train --campaign {name} --prepare` "
                             "(needs the shared data) or carry it along")
        from vaezip.network.registry import get_spec, read_record

        if weights.is_file() and record.is_file() and read_record(record).get("training", {}).get("campaign") == name:
            start = str(weights)  # the weights an earlier session brought back, its checkpoint left behind
            config = campaign.config or ModelConfig.from_dict(read_record(record)["config"])
        else:
            start = starting_model(campaign)
            config = campaign.config or get_spec(start).config
        if campaign.stage0_levels is not None:
            config = replace(config, stage0_levels=campaign.stage0_levels)
        if campaign.pixel_halo is not None:
            config = replace(config, pixel_halo=campaign.pixel_halo)
        options = TrainOptions(
            config=config, data=(bank,), heldout=bank + ":heldout", crop=campaign.crop,
            steps=campaign.steps, lr=campaign.lr, lr_scales=campaign.lr_scales, warmup_steps=campaign.warmup_steps,
            kl_warmup_fraction=0.0,
            eval_every=campaign.eval_every, eval_crops=campaign.eval_crops,
            checkpoint_every=campaign.checkpoint_every, checkpoint_seconds=campaign.checkpoint_seconds,
            device=device, out=out, time_limit=seconds, init_from=start, campaign=campaign.name, **per_device,
        )
    options = replace(options, **overrides)
    options.__post_init__()
    return options


DEVICE_UPLOAD_BYTES = 64 * 2**20
"""What one call of the device tool sends at most: the checkout's tracked and untracked
(not ignored) files plus the paths it is told to carry."""
UPLOAD_RESERVE_BYTES = 2**20
"""Room left for code and records that change between `--prepare` and the device call."""


def travelling_bytes(root: str | Path = ".") -> Optional[int]:
    """Bytes of the files a device call sends unasked: the tracked and the untracked, not
    ignored files of the git checkout at `root`. None outside a git checkout."""
    import os
    import subprocess

    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = (Path(root) / os.fsdecode(name) for name in set(listed.split(b"\0")) - {b""})
    return sum(p.stat().st_size for p in paths if p.is_file())


def carried_run_files(name: str) -> list[Path]:
    """The files of campaign `name` that a device call must carry besides the bank: the
    weights and record of an earlier session (runs/NAME.pt, .json), where present. A
    checkpoint (.ckpt) is left behind: it does not fit."""
    from vaezip.training.train import output_paths

    weights, record, _ = output_paths(f"runs/{get_campaign(name).name}")
    return [p for p in (weights, record) if p.is_file()]


def bank_budget(name: str, log: Callable[[str], None] = print) -> Optional[int]:
    """Bytes campaign `name`'s bank may take so that the checkout, the run files it carries
    and the bank fit one device call (None outside a git checkout: no limit known)."""
    checkout = travelling_bytes()
    if checkout is None:
        log("not in a git checkout: the bank is built without an upload budget")
        return None
    run_files = sum(p.stat().st_size for p in carried_run_files(name))
    budget = DEVICE_UPLOAD_BYTES - UPLOAD_RESERVE_BYTES - checkout - run_files
    log(f"device upload: checkout {checkout / 2**20:.1f} MiB + run files {run_files / 2**20:.1f} MiB "
        f"+ reserve {UPLOAD_RESERVE_BYTES / 2**20:.1f} MiB leave {budget / 2**20:.1f} MiB of "
        f"{DEVICE_UPLOAD_BYTES / 2**20:.0f} MiB for the bank")
    if budget <= 0:
        raise VaezipError("the checkout alone does not fit the device upload: nothing is left for a photo bank")
    return budget


def prepare(name: str, *, rebuild: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build the campaign's bank if it is missing, older, over the upload budget
    (`bank_budget`) or `rebuild`, then run two steps of the campaign's own code path on
    the CPU with a batch of 2 in a temporary folder.

    Returns:
        The bank's manifest (as in BANK.npz.json).
    """
    import json

    from vaezip.training.train import train

    campaign = get_campaign(name)
    bank = Path(campaign.bank)
    budget = bank_budget(name, log)
    reason = "--force" if rebuild else "it is missing" if not bank.is_file() else None
    if reason is None and bankfile.bank_format(bank) != bankfile.PHOTO_BANK_FORMAT:
        reason = f"it is not a {bankfile.PHOTO_BANK_FORMAT} file"
    if reason is None and budget is not None and bank.stat().st_size > budget:
        reason = f"its {bank.stat().st_size / 2**20:.1f} MiB are over the budget"
    if reason is not None:
        log(f"building {bank} from {datasets.data_root()} ({reason}) ...")
        manifest = photo_bank.build_photo_bank(bank, campaign.recipe(), log=log, max_bytes=budget)
    else:
        sidecar = bank.with_name(bank.name + ".json")
        manifest = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        loaded = bankfile.read_photo_bank(bank)
        if manifest.get("sha256") not in (None, loaded.sha256):
            raise VaezipError(f"{bank} does not match its manifest {sidecar}: rebuild it")
        log(f"{bank}: {loaded.describe()}")
    carry = [campaign.bank] + [str(p) for p in carried_run_files(name)]
    log(f"a device call carries: {' '.join(carry)}")
    with tempfile.TemporaryDirectory() as tmp:
        options = campaign_options(name, seconds=None, device="cpu", out=str(Path(tmp) / "smoke"), local_bank=False,
                                   batch=2, stop_step=2, eval_crops=4, eval_every=2)
        result = train(options, log=lambda line: log("smoke: " + line))
    log(f"smoke run: 2 steps on the CPU, held-out -ELBO {result.heldout_bpd:.4f} on 4 crops; ready")
    return manifest


def compare_heldout(weights: str | Path, record: dict, baseline: str, batch: int = 32) -> tuple[float, float, int]:
    """-ELBO of new weights and of registered model `baseline` on the held-out crops the
    run was selected on (its record's `heldout` spec, e.g. BANK.npz:heldout), float32 on
    the CPU with the same latent noise.

    Returns:
        (new bpd, baseline bpd, number of crops), bits per subpixel.
    """
    import numpy as np
    import torch

    from vaezip.network.model import HALO
    from vaezip.network.registry import ModelSpec, load_model, model_from_weights
    from vaezip.training.train import EVAL_SEED, evaluate_bpd

    options = record.get("training", {}).get("options", {})
    spec = options.get("heldout")
    if not spec:
        raise InputError("the record names no held-out set to compare on")
    config = ModelConfig.from_dict(record["config"])
    images = datasets.load_dataset(spec, None, config.channels)
    count = int(record["training"].get("heldout_crops") or len(images))
    ring = 4 * HALO if config.pixel_halo else 0  # a halo model's crops carry the ring; the baseline codes the tiles
    crops = datasets.evaluation_crops(images, options.get("crop", 64) + ring, count, EVAL_SEED)
    crops = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))
    new = model_from_weights(ModelSpec("candidate", str(weights), "", config), str(weights)).net
    old = load_model(baseline).net
    cpu = torch.device("cpu")
    return (evaluate_bpd(new, crops, batch, cpu, ring=bool(ring)), evaluate_bpd(old, crops, batch, cpu, ring=bool(ring)),
            len(crops))
