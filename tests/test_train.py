"""Training loop on a tiny model and random crops: outputs, strict reload, exact resume, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import KODAK

from vaezip.cli.train import parse_latent_scales, train_command
from vaezip.errors import InputError, OutputExistsError
from vaezip.network.config import ModelConfig
from vaezip.network.model import HierarchicalVAE
from vaezip.training.data import save_crop_bank
from vaezip.training.train import TrainOptions, kl_weight, learning_rate, train

TINY = ModelConfig(width=16, bottleneck=8, pixel_width=8, latent_scales=((16, 1, 4), (4, 1, 2)))


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    crops = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    return str(save_crop_bank(tmp_path_factory.mktemp("bank") / "bank.npz", crops)) + ":crops"


def _options(bank, out, **kw):
    base = dict(config=TINY, data=(bank,), crop=16, batch=4, steps=20, warmup_steps=5, lr=2e-3,
                eval_every=10, eval_crops=8, checkpoint_every=10, out=str(out), device="cpu")
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def straight_run(bank, tmp_path_factory):
    events = []
    result = train(_options(bank, tmp_path_factory.mktemp("run") / "m"), events.append, log=None)
    return result, events


def test_trains_and_writes_outputs(straight_run):
    result, events = straight_run
    assert result.steps == 20 and math.isfinite(result.heldout_bpd)
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 20 and all(math.isfinite(e.train_bpd) for e in steps)
    assert [e.step for e in events if e.kind == "eval"] == [10, 20]
    record = json.loads(result.record.read_text())
    assert ModelConfig.from_dict(record["config"]) == TINY
    training = record["training"]
    assert training["steps"] == 20 and training["crops_seen"] == 80 and training["crop"] == 16
    assert [row[0] for row in training["curve"]] == [10, 20]
    assert training["final_heldout_bpd"] == pytest.approx(result.heldout_bpd)
    assert "torch_version" in training and "hardware" in training
    state = torch.load(result.weights, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    HierarchicalVAE(TINY).load_state_dict(state, strict=True)
    assert result.checkpoint.exists()


def test_resume_is_exact(bank, straight_run, tmp_path):
    out = tmp_path / "m"
    first = train(_options(bank, out, stop_step=10), log=None)
    assert first.steps == 10
    resumed = train(_options(bank, out, resume=str(first.checkpoint)), log=None)
    assert resumed.steps == 20
    a = torch.load(straight_run[0].weights, weights_only=True)
    b = torch.load(resumed.weights, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    curve = json.loads(resumed.record.read_text())["training"]["curve"]
    assert [row[0] for row in curve] == [10, 20]


def test_a_killed_session_keeps_its_row_up_to_its_last_checkpoint(bank, tmp_path):
    out = tmp_path / "killed"

    def kill_at_step_7(event):
        if event.kind == "step" and event.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_options(bank, out, checkpoint_every=5), kill_at_step_7, log=None)
    ckpt = out.with_suffix(".ckpt")
    assert torch.load(ckpt, weights_only=False)["open_session"]["steps"] == [0, 5]
    ended = train(_options(bank, out, resume=str(ckpt), stop_step=5), log=None)  # only writes the outputs
    sessions = json.loads(ended.record.read_text())["training"]["sessions"]
    assert len(sessions) == 1 and sessions[0]["steps"] == [0, 5] and "killed" in sessions[0]["note"]
    assert sessions[0]["seconds"] > 0


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_session_as_its_time_limit_does(bank, tmp_path, name):
    """SIGTERM (`timeout`, pre-emption) or Ctrl-C: the step in progress ends, then the final
    evaluation, checkpoint and outputs as at a time limit; the handlers are given back, and
    the run resumes from there."""
    import os
    import signal

    out = tmp_path / "signalled"
    sig = getattr(signal, name)

    def signal_at_step_3(event):
        if event.kind == "step" and event.step == 3:
            os.kill(os.getpid(), sig)

    previous = signal.getsignal(sig)
    lines = []
    result = train(_options(bank, out), signal_at_step_3, log=lines.append)
    assert signal.getsignal(sig) is previous
    assert result.steps == 3 and math.isfinite(result.heldout_bpd)
    assert any(f"{name} received: stopped at step 3" in line for line in lines)
    training = json.loads(result.record.read_text())["training"]
    assert training["steps"] == 3 and training["sessions"][-1]["note"] == f"stopped by {name}"
    HierarchicalVAE(TINY).load_state_dict(torch.load(result.weights, weights_only=True), strict=True)
    resumed = train(_options(bank, out, resume=str(result.checkpoint)), log=None)
    assert resumed.steps == 20
    sessions = json.loads(resumed.record.read_text())["training"]["sessions"]
    assert [row["steps"] for row in sessions] == [[0, 3], [3, 20]] and "note" not in sessions[1]


def test_a_model_with_rings_trains_on_wider_crops(bank, tmp_path):
    from dataclasses import replace

    from vaezip.training.train import crop_side

    config = replace(TINY, fixed_bits=(8, 10, 10, 16), latent_grid=1 / 64, pixel_halo=True)
    options = _options(bank, tmp_path / "ring", config=config, steps=2, eval_every=2, eval_crops=4)
    assert crop_side(options) == 20  # the 16-pixel tile and its two-pixel ring
    lines = []
    result = train(options, log=lines.append)
    assert math.isfinite(result.heldout_bpd) and any("4 crops of 20" in line for line in lines)


def test_refuses_overwrite_and_kodak(bank, straight_run):
    with pytest.raises(OutputExistsError):
        train(_options(bank, straight_run[0].weights), log=None)
    with pytest.raises(InputError):
        train(_options(bank, "unused", data=(str(KODAK),)), log=None)
    with pytest.raises(InputError):
        _options(bank, "unused", crop=24)  # not a multiple of the downsampling


def test_schedules():
    options = TrainOptions(config=TINY, steps=1000, warmup_steps=100, lr=1e-3, crop=16)
    assert learning_rate(options, 50) == pytest.approx(5e-4)
    assert learning_rate(options, 100) == pytest.approx(1e-3)
    assert learning_rate(options, 1000) == pytest.approx(1e-4)
    assert kl_weight(options, 0) == pytest.approx(0.2)
    assert kl_weight(options, 50) == pytest.approx(0.6)
    assert kl_weight(options, 100) == 1.0 and kl_weight(options, 900) == 1.0
    assert TrainOptions.from_dict(options.to_dict()) == options


def test_lr_scales_group_parameters_and_train_them_faster(bank, tmp_path):
    from vaezip.training.train import parameter_groups

    scales = ((r"stages\.0\.", 10.0), (r"stages\.", 3.0))
    groups = parameter_groups(HierarchicalVAE(TINY), scales)
    assert [g["lr_scale"] for g in groups] == [10.0, 3.0, 1.0]
    model = HierarchicalVAE(TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in parameter_groups(model, scales):
        for p in group["params"]:
            name = names[id(p)]
            want = 10.0 if name.startswith("stages.0.") else 3.0 if name.startswith("stages.") else 1.0
            assert group["lr_scale"] == want, name
    options = _options(bank, tmp_path / "scaled", steps=4, lr_scales=scales)
    assert TrainOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    torch.manual_seed(options.seed)  # the initialisation train() starts from
    before = HierarchicalVAE(TINY).state_dict()
    result = train(options, log=None)
    after = torch.load(result.weights, weights_only=True)
    moved = {name: float((after[name] - before[name]).abs().max()) for name in ("stages.0.head.bias", "stem.bias")}
    assert moved["stages.0.head.bias"] > moved["stem.bias"] > 0


def test_cli_runs_and_resumes(bank, tmp_path):
    out = tmp_path / "cli"
    args = ["--data", bank, "--width", "16", "--bottleneck", "8", "--pixel-width", "8",
            "--latent-scales", "16:1:4,4:1:2", "--crop", "16", "--batch", "2", "--steps", "4",
            "--eval-every", "2", "--eval-crops", "4", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(train_command, args + ["--stop-step", "2"])
    assert result.exit_code == 0, result.output
    assert "step 2/4" in result.output and (tmp_path / "cli.ckpt").exists()
    again = CliRunner().invoke(train_command, args)
    assert again.exit_code != 0 and "exists" in again.output
    resumed = CliRunner().invoke(train_command, ["--resume", str(tmp_path / "cli.ckpt")])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "cli.json").read_text())["training"]["steps"] == 4
    bad = CliRunner().invoke(train_command, ["--resume", str(tmp_path / "cli.ckpt"), "--width", "8"])
    assert bad.exit_code != 0 and "--width" in bad.output
    missing = CliRunner().invoke(train_command, ["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "Error:" in missing.output and "Traceback" not in missing.output


def test_the_command_stopped_by_sigterm_writes_its_outputs(bank, tmp_path):
    """`vaezip train` in a real process (as under `timeout` or nohup): SIGTERM after its first
    evaluation; it exits 0 with weights, record and checkpoint written."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "term"
    args = ["--data", bank, "--width", "16", "--bottleneck", "8", "--pixel-width", "8",
            "--latent-scales", "16:1:4,4:1:2", "--crop", "16", "--batch", "2", "--steps", "1000000",
            "--eval-every", "5", "--eval-crops", "4", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", "from vaezip.cli.main import run; run()", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 5/"):
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: stopped at step" in stdout and "Traceback" not in stderr
    training = json.loads(out.with_suffix(".json").read_text())["training"]
    assert training["steps"] >= 5 and training["sessions"][-1]["note"] == "stopped by SIGTERM"
    assert out.with_suffix(".pt").exists() and out.with_suffix(".ckpt").exists()


def test_parse_latent_scales():
    assert parse_latent_scales("16:2:16,8:2:16,4:1:8") == ((16, 2, 16), (8, 2, 16), (4, 1, 8))
    with pytest.raises(Exception):
        parse_latent_scales("16:2")
