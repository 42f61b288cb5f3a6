"""Portability matrix: decode files under imitated other machines, and re-encode under a few.

Compresses a few images (default: 192x128 crops of kodim01 and kodim23, a gray crop of
kodim08, and kodim23 in 16 colours, which the plane coder codes without the network: a
control) with `--model` (default: the registered model for each mode) at format
`--version` (default: the version this build writes), in a fresh process with default
settings. Then decodes every file in one fresh process per setting of
`portability.full_matrix()` (oneDNN ISA caps, MKL_CBWR, numpy's dispatch switched off,
ATen's capability, thread counts, oneDNN off, VAEZIP_EXACT_SPLIT) and, with
`--aarch64-root`, in an emulated arm64 root, whose coder calls go to this machine's
constriction (`constriction_rpc/`: PyPI has no aarch64 Linux build). It also re-encodes
under `portability.encode_matrix()` and compares the bytes.

Prints a markdown table (`--json` for JSON). Exit status 1 if any decode does not give the
original pixels, or any re-encode gives other bytes.

    .venv/bin/python benchmarks/portability.py [--images A.png ...] [--version 6] [--json] [--json-out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import _snapshot

KODAK = Path("/work/shared/data/kodak")
RPC = Path(__file__).resolve().parent / "constriction_rpc"
CROPS = (("kodim01", "RGB"), ("kodim23", "RGB"), ("kodim08", "L"), ("kodim23", "P"))
CROP_SIZE = (192, 128)  # width, height


def default_images(folder: Path) -> list[Path]:
    """Centre crops of CROP_SIZE, as PNG files in `folder`."""
    from PIL import Image as PILImage

    paths = []
    width, height = CROP_SIZE
    for name, mode in CROPS:
        with PILImage.open(KODAK / f"{name}.png") as im:
            left, top = (im.width - width) // 2, (im.height - height) // 2
            path = folder / f"{name}-{mode}-{width}x{height}.png"
            crop = im.convert("RGB").crop((left, top, left + width, top + height))
            (crop.quantize(16) if mode == "P" else crop.convert(mode)).save(path)
            paths.append(path)
    return paths


def _cell(outcome: dict, expected: str) -> str:
    if outcome["status"] == "ok":
        return "ok" if outcome["sha256"] == expected else "**WRONG PIXELS**"
    return "**checksum**" if outcome["status"] == "checksum" else f"**error**: {outcome['detail'][:60]}"


def _differences(reference: Path, own: Path) -> dict:
    """How the activations a worker saved (`own`) differ from the baseline's (`reference`)."""
    import numpy as np

    if not (reference.exists() and own.exists()):
        return {}
    with np.load(reference) as ref, np.load(own) as new:
        values = sum(ref[k].size for k in ref.files)
        differ = sum(int((ref[k] != new[k]).sum()) for k in ref.files)
        worst = max(float(np.abs(ref[k].astype(np.float64) - new[k]).max()) for k in ref.files)
    return {"values": values, "differ": differ, "max_abs_diff": worst}


def render(result: dict) -> str:
    """The markdown tables of a result: decodes (setting x file), then re-encodes."""
    expected = result["expected_pixels_sha256"]
    stems = list(result["files"])
    header = f"Format version {result['version']}; {len(stems)} files; {result['date']}; runtime {result['runtime']}"
    lines = [header, "", "| decoded with | " + " | ".join(stems) + " |", "|---|" + "---|" * len(stems)]
    rows: dict = {}
    for o in result["decodes"]:
        rows.setdefault(o["setting"], {})[Path(o["file"]).stem] = o
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[s], expected[s]) for s in stems) + " |")
    reference = {Path(o["file"]).stem: o["sha256"] for o in result["encodes"] if o["setting"] == "baseline"}
    encodes: dict = {}
    for o in result["encodes"]:
        if o["setting"] != "baseline":
            encodes.setdefault(o["setting"], {})[Path(o["file"]).stem] = o
    if encodes:
        lines += ["", "| re-encoded with | " + " | ".join(stems) + " |", "|---|" + "---|" * len(stems)]
        for name, row in encodes.items():
            cells = ["same bytes" if row[s]["sha256"] == reference[s] else
                     ("**other bytes**" if row[s]["status"] == "ok" else f"**error**: {row[s]['detail'][:60]}")
                     for s in stems]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("network"):
        lines += ["", "| network (`bottom_up` activations) | " + " | ".join(stems) + " |",
                  "|---|" + "---|" * len(stems)]
        rows = {}
        for o in result["network"]:
            rows.setdefault(o["setting"], {})[Path(o["file"]).stem] = o
        for name, row in rows.items():
            cells = []
            for s in stems:
                o = row.get(s)
                diff = (o or {}).get("runtime", {}).get("activations") or {}
                if o and o["status"] == "ok" and o["sha256"] is None:
                    cells.append("no network")
                elif not o or o["status"] != "ok":
                    cells.append(f"**error**: {(o or {}).get('detail', '?')[:60]}")
                elif name == "baseline":
                    cells.append(f"{diff.get('values', 0):,} values")
                else:
                    cells.append(f"{diff['differ']:,} differ, max {diff['max_abs_diff']:.2g}" if diff else "?")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    verdict = (f"All decodes exact: {result['all_decodes_ok']}; all re-encodes identical: "
               f"{result['all_encodes_identical']}. Command: `{result['command']}`")
    lines += ["", verdict]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", type=Path, help="default: two Kodak crops and a gray one")
    parser.add_argument("--model", help="registered model (default: the registry's for each mode)")
    parser.add_argument("--version", type=int, help="format version to write (default: the current one)")
    parser.add_argument("--aarch64-root", type=Path,
                        help="also decode in this arm64 root (docs/portability-aarch64.md)")
    parser.add_argument("--aarch64-python", default="/opt/venv/bin/python")
    parser.add_argument("--no-encode", action="store_true", help="skip the re-encoding check")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result here")
    parser.add_argument("--render", type=Path, help="only print the markdown of a saved JSON result")
    parser.add_argument("--code", choices=("head", "worktree", "installed"), default="head",
                        help="which code to run, copied once at start (default: git HEAD); see _snapshot.py")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0

    with tempfile.TemporaryDirectory(prefix="vaezip-port-") as tmp:
        tmp = Path(tmp)
        code = _snapshot.make(args.code, tmp / "code")
        from vaezip.evaluation import portability as port
        from vaezip.format import versions
        from vaezip.imaging.images import read_image

        version = args.version or versions.CURRENT.version
        images = args.images or default_images(tmp)
        expected = {p.stem: port.pixels_sha256(read_image(p)) for p in images}
        run = {"model": args.model, "base_env": code["env"]}

        encode_settings = [port.BASELINE] + ([] if args.no_encode else port.encode_matrix()[1:])
        encodes = port.encode_all(encode_settings, images, tmp / "vz", version=version, **run)
        reference = [o for o in encodes if o.setting == port.BASELINE.name]
        failed = [o for o in reference if o.status != "ok"]
        if failed:
            raise SystemExit(f"encoding failed: {failed[0].file}: {failed[0].detail}")
        files = sorted((tmp / "vz" / "enc0").glob("*.vz"))

        settings = port.full_matrix()
        server = None
        if args.aarch64_root:
            # no constriction for aarch64 Linux: its coder calls go to this machine's (constriction_rpc)
            sock = tmp / "constriction.sock"
            server = subprocess.Popen([sys.executable, str(RPC / "server.py"), str(sock)], stdout=subprocess.PIPE,
                                      text=True)
            server.stdout.readline()
            pythonpath = os.pathsep.join([str(RPC), *filter(None, [code["env"].get("PYTHONPATH")])])
            arm = port.aarch64_setting(args.aarch64_root, args.aarch64_python)
            settings.append(dataclasses.replace(arm, name=f"{arm.name}, coder on x86 via RPC", env=(
                ("PYTHONPATH", pythonpath), ("VAEZIP_CONSTRICTION_RPC", str(sock)))))
        decodes = []
        for setting in settings:
            decodes += port.run_worker(setting, "decode", files, **run)
            print(f"{setting.name}: {', '.join(o.status for o in decodes[-len(files):])}", file=sys.stderr, flush=True)

        network = []
        if args.aarch64_root:
            network = port.encode_all([port.BASELINE, settings[-1]], images, tmp / "net", version=version,
                                      action="network", **run)
            for i, o in enumerate(network):
                name = f"{Path(o.file).stem}.npz"
                if o.status == "ok":
                    own = tmp / "net" / f"enc{i // len(images)}" / name
                    o.runtime["activations"] = _differences(tmp / "net" / "enc0" / name, own)

        if server is not None:
            server.terminate()
            server.wait()

        ref_bytes = {Path(o.file).stem: o.sha256 for o in reference}
        decode_ok = all(o.status == "ok" and o.sha256 == expected[Path(o.file).stem] for o in decodes)
        encode_ok = all(o.status == "ok" and o.sha256 == ref_bytes[Path(o.file).stem] for o in encodes)
        result = {
            "benchmark": "portability",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv), "code": _snapshot.public(code), "version": version,
            "files": {f.stem: f.stat().st_size for f in files}, "expected_pixels_sha256": expected,
            "runtime": reference[0].runtime, "decodes": [vars(o) for o in decodes],
            "encodes": [vars(o) for o in encodes],
            "network": [vars(o) for o in network],
            "all_decodes_ok": decode_ok, "all_encodes_identical": encode_ok,
        }
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0 if decode_ok and encode_ok else 1

if __name__ == "__main__":
    raise SystemExit(main())
