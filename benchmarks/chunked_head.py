"""Peak memory and time of the output head + cross-entropy, chunked (``linear_cross_entropy``) against unchunked.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/chunked_head.py               # CPU: vocab 151,674, 4,096 positions
    PYTHONPATH=$PWD python benchmarks/chunked_head.py --device cuda --dtype bf16

One forward + backward of ``hidden (N, D) → logits (N, V) → cross-entropy`` at the N supervised positions of a batch,
the head's weight trained, each variant in its own process. Memory is what the step adds to the process, the gradients it
leaves included (the head's, as training with ``zero_grad(set_to_none=True)`` allocates it each step): the peak
resident set over the one after the inputs and the head exist (CPU), or torch's peak allocation over
the allocation before the step (GPU). The unchunked path is what SFT ran before (the model's ``head=Logits(at)`` at
the supervised positions → float32 ``F.cross_entropy``); the chunked one (``head=CrossEntropy(targets)``,
:func:`~lit_internvl.losses.linear_cross_entropy`) keeps one chunk's logits at a time. With ``OUT`` set, the table is also
written to ``$OUT/chunked_head.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(args) -> dict:
    from lit_internvl.losses import linear_cross_entropy

    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.positions, args.dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=g) / args.dim**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.positions,), generator=g).to(device)

    def step():
        if args.variant == "chunked":
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=args.chunk_size).mean()
        else:
            loss = F.cross_entropy((hidden @ weight.T).float(), targets)
        loss.backward()
        return loss.item()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        added = torch.cuda.max_memory_allocated() - before
    else:
        added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"variant": args.variant, "seconds": seconds, "added_bytes": added, "loss": loss}


def run(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--vocab", type=int, default=151674)
    parser.add_argument("--dim", type=int, default=896, help="hidden size (InternVL3-1B's decoder: 896)")
    parser.add_argument("--positions", type=int, default=4096, help="supervised positions N")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("unchunked", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    common = ["--device", args.device, "--dtype", args.dtype, "--vocab", str(args.vocab), "--dim", str(args.dim),
              "--positions", str(args.positions), "--chunk-size", str(args.chunk_size)]  # fmt: skip
    if args.threads:
        common += ["--threads", str(args.threads)]
    results = [run([*common, "--variant", variant]) for variant in ("unchunked", "chunked")]
    title = (
        f"head + cross-entropy, forward + backward: {args.positions} positions × vocab {args.vocab}, "
        f"hidden {args.dim}, {args.dtype}, chunks of {args.chunk_size} rows, {args.device}"
    )
    lines = [title, "", "| path | memory added (GiB) | time (s) | loss |", "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| | {r['error']} | | |")
        else:
            lines.append(f"| {r['variant']} | {r['added_bytes'] / 2**30:.2f} | {r['seconds']:.2f} | {r['loss']:.5f} |")
    if all("error" not in r for r in results):
        ratio = results[1]["added_bytes"] / results[0]["added_bytes"]
        lines.append(
            f"| **chunked / unchunked** | **{100 * ratio:.1f}%** | {results[1]['seconds'] / results[0]['seconds']:.2f} | |"
        )
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "chunked_head.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
