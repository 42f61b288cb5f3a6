"""Training at scale on a tiny model: warm start, device-side crops, campaigns, torchrun (2 gloo ranks)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vaezip.errors import InputError, VaezipError
from vaezip.network.config import ModelConfig
from vaezip.network.model import HierarchicalVAE
from vaezip.training import bank as photo_bank
from vaezip.training import bankfile, data
from vaezip.training import campaign as campaigns
from vaezip.training.train import TrainOptions, bf16_layers, load_checkpoint, train, weights_sha256

TINY = ModelConfig(width=16, bottleneck=8, pixel_width=8, latent_scales=((16, 1, 4), (4, 1, 2)))


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    crops = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    return str(data.save_crop_bank(tmp_path_factory.mktemp("bank") / "bank.npz", crops)) + ":crops"


def _options(bank, out, **kw):
    base = dict(config=TINY, data=(bank,), crop=16, batch=4, steps=6, warmup_steps=2, lr=2e-3,
                eval_every=3, eval_crops=8, checkpoint_every=3, out=str(out), device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def test_init_from_starts_where_the_old_model_stands(bank, tmp_path):
    first = train(_options(bank, tmp_path / "a"), log=None)
    lines = []
    warm = train(_options(bank, tmp_path / "b", init_from=str(first.weights), steps=1, eval_every=1), log=lines.append)
    record = json.loads(warm.record.read_text())["training"]
    assert record["warm_start"]["from"] == str(first.weights) and not record["warm_start"]["new"]
    assert any("warm start: " in line for line in lines)
    # the held-out -ELBO of the warm-started EMA after one small step stays near the old model's
    assert abs(warm.heldout_bpd - first.heldout_bpd) < 0.5


def test_channels_last_and_time_checkpoints(bank, tmp_path, monkeypatch):
    plain = train(_options(bank, tmp_path / "p"), log=None)
    fast = train(_options(bank, tmp_path / "c", channels_last=True, checkpoint_seconds=1e-3), log=None)
    a, b = (torch.load(r.weights, weights_only=True) for r in (plain, fast))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert all(v.is_contiguous() for v in b.values())
    sessions = json.loads(fast.record.read_text())["training"]["sessions"]
    assert sessions[0]["steps"] == [0, 6] and sessions[0]["channels_last"] and sessions[0]["crops_per_s"] > 0
    with pytest.raises(InputError):
        train(_options(bank, tmp_path / "bf", precision="bf16"), log=None)  # bf16 is CUDA only


def test_campaign_starts_warm_then_resumes(bank, tmp_path, monkeypatch):
    base = train(_options(bank, tmp_path / "base"), log=None)
    tiny = campaigns.Campaign("tiny", base_model=str(base.weights), bank=bank.removesuffix(":crops"),
                              recipe=lambda: None, config=TINY, crop=16, batch={"cpu": 2, "cuda": 2},
                              warmup_steps=1, eval_every=2, eval_crops=4, checkpoint_every=2)
    monkeypatch.setitem(campaigns.CAMPAIGNS, "tiny", tiny)
    options = campaigns.campaign_options("tiny", seconds=None, device="cpu", out=str(tmp_path / "run"), stop_step=2)
    assert options.init_from == str(base.weights) and options.heldout.endswith(":heldout")
    options = options.__class__(**{**options.__dict__, "heldout": None})  # a crop bank has no :heldout
    first = train(options, log=None)
    assert first.steps == 2 and json.loads(first.record.read_text())["training"]["campaign"] == "tiny"
    again = campaigns.campaign_options("tiny", seconds=30, device="cpu", out=str(tmp_path / "run"), stop_step=4)
    assert again.resume == str(first.checkpoint) and again.time_limit == 30
    assert train(again, log=None).steps == 4
    first.checkpoint.unlink()  # a device session brings back OUT.pt and OUT.json, not the checkpoint
    later = campaigns.campaign_options("tiny", seconds=None, device="cpu", out=str(tmp_path / "run"), stop_step=1)
    assert later.init_from == str(first.weights) and later.resume is None
    later = later.__class__(**{**later.__dict__, "heldout": None})
    record = json.loads(train(later, log=None, overwrite=True).record.read_text())["training"]
    assert record["warm_start"]["from"] == str(first.weights)
    # base run, campaign session 1, its resumed session 2 (all before), then this one
    assert [row.get("before_warm_start", False) for row in record["sessions"]] == [True, True, True, False]
    with pytest.raises(InputError):
        campaigns.get_campaign("nope")


def test_a_cpu_session_trains_on_the_local_bank(tmp_path, monkeypatch):
    """A campaign's CPU sessions read its larger local bank (built on first use, the same
    held-out crops); the device rehearsal and other devices read the bank that travels."""
    rng = np.random.default_rng(0)
    for folder, count in (("train", 3), ("held", 2)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / folder / f"{i}.png")
    monkeypatch.setenv("VAEZIP_DATA", str(tmp_path))

    def recipe(window):
        return photo_bank.BankRecipe((photo_bank.BankPart(data.PhotoSource(tmp_path / "train"), window),),
                                     (data.PhotoSource(tmp_path / "held"),), heldout_crops=4, crop=16)

    travelling, local = tmp_path / "travel.npz", tmp_path / "local.npz"
    photo_bank.build_photo_bank(travelling, recipe(24))
    base = train(_options(str(travelling), tmp_path / "base", heldout=f"{travelling}:heldout"), log=None)
    tiny = campaigns.Campaign("tiny", base_model=str(base.weights), bank=str(travelling), recipe=lambda: recipe(24),
                              local_bank=str(local), local_recipe=lambda: recipe(40), config=TINY, crop=16,
                              batch={"cpu": 2, "cuda": 2}, warmup_steps=1, eval_every=2, eval_crops=4,
                              checkpoint_every=2)
    monkeypatch.setitem(campaigns.CAMPAIGNS, "tiny", tiny)
    out = str(tmp_path / "run")
    first = campaigns.campaign_options("tiny", seconds=None, device="cpu", out=out, local_bank=False, stop_step=2)
    assert first.data == (str(travelling),) and not local.exists()
    train(first, log=None)
    lines = []
    again = campaigns.campaign_options("tiny", seconds=None, device="cpu", out=out, log=lines.append, stop_step=4)
    assert again.resume and again.data == (str(local),) and again.heldout == f"{local}:heldout"
    assert any(line.startswith("building") for line in lines) and any("trains on" in line for line in lines)
    small, large = bankfile.read_photo_bank(travelling), bankfile.read_photo_bank(local)
    np.testing.assert_array_equal(small.heldout, large.heldout)
    assert sum(im.size for im in large.images) > sum(im.size for im in small.images)
    record = json.loads(train(again, log=None).record.read_text())["training"]
    assert [row["data"] for row in record["sessions"][-2:]] == [[str(travelling)], [str(local)]]
    local.unlink()  # no local bank and no shared data: the bank that travels
    monkeypatch.setenv("VAEZIP_DATA", str(tmp_path / "nowhere"))
    assert campaigns.training_bank(tiny, "cpu", lines.append) == str(travelling) and "is not there" in lines[-1]


def test_torchrun_two_gloo_ranks_stay_identical(bank, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vaezip.cli.train", "--data", bank, "--width", "16", "--bottleneck", "8", "--pixel-width", "8",
               "--latent-scales", "16:1:4,4:1:2", "--crop", "16", "--batch", "2", "--steps", "4", "--eval-every", "2",
               "--eval-crops", "4", "--checkpoint-every", "2", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("held-out -ELBO") == 1  # rank 0 alone talks
    assert "2 ranks" in done.stdout
    record = json.loads((tmp_path / "ddp.json").read_text())["training"]
    hashes = record["rank_weights_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert record["crops_seen"] == 4 * 2 * 2 and record["batch"] == 4
    checkpoint = load_checkpoint(tmp_path / "ddp.ckpt")
    streams = checkpoint["rank_states"]
    assert len(streams) == 2 and not torch.equal(streams[0]["sampler"], streams[1]["sampler"])
    model = HierarchicalVAE(TINY)
    model.load_state_dict(checkpoint["model"])
    assert weights_sha256(model) == hashes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.ckpt", "ddp.json", "ddp.pt"]


def test_bf16_layers_keep_heads_and_likelihood_in_float32():
    import copy

    torch.manual_seed(0)
    model = HierarchicalVAE(TINY)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    reference = model.nelbo(x).nelbo_bits
    mixed = copy.deepcopy(model)
    autocast = bf16_layers(mixed, "cpu")  # the CUDA code path, on CPU autocast
    torch.manual_seed(1)
    with autocast():
        terms = mixed.nelbo(x)
        head = mixed.stages[1].head(torch.zeros(1, 8, 4, 4))
        trunk = mixed.stem(torch.zeros(1, 48, 4, 4))
    assert terms.nelbo_bits.dtype == torch.float32 and head.dtype == torch.float32 and trunk.dtype == torch.float32
    torch.testing.assert_close(terms.nelbo_bits, reference, rtol=0.01, atol=0)
    assert not torch.equal(terms.nelbo_bits, reference)  # the trunk did run in bf16
    terms.nelbo_bits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixed.parameters() if p.requires_grad
               and p is not mixed.top_bias)


def test_registry_add_refuses_a_model_that_is_not_better(tmp_path):
    from click.testing import CliRunner

    from vaezip.cli.models import registry_group
    from vaezip.network import registry

    crops = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    held = data.save_crop_bank(tmp_path / "held.npz", crops)
    config = registry.get_spec("photo-rgb-1").config
    torch.manual_seed(0)
    torch.save(HierarchicalVAE(config).state_dict(), tmp_path / "w.pt")  # untrained: far worse
    options = TrainOptions(config=config, data=(str(held),), heldout=f"{held}:crops", crop=64).to_dict()
    record = {"config": config.to_dict(), "training": {"options": options, "heldout_crops": 3}}
    (tmp_path / "w.json").write_text(json.dumps(record))
    before = (registry.source_models_dir() / "registry.json").read_bytes()
    result = CliRunner().invoke(registry_group, ["add", "never-registered", str(tmp_path / "w.pt"),
                                                 str(tmp_path / "w.json"), "--only-if-better-than", "photo-rgb-1"])
    assert result.exit_code == 1 and "not better" in result.output and "photo-rgb-1" in result.output
    assert (registry.source_models_dir() / "registry.json").read_bytes() == before
    assert not (registry.source_models_dir() / "never-registered.pt").exists()


def test_the_bank_budget_is_what_a_device_call_leaves(tmp_path, monkeypatch):
    """travelling_bytes counts tracked and untracked-not-ignored files (what a device call sends);
    the budget leaves room for them, the campaign's run files and the reserve."""
    repo = tmp_path / "repo"
    (repo / "runs").mkdir(parents=True)
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (repo / ".gitignore").write_text("runs/\n.carry/\n")
    (repo / "tracked.bin").write_bytes(bytes(3000))
    git("add", ".gitignore", "tracked.bin")
    (repo / "untracked.txt").write_bytes(bytes(500))
    (repo / "runs" / "tiny.pt").write_bytes(bytes(7000))  # ignored, but the campaign carries it
    (repo / "runs" / "tiny.json").write_bytes(bytes(100))
    (repo / "runs" / "tiny.ckpt").write_bytes(bytes(90000))  # left behind
    expected_checkout = 3000 + 500 + len("runs/\n.carry/\n")
    assert campaigns.travelling_bytes(repo) == expected_checkout
    assert campaigns.travelling_bytes(tmp_path / "nowhere") is None
    monkeypatch.setitem(campaigns.CAMPAIGNS, "tiny", campaigns.Campaign("tiny", base_model="x", bank=".carry/b.npz",
                                                                          recipe=lambda: None))
    monkeypatch.chdir(repo)
    assert [p.name for p in campaigns.carried_run_files("tiny")] == ["tiny.pt", "tiny.json"]
    lines = []
    budget = campaigns.bank_budget("tiny", log=lines.append)
    assert budget == campaigns.DEVICE_UPLOAD_BYTES - campaigns.UPLOAD_RESERVE_BYTES - expected_checkout - 7100
    assert "leave" in lines[0]
    monkeypatch.setattr(campaigns, "DEVICE_UPLOAD_BYTES", 1000)
    with pytest.raises(VaezipError, match="does not fit"):
        campaigns.bank_budget("tiny", log=lines.append)
