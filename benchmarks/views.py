"""What a view costs the loader: stage 1's training batches (recipes/stage1.yaml's data) built with the views stage 1
asks for (``pair``) and with stage 2's (``pair`` + ``negative``, ITM's negative caption of another scene).

    python benchmarks/views.py [--batches 10] [--batch-size 128]

Prints seconds per batch, one loader process, one thread. Before stages declared their views, every shapes pair
sample drew its negative (rendering another scene) whether or not the stage read it.
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_internvl.data import ShapesDataModule
from lit_internvl.data.views import View


def seconds_per_batch(views: tuple[View, ...], batches: int, batch_size: int) -> float:
    data = ShapesDataModule(records="captions", itc_prefix="", tile_size=56, train_size=batches * batch_size * 2,
                            batch_size=batch_size, num_workers=0)  # fmt: skip
    data.use_views(views)
    loader = iter(data.train_dataloader())
    next(loader)  # the first batch pays for imports and caches
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| views | s / batch of {args.batch_size} |\n|---|---|")
    for views in ((View("pair"),), (View("pair"), View("negative"))):
        seconds = seconds_per_batch(views, args.batches, args.batch_size)
        print(f"| {' + '.join(view.name for view in views)} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
