"""``python -m lit_internvl probe``: a probe of a vision encoder (``fit`` of a probe recipe), once or over the few-shot
protocol's fractions of the training data, and a table of its held-out scores beside chance.

    python -m lit_internvl probe --config recipes/probe_linear.yaml
    python -m lit_internvl probe --config recipes/probe_segmentation.yaml --fractions 1/16 1/8 1/4 1/2 1 --seeds 3
    python -m lit_internvl probe --config recipes/probe_linear.yaml --output runs/digits \\
        --data.class_path lit_internvl.data.ImagesDataModule --data.init_args.train digits/train ...

Each fraction is one ``fit`` (the recipe's epochs, so a smaller fraction trains fewer steps, as InternVL's few-shot
ADE20K runs: 5k iterations for 1/16 … 80k for 1/1) into ``<output>/fraction_<f>``; every run shares one feature
cache, ``<output>/features``, so the encoder sees each image once across all of them. Arguments the command does not
know are the recipe's overrides (``--model.init_args.init_from ckpt``). The table (top-1/top-5 for the linear probe,
mIoU and pixel accuracy for segmentation) is printed and written to ``<output>/probe.json``.

One run of a small fraction is noisy (a few dozen images, a few steps). ``--seeds k`` repeats each fraction k times, run
s with ``seed_everything = s`` (the head's initialisation) and ``subset_seed = s`` (which images the fraction keeps and
their order; the pictures themselves, and so the cached features, stay the same), and reports each score's mean and
its sample standard deviation over the k runs, as few-shot results are reported over several random subsets.
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

#: The scores a probe's table shows, in this order, where its runs logged them.
COLUMNS = ("val/top1", "val/top5", "val/mIoU", "val/pixel_accuracy")


def run_fraction(
    config: list[str], fraction: Fraction, output: Path, overrides: list[str], seed: int | None = None
) -> dict:
    """One ``fit`` of the recipe on ``fraction`` of its training data: ``{metric: {"value", "chance"}}``; ``seed`` (None:
    the recipe's) sets ``seed_everything`` and the data's ``subset_seed``."""
    from lit_internvl.cli import main as cli_main

    folder = output / f"fraction_{str(fraction).replace('/', 'of')}"
    if seed is not None:
        folder = folder / f"seed_{seed}"
        overrides = [*overrides, "--seed_everything", str(seed), "--data.init_args.subset_seed", str(seed)]
    argv = ["fit", *(a for c in config for a in ("--config", c)), *overrides,
            "--data.init_args.fraction", str(float(fraction)),
            "--trainer.default_root_dir", str(folder),
            "--model.init_args.feature_cache", str(output / "features")]  # fmt: skip
    cli = cli_main(argv)
    chance = cli.model.chance_levels
    return {
        name: {"value": float(value), "chance": chance.get(name)}
        for name, value in cli.trainer.callback_metrics.items()
        if name in COLUMNS
    }


def over_seeds(runs: list[dict]) -> dict:
    """The runs of one fraction → ``{metric: {"value": mean, "std": sample standard deviation, "runs": [...],
    "chance"}}`` (the chance of the first run: the held-out split is the same in every run)."""
    merged = {}
    for name in runs[0]:
        values = [run[name]["value"] for run in runs]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        merged[name] = {"value": mean, "std": std, "runs": values, "chance": runs[0][name]["chance"]}
    return merged


def probe_table(rows: dict[str, dict]) -> str:
    """A markdown table: a row per fraction, each score (``mean ± std`` over seeds) with its chance level in brackets."""
    shown = [c for c in COLUMNS if any(c in scores for scores in rows.values())]
    lines = ["| fraction | " + " | ".join(f"{c.removeprefix('val/')} (chance)" for c in shown) + " |",
             "|---" * (len(shown) + 1) + "|"]  # fmt: skip
    for fraction, scores in rows.items():
        cells = []
        for column in shown:
            score = scores.get(column)
            chance = "" if score is None or score["chance"] is None else f" ({score['chance']:.3f})"
            spread = f" ± {score['std']:.3f}" if score is not None and "std" in score else ""
            cells.append("" if score is None else f"{score['value']:.3f}{spread}{chance}")
        lines.append(f"| {fraction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="the probe recipe (repeat for layers)")
    parser.add_argument("--fractions", nargs="+", default=["1"], help="fractions of the training data (1/16 ... 1)")
    parser.add_argument("--seeds", type=int, default=1, help="runs of each fraction, seeds 0..k-1 (mean ± std)")
    parser.add_argument("--output", help="folder of the runs and the features (default: runs/probe/<recipe name>)")
    args, overrides = parser.parse_known_args(argv)
    try:
        fractions = [Fraction(f) for f in args.fractions]
    except ValueError:
        parser.error(f"--fractions: {args.fractions} are not fractions such as 1/16 or 0.5")
    if not all(0 < f <= 1 for f in fractions):
        parser.error(f"--fractions must lie in (0, 1], got {', '.join(map(str, fractions))}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    output = Path(args.output or Path("runs/probe") / Path(args.config[-1]).stem)
    if args.seeds == 1:
        rows = {str(f): run_fraction(args.config, f, output, overrides) for f in fractions}
    else:
        rows = {
            str(f): over_seeds([run_fraction(args.config, f, output, overrides, seed) for seed in range(args.seeds)])
            for f in fractions
        }
    table = probe_table(rows)
    output.mkdir(parents=True, exist_ok=True)
    (output / "probe.json").write_text(json.dumps(rows, indent=2) + "\n")
    seeds = f"; mean ± std over {args.seeds} seeds" if args.seeds > 1 else ""
    print(f"Probe of {', '.join(args.config)} (held-out split; chance in brackets{seeds})\n{table}", flush=True)
    return rows
