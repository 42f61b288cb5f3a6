"""`vaezip train`: a thin click front end to `vaezip.training.train.train` with a progress bar.

torch is imported inside the command, so `vaezip --help` stays fast. Runnable
stand-alone (no constriction needed):
    python -c "from vaezip.cli.train import train_command; train_command()" --help
"""

from __future__ import annotations

import sys

import click

from vaezip.errors import VaezipError

# Options a resumed run may change; everything else is fixed by the checkpoint.
RESUME_OVERRIDES = ("time_limit", "stop_step", "out", "device", "steps", "eval_every", "checkpoint_every",
                    "checkpoint_seconds", "batch", "precision", "channels_last", "compile")
# Options a campaign run takes from the command line; the campaign fixes the rest.
CAMPAIGN_OPTIONS = ("time_limit", "stop_step", "out", "device", "batch", "precision", "channels_last", "compile")


class _FixedBits(click.ParamType):
    name = "A,H,F,S"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        try:
            bits = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not four comma-separated integers", param, ctx)
        if len(bits) != 4:
            self.fail(f"{value!r} is not four comma-separated integers", param, ctx)
        return bits


FIXED_BITS = _FixedBits()


def parse_latent_scales(text: str) -> tuple[tuple[int, int, int], ...]:
    """"16:2:16,8:2:16,4:1:8" -> ((16, 2, 16), (8, 2, 16), (4, 1, 8))."""
    try:
        scales = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected FACTOR:GROUPS:CHANNELS[,...]") from None
    if not scales or any(len(s) != 3 or min(s) < 1 for s in scales):
        raise click.BadParameter(f"{text!r}: expected FACTOR:GROUPS:CHANNELS[,...] of positive integers")
    return scales


@click.command("train")
@click.option("--data", "data", multiple=True, metavar="SPEC",
              help="Training data (repeatable): photos (default: BSDS500 reduced 2x + wikiphotos minus the "
                   "held-out 9), mnist, cifar10, a folder, image, file.npz[:KEY], .npy, IDX(.gz), CIFAR batch; "
                   "FOLDER@2 reduces 2x. Never Kodak.")
@click.option("--heldout", metavar="SPEC", default=None,
              help="Held-out evaluation images (default: the held-out wikiphotos for photos, else the last 5% of --data).")
@click.option("--data-limit", type=click.IntRange(min=1), default=None, help="At most N images per --data spec.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True, help="Gray (1) or RGB (3).")
@click.option("--width", type=click.IntRange(min=1), default=96, show_default=True, help="Trunk channels.")
@click.option("--bottleneck", type=click.IntRange(min=1), default=32, show_default=True, help="Residual block inner channels.")
@click.option("--mixtures", type=click.IntRange(min=1), default=3, show_default=True, help="Logistic mixture components.")
@click.option("--kl-warmup", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Fraction of the steps over which the KL weight rises from 0.2 to 1 (0 for a fine-tune).")
@click.option("--fixed-bits", type=FIXED_BITS, default=None, metavar="A,H,F,S",
              help="Train a fixed-point model (format version 6): bits of ReLU activations, pixel-head "
                   "inputs, pixel features, residual streams, e.g. 8,10,10,16.")
@click.option("--pixel-width", type=click.IntRange(min=1), default=48, show_default=True, help="Pixel decoder channels.")
@click.option("--latent-scales", default="16:2:16,8:2:16,4:1:8", show_default=True, metavar="F:G:C,...",
              help="Latent groups, coarsest first: downsampling factor : groups : channels per group.")
@click.option("--crop", type=click.IntRange(min=16), default=64, show_default=True, help="Training crop side (multiple of 16).")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Crops per step.")
@click.option("--steps", type=click.IntRange(min=1), default=20000, show_default=True, help="Total steps (the lr schedule spans them).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=200, show_default=True, help="Linear lr warm-up steps.")
@click.option("--time-limit", "--seconds", "time_limit", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Stop cleanly after this long: checkpoint and write the outputs.")
@click.option("--stop-step", type=click.IntRange(min=1), default=None, help="Stop this run after this step (resume later).")
@click.option("--eval-every", type=click.IntRange(min=1), default=500, show_default=True, help="Held-out evaluation period (steps).")
@click.option("--eval-crops", type=click.IntRange(min=1), default=64, show_default=True, help="Held-out crops.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True, help="Checkpoint period (steps).")
@click.option("--checkpoint-seconds", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Also checkpoint every SECONDS of wall time.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast the convolutions on CUDA (everything else float32).")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True, help="Channels-last layout.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training step.")
@click.option("--init-from", default=None, metavar="MODEL|PATH",
              help="Warm-start a fresh run from a registered model or OUT.pt / OUT.ckpt (matching tensors copied).")
@click.option("--campaign", default=None, metavar="NAME",
              help="Continue the named campaign (gen2) from runs/NAME.ckpt or the newest registered model; "
                   "takes --seconds, --device, --out, --batch, --precision, --[no-]channels-last, --compile, --stop-step.")
@click.option("--prepare", is_flag=True, help="With --campaign: build its photo bank if missing (--force: rebuild) "
                                              "and run 2 steps of the campaign on the CPU.")
@click.option("--out", default="runs/model", show_default=True, metavar="PATH",
              help="Writes PATH.pt (EMA weights), PATH.json (config + training record), PATH.ckpt.")
@click.option("--resume", default=None, metavar="PATH.ckpt",
              help="Continue a checkpoint exactly (its options apply; --steps/--time-limit/--out/--device/... may change).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, crops and latent noise.")
@click.option("--force", is_flag=True, help="Overwrite the outputs of an earlier run.")
@click.pass_context
def train_command(ctx: click.Context, **kw) -> None:
    """Train a vaezip model on image crops (negative ELBO, bits per subpixel)."""
    from dataclasses import replace

    from vaezip.network import registry
    from vaezip.network.config import ModelConfig
    from vaezip.training.train import TrainOptions, checkpoint_options, output_paths, train

    kw["compile"] = kw.pop("compile_")
    given = [name for name in kw if ctx.get_parameter_source(name if name != "compile" else "compile_")
             == click.core.ParameterSource.COMMANDLINE]
    try:
        if kw["campaign"]:
            from vaezip.training import campaign

            extra = [n for n in given if n not in CAMPAIGN_OPTIONS + ("campaign", "prepare", "force")]
            if extra:
                raise click.UsageError(f"--campaign sets these itself: {', '.join('--' + f.replace('_', '-') for f in extra)}")
            if kw["prepare"]:
                campaign.prepare(kw["campaign"], rebuild=kw["force"], log=click.echo)
                return
            options = campaign.campaign_options(
                kw["campaign"], seconds=kw["time_limit"], device=kw["device"], log=click.echo,
                out=kw["out"] if "out" in given else None,
                **{n: kw[n] for n in CAMPAIGN_OPTIONS if n in given and n not in ("time_limit", "device", "out")})
            # continuing from the weights OUT.pt of an earlier session replaces them
            result = _run_with_progress(options, train, overwrite=options.init_from == str(output_paths(options.out)[0]))
            _summary(result)
            return
        if kw["prepare"]:
            raise click.UsageError("--prepare needs --campaign")
        if kw["resume"]:
            fixed = [name for name in given if name not in RESUME_OVERRIDES and name not in ("resume", "force")]
            if fixed:
                raise click.UsageError(f"--resume takes these from the checkpoint: {', '.join('--' + f.replace('_', '-') for f in fixed)}")
            options = checkpoint_options(kw["resume"])
            options.resume = kw["resume"]
            for name in RESUME_OVERRIDES:
                if name in given:
                    setattr(options, name, kw[name])
            # per-invocation limits never carry over from the checkpoint
            options.time_limit, options.stop_step = kw["time_limit"], kw["stop_step"]
            options.__post_init__()
        else:
            config = ModelConfig(
                channels=int(kw["channels"]), width=kw["width"], bottleneck=kw["bottleneck"],
                latent_scales=parse_latent_scales(kw["latent_scales"]), pixel_width=kw["pixel_width"],
                mixtures=kw["mixtures"], fixed_bits=kw["fixed_bits"],
            )
            if kw["fixed_bits"] is not None and kw["init_from"] in registry.specs():
                # a fixed-point version of a registered model: its architecture, its coded latents
                config = replace(registry.get_spec(kw["init_from"]).config, fixed_bits=kw["fixed_bits"])
            options = TrainOptions(
                config=config, data=kw["data"] or ("photos",), heldout=kw["heldout"], data_limit=kw["data_limit"],
                crop=kw["crop"], batch=kw["batch"], steps=kw["steps"], lr=kw["lr"], warmup_steps=kw["warmup_steps"],
                eval_every=kw["eval_every"], eval_crops=kw["eval_crops"], checkpoint_every=kw["checkpoint_every"],
                seed=kw["seed"], device=kw["device"], out=kw["out"], time_limit=kw["time_limit"],
                stop_step=kw["stop_step"], checkpoint_seconds=kw["checkpoint_seconds"], precision=kw["precision"],
                channels_last=kw["channels_last"], compile=kw["compile"], init_from=kw["init_from"],
                kl_warmup_fraction=kw["kl_warmup"],
            )
        result = _run_with_progress(options, train, overwrite=kw["force"])
    except VaezipError as exc:
        raise click.ClickException(str(exc)) from None
    _summary(result)


def _summary(result) -> None:
    """The closing line (rank 0 only under torchrun)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        click.echo(f"held-out -ELBO {result.heldout_bpd:.4f} bits/subpixel after {result.steps} steps; "
                   f"weights {result.weights}, record {result.record}")


def _run_with_progress(options, train, overwrite: bool):
    import os

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stdout)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 talks
        return train(options, None, log=None, overwrite=overwrite)
    columns = [
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} crops/s  batch {task.fields[train]} bpd  held-out {task.fields[heldout]} bpd"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    # A non-terminal stdout (nohup, a log file) gets only the plain per-eval lines.
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("train", total=options.steps, rate="-", train="-", heldout="-")

        def progress(event) -> None:
            bar.update(
                task, completed=event.step, rate=f"{event.crops_per_s:.1f}", train=f"{event.train_bpd:.3f}",
                heldout="-" if event.heldout_bpd is None else f"{event.heldout_bpd:.4f}",
            )

        return train(options, progress, log=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True),
                     overwrite=overwrite)


if __name__ == "__main__":
    train_command()
