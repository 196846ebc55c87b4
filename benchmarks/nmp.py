"""Native multimodal pretraining on the embedded default: does training on interleaved documents (and V2PE)
help where it should? One table of held-out text losses, each beside the uniform baseline ln(vocabulary).

    .venv/bin/python benchmarks/nmp.py [--steps 300]

Runs ``recipes/nmp.yaml`` (interleaved 3 : text-only 1, V2PE random) and, for the same steps, the same model
on text-only data (``weights: [0, 1]``) and the mixture with V2PE off; then validates every checkpoint (and
the untrained model, step 0) on held-out interleaved documents of 1-3 pictures (what training saw) and of 6-8
pictures (more than it saw; V2PE evaluated at ``{stride: 64}``, off at δ = 1). Each run is a subprocess of
``python -m lit_internvl``, one at a time; runtimes are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "recipes" / "nmp.yaml"
RUNS = {  # name → overrides of recipes/nmp.yaml
    "NMP mixture 3:1, V2PE random": [],
    "NMP mixture 3:1, V2PE off": ["--data.init_args.v2pe", "off"],
    "text-only data, V2PE random": ["--data.init_args.weights", "[0, 1]"],
}
HELD_OUT = {"1-3 pictures": "[1, 3]", "6-8 pictures": "[6, 8]"}


def cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_internvl", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def validate(root: Path, overrides: list[str], ckpt: str | None, pictures: str) -> float:
    """``val/loss`` of ``ckpt`` (None: the untrained model) on held-out documents of ``pictures`` pictures."""
    from lit_internvl.cli import main

    cli_ = main(["--config", str(RECIPE), *overrides, "--trainer.default_root_dir", str(root / "validate"),
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--data.init_args.val_images_per_document", pictures, "--data.init_args.val_size", "256"], run=False)  # fmt: skip
    (metrics,) = cli_.trainer.validate(cli_.model, cli_.datamodule, ckpt_path=ckpt, verbose=False)
    return metrics["val/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    vocabulary = 394  # the "shapes" tokenizer (tiny-shapes decoder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = {name: validate(root, [], None, pictures) for name, pictures in HELD_OUT.items()}
        rows.append(("untrained (step 0)", start, 0.0))
        for name, overrides in RUNS.items():
            run = root / f"run{len(rows)}"
            seconds = cli("fit", "--config", str(RECIPE), *overrides, "--trainer.default_root_dir", str(run),
                          "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", "1.0")  # fmt: skip
            ckpt = str(run / "checkpoints" / "last.ckpt")
            losses = {held: validate(root, overrides, ckpt, pictures) for held, pictures in HELD_OUT.items()}
            rows.append((name, losses, seconds))
    print(f"\nHeld-out text loss on interleaved documents after {args.steps} steps (uniform: ln {vocabulary} = "
          f"{math.log(vocabulary):.3f}); lower is better\n")  # fmt: skip
    print("| run | " + " | ".join(HELD_OUT) + " | train wall time |")
    print("|---|" + "---:|" * (len(HELD_OUT) + 1))
    for name, losses, seconds in rows:
        cells = " | ".join(f"{losses[held]:.3f}" for held in HELD_OUT)
        print(f"| {name} | {cells} | {seconds / 60:.1f} min |" if seconds else f"| {name} | {cells} | – |")


if __name__ == "__main__":
    main()
