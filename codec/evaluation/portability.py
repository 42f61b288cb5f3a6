"""Portability: decode and re-encode .vz files in fresh processes under other numerics settings.

A file is portable when every machine decodes it to the same pixels. We have one machine,
so other machines are imitated by each library's own switch (a `Setting`: environment
variables, thread count, oneDNN on or off, or another interpreter such as an emulated
aarch64 root). `decode_all` runs one fresh process per setting (`python -m
vaezip.evaluation.portability decode ...`), which decodes every file and prints one JSON
line per file: ok, checksum (the decoder's own pixel check failed), or error, and the
sha256 of the decoded pixels. `encode_all` does the same for encoding, so equal file
bytes show that the encoder is portable too; with action "network" it saves the network's
activations instead, for machines where the entropy coder cannot run.

Torch-free in the parent: only the worker processes import torch. Used by
`benchmarks/portability.py` and `tests/test_portability.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

CONTROLLED = ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "NPY_DISABLE_CPU_FEATURES",
              "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VAEZIP_EXACT_SPLIT")
"""Variables a worker never inherits from its parent: only its `Setting` sets them."""

OK, CHECKSUM, ERROR = "ok", "checksum", "error"


@dataclass(frozen=True)
class Setting:
    """One way to run a worker process.

    Attributes:
        name: column label, e.g. "ONEDNN_MAX_CPU_ISA=SSE41".
        env: variables set in the worker (all of `CONTROLLED` are cleared first).
        threads: `torch.set_num_threads` (and OMP_NUM_THREADS) in the worker; None: torch's default.
        onednn: False: oneDNN off before any coding, and kept off (`_force_onednn_off`).
        command: the interpreter and its prefix (e.g. ("chroot", ROOT, "/opt/venv/bin/python"));
            empty: this interpreter.
        isa_dependent: the setting changes the instruction set the float kernels use (the
            cases format version 5 is expected to fail).
    """

    name: str
    env: tuple[tuple[str, str], ...] = ()
    threads: Optional[int] = None
    onednn: bool = True
    command: tuple[str, ...] = ()
    isa_dependent: bool = False


BASELINE = Setting("baseline")


def cpu_flags() -> set[str]:
    """The CPU's flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def numpy_dispatched_features() -> list[str]:
    """The CPU features numpy found here and dispatches loops to (beyond its baseline):
    what NPY_DISABLE_CPU_FEATURES can switch off."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]


def _isa(value: str) -> Setting:
    # AVX2 is what `import vaezip` sets by default: the same kernels on any AVX2 CPU
    return Setting(f"ONEDNN_MAX_CPU_ISA={value}", (("ONEDNN_MAX_CPU_ISA", value),), isa_dependent=value != "AVX2")


def _env(key: str, value: str, isa_dependent: bool = True) -> Setting:
    return Setting(f"{key}={value}", ((key, value),), isa_dependent=isa_dependent)


def _threads(n: int) -> Setting:
    return Setting(f"threads={n}", (("OMP_NUM_THREADS", str(n)), ("MKL_NUM_THREADS", str(n))), threads=n)


def _npy() -> list[Setting]:
    features = numpy_dispatched_features()
    return [_env("NPY_DISABLE_CPU_FEATURES", " ".join(features))] if features else []


def full_matrix() -> list[Setting]:
    """Every setting the benchmark decodes under (AMX only where the CPU has it)."""
    isas = ["SSE41", "AVX", "AVX2", "AVX512_CORE"] + (["AVX512_CORE_AMX"] if "amx_tile" in cpu_flags() else [])
    return ([BASELINE] + [_isa(v) for v in isas]
            + [_env("MKL_CBWR", "COMPATIBLE"), _env("MKL_CBWR", "AVX2")] + _npy()
            + [_env("ATEN_CPU_CAPABILITY", "default"), _env("ATEN_CPU_CAPABILITY", "avx2")]
            + [_threads(n) for n in (1, 2, 16)]
            + [Setting("oneDNN off", onednn=False, isa_dependent=True)]
            + [_env("VAEZIP_EXACT_SPLIT", str(n), isa_dependent=False) for n in (1, 4, 16)])


def quick_matrix() -> list[Setting]:
    """The reduced matrix of the test suite."""
    return ([_isa("SSE41"), _isa("AVX2"), _env("ATEN_CPU_CAPABILITY", "default")]
            + [_threads(1), _threads(2)] + _npy())


def encode_matrix() -> list[Setting]:
    """Settings to re-encode under (the encoder's bytes must not change either)."""
    return [BASELINE, _isa("SSE41"), _threads(1), _threads(2)] + _npy()


def aarch64_setting(root: str | os.PathLike, python: str = "/opt/venv/bin/python") -> Setting:
    """Decode in an arm64 root (`chroot`, run by qemu-user through binfmt_misc). The root
    must see this checkout and the temp files at the same paths (bind mounts) and have
    `vaezip` importable by `python` (docs/portability-aarch64.md)."""
    return Setting("aarch64 (qemu)", command=("chroot", str(root), python), isa_dependent=True)


# ---- what a worker reports ---------------------------------------------------------


def code_sha256(data: bytes) -> str:
    """sha256 (hex) of a .vz file with its informational `runtime` header field blanked (it
    names the libraries and the CPU dispatch that wrote it): equal for equal code."""
    import dataclasses

    from vaezip.format import container

    header, words = container.unpack(data)
    return hashlib.sha256(container.pack(dataclasses.replace(header, runtime=""), words)).hexdigest()


def pixels_sha256(image) -> str:
    """sha256 (hex) of an `Image`'s mode, shape, little-endian pixels, palette and transparency."""
    import numpy as np

    digest = hashlib.sha256()
    pixels = np.ascontiguousarray(image.pixels)
    digest.update(f"{image.mode}|{pixels.shape}|{pixels.dtype.str[1:]}|".encode())
    digest.update(pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes())
    digest.update(len(image.palette).to_bytes(4, "little") + image.palette)
    digest.update(len(image.transparency).to_bytes(4, "little") + image.transparency)
    return digest.hexdigest()


@dataclass
class Outcome:
    """One worker's result for one file.

    Attributes:
        setting: the `Setting.name`.
        file: the file decoded (or the image encoded).
        status: OK, CHECKSUM (the decoder's pixel checksum failed) or ERROR.
        sha256: decode: sha256 of the decoded pixels (`pixels_sha256`); encode: of the
            .vz bytes. None unless status is OK.
        detail: the error message, else the runtime the worker saw.
        seconds: the worker's time for this file.
    """

    setting: str
    file: str
    status: str
    sha256: Optional[str] = None
    detail: str = ""
    seconds: float = 0.0
    runtime: dict = field(default_factory=dict)


# ---- the parent side ---------------------------------------------------------------


def worker_env(setting: Setting, base: Optional[dict] = None) -> dict:
    """The environment of a worker: `base` (default os.environ) without `CONTROLLED`, plus the setting's."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in CONTROLLED}
    env.update(dict(setting.env))
    return env


def _worker_cmd(setting: Setting, action: str, paths: Sequence[str], model: Optional[str],
                model_file: Optional[str], options: Sequence[str]) -> list[str]:
    cmd = list(setting.command or (sys.executable,)) + ["-m", "vaezip.evaluation.portability", action]
    if setting.threads is not None:
        cmd += ["--threads", str(setting.threads)]
    if not setting.onednn:
        cmd.append("--no-onednn")
    if model:
        cmd += ["--model", model]
    if model_file:
        cmd += ["--model-file", str(model_file)]
    return cmd + list(options) + [str(p) for p in paths]


def run_worker(setting: Setting, action: str, paths: Sequence[str | os.PathLike], *, model: Optional[str] = None,
               model_file: Optional[str | os.PathLike] = None, options: Sequence[str] = (),
               timeout: float = 1800, base_env: Optional[dict] = None) -> list[Outcome]:
    """Run one fresh worker process under `setting` over `paths`; one `Outcome` per path.

    `base_env` (default os.environ) is what `worker_env` starts from. A worker that dies
    (or times out) gives ERROR for every path it did not report.
    """
    paths = [str(p) for p in paths]
    cmd = _worker_cmd(setting, action, paths, model, None if model_file is None else str(model_file), options)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(setting, base_env),
                              timeout=timeout, check=False)
        stdout, problem = proc.stdout, (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired as exc:
        stdout, problem = exc.stdout or "", f"timed out after {timeout:.0f} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    except OSError as exc:
        stdout, problem = "", f"cannot start worker: {exc}"
    reported = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            reported[row["file"]] = Outcome(setting.name, **{k: v for k, v in row.items()})
    elapsed = time.perf_counter() - start
    return [reported.get(p) or Outcome(setting.name, p, ERROR, detail=problem, seconds=elapsed) for p in paths]


def decode_all(settings: Sequence[Setting], files: Sequence[str | os.PathLike], **kwargs) -> list[Outcome]:
    """Decode every file under every setting (one fresh process per setting)."""
    return [outcome for s in settings for outcome in run_worker(s, "decode", files, **kwargs)]


def encode_all(settings: Sequence[Setting], images: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
               version: Optional[int] = None, action: str = "encode", **kwargs) -> list[Outcome]:
    """Encode every image under every setting into out_dir/enc<setting index>/ (sha256 of
    the bytes); with action "network", save the network's activations there instead."""
    outcomes = []
    for i, setting in enumerate(settings):
        folder = Path(out_dir) / f"enc{i}"
        folder.mkdir(parents=True, exist_ok=True)
        options = ["--out-dir", str(folder)] + ([] if version is None else ["--version", str(version)])
        outcomes += run_worker(setting, action, images, options=options, **kwargs)
    return outcomes


def save_model(loaded, folder: str | os.PathLike) -> Path:
    """Write an unregistered `LoadedModel` (e.g. a test's tiny model) as <name>.json +
    <name>.pt, for workers' --model-file. Returns the JSON path."""
    import torch

    folder = Path(folder)
    spec = loaded.spec
    weights = folder / f"{spec.name}.pt"
    torch.save(loaded.net.state_dict(), weights)
    path = folder / f"{spec.name}.json"
    path.write_text(json.dumps({"name": spec.name, "file": weights.name, "sha256": spec.sha256,
                                "config": spec.config.to_dict(), "modes": list(spec.modes)}))
    return path


def _load_model_file(path: str):
    from vaezip.network import registry
    from vaezip.network.config import ModelConfig

    data = json.loads(Path(path).read_text())
    spec = registry.ModelSpec(data["name"], data["file"], data["sha256"], ModelConfig.from_dict(data["config"]),
                              tuple(data["modes"]))
    return registry.model_from_weights(spec, Path(path).parent / data["file"])


# ---- the worker side ---------------------------------------------------------------


def _runtime() -> dict:
    import numpy as np
    import torch

    try:
        import constriction
    except ImportError:
        coder = None
    else:  # the RPC stand-in (benchmarks/constriction_rpc) has a __version__, the real package none
        from importlib.metadata import version

        coder = getattr(constriction, "__version__", None) or version("constriction")
    return {"machine": os.uname().machine, "torch": torch.__version__, "numpy": np.__version__, "constriction": coder,
            "aten": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "onednn": torch.backends.mkldnn.enabled,
            "env": {k: os.environ[k] for k in CONTROLLED if k in os.environ}}


def _network_sha256(image, path: str, args, loaded) -> Optional[str]:
    """Run the encoder half of the network (`bottom_up`) on the whole image as one tile,
    under the numerics of format `args.version`; save the activations to
    args.out_dir/<image name>.npz and return the sha256 of their float32 bytes (None for
    a mode the plane coder codes without the network). Checks a machine's network
    arithmetic where the full codec does not run (no constriction)."""
    import numpy as np
    import torch

    from vaezip.coding import imagecodec
    from vaezip.format import versions
    from vaezip.network.inference import coding_network

    model = imagecodec.model_for_mode(image.mode, args.model, () if loaded is None else (loaded,))
    if model is None:
        return None  # the plane coder's modes: no network
    fmt = versions.get(args.version or versions.CURRENT.version)
    x = torch.from_numpy(np.ascontiguousarray(image.pixels.transpose(2, 0, 1)[None]))
    with coding_network(model.net, fmt) as network, torch.inference_mode():
        acts = {f"factor{k}": v.float().numpy() for k, v in network.bottom_up(x).items()}
    np.savez(Path(args.out_dir) / f"{Path(path).stem}.npz", **acts)
    digest = hashlib.sha256()
    for key in sorted(acts):
        digest.update(key.encode() + np.ascontiguousarray(acts[key], dtype="<f4").tobytes())
    return digest.hexdigest()


def _force_onednn_off(torch) -> None:
    """oneDNN off for good: `inference.coding_network` switches it per format version, so
    later writes to `torch.backends.mkldnn.enabled` are ignored."""
    from torch.backends import ContextProp

    torch.backends.mkldnn.enabled = False
    type(torch.backends.mkldnn).enabled = ContextProp(torch._C._get_mkldnn_enabled, lambda _: None)


def worker(argv: Sequence[str]) -> int:
    """Entry point of a worker process: set threads and oneDNN first, then code each file,
    printing one JSON line (`Outcome` fields) per file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vaezip.evaluation.portability")
    parser.add_argument("action", choices=("decode", "encode", "network"))
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-onednn", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--model-file")
    parser.add_argument("--version", type=int)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.no_onednn:
        _force_onednn_off(torch)
    from vaezip.errors import DecodeMismatchError
    from vaezip.imaging.images import read_image

    loaded = _load_model_file(args.model_file) if args.model_file else None
    runtime = _runtime()
    for path in args.paths:
        start = time.perf_counter()
        row = {"file": path, "status": OK, "sha256": None, "detail": "", "runtime": runtime}
        try:
            if args.action != "network":  # the network alone needs no entropy coder (constriction)
                from vaezip import api
            if args.action == "decode":
                row["sha256"] = pixels_sha256(api.decompress_image(Path(path).read_bytes(), loaded=loaded))
            elif args.action == "network":
                row["sha256"] = _network_sha256(read_image(path), path, args, loaded)
            else:
                kwargs = {} if args.version is None else {"version": args.version}
                data = api.compress(read_image(path), args.model, loaded=loaded, **kwargs)
                (Path(args.out_dir) / (Path(path).stem + ".vz")).write_bytes(data)
                row["sha256"] = code_sha256(data)
        except DecodeMismatchError as exc:
            row.update(status=CHECKSUM, detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the table shows it
            row.update(status=ERROR, detail=f"{type(exc).__name__}: {exc}")
        row["seconds"] = round(time.perf_counter() - start, 3)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
