"""Where the time of one compress / decompress goes: start-up, network, tables, ANS.

Times, in one process: the imports (vaezip and torch), the model load, then a cold and a
warm `vaezip.compress` and `vaezip.decompress` of one image, and for the warm runs the
wall time spent in each phase, measured by wrapping the functions that do the work:

  network   `inference.Network.bottom_up`, `top_down` (which includes the latent
            pops and pushes its chooser does), `posteriors`, `stage_params`;
  offsets   the encoder's search for format version 3's scale offsets
            (`calibrate.choose_offsets`);
  tables    waiting for `inference.Network.row_tables`: the probability tables are
            built in the thread pool while the pixels of earlier chunks are coded, so
            this is only the part of their time that coding does not hide;
  ANS       constriction's encode/decode calls for the pixels;
  rest      everything else (parameter rounding, lattices, checksums).

    .venv/bin/python benchmarks/profile_coding.py [IMAGE] [--json-out FILE]

Default image: kodim03 (768x512). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

START = time.perf_counter()

from vaezip import api  # noqa: E402  (timed: the imports)
from vaezip.coding import calibrate  # noqa: E402  (timed: the imports)
from vaezip.entropy import coders  # noqa: E402  (timed: the imports)
from vaezip.imaging.images import as_image  # noqa: E402
from vaezip.network import inference, registry  # noqa: E402  (timed: the imports)

IMPORTED = time.perf_counter()
PHASES = {"bottom_up": "network", "top_down": "network", "posteriors": "network", "stage_params": "network"}


def instrument(totals: collections.Counter) -> None:
    """Wrap the phase functions so each call adds its wall time to `totals`."""
    for name, phase in PHASES.items():
        original = getattr(inference.Network, name)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_phase] += time.perf_counter() - start

        setattr(inference.Network, name, timed)
    choose_offsets = calibrate.choose_offsets

    def timed_choose_offsets(*args):
        start = time.perf_counter()
        try:
            return choose_offsets(*args)
        finally:
            totals["offsets"] += time.perf_counter() - start

    calibrate.choose_offsets = timed_choose_offsets
    row_tables = inference.Network.row_tables

    def timed_row_tables(*args, **kwargs):
        chunks = row_tables(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                totals["tables"] += time.perf_counter() - start
            yield chunk

    inference.Network.row_tables = timed_row_tables
    categorical = coders.categorical

    def timed_categorical(probabilities, normalized=False):
        codec = categorical(probabilities, normalized)

        def push(ans, symbols):
            start = time.perf_counter()
            codec.push(ans, symbols)
            totals["ANS"] += time.perf_counter() - start

        def pop(ans):
            start = time.perf_counter()
            try:
                return codec.pop(ans)
            finally:
                totals["ANS"] += time.perf_counter() - start

        return coders.Codec(push, pop)

    coders.categorical = timed_categorical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default="/work/shared/data/kodak/kodim03.png")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    start = time.perf_counter()
    registry.load_model("photo-rgb-1")
    loaded = time.perf_counter() - start
    image = as_image(args.image)
    result = {"image": args.image, "size": [image.width, image.height], "import_s": IMPORTED - START,
              "model_load_s": loaded, "threads": inference.default_workers()}
    totals: collections.Counter = collections.Counter()
    for label, run in (("compress", lambda: api.compress(image)), ("decompress", lambda: api.decompress_image(data))):
        start = time.perf_counter()
        out = run()
        cold = time.perf_counter() - start
        if label == "compress":
            data = out
            instrument(totals)
        totals.clear()
        start = time.perf_counter()
        run()
        warm = time.perf_counter() - start
        phases = {phase: totals[phase] for phase in ("network", "offsets", "tables", "ANS")}
        phases["rest"] = warm - sum(phases.values())
        result[label] = {"cold_s": cold, "warm_s": warm, "phases_s": phases}
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
