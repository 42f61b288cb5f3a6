"""Plot the training curves stored in the model registry (held-out −ELBO, bits per subpixel).

Two panels, because the two generations measure on different held-out crops:
  left: the first models (one H200, 12 minutes each), on their held-out crops;
  right: everything trained on the generation-2 photo banks (.carry/photos-gen2.npz, and
    runs/photos-gen2-local.npz for CPU sessions), on their held-out photos2 crops (a model
    that reads the ring around each tile on crops 4 px wider, a different sample: dashed).
    A warm-started model continues its parent's line: the x axis counts the crops seen on
    these banks along the whole chain of warm starts (earlier sessions of the same model
    included), so one line per lineage reads left to right. A model registered from a run
    that an earlier registered model was also taken from draws only the run's later rows.
    A family's sessions (photo-rgb-halo-1 ... -N) share one colour and one legend entry.

    python benchmarks/plot_training.py docs/training_curve.png
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vaezip.network import registry  # noqa: E402
from vaezip.training.campaign import CAMPAIGNS  # noqa: E402

GEN2_BANKS = (CAMPAIGNS["gen2"].bank, CAMPAIGNS["gen2"].local_bank)  # the same held-out crops


def on_gen2_bank(spec: registry.ModelSpec) -> bool:
    return str(spec.training.get("heldout", "")).startswith(GEN2_BANKS)


def parent(spec: registry.ModelSpec) -> str | None:
    """The registered model `spec` was warm-started from (a run file: its campaign's base)."""
    source = (spec.training.get("warm_start") or {}).get("from", "")
    match = re.match(r"registered model (\S+)", source)
    if match:
        return match.group(1)
    campaign = CAMPAIGNS.get(spec.training.get("campaign", ""))
    return campaign.base_model if campaign and source else None


def session_crops(session: dict) -> int:
    first, last = session["steps"]
    return (last - first) * session["batch_per_rank"] * session.get("ranks", 1)


@lru_cache(maxsize=None)
def crops_before(name: str) -> int:
    """Crops of the generation-2 bank seen along `name`'s warm-start chain, all its sessions included."""
    spec = registry.get_spec(name)
    if not on_gen2_bank(spec):
        return 0
    own = sum(session_crops(s) for s in spec.training.get("sessions", []) if not s.get("before_warm_start")) \
        or spec.training.get("crops_seen", 0)
    return own + (crops_before(parent(spec)) if parent(spec) in registry.specs() else 0)


def curve_start(spec: registry.ModelSpec) -> int:
    """Crops seen before step 0 of `spec`'s run (its curve counts steps from its warm start,
    across all the run's resumed sessions)."""
    return crops_before(parent(spec)) if parent(spec) in registry.specs() else 0


def new_rows(spec: registry.ModelSpec) -> list:
    """`spec`'s curve from where the longest earlier-registered curve of the same run ends (its
    last row kept, so the lines join): a resumed run's record holds the whole run."""
    curve = spec.training.get("curve", [])
    shown_until = None
    for other in registry.specs().values():
        if other.name == spec.name:
            break
        rows = other.training.get("curve", [])
        if len(rows) > 1 and len(rows) < len(curve) and rows[:-1] == curve[:len(rows) - 1] \
                and parent(other) == parent(spec):
            shown_until = rows[-1] if shown_until is None or rows[-1][0] > shown_until[0] else shown_until
    if shown_until is None:
        return curve
    return [shown_until] + [row for row in curve if row[0] > shown_until[0]]


def lineage_of(name: str) -> str:
    """A model's family: its name without the session number (photo-rgb-halo-14 -> photo-rgb-halo)."""
    return re.sub(r"-\d+$", "", name)


def lineage_labels(specs: list[registry.ModelSpec]) -> dict[str, str]:
    """The legend entry of each family: its one name, or its first name and last number."""
    members: dict[str, list[str]] = {}
    for spec in specs:
        members.setdefault(lineage_of(spec.name), []).append(spec.name)
    return {lineage: names[0] if len(names) == 1 else f"{names[0]} … {names[-1].rsplit('-', 1)[1]}"
            for lineage, names in members.items()}


def main(out: str) -> None:
    fig, (gen1, gen2) = plt.subplots(1, 2, figsize=(11, 4.2))
    gen2.set_prop_cycle(color=plt.cm.tab20.colors)  # more models than the default cycle's 10 colours
    lineages = lineage_labels([spec for spec in registry.specs().values() if on_gen2_bank(spec)])
    colours: dict[str, tuple] = {}
    for spec in registry.specs().values():
        curve = spec.training.get("curve", [])
        if not curve or spec.name.startswith("mnist"):
            continue
        batch = spec.training.get("batch", 64)
        if on_gen2_bank(spec):
            start, curve = curve_start(spec), new_rows(spec)
            x = [(start + row[0] * batch) / 1e3 for row in curve]
            lineage = lineage_of(spec.name)
            if lineage in colours:  # a later session: the family's colour, no second legend entry
                style = {"color": colours[lineage]}
            else:  # a ring model's held-out crops are 68 px (the ring): another sample of the photos
                style = {"label": lineages[lineage] + (" (68 px crops: the ring)" if spec.config.pixel_halo else "")}
            (line,) = gen2.plot(x, [row[2] for row in curve], marker="o", ms=3,
                                ls="--" if spec.config.pixel_halo else "-", **style)
            colours.setdefault(lineage, line.get_color())
        else:
            x = [row[0] * batch / 1e3 for row in curve]
            (line,) = gen1.plot(x, [row[2] for row in curve], marker="o", ms=3, label=f"{spec.name} held-out")
            gen1.plot(x, [row[1] for row in curve], ls=":", color=line.get_color(), alpha=0.6,
                      label=f"{spec.name} train")
    gen1.set_title("generation 1: one H200, 12 minutes a model (own held-out crops)", fontsize=9)
    gen1.set_ylim(3, 6)
    gen2.set_title("generation-2 bank, 2 CPU cores (held-out photos2 crops)", fontsize=9)
    for ax in (gen1, gen2):
        ax.set_xlabel("crops seen (thousands)")
        ax.set_ylabel("held-out −ELBO, bits per subpixel")
        ax.grid(alpha=0.3)
    gen1.legend(fontsize=7)
    gen2.legend(fontsize=7, loc="upper right")  # the curves fall from the upper left
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/training_curve.png")
