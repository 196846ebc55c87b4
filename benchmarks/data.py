"""The data path end to end (decode, tile, normalise, template + tokenize, pad or pack) through
``RecordsDataModule``: samples/s and real tokens/s from a jsonl source and from litdata shards,
with 0 and 2 loader workers, and how much of a batch is real tokens when padded vs packed.

    .venv/bin/python benchmarks/data.py

Two settings, each over generated shapes conversations (``write_records``), half with small and
half with large images (an InternVL meta file of two datasets):

- ``internvl``: InternVL's tiling (448-px tiles, at most 6 + thumbnail, 256 tokens per tile) on
  448-px images (1 tile) and 768-px images (2×2 tiles + thumbnail);
- ``tiny``: the embedded default (56-px tiles, 4 tokens per tile) on 56-px and 112-px images.

The shards are written by ``python -m lit_internvl prepare`` in a subprocess before anything is
timed (litdata streams slowly in a process that has just run ``optimize``). Every timed run is a
full epoch of a fresh loader, worker start-up included; tokens are real tokens
(``attention_mask.sum()``), efficiency is real tokens / slots (``input_ids.numel()``). A second
table times each stage of building a sample in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_internvl.data import RecordsDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.images import to_tensor
from lit_internvl.data.records import SkipCounter, index_records, open_images, read_meta, read_record
from lit_internvl.data.shapes import write_records
from lit_internvl.data.templates import tokenize_conversation
from lit_internvl.data.tiling import dynamic_tiles
from lit_internvl.data.tokenizer import ByteTokenizer
from lit_internvl.data.views import View

SETTINGS = {
    "internvl": dict(tile_size=448, budget=256, max_tiles=6, image_sizes=(448, 768)),
    "tiny": dict(tile_size=56, budget=4, max_tiles=6, image_sizes=(56, 112)),
}


def write_dataset(folder: Path, records: int, image_sizes: tuple[int, ...]) -> Path:
    """``records`` conversations split over ``image_sizes``, one dataset each, listed in a meta file."""
    meta = {}
    for i, size in enumerate(image_sizes):
        count = records // len(image_sizes) + (1 if i < records % len(image_sizes) else 0)
        write_records(folder / f"px{size}", "conversation", count, seed=i, image_size=size)
        meta[f"shapes_{size}px"] = {"root": f"px{size}", "annotation": f"px{size}/conversation.jsonl"}
    path = folder / "meta.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def prepare_shards(meta: Path, output: Path, workers: int) -> float:
    """``python -m lit_internvl prepare`` in a subprocess (its optimize cache kept private); seconds."""
    env = {
        **os.environ,
        "DATA_OPTIMIZER_CACHE_FOLDER": str(output.parent / "optimize-chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(output.parent / "optimize-data"),
    }
    command = [sys.executable, "-m", "lit_internvl", "prepare", "--meta", str(meta), "--output", str(output)]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--num-workers", str(workers)], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0 or not (output / "index.json").is_file():
        raise RuntimeError(f"prepare failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def epoch(source: Path, setting: dict, workers: int, pack: bool, args) -> dict:
    """One full epoch of a fresh ``RecordsDataModule`` loader: time, samples, real tokens, slots.

    The data is asked for one ``conversation`` view at the setting's budget, as an SFT stage's handshake asks it."""
    dm = RecordsDataModule(
        train=str(source), tile_size=setting["tile_size"], max_tiles=setting["max_tiles"],
        max_length=setting["max_tokens"], pack=pack, max_tokens=setting["max_tokens"],
        batch_size=args.batch_size, num_workers=workers, shuffle=True, seed=0,
    )  # fmt: skip
    dm.use_views((View("conversation", setting["budget"], name="conversation"),))
    samples = tokens = slots = rows = skipped = 0
    start = time.perf_counter()
    for views in dm.train_dataloader():
        skipped += sum(views.skipped.values())
        if views.empty:
            continue
        batch = views["conversation"]
        samples += sum(len(names.split("+")) for names in batch.sample_names)
        tokens += int(batch.attention_mask.sum())
        slots += batch.input_ids.numel()
        rows += batch.input_ids.shape[0]
    seconds = time.perf_counter() - start
    if skipped:
        raise RuntimeError(f"{skipped} samples skipped: the benchmark's records should all be valid")
    return dict(seconds=seconds, samples=samples, tokens=tokens, slots=slots, rows=rows)


def stages(meta: Path, setting: dict, limit: int) -> dict[str, float]:
    """Milliseconds per sample of each step of building one, in this process with one torch thread,
    as in a loader worker (DataLoader workers run ``torch.set_num_threads(1)``)."""
    tokenizer = ByteTokenizer()
    items = [item for spec in read_meta(meta) for item in index_records(spec, True, SkipCounter())]
    items = random.Random(0).sample(items, min(limit, len(items)))  # both image sizes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stages(items, setting, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _stages(items: list, setting: dict, tokenizer) -> dict[str, float]:
    totals = dict.fromkeys(("decode", "tile", "normalise", "tokenize"), 0.0)
    view = View("conversation", setting["budget"], name="conversation")
    tiles_made = 0
    built = []
    for item in items:
        record = read_record(item)
        t0 = time.perf_counter()
        images = open_images(record)
        t1 = time.perf_counter()
        tiles = [dynamic_tiles(image, setting["tile_size"], 1, setting["max_tiles"]) for image in images]
        t2 = time.perf_counter()
        pixel_values = torch.stack([to_tensor(tile) for image_tiles in tiles for tile in image_tiles])
        t3 = time.perf_counter()
        counts = [len(image_tiles) * setting["budget"] for image_tiles in tiles]
        tiles_made += len(pixel_values)
        ids, labels = tokenize_conversation(record.fields["conversations"], tokenizer, "internvl2_5", counts)
        t4 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += seconds
        sample = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values,
            "budget": setting["budget"],
            "name": record.name,
        }
        built.append({"views": {view.name: sample}, "name": record.name})  # as the sample builder hands a record
    for pack in (False, True):
        collate = Collator(tokenizer.pad_id, (view,), pack=pack, max_tokens=setting["max_tokens"])
        collate(built[:16])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(built), 16):
            collate(built[i : i + 16])
        totals["collate (packed)" if pack else "collate (padded)"] = time.perf_counter() - start
    return {
        "tiles/sample": tiles_made / len(items),
        **{key: 1000 * seconds / len(items) for key, seconds in totals.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=120, help="records of the internvl setting")
    parser.add_argument("--tiny-records", type=int, default=1500, help="records of the tiny setting")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4096, help="packed row budget (and max_length), internvl")
    parser.add_argument("--tiny-max-tokens", type=int, default=512, help="packed row budget (and max_length), tiny")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to time")
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--stage-samples", type=int, default=40, help="samples timed stage by stage")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--main-threads", type=int, nargs="+",
        help="torch threads of this process for the 0-worker runs (default: torch's default, then 1)",
    )  # fmt: skip
    parser.add_argument("--workdir", help="where records and shards go (default: a temporary folder, removed)")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    main_threads = args.main_threads or sorted({default_threads, 1}, reverse=True)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lit_internvl_data_bench_"))
    throughput, breakdown, notes = [], [], []
    try:
        for name in args.settings:
            setting = dict(SETTINGS[name])
            setting["max_tokens"] = args.max_tokens if name == "internvl" else args.tiny_max_tokens
            records = args.records if name == "internvl" else args.tiny_records
            folder = workdir / name
            start = time.perf_counter()
            meta = write_dataset(folder, records, setting["image_sizes"])
            written = time.perf_counter() - start
            prepared = prepare_shards(meta, folder / "shards", args.prepare_workers)
            shard_mb = sum(f.stat().st_size for f in (folder / "shards").glob("*.bin")) / 1e6
            notes.append(
                f"{name}: {records} records written in {written:.1f} s; `prepare --num-workers {args.prepare_workers}` "
                f"(subprocess, interpreter start included) {prepared:.1f} s → {shard_mb:.0f} MB of shards"
            )
            # First, as it also warms this process up (imports, first-call costs) before the epochs.
            breakdown.append((name, stages(meta, setting, args.stage_samples)))
            # (source, loader workers, torch threads of this process, packed)
            runs = [
                (source, workers, threads, False)
                for source in ("jsonl", "shards")
                for workers in args.workers
                for threads in (main_threads if workers == 0 else [default_threads])
            ]
            last = max(args.workers)
            runs += [
                (source, last, main_threads[-1] if last == 0 else default_threads, True)
                for source in ("jsonl", "shards")
            ]
            for source, workers, threads, pack in runs:
                path = meta if source == "jsonl" else folder / "shards"
                torch.set_num_threads(threads)
                r = epoch(path, setting, workers, pack, args)
                torch.set_num_threads(default_threads)
                threads_label = str(threads) if workers == 0 else "1 per worker"
                throughput.append(
                    (name, source, workers, threads_label, "packed" if pack else "padded", r["samples"], r["rows"], r["seconds"],
                     r["samples"] / r["seconds"], r["tokens"] / r["seconds"], r["tokens"] / r["slots"], r["tokens"] / r["samples"])
                )  # fmt: skip
                print(f"  {name} {source} workers={workers} threads={threads_label} {'packed' if pack else 'padded'}: "
                      f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"batch {args.batch_size} samples; packed rows hold ≤ max_tokens (internvl {args.max_tokens}, tiny "
        f"{args.tiny_max_tokens}); torch's default here: {default_threads} thread(s)\n"
    )
    print(
        "| setting | source | workers | torch threads | batches | samples | rows | s | samples/s | real tokens/s | real / slots | tokens/sample |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, source, workers, threads, mode, samples, rows, seconds, sps, tps, eff, per in throughput:
        print(
            f"| {name} | {source} | {workers} | {threads} | {mode} | {samples} | {rows} | {seconds:.1f} | {sps:.1f} | "
            f"{tps:,.0f} | {eff:.1%} | {per:.0f} |"
        )
    print(
        f"\nms per sample, one process with 1 torch thread (as a loader worker), {args.stage_samples} samples "
        "(tile = PIL resize + crop; normalise = to_tensor + stack; collate = per sample of 16-sample batches):\n"
    )
    keys = list(breakdown[0][1])
    print("| setting | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, ms in breakdown:
        print(
            f"| {name} | " + " | ".join(f"{ms[k]:.1f}" if k == "tiles/sample" else f"{ms[k]:.2f}" for k in keys) + " |"
        )
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
