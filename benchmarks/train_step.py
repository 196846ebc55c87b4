"""One training step of lit_internvl's VisionLanguageModel against transformers' InternVLForConditionalGeneration.

    .venv/bin/python benchmarks/train_step.py                    # CPU: the tiny config and InternVL3-1B
    python benchmarks/train_step.py --device cuda                # GPU, bf16: the same, then MFU per attention backend

Both sides get the same configuration and the same weights (a randomly initialised model of ours is exported with
``lit_internvl.hf.export_vlm``; ours reads it back with ``load_vlm``, transformers with ``from_pretrained``), the same
batch, and take the same step: forward, next-token cross-entropy averaged over the supervised tokens, backward,
AdamW. lit_internvl runs its output head only at the supervised positions, with the cross-entropy in chunks
(``head=CrossEntropy(targets)``, as ``SFTStage`` trains; ``--ours-backend``/``--ours-compile`` choose its attention and compilation);
transformers' model projects every position onto the vocabulary, image tokens included. Each measurement runs in its own process, so that peak memory is its own: the peak resident set of the
process on a CPU, torch's peak allocation on a GPU. Warm-up steps come first; a measurement's time is the median of
its timed steps, and the two sides run in alternation for ``--rounds`` rounds (the fastest median of each is kept), so
that both see the same load on a shared machine. The table gives step time, real tokens per second, peak memory, the
first step's loss (the two sides must agree) and the ratios lit_internvl / transformers.

Configs: ``tiny`` (the embedded default: 4 rows of 128 tokens, one 56 px tile each) and ``InternVL3-1B`` (its
architecture, random weights: one 448 px tile and 1024 tokens), and their padded twins (8 rows of InternVL3-1B).
Before a config runs, :mod:`lit_internvl.planner` plans lit_internvl's step on fake tensors (no memory): a config whose
planned peak exceeds the machine's available memory (a GPU's usable share) is skipped, both sides, with the planner's
reason, instead of being killed for memory; ``--optimizer auto`` takes AdamW where its plan fits, else SGD. On a GPU the second table trains InternVL3-1B on packed
rows of ``--packed-tokens`` tokens (documents of one tile and some text, positions restarting per document, attention
within documents) in bf16 autocast with each attention backend, and reports tokens/s and MFU: the analytic model FLOPs
of :mod:`lit_internvl.flops` (the head counted on every token, as MFU conventionally does) over the device's peak
(the project's table, :data:`lit_internvl.flops.PEAK_TFLOPS`: 989.4 TFLOP/s dense bf16 on an H100 or H200).

The MFU table uses fused AdamW; ``--compile on`` (or ``both``) also ``torch.compile``s every transformer block.
Imports only torch, transformers and lit_internvl's components, models, hf, flops
and losses (the GPU image has no litdata, omegaconf or jsonargparse; lit_internvl need not be installed). With ``OUT``
set in the environment, the tables and raw results are also written to ``$OUT/train_step.md`` and
``$OUT/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lit_internvl from this checkout, installed or not

CONFIGS = {
    # name: (preset, rows, tokens per row, tiles per row, text-token range[, padded: row r is r·tokens/(2·rows) shorter])
    "tiny": ("tiny", 4, 128, 1, (0, 256)),
    "InternVL3-1B": ("InternVL3-1B", 1, 1024, 1, (1000, 100_000)),
    "InternVL3-1B-padded": ("InternVL3-1B", 8, 1024, 1, (1000, 100_000), True),
    "tiny-padded": ("tiny", 4, 128, 1, (0, 256), True),  # the padded comparison's CPU rehearsal
}
BACKENDS = ("sdpa", "flex", "eager", "xformers")


# -- the batch ---------------------------------------------------------------------------------------------------


def comparison_batch(model, name: str, device: str) -> dict:
    """Rows of ``tokens`` ids, each with its tiles' ``<IMG_CONTEXT>`` run after the first token; padded configs'
    row r has r·tokens/(2·rows) padding tokens on the right (id 0, masked, not trained)."""
    _, rows, tokens, tiles, (low, high), *padded = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(low, high, (rows, tokens), generator=g)
    image_tokens = model.tokens_per_tile() * tiles
    ids[:, 1 : 1 + image_tokens] = model.image_context_id
    mask = torch.ones_like(ids)
    if padded:
        for row in range(rows):
            mask[row, tokens - row * (tokens // (2 * rows)) :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill((ids == model.image_context_id) | (mask == 0), -100)
    size = model.vision.config.image_size
    pixels = torch.randn(rows * tiles, 3, size, size, generator=g)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}
    return {k: v.to(device) for k, v in batch.items()}


def packed_batch(model, rows: int, tokens: int, device: str) -> tuple[dict, list[int], int]:
    """Rows of exactly ``tokens`` tokens packed with documents of one tile and 256–1280 text tokens (the last document
    of a row is text that fills it): ids, labels, positions restarting per document, document ids."""
    g = torch.Generator().manual_seed(2)
    image = model.tokens_per_tile()
    low, high = (1000, 100_000) if model.decoder.config.vocab_size > 100_000 else (0, 256)  # ordinary text tokens
    ids = torch.randint(low, high, (rows, tokens), generator=g)
    positions = torch.zeros(rows, tokens)
    documents = torch.zeros(rows, tokens, dtype=torch.long)
    lengths, tiles = [], 0
    for row in range(rows):
        start, doc = 0, 0
        while start < tokens:
            length = image + 2 + int(torch.randint(256, 1281, (), generator=g))
            if start + length > tokens - 64:  # too little room left for another one: text to the end
                length = tokens - start
            else:
                ids[row, start + 1 : start + 1 + image] = model.image_context_id
                tiles += 1
            positions[row, start : start + length] = torch.arange(length, dtype=torch.float32)
            documents[row, start : start + length] = doc
            lengths.append(length)
            start, doc = start + length, doc + 1
    labels = ids.masked_fill(ids == model.image_context_id, -100)
    size = model.vision.config.image_size
    pixels = torch.randn(tiles, 3, size, size, generator=g)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "positions": positions,
        "document_ids": documents,
        "pixel_values": pixels,
    }
    return {k: v.to(device) for k, v in batch.items()}, lengths, tiles


# -- one side of the comparison, in its own process -----------------------------------------------------------------


def _optimizer(params, name: str, fused: bool = False) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=fused or None)
    return torch.optim.SGD(params, lr=1e-5)


def _timed(step, warmup: int, steps: int, device: str) -> tuple[list[float], float]:
    losses, times = [], []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    return times, losses[0]


def _peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def worker(args) -> dict:
    """Train one side for ``warmup + steps`` steps; returns its timings."""
    from lit_internvl.components.attention import set_attention_backend
    from lit_internvl.distributed import compile_blocks
    from lit_internvl.flops import vlm_flops
    from lit_internvl.hf import build_vlm, load_vlm, read_config
    from lit_internvl.losses import next_token_targets, reduce_token_losses
    from lit_internvl.models.vlm import CrossEntropy

    device = args.device
    if args.mode == "mfu":
        return mfu_worker(args, load_vlm(args.folder, device=device).train())
    with torch.device("meta"):  # the architecture, for the batch and the FLOP count, without memory
        architecture = build_vlm(read_config(args.folder))
    batch = comparison_batch(architecture, args.config, device)
    tokens = int(batch["attention_mask"].sum())
    count = vlm_flops(architecture, batch["attention_mask"].sum(dim=1).tolist(), batch["pixel_values"].shape[0])
    if args.mode == "transformers":
        from transformers import InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(
            args.folder, dtype=torch.float32, attn_implementation="sdpa"
        )
        model = model.to(device).train()

        def forward_loss():
            return model(**batch).loss
    else:
        model = load_vlm(args.folder, device=device).train()
        set_attention_backend(model, args.backend or "sdpa")
        if args.compiled:
            compile_blocks(model)
        targets = next_token_targets(batch["labels"])

        def forward_loss():  # as SFTStage: the head and the loss in chunks, where a target is supervised
            # Bare tiles: every row's tile at the model's default budget (comparison_batch reserves that many slots).
            losses = model(
                batch["input_ids"],
                batch["pixel_values"],
                attention_mask=batch["attention_mask"],
                head=CrossEntropy(targets),
            )
            return reduce_token_losses(losses, batch["labels"], reduction="token")

    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], args.optimizer)

    def step() -> float:
        with _autocast(device):
            loss = forward_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, first_loss = _timed(step, args.warmup, args.steps, device)
    median = statistics.median(times)
    return {
        "config": args.config, "implementation": args.mode, "device": device, "optimizer": args.optimizer,
        "step_s": median, "step_times": times, "tokens": tokens, "tokens_per_s": tokens / median,
        "peak_bytes": _peak_memory(device), "loss": first_loss, "model_tflop": count.training / 1e12,
    }  # fmt: skip


def mfu_worker(args, model) -> dict:
    """InternVL3-1B on packed rows in bf16 with one attention backend."""
    from lit_internvl.components.attention import set_attention_backend
    from lit_internvl.distributed import compile_blocks
    from lit_internvl.flops import vlm_flops
    from lit_internvl.losses import next_token_targets, reduce_token_losses
    from lit_internvl.models.vlm import CrossEntropy

    device = args.device
    set_attention_backend(model, args.backend)
    if args.compiled:
        compile_blocks(model)
    batch, lengths, tiles = packed_batch(model, args.rows, args.packed_tokens, device)
    count = vlm_flops(model, lengths, tiles)
    optimizer = _optimizer(model.parameters(), args.optimizer, fused=device == "cuda")
    targets = next_token_targets(batch["labels"], batch["document_ids"])

    def step() -> float:
        with _autocast(device):
            losses = model(
                batch["input_ids"], batch["pixel_values"], positions=batch["positions"],
                document_ids=batch["document_ids"], head=CrossEntropy(targets),
            )  # fmt: skip
            loss = reduce_token_losses(losses, batch["labels"], batch["document_ids"], reduction="token")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, first_loss = _timed(step, args.warmup, args.steps, device)
    median = statistics.median(times)
    peak = peak_flops(device)
    tokens = sum(lengths)
    return {
        "backend": args.backend, "compiled": args.compiled, "rows": args.rows, "packed_tokens": args.packed_tokens,
        "documents": len(lengths), "tiles": tiles, "step_s": median, "step_times": times, "tokens_per_s": tokens / median,
        "tflop_per_s": count.training / median / 1e12, "mfu": count.training / median / peak if peak else None,
        "peak_bytes": _peak_memory(device), "loss": first_loss,
    }  # fmt: skip


def peak_flops(device: str) -> float | None:
    from lit_internvl.flops import device_peak_flops

    return device_peak_flops(torch.device(device), torch.bfloat16)


# -- the driver ------------------------------------------------------------------------------------------------------


def run_worker(argv: list[str], timeout: float, script: str = __file__) -> dict:
    """``script --worker argv`` in its own process: the dict its ``RESULT`` line holds, or ``{"error": ...}``."""
    command = [sys.executable, script, "--worker", *argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
    return {"error": (lines[-1] if lines else f"exit {done.returncode}, no output")[:300]}


def export_model(name: str, folder: Path) -> None:
    from lit_internvl.hf import export_vlm
    from lit_internvl.models import internvl

    torch.manual_seed(0)
    export_vlm(internvl(CONFIGS[name][0]), folder)


def available_memory(device: str) -> int | None:
    """What a measurement may use: the GPU's memory (the planner's usable share), or the machine's available memory;
    None where it cannot be read."""
    from lit_internvl.planner import USABLE

    if device == "cuda":
        return int(USABLE * torch.cuda.get_device_properties(0).total_memory)
    if not Path("/proc/meminfo").exists():
        return None
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))


def planned_step(name: str, device: str) -> dict:
    """lit_internvl's side of config ``name`` planned before it runs (:mod:`lit_internvl.planner`: the step on fake
    tensors, AdamW's state and step added): its peak with AdamW, and without AdamW's state (SGD keeps none)."""
    from lit_internvl.models import internvl
    from lit_internvl.planner import Setup, measure_model

    preset, rows, tokens, tiles, *_ = CONFIGS[name]
    setup = Setup(rows=rows, tokens=tokens, tiles=rows * tiles, device=device)
    step = measure_model(lambda: internvl(preset), setup)
    state = step.kinds["Optimizer state"]
    sgd = max(step.peak - state, step.kinds["Optimizer step"] - state - (state // 2 if device == "cuda" else 0))
    return {"adamw": step.peak, "sgd": sgd}


def choose_optimizer(name: str, device: str, wanted: str) -> tuple[str | None, str]:
    """The optimizer config ``name`` runs with (``wanted``, or for ``auto`` AdamW where the plan fits, else SGD),
    or None and the planner's reason when not even that fits."""
    available = available_memory(device)
    if available is None:
        return ("adamw" if wanted == "auto" else wanted), ""
    plans = planned_step(name, device)
    choices = ("adamw", "sgd") if wanted == "auto" else (wanted,)
    for choice in choices:
        if plans[choice] <= available:
            return choice, f"planned peak {gib(plans[choice])} GiB"
    return None, (
        f"skipped: planned peak {gib(plans[choices[-1]])} GiB with {choices[-1]} > {gib(available)} GiB available "
        "(lit_internvl.planner)"
    )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def comparison_table(results: list[dict]) -> str:
    lines = [
        "| config | implementation | optimizer | step time (s) | tokens/s | peak memory (GiB) | first loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["config"] for r in results):
        ours, theirs = (
            next(r for r in results if r["config"] == name and r["implementation"] == side)
            for side in ("ours", "transformers")
        )
        for label, r in (("lit_internvl", ours), ("transformers", theirs)):
            if "error" in r:
                lines.append(f"| {name} | {label} | | {r['error']} | | | |")
            else:
                lines.append(
                    f"| {name} | {label} | {r['optimizer']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                    f"{gib(r['peak_bytes'])} | {r['loss']:.5f} |"
                )
        if "error" not in ours and "error" not in theirs:
            lines.append(
                f"| {name} | **ratio ours/theirs** | | **{ours['step_s'] / theirs['step_s']:.2f}** | "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f} | {ours['peak_bytes'] / theirs['peak_bytes']:.2f} | |"
            )
    return "\n".join(lines)


def mfu_table(results: list[dict]) -> str:
    lines = [
        "| backend | compiled | rows × tokens (documents, tiles) | step time (s) | tokens/s | model TFLOP/s | MFU | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(
                f"| {r['backend']} | {r.get('compiled', '')} | | {r.get('error') or r.get('skipped')} | | | | |"
            )
            continue
        shape = f"{r['rows']} × {r['packed_tokens']} ({r['documents']}, {r['tiles']})"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        lines.append(
            f"| {r['backend']} | {r['compiled']} | {shape} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['tflop_per_s']:.1f} | {mfu} | {gib(r['peak_bytes'])} |"
        )
    return "\n".join(lines)


def eager_attention_bytes(rows: int, tokens: int) -> int:
    """The float32 scores and weights eager attention keeps for backward in each of the decoder's 24 layers."""
    return 24 * 2 * rows * 14 * tokens * tokens * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--configs",
        nargs="*",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        help="comparison configs (none: only the GPU MFU table)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 (1 for InternVL3-1B on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 5 (3 for InternVL3-1B on a CPU)")
    parser.add_argument(
        "--optimizer",
        default="auto",
        choices=("auto", "adamw", "sgd"),
        help="auto: AdamW where lit_internvl.planner says the step fits, else SGD; a config that fits with neither is "
        "skipped with the planner's reason",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each CPU worker")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating runs of each side, the fastest median kept; default 3 for tiny on a CPU, else 1",
    )
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS), help="GPU MFU table: attention backends")
    parser.add_argument("--packed-tokens", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument(
        "--compile",
        default="off",
        choices=("off", "on", "both"),
        help="GPU MFU table: torch.compile each transformer block (on), or measure both ways",
    )
    parser.add_argument("--ours-backend", default="sdpa", help="comparison: lit_internvl's attention backend")
    parser.add_argument("--ours-compile", action="store_true", help="comparison: compile lit_internvl's blocks")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("ours", "transformers", "mfu"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    machine = f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, " + machine
    print(f"# benchmarks/train_step.py on {machine}\n", flush=True)
    results, mfu_results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            folder = Path(tmp) / name
            export_model(name, folder)
            big_on_cpu = name != "tiny" and args.device == "cpu"
            optimizer, reason = choose_optimizer(name, args.device, args.optimizer)
            print(f"{name}: {optimizer or 'not run'}, {reason}", file=sys.stderr, flush=True)
            if optimizer is None:  # the planner says it cannot fit: both sides left out, with its reason
                results += [
                    {"config": name, "implementation": mode, "error": reason} for mode in ("ours", "transformers")
                ]
                continue
            common = ["--device", args.device, "--folder", str(folder), "--config", name, "--optimizer", optimizer,
                      "--warmup", str(args.warmup if args.warmup is not None else (1 if big_on_cpu else 2)),
                      "--steps", str(args.steps if args.steps is not None else (3 if big_on_cpu else 5))]  # fmt: skip
            if args.threads:
                common += ["--threads", str(args.threads)]
            rounds = args.rounds if args.rounds is not None else (3 if args.device == "cpu" and not big_on_cpu else 1)
            runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
            ours = ["--backend", args.ours_backend] + (["--compiled"] if args.ours_compile else [])
            for _ in range(rounds):  # alternating, so that both sides see the same machine load
                for mode in runs:
                    result = run_worker(["--mode", mode, *common, *(ours if mode == "ours" else [])], args.timeout)
                    runs[mode].append(result)
                    print(f"{name} {mode}: {result}", file=sys.stderr, flush=True)
            for mode, tries in runs.items():
                finished = [r for r in tries if "error" not in r]
                best = min(finished, key=lambda r: r["step_s"]) if finished else tries[0]
                results.append(
                    {"config": name, "implementation": mode, **best, "rounds": [r.get("step_s") for r in tries]}
                )
        if results:
            print(comparison_table(results), flush=True)
        if args.device == "cuda" and args.backends:
            folder = Path(tmp) / "InternVL3-1B"
            if not folder.exists():
                export_model("InternVL3-1B", folder)
            total = torch.cuda.get_device_properties(0).total_memory
            for backend in args.backends:
                for compiled in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
                    entry = {"backend": backend, "compiled": compiled}
                    if backend == "xformers" and not _importable("xformers"):
                        entry["skipped"] = "xformers is not installed"
                    elif backend == "eager" and eager_attention_bytes(args.rows, args.packed_tokens) > total:
                        need = eager_attention_bytes(args.rows, args.packed_tokens)
                        entry["skipped"] = (
                            f"needs ~{gib(need)} GiB for the attention matrices at {args.packed_tokens} tokens"
                        )
                    else:
                        argv = ["--mode", "mfu", "--device", "cuda", "--folder", str(folder), "--config", "InternVL3-1B",
                                "--backend", backend, "--optimizer", "adamw", "--rows", str(args.rows),
                                "--packed-tokens", str(args.packed_tokens),
                                "--warmup", str(args.warmup or 3), "--steps", str(args.steps or 5)]  # fmt: skip
                        entry.update(run_worker(argv + (["--compiled"] if compiled else []), args.timeout))
                        entry["backend"], entry["compiled"] = backend, compiled
                    mfu_results.append(entry)
                    print(f"mfu {backend} compiled={compiled}: {entry}", file=sys.stderr, flush=True)
            print("\nInternVL3-1B architecture, packed rows, bf16 autocast, AdamW\n", flush=True)
            print(mfu_table(mfu_results), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        text = f"# benchmarks/train_step.py on {machine}\n\n{comparison_table(results) if results else ''}\n"
        if mfu_results:
            text += f"\n{mfu_table(mfu_results)}\n"
        (Path(out) / "train_step.md").write_text(text)
        (Path(out) / "train_step.json").write_text(
            json.dumps({"machine": machine, "comparison": results, "mfu": mfu_results}, indent=1)
        )


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
