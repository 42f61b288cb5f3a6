"""Plot the training curves stored in the model registry (held-out −ELBO, bits per subpixel).

    python benchmarks/plot_training.py docs/training_curve.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vaezip.network import registry  # noqa: E402


def main(out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in registry.specs().values():
        curve = spec.training.get("curve", [])
        if not curve:
            continue
        steps = [row[0] for row in curve]
        (line,) = ax.plot(steps, [row[2] for row in curve], marker="o", ms=3, label=f"{spec.name} held-out")
        ax.plot(steps, [row[1] for row in curve], ls=":", color=line.get_color(), alpha=0.6, label=f"{spec.name} train")
    ax.set_xlabel("step (batch 64)")
    ax.set_ylabel("−ELBO, bits per subpixel")
    ax.set_ylim(0, 6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("vaezip training (one H200; learning-rate restart at the resume, ~step 8000)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/training_curve.png")
