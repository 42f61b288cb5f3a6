"""Render the docs/RESULTS.md tables from the JSON files the benchmarks wrote.

Every number in those tables comes from the JSON; nothing is typed by hand.

    .venv/bin/python benchmarks/report.py --kodak /tmp/vaezip-bench/kodak.json \
        --photos /tmp/vaezip-bench/wiki_heldout.json --photos-title "Held-out wikiphotos" \
        --determinism /tmp/vaezip-bench/determinism.json \
        --packed /tmp/vaezip-bench/packed_mnist.json /tmp/vaezip-bench/packed_cifar.json \
        --large /tmp/vaezip-bench/large_mp.json /tmp/vaezip-bench/large_8000.json \
        --iwae-kodak /tmp/vaezip-bench/iwae_kodak.json --fuzz /tmp/vaezip-bench/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kodak import _code_line, markdown  # noqa: E402
from large_image import markdown as large_markdown  # noqa: E402


def kodak_section(result: dict, title: str = "Kodak") -> str:
    """The section of a `kodak.py` run; `title` names its image set."""
    t, b, env = result["totals"], result["totals"]["baselines"], result["environment"]
    libs = env["libraries"]
    worse = [r for r in result["images"] if r["baselines"]["jpegxl"]["bpd"] is not None
             and r["file_bpd"] > r["baselines"]["jpegxl"]["bpd"]]
    elbo_worse = [r for r in result["images"] if r["baselines"]["jpegxl"]["bpd"] is not None
                  and r["nelbo_bpd"] > r["baselines"]["jpegxl"]["bpd"]]
    webp_worse = [r for r in result["images"] if r["baselines"]["webp"]["bpd"] is not None
                  and r["file_bpd"] > r["baselines"]["webp"]["bpd"]]
    n = t["images"]
    pct = lambda x: f"{100 * x:+.1f} %"  # noqa: E731
    lines = [
        f"## {title} ({n} images), single-image files",
        "",
        "Each image is compressed and decompressed by the real CLI (`vaezip compress IMG -o X.vz`, "
        "`vaezip decompress X.vz -o X.png`) in a fresh subprocess, so encode/decode times are wall "
        "times including Python, torch and model start-up. The decoded PNG is compared with the "
        "original (mode and every pixel); the run aborts on any difference. −ELBO is the model's "
        "bound on the same pixels with the tile size from the file header "
        "(`vaezip.api.model_bits`). Baselines come from `vaezip.evaluation.baselines` (PNG: Pillow "
        "`optimize=True`; WebP: Pillow `lossless=True, quality=100, method=6, exact=True`; "
        "JPEG-XL: `imagecodecs.jpegxl_encode(arr, lossless=True, effort=9)`), each decoded back "
        "and checked pixel-exact. Rates are bits per subpixel (H·W·3); the total row is total "
        "bits / total subpixels, not a mean of ratios. Baseline times are in-process (no start-up).",
        "",
        markdown(result),
        "",
        "### Summary",
        "",
        f"- All {n} round trips pixel-exact: **{t['all_roundtrips_exact']}**.",
        f"- vaezip file: **{t['file_bpd']:.3f}** bpd; −ELBO **{t['nelbo_bpd']:.3f}** bpd; "
        f"PNG {b['png']['bpd']:.3f}, WebP {b['webp']['bpd']:.3f}, JPEG-XL e9 {b['jpegxl']['bpd']:.3f} bpd.",
        f"- Coding overhead (file over −ELBO): {100 * t['overhead_total']:.2f} % in total, "
        f"{100 * t['overhead_mean']:.2f} % mean per image "
        f"(range {100 * t['overhead_min']:.2f} – {100 * t['overhead_max']:.2f} %).",
        f"- vaezip file vs PNG {pct(t['file_vs_png'])}, vs WebP {pct(t['file_vs_webp'])}, "
        f"vs JPEG-XL {pct(t['file_vs_jpegxl'])} (negative: vaezip smaller).",
        f"- **Where vaezip loses to JPEG-XL**: the file is larger than JPEG-XL e9 on {len(worse)} of {n} images"
        + (f" ({', '.join(r['image'] for r in worse)})" if worse and len(worse) < n else "")
        + f"; even the −ELBO bound is above JPEG-XL on {len(elbo_worse)} of {n}. In total the file is "
        f"{pct(t['file_vs_jpegxl'])} against JPEG-XL e9.",
        f"- Against WebP lossless the file is larger on {len(webp_worse)} of {n} images"
        + (f"; smaller only on {', '.join(r['image'] for r in result['images'] if r not in webp_worse)}"
           if 0 < len(webp_worse) < n else "") + ".",
        f"- Time for all {n} images ({t['megapixels']:.3f} MP): vaezip encode {t['encode_s']:.1f} s "
        f"({t['encode_s_per_mp']:.2f} s/MP), decode {t['decode_s']:.1f} s ({t['decode_s_per_mp']:.2f} s/MP); "
        f"JPEG-XL e9 encode {b['jpegxl']['encode_s']:.1f} s ({b['jpegxl']['encode_s_per_mp']:.2f} s/MP), "
        f"decode {b['jpegxl']['decode_s']:.2f} s. Ratio to JPEG-XL: encode "
        f"{t['encode_time_ratio_vs_jpegxl']:.2f}x, decode {t['decode_time_ratio_vs_jpegxl']:.1f}x.",
        "",
        "### Setup",
        "",
        f"- Date (UTC): {result['date']}.",
        f"- Command (run from the repository root): `{result['command']}`",
        f"- Machine: {env['cores']} cores, {env['cpu']}; {env['platform']}. Other jobs on the "
        "2 cores inflate the times: check `uptime` before timing.",
        f"- torch {env['torch']}, threads: the CLI runs with torch's default ({env['torch_default_threads']}; "
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}); numpy {env['numpy']}, Python {env['python']}.",
        f"- Pillow {libs['pillow']} (zlib {libs['zlib']}, libwebp {libs['libwebp']}), imagecodecs "
        f"{libs['imagecodecs']} ({libs['libjxl']}, imagecodecs' default thread count).",
        f"- Model: {', '.join(sorted({r['model'] for r in result['images']}))}, tile "
        f"{', '.join(str(x) for x in sorted({r['tile'] for r in result['images']}))} px.",
    ]
    return "\n".join(lines)


def determinism_section(result: dict) -> str:
    lines = [
        "## Determinism across thread counts",
        "",
        "Each image is encoded in a fresh process with `torch.set_num_threads(2)` and decoded in "
        "another with `torch.set_num_threads(1)`, and the other way round; every process loads the "
        "model afresh. The two encodes are also compared byte for byte.",
        "",
        "| image | mode | size | enc 2 thr → dec 1 thr | enc 1 thr → dec 2 thr | .vz bytes equal (enc 2 vs 1) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["images"]:
        cells = []
        for run in r["runs"]:
            err = run["encode"].get("error") or run.get("decode", {}).get("error")
            cells.append("identical" if run["identical"] else f"DIFFERENT{f' ({err})' if err else ''}")
        sizes = "/".join(str(x) for x in r["encode_bytes"])
        lines.append(f"| {r['image']} | {r['mode']} | {r['width']}x{r['height']} | {cells[0]} | {cells[1]} "
                     f"| {'yes' if r['encodes_identical'] else 'NO'} ({sizes} B) |")
    lines += [
        "",
        f"Result: **{'all identical' if result['all_ok'] else 'NOT all identical'}** "
        f"({result['date']} UTC). Command: `{result['command']}`. Code: {_code_line(result.get('code'))}.",
    ]
    return "\n".join(lines)


def packed_table(results: list[dict]) -> str:
    """`benchmarks/packed.py` results, one row per data set."""
    def bpd(value) -> str:
        return "(missing)" if value is None else f"{value:.3f}"

    lines = ["| data set | images | model | −ELBO bpd | payload bpd | file bpd | file / −ELBO | table bytes / image "
             "| PNG | WebP | JPEG-XL e9 | pack s | unpack s |", "|" + "---|" * 13]
    for r in results:
        b = r.get("baselines_bpd", {})
        lines.append(
            f"| {r['dataset']} | {r['images']:,} | {', '.join(r['models'])} | {r['nelbo_bpd']:.4f} | {r['payload_bpd']:.4f} "
            f"| {r['file_bpd']:.4f} | {100 * r['overhead_file']:+.3f} % | {r['metadata_bytes_per_image']:.2f} "
            f"| {bpd(b.get('png'))} | {bpd(b.get('webp'))} | {bpd(b.get('jpegxl'))} "
            f"| {r['pack_seconds']:.0f} | {r['unpack_seconds']:.0f} |")
    return "\n".join(lines)


def iwae_kodak_table(result: dict) -> str:
    """`benchmarks/iwae_kodak.py`: IWAE, time and peak RSS against K on full images."""
    lines = [f"{result['model']} on {', '.join(result['images'])} (full size, {result['subpixels']:,} subpixels); "
             f"RSS after loading the model {result['rss_after_load_mib']:.0f} MiB. Command: `{result['command']}`.", "",
             "| K | IWAE bpd | −ELBO bpd | seconds | peak RSS MiB |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['k']} | {row['iwae_bpd']:.4f} | {row['nelbo_bpd']:.4f} | {row['seconds']:.0f} "
                     f"| {row['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def fuzz_table(result: dict) -> str:
    """`benchmarks/fuzz.py`: outcomes by file kind."""
    lines = ["| file | outcome | cases |", "|---|---|---|"]
    for key, count in sorted(result["outcomes"].items()):
        kind, outcome = key.split(": ", 1)
        lines.append(f"| {kind} | {outcome} | {count:,} |")
    lines += ["", f"{result['cases']:,} cases (seed {result['seed']}) from {result['valid_files']} valid files; "
              f"failures (crash, wrong image, decode over the time limit): **{result['failure_count']}**. "
              f"Slowest decode {result['slowest_decode_s']:.2f} s, whole run {result['total_s']:.0f} s, "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kodak", type=Path)
    parser.add_argument("--photos", type=Path, help="a kodak.py run on other photos (--data)")
    parser.add_argument("--photos-title", default="Held-out photos")
    parser.add_argument("--determinism", type=Path)
    parser.add_argument("--packed", type=Path, nargs="+")
    parser.add_argument("--large", type=Path, nargs="+")
    parser.add_argument("--iwae-kodak", type=Path)
    parser.add_argument("--fuzz", type=Path)
    args = parser.parse_args()
    load = lambda path: json.loads(path.read_text())  # noqa: E731
    sections = []
    if args.kodak:
        sections.append(kodak_section(load(args.kodak)))
    if args.photos:
        sections.append(kodak_section(load(args.photos), args.photos_title))
    if args.determinism:
        sections.append(determinism_section(load(args.determinism)))
    if args.packed:
        sections.append(packed_table([load(p) for p in args.packed]))
    for path in args.large or ():
        sections.append(large_markdown(load(path)))
    if args.iwae_kodak:
        sections.append(iwae_kodak_table(load(args.iwae_kodak)))
    if args.fuzz:
        sections.append(fuzz_table(load(args.fuzz)))
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
