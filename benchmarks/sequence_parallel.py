"""Sequence parallelism on the CPU: activation memory per rank at ``sp: 2`` against one process on the same row, and
the time the all-to-alls take.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/sequence_parallel.py [--tokens 8192] [--layers 4] [--width 256]
        [--one-document]

The model is a VisionLanguageModel whose activations dominate (the tiny vision tower, a narrow decoder over a long
packed row of documents with tiles and V2PE positions, or with ``--one-document`` the same tokens as one document);
one training step (forward, the chunked head's square loss,
backward) runs on one process, then on two gloo processes (one thread each) that split the row. Memory is what the
step adds to the process's resident set (``VmHWM`` after minus ``VmRSS`` before, glibc's mmap threshold fixed so that
freed tensors leave the resident set at once), per rank. The all-to-alls' time is torch.profiler's sum over the
exchange's collectives (forward and backward) on rank 0, beside the step's time; on a shared 2-core CPU both ranks
compete for the cores, so the times say more about the machine than about the exchange. On the CPU a packed row's
attention takes a dense ``T × T`` document mask, which every rank holds whole (GPU backends keep none): the
``--one-document`` row, causal without a mask, shows the split of the activations alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def build(tokens: int, layers: int, width: int):
    """The model and its packed row (documents of 256-1,024 tokens, each opening with a tile, V2PE at stride 16)."""
    from lit_internvl.batch import Images
    from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
    from lit_internvl.data.v2pe import v2pe_positions
    from lit_internvl.models import VisionLanguageModel

    torch.manual_seed(0)
    language = LanguageConfig.from_name(
        "tiny", hidden_size=width, num_layers=layers, intermediate_size=3 * width, num_heads=8, num_kv_heads=2
    )
    vision, decoder = InternViT("tiny"), Decoder(language)
    model = VisionLanguageModel(vision, PixelShuffleMLP(vision.hidden_size, width), decoder, image_context_id=261)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, tokens), generator=g)
    positions, documents = torch.zeros(1, tokens), torch.zeros(1, tokens, dtype=torch.long)
    start, document = 0, 0
    while start < tokens:
        length = min(int(torch.randint(256, 1025, (), generator=g)), tokens - start)
        tile = length > 8
        if tile:
            ids[0, start + 1 : start + 5] = 261
        positions[0, start : start + length] = v2pe_positions(ids[0, start : start + length].tolist(), 261, [16] * tile)
        documents[0, start : start + length] = document
        start, document = start + length, document + 1
    tiles = int((ids == 261).sum()) // 4
    images = Images.uniform(torch.randn(tiles, 3, 56, 56, generator=g), [tiles], 4)
    labels = ids.masked_fill(ids == 261, -100)
    return model, ids, images, positions, documents, labels


def step(args, rank: int, size: int) -> dict:
    from lit_internvl.components.sequence_parallel import SequenceParallel
    from lit_internvl.losses import next_token_targets, reduce_token_losses
    from lit_internvl.models.vlm import CrossEntropy

    model, ids, images, positions, documents, labels = build(args.tokens, args.layers, args.width)
    if args.one_document:  # the same tokens as one document: causal attention, no mask
        documents, positions = None, torch.arange(args.tokens, dtype=torch.float32)[None]
    if size > 1:
        model.sequence_parallel, model.dummy_tile = SequenceParallel(), True
    targets = next_token_targets(labels, documents)

    def run():
        losses = model(ids, images, positions=positions, document_ids=documents, head=CrossEntropy(targets))
        loss = reduce_token_losses(losses, labels, documents, "square")
        loss.backward()
        return loss.item()

    run()  # warm-up (kernels, the autograd engine's threads)
    model.zero_grad(set_to_none=True)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # the high-water mark from here on
        refs.write("5")
    started = time.perf_counter()
    loss = run()
    step_s = time.perf_counter() - started
    added = _status("VmHWM") - before
    model.zero_grad(set_to_none=True)
    exchange_s = None
    if size > 1:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            run()
        events = [e for e in profiler.key_averages() if "all_to_all" in e.key or "alltoall" in e.key]
        exchange_s = sum(e.cpu_time_total for e in events if not e.key.startswith("c10d::")) / 1e6
        exchange_s = exchange_s or sum(e.cpu_time_total for e in events) / 1e6
    return {"rank": rank, "size": size, "loss": loss, "added": added, "step_s": step_s, "exchange_s": exchange_s,
            "tiles": len(images.budgets)}  # fmt: skip


def worker(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    size = args.size
    if size > 1:
        rank = int(os.environ["RANK"])
        dist.init_process_group("gloo", rank=rank, world_size=size)
    else:
        rank = 0
    result = step(args, rank, size)
    print("RESULT " + json.dumps(result), flush=True)
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(args, size: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(size)}  # fmt: skip
    command = [sys.executable, __file__, "--worker", "--size", str(size), "--tokens", str(args.tokens), "--layers",
               str(args.layers), "--width", str(args.width), *(["--one-document"] if args.one_document else [])]  # fmt: skip
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(size)]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=args.timeout)
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        results.append(json.loads(line[7:]) if line else {"error": (err.strip().splitlines() or ["?"])[-1]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--one-document", action="store_true", help="the row as one document (no dense mask)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [*launch(args, 1), *launch(args, 2)]
    print(json.dumps(rows), file=sys.stderr)
    lines = [
        f"{args.tokens}-token {'row, one document' if args.one_document else 'packed row'}, decoder {args.layers} × {args.width} (8 heads, 2 key/value heads), "
        f"{rows[0].get('tiles')} tiles; one training step (forward + backward)",
        "",
        "| sp | rank | memory added by the step (MiB) | step time (s) | all-to-all time (s) | loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| | | {r['error']} | | | |")
            continue
        exchange = f"{r['exchange_s']:.2f}" if r["exchange_s"] is not None else "–"
        lines.append(f"| {r['size']} | {r['rank']} | {r['added'] / 2**20:.0f} | {r['step_s']:.2f} | {exchange} | "
                     f"{r['loss']:.6f} |")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
