"""Lightning's overhead over a hand-written loop: the stage-1 embedded default, the same model,
data, optimiser and number of steps, timed both ways.

    .venv/bin/python benchmarks/contrastive_overhead.py --steps 100

Prints a table of seconds per step for the plain PyTorch loop and for ``Trainer.fit`` with
``ContrastiveStage`` (validation, checkpointing and logging off, so the training loop alone is compared).
"""

from __future__ import annotations

import argparse
import math
import time

import lightning as L
import torch

from lit_internvl.components import InternViT, TextEncoder
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.views import View
from lit_internvl.losses import contrastive_loss
from lit_internvl.models import DualEncoder
from lit_internvl.stages import ContrastiveStage


def plain_loop(steps: int, datamodule: ShapesDataModule) -> float:
    torch.manual_seed(0)
    model = DualEncoder(InternViT("tiny"), TextEncoder("tiny"), embed_dim=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    datamodule.use_views((View("pair"),))  # what ContrastiveStage asks for in its handshake
    start = time.perf_counter()
    for step, views in enumerate(datamodule.train_dataloader()):
        if step == steps:
            break
        batch = views["pair"]
        loss = contrastive_loss(*model(batch.pixel_values, batch.input_ids, batch.attention_mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return time.perf_counter() - start


def lightning_fit(steps: int, datamodule: ShapesDataModule) -> float:
    torch.manual_seed(0)
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=128)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(stage, datamodule)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    datamodule = ShapesDataModule(
        records="captions",
        train_size=args.steps * args.batch_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    plain = plain_loop(args.steps, datamodule)
    fit = lightning_fit(args.steps, datamodule)
    print(f"| loop ({args.steps} steps, batch {args.batch_size}, {args.num_workers} worker) | s/step | total s |")
    print("|---|---|---|")
    print(f"| plain PyTorch | {plain / args.steps:.3f} | {plain:.1f} |")
    print(f"| Lightning ContrastiveStage | {fit / args.steps:.3f} | {fit:.1f} |")
    print(f"| overhead | {100 * (fit / plain - 1):+.1f}% | |")


if __name__ == "__main__":
    main()
