"""The planner's predicted peak against the peak a real training step reaches, on the CPU.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/planner_accuracy.py [--configs tiny wide ...]

Each configuration is a recipe config (an ``SFTStage`` of the tiny vision tower and connector and a CPU-sized
decoder, float32 or bf16 autocast, one process) and a micro-batch: one packed row of documents with V2PE positions, tiles, every text
token supervised. The planner (:func:`lit_internvl.planner.measure`, device ``cpu``) predicts its peak from fake
tensors; a fresh process then builds the same stage for real and trains two steps on such a row
(``forward_batch(..., cross_entropy=True)``, the square loss reduction, backward, AdamW), and the peak is its
resident set's high-water mark (``VmHWM``) minus its resident set just before the model was built. glibc's mmap
threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once. The measured
peak also holds what the first step's kernels and autograd keep for themselves (about 35 MiB here), which the
planner does not count; the configurations are large enough for that to stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (decoder overrides of "tiny-shapes", tokens, tiles, activation checkpointing, LoRA r or None)
CONFIGS = {
    "tiny": ({}, 4096, 32, False, None),
    "tiny checkpointed": ({}, 4096, 32, True, None),
    "wide, LoRA": ({"hidden_size": 512, "num_layers": 6, "intermediate_size": 1536, "num_heads": 8,
                    "num_kv_heads": 2, "vocab_size": 32_000}, 4096, 16, False, 16),
    "wide, checkpointed": ({"hidden_size": 512, "num_layers": 6, "intermediate_size": 1536, "num_heads": 8,
                            "num_kv_heads": 2, "vocab_size": 32_000}, 4096, 16, True, None),
    "long, LoRA, checkpointed": ({"hidden_size": 256, "num_layers": 4, "intermediate_size": 768, "num_heads": 4,
                                  "num_kv_heads": 2}, 12_288, 64, True, 16),
    "wide, bf16 autocast": ({"hidden_size": 512, "num_layers": 6, "intermediate_size": 1536, "num_heads": 8,
                             "num_kv_heads": 2, "vocab_size": 32_000}, 4096, 16, False, None),
}  # fmt: skip
#: Configurations trained under bf16 autocast (float32 weights), as ``precision: bf16-mixed``.
MIXED = {"wide, bf16 autocast"}


def language(overrides: dict) -> dict:
    """The fields of the ``tiny-shapes`` decoder with ``overrides``, as a YAML mapping."""
    from dataclasses import asdict

    from lit_internvl.components.language import LANGUAGE_PRESETS

    return {**asdict(LANGUAGE_PRESETS["tiny-shapes"]), **overrides}


def config(name: str) -> dict:
    """The recipe config of configuration ``name`` (what ``python -m lit_internvl plan`` would read)."""
    decoder, tokens, tiles, checkpointing, lora = CONFIGS[name]
    init_args = {
        "vision": {"class_path": "lit_internvl.components.InternViT", "init_args": {"config": "tiny"}},
        "connector": {"class_path": "lit_internvl.components.PixelShuffleMLP"},
        "decoder": {"class_path": "lit_internvl.components.Decoder", "init_args": {"config": language(decoder)}},
        "activation_checkpointing": checkpointing, "loss_reduction": "square",
    }  # fmt: skip
    if lora:
        init_args["lora"] = {"parts": ["decoder"], "r": lora}
    return {
        "model": {"class_path": "lit_internvl.stages.SFTStage", "init_args": init_args},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed" if name in MIXED else "32-true"},
        "data": {"init_args": {"pack": True, "max_tokens": tokens, "max_length": tokens, "batch_size": 1,
                               "max_tiles": tiles, "tile_size": 56}},
    }  # fmt: skip


def predict(name: str, tiles: int) -> dict:
    """The planner's peak for configuration ``name`` on a row of ``tiles`` tiles (the measured row's)."""
    from lit_internvl import planner

    cfg = config(name)
    setup = planner.setup_of(cfg)
    setup.device, setup.tiles = "cpu", tiles
    started = time.perf_counter()
    step = planner.measure(planner.stage_factory(cfg), setup, planner.tile_size_of(cfg))
    return {"predicted": step.peak, "kinds": step.kinds, "plan_s": time.perf_counter() - started}


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def batch(name: str, image_context_id: int, tokens_per_tile: int):
    """One packed row of ``tokens`` tokens: documents of 256-1,280 tokens with one to three tiles each (the tiles'
    ``<IMG_CONTEXT>`` run after the document's first token, V2PE positions at stride 16), every text token supervised."""
    from lit_internvl.batch import Batch, Images
    from lit_internvl.data.v2pe import v2pe_positions

    _, tokens, tiles, _, _ = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, tokens), generator=g)
    positions, documents = torch.zeros(1, tokens), torch.zeros(1, tokens, dtype=torch.long)
    start, document, placed = 0, 0, 0
    while start < tokens:
        length = min(int(torch.randint(256, 1281, (), generator=g)), tokens - start)
        count = min(tiles - placed, int(torch.randint(1, 4, (), generator=g)), max((length - 2) // tokens_per_tile, 0))
        ids[0, start + 1 : start + 1 + count * tokens_per_tile] = image_context_id
        placed += count
        span = ids[0, start : start + length].tolist()
        strides = [16] if count else []
        positions[0, start : start + length] = v2pe_positions(span, image_context_id, strides)
        documents[0, start : start + length] = document
        start, document = start + length, document + 1
    labels = ids.masked_fill(ids == image_context_id, -100)
    pixels = torch.randn(placed, 3, 56, 56, generator=g)
    images = Images.uniform(pixels, [placed], tokens_per_tile)
    return Batch(ids, labels, torch.ones_like(ids), positions, documents, images, [name]), placed


def measure(name: str) -> dict:
    """Two real training steps in this process; the peak resident memory they add to what the process held."""
    from lit_internvl.losses import reduce_token_losses
    from lit_internvl.planner import fake_world, stage_factory

    torch.manual_seed(0)
    build = stage_factory(config(name))
    with fake_world(1):  # the same stage options the planner builds under (one process)
        stage = build()
    stage._data = type("Data", (), {"tile_size": 56})()
    probe = stage.build_model()
    context_id, budget = 261, probe.tokens_per_tile(56)
    del probe
    row, placed = batch(name, context_id, budget)
    stage.hparams.image_context_id = context_id
    stage.hparams.activation_checkpointing = CONFIGS[name][3]
    baseline = _status("VmRSS")
    stage.configure_model()
    optimizer = torch.optim.AdamW(stage.parameter_groups())
    started = time.perf_counter()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name in MIXED):
            losses = stage.forward_batch(row, cross_entropy=True)
            loss = reduce_token_losses(losses, row.labels, row.document_ids, "square")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"measured": _status("VmHWM") - baseline, "tiles": placed, "step_s": (time.perf_counter() - started) / 2}


def run_worker(name: str, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(measure(args.worker)), flush=True)
        return
    lines = [
        "| configuration | tokens | tiles | checkpointing | LoRA | predicted (MiB) | measured (MiB) | predicted / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.configs:
        _, tokens, tiles, checkpointing, lora = CONFIGS[name]
        got = run_worker(name, args.timeout)
        if "error" in got:
            lines.append(f"| {name} | {tokens} | {tiles} | {checkpointing} | {lora or 'off'} | | {got['error']} | |")
            continue
        predicted = predict(name, got["tiles"])
        print(f"{name}: {got} {predicted}", file=sys.stderr, flush=True)
        ratio = predicted["predicted"] / got["measured"]
        lines.append(
            f"| {name} | {tokens} | {got['tiles']} | {'on' if checkpointing else 'off'} | {f'r {lora}' if lora else 'off'} | "
            f"{predicted['predicted'] / 2**20:.0f} | {got['measured'] / 2**20:.0f} | {ratio:.2f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
