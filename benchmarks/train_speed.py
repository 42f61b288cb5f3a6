"""Training throughput (crops/s) of a shipped photo configuration, variants of the
training step interleaved in one process so that a shared host's changing load falls on
every variant alike.

`--compare pipeline` (default): the step as it was (crops cut on the host and copied, one
EMA update per tensor, NCHW) against the step now (crops cut by one gather from the bank in
device memory, a fused EMA update), with and without channels-last.
`--compare floor-clamp`: a fixed-point model's floor-and-clamp layers as the plain ops
(floor straight through, torch.minimum/maximum or torch.clamp and their autograd) against
the fused `fixedpoint._FloorClamp` (the same values and gradients) with every bound a tensor
(its first version) and with scalar bounds where a layer's channels share them (the
hardtanh_backward path), channels-last.

    python benchmarks/train_speed.py [--compare pipeline|floor-clamp] [--model NAME]
        [--batch 64] [--rounds 5] [--steps 3] [--device cpu]

Prints per variant the median over rounds (the first round is a warm-up and not
counted) of crops per wall-clock second and crops per CPU second of this process,
and `uptime` before and after. Same code path as `vaezip train` (`vaezip.training.train`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from vaezip.network import fixedpoint
from vaezip.network.registry import get_spec
from vaezip.training import data as datasets
from vaezip.training.train import TrainOptions, _new_run, _Objective, _train_step, _update_ema, resolve_device


def _ema_per_tensor(ema, model, decay):
    """The EMA update before this change: one lerp per tensor."""
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
            e.lerp_(p, 1.0 - decay) if e.dtype.is_floating_point else e.copy_(p)


class _PlainFloorClamp:
    """`fixedpoint._FloorClamp` as the composition of autograd ops it replaced."""

    @staticmethod
    def apply(y, lo, hi, at_bound):
        straight = y + (torch.floor(y) - y).detach()
        if at_bound == 1.0:
            return torch.clamp(straight, lo, hi)
        lo, hi = (torch.as_tensor(t, dtype=y.dtype, device=y.device) for t in (lo, hi))
        return torch.maximum(torch.minimum(straight, hi), lo)


_FUSED = fixedpoint._FloorClamp


class _TensorBoundsFloorClamp:
    """`fixedpoint._FloorClamp` with every bound a tensor: its first version's backward
    (five passes for the factor) in every layer."""

    @staticmethod
    def apply(y, lo, hi, at_bound):
        lo, hi = (torch.as_tensor(t, dtype=y.dtype, device=y.device) for t in (lo, hi))
        return _FUSED.apply(y, lo, hi, at_bound)


def _pipeline_variants(args, device, images):
    """name -> (channels_last, sampler, on_device, floor_clamp) of `--compare pipeline`."""
    variants = {}
    for name, channels_last, on_device in (("before: host crops, per-tensor EMA, NCHW", False, False),
                                           ("after: device crops, fused EMA, NCHW", False, True),
                                           ("after, channels-last", True, True)):
        sampler = (datasets.TensorCrops(images, args.crop, device=device) if on_device
                   else datasets.RandomCrops(images, args.crop))
        variants[name] = (channels_last, sampler, on_device, fixedpoint._FloorClamp)
    return variants


def _floor_clamp_variants(args, device, images):
    """name -> (channels_last, sampler, on_device, floor_clamp) of `--compare floor-clamp`."""
    return {name: (True, datasets.TensorCrops(images, args.crop, device=device), True, floor_clamp)
            for name, floor_clamp in (("plain ops: floor straight through, minimum/maximum, clamp", _PlainFloorClamp),
                                      ("fused _FloorClamp, tensor bounds", _TensorBoundsFloorClamp),
                                      ("fused _FloorClamp, scalar bounds where shared", _FUSED))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=("pipeline", "floor-clamp"), default="pipeline")
    parser.add_argument("--model", default="photo-rgb-1", help="registered model whose config is timed")
    parser.add_argument("--data", default=str(datasets.data_root() / "bsds500" / "val") + "@2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = resolve_device(args.device)
    config = get_spec(args.model).config
    if args.compare == "floor-clamp" and not config.fixed_bits:
        raise SystemExit(f"{args.model} is not a fixed-point model: no floor-and-clamp layers to compare")
    images = datasets.load_dataset(args.data, 50, config.channels)
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    choose = _pipeline_variants if args.compare == "pipeline" else _floor_clamp_variants
    variants = {}
    for name, (channels_last, sampler, on_device, floor_clamp) in choose(args, device, images).items():
        options = TrainOptions(config=config, data=(args.data,), crop=args.crop, batch=args.batch, device=str(device),
                               channels_last=channels_last, warmup_steps=1)
        run = _new_run(options, device, lambda line: None)
        objective = _Objective(run.model, config.channels * args.crop * args.crop)
        variants[name] = (options, run, sampler, objective, on_device, floor_clamp, [], [])

    import vaezip.training.train as train_module

    for round_ in range(args.rounds):
        for name, (options, run, sampler, objective, on_device, floor_clamp, wall, cpu) in variants.items():
            train_module._update_ema = _update_ema if on_device else _ema_per_tensor
            fixedpoint._FloorClamp = floor_clamp
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                run.step += 1
                x = sampler.sample(args.batch) if on_device else sampler.sample(args.batch).to(device)
                _train_step(run, objective, lambda: torch.autocast("cpu", enabled=False), x, options, 1e-5, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                wall.append(args.steps * args.batch / (time.perf_counter() - t_wall))
                cpu.append(args.steps * args.batch / (time.process_time() - t_cpu))
    train_module._update_ema = _update_ema
    fixedpoint._FloorClamp = _FUSED
    print("uptime after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"{args.model} config, batch {args.batch} of {args.crop}x{args.crop}, {args.steps} steps x "
          f"{args.rounds - 1} rounds per variant, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | crops/s (wall, median) | crops per CPU second (median) | rounds (wall) |")
    print("|---|---|---|---|")
    for name, (*_, wall, cpu) in variants.items():
        print(f"| {name} | {statistics.median(wall):.1f} | {statistics.median(cpu):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in wall)} |")


if __name__ == "__main__":
    main()
