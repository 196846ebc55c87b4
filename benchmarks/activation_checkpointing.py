"""Peak memory of a training step with and without activation checkpointing, where activations dominate.

    .venv/bin/python benchmarks/activation_checkpointing.py                 # CPU
    python benchmarks/activation_checkpointing.py --device cuda            # GPU

The model is a VisionLanguageModel with a long-context, narrow decoder (8 blocks of width 128 over 8192
tokens, one 56 px tile): its weights take a few MB and its activations about a GB, so the step's memory is
the activations'. Activation checkpointing (``lit_internvl.distributed.parallelize``) keeps each block's
input only and recomputes the rest in the backward pass.

What is measured: the memory a training step (forward, backward, AdamW) adds on top of what the process
held before it. On a CPU that is the process's peak resident set during the step (``VmHWM``) minus its
resident set before (``VmRSS``); every variant runs in a fresh process, with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once, and so that neither
variant inherits the other's high-water mark or allocator cache. On a GPU it is ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

TOKENS, LAYERS, WIDTH = 8192, 8, 128


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def build(tokens: int = TOKENS, layers: int = LAYERS):
    from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
    from lit_internvl.models import VisionLanguageModel

    torch.manual_seed(0)
    language = LanguageConfig.from_name("tiny", hidden_size=WIDTH, num_layers=layers, intermediate_size=4 * WIDTH)
    vision, decoder = InternViT("tiny"), Decoder(language)
    model = VisionLanguageModel(vision, PixelShuffleMLP(vision.hidden_size, WIDTH), decoder, image_context_id=261)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, tokens), generator=g)
    ids[0, 1:5] = 261
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    return model, ids, pixels


def measure(checkpointing: bool, device: str = "cpu", tokens: int = TOKENS, layers: int = LAYERS) -> dict:
    """One training step in this process; returns the memory it added and its time."""
    from lit_internvl.distributed import parallelize
    from lit_internvl.losses import language_model_loss
    from lit_internvl.models.vlm import Logits

    model, ids, pixels = build(tokens, layers)
    model, ids, pixels = model.to(device), ids.to(device), pixels.to(device)
    parallelize(model, activation_checkpointing=checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = ids.masked_fill(ids == 261, -100)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status("VmRSS")
    start = time.perf_counter()
    # Bare tiles: one row's tile at the model's default budget (4 tokens); the logits at every position, as a
    # plain (unchunked) language-model head computes them.
    loss = language_model_loss(model(ids, pixels, head=Logits()), labels, reduction="token")
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - before
    else:
        added = _status("VmHWM") - before
    return {
        "checkpointing": checkpointing,
        "added_bytes": added,
        "seconds": time.perf_counter() - start,
        "loss": loss.item(),
    }


def measure_in_subprocess(checkpointing: bool, device: str = "cpu", tokens: int = TOKENS, layers: int = LAYERS) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks');"
        "from activation_checkpointing import measure;"
        f"print('RESULT', json.dumps(measure({checkpointing}, {device!r}, {tokens}, {layers})))"
    )
    # A fixed mmap threshold makes glibc return every large freed block to the system at once, so that the
    # resident set follows the live tensors instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_repo(), env=env
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _repo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--layers", type=int, default=LAYERS)
    args = parser.parse_args()
    plain, checkpointed = (measure_in_subprocess(c, args.device, args.tokens, args.layers) for c in (False, True))
    assert abs(plain["loss"] - checkpointed["loss"]) < 1e-5, "checkpointing must not change the loss"
    print(
        f"VisionLanguageModel, decoder {args.layers} × width {WIDTH}, {args.tokens} tokens + one tile, {args.device}\n"
    )
    print("| activation checkpointing | memory added by the step (MiB) | step time (s) |")
    print("|---|---|---|")
    for result in (plain, checkpointed):
        print(
            f"| {'on' if result['checkpointing'] else 'off'} | {result['added_bytes'] / 2**20:.0f} | {result['seconds']:.2f} |"
        )
    saved = 1 - checkpointed["added_bytes"] / plain["added_bytes"]
    print(f"\nreduction: {100 * saved:.0f}% less memory, {checkpointed['seconds'] / plain['seconds']:.2f}× the time")


if __name__ == "__main__":
    main()
