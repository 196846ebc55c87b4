"""Draw the training stages and how the recipes chain (``init_from``) into docs/stages.png.

    python docs/make_stages_figure.py [--output docs/stages.png]

The edges are read from the recipes themselves (each recipe's ``model.init_args.init_from``, its layers composed),
so the picture cannot disagree with them; only the layout (which column and row a recipe sits in) is written here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from lit_internvl.recipes import compose  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# recipe → (column, row, what it trains, colour). Rows: InternVL 1's path, InternVL3's native pretraining, test-time
# scaling and RL (the critic's start sits between the rows it joins).
LAYOUT = {
    "stage1": (0, 0, "stage 1\ncontrastive (InternVL-C)", 0),
    "stage2": (1, 0, "stage 2\ngenerative (InternVL-G)", 0),
    "sft": (2, 0, "SFT\nconversations", 0),
    "mpo": (3, 0, "MPO\npreferences", 0),
    "nmp": (1, 1, "NMP (InternVL3)\ninterleaved + text", 1),
    "sft_steps": (2, 2, "SFT step by step\n(the policy)", 2),
    "critic_base": (3, 1, "SFT step by step\n(the critic's start)", 2),
    "critic": (4, 2, "critic (VisualPRM)\n+ Best-of-N", 2),
    "rl": (4, 0, "online RL\nGSPO / GRPO", 0),
}
COLOURS = {0: "#dbe9f6", 1: "#e4f2dc", 2: "#fbe8d3", 3: "#f4dcdc"}


def chains(recipes: Path) -> list[tuple[str, str]]:
    """(from, to) for every recipe whose init_from is another recipe's runs/<name>/ checkpoint."""
    edges = []
    for name in LAYOUT:
        init_from = compose(recipes / f"{name}.yaml")["model"]["init_args"].get("init_from")
        match = re.match(r"runs/([^/]+)/", str(init_from or ""))
        if match:
            edges.append((match.group(1), name))
    return edges


def draw(output: Path) -> list[tuple[str, str]]:
    edges = chains(REPO / "recipes")
    figure, axes = plt.subplots(figsize=(13.5, 5.2), dpi=110)
    width, height = 2.2, 0.8

    def centre(name: str) -> tuple[float, float]:
        column, row, _, _ = LAYOUT[name]
        return column * 2.9, -row * 1.25

    for name, (_, _, label, colour) in LAYOUT.items():
        x, y = centre(name)
        axes.add_patch(
            FancyBboxPatch(
                (x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.05", fc=COLOURS[colour], ec="#333"
            )
        )
        axes.text(x, y + 0.1, label, ha="center", va="center", fontsize=9)
        axes.text(x, y - 0.27, f"recipes/{name}.yaml", ha="center", va="center", fontsize=7.5, family="monospace")
    for source, target in edges:
        (x0, y0), (x1, y1) = centre(source), centre(target)
        start = (x0 + width / 2 + 0.05, y0) if y0 == y1 else (x0 + (width / 2 if x1 > x0 else 0), y0 - height / 2)
        end = (x1 - width / 2 - 0.05, y1) if y0 == y1 else (x1 - width / 2 - 0.05, y1)
        axes.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.4, color="#333"))
    # The one chain that is a command-line override, not a recipe's init_from (make pipeline's sft_from_nmp).
    (x0, y0), (x1, y1) = centre("nmp"), centre("sft")
    axes.annotate(
        "", xy=(x1 - 0.3, y1 - height / 2 - 0.05), xytext=(x0 + width / 2 + 0.05, y0),
        arrowprops=dict(arrowstyle="->", lw=1.2, ls="--", color="#555"),
    )  # fmt: skip
    axes.text(
        x0 + 2.0,
        y0 - 0.05,
        "make pipeline:\n--model.init_args.init_from\nruns/nmp/…",
        fontsize=7,
        color="#555",
        ha="left",
    )
    # The critic's data are the policy's samples (a command, not an init_from).
    (x0, y0), (x1, y1) = centre("sft_steps"), centre("critic")
    axes.annotate(
        "", xy=(x1 - width / 2 - 0.05, y1), xytext=(x0 + width / 2 + 0.05, y0),
        arrowprops=dict(arrowstyle="->", lw=1.2, ls="--", color="#555"),
    )  # fmt: skip
    axes.text((x0 + x1) / 2, y0 + 0.12, "critic_data:\nthe policy's samples", fontsize=7, color="#555",
              ha="center", va="bottom")  # fmt: skip
    axes.text(
        -1.2, -4.55,
        "Arrows: the next recipe's init_from is the previous run's runs/<name>/checkpoints/last.ckpt.\n"
        "Any stage can instead start from a real checkpoint (init_from: hf:/path/to/InternVL3-1B); "
        "recipes/internvl3_*/ do.",
        fontsize=8, ha="left", va="center",
    )  # fmt: skip
    axes.set_xlim(-1.3, 4 * 2.9 + 1.3)
    axes.set_ylim(-4.9, 0.7)
    axes.set_axis_off()
    axes.set_title("The embedded default's stages and how the recipes chain", fontsize=11)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return edges


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "stages.png")
    args = parser.parse_args()
    for source, target in draw(args.output):
        print(f"{source} → {target}")
    print(f"written to {args.output}")
