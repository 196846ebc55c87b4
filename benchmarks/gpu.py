"""Every GPU speed table in one run: MFU of InternVL3-1B on a packed row per attention backend, compiled or
not, with the head + loss chunked or not, q/k/v and gate/up fused or not; where its step's time goes (torch profiler); the matmul ceiling at the
model's own GEMM shapes; InternVL3-8B at full width and reduced depth, and with LoRA at full depth; InternVL3.5-8B
(Qwen3) and -30B-A3B (Qwen3-MoE) the same way (the MoE's LoRA at 12 of its 48 layers); torchao float8.

    PYTHONPATH=$PWD python benchmarks/gpu.py                    # on the GPU (benchmarks/gpu.sh runs this and the rest)
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu.py --tiny   # CPU rehearsal: the same code paths at tiny sizes

Each measurement runs in its own process (its peak memory is its own; a crash or a timeout loses one row, not the
table), one after another in priority order while ``--budget`` seconds last. The step: forward, the loss (chunked
head + cross-entropy over the supervised positions, token average), backward, fused AdamW; bf16 autocast on the
GPU. MFU = the model's analytic FLOPs (:mod:`lit_internvl.flops`, the head on every token as MFU counts it) per
second over the device's dense peak from the project's table (989.4 TFLOP/s bf16 on an H100/H200).

The breakdown profiles one extra step with a device synchronisation at each boundary (vision, connector, decoder,
head + loss, each forward and backward, then the optimiser: module hooks and gradient hooks mark them) and sums the
device time of the kernels launched in each phase by class: GEMM, attention, other. The ceiling times every GEMM
of a training step (forward, input and weight gradients) at the model's shapes in bf16, alone: the model's linear
FLOPs over that time is the rate the matmuls could reach; beside MFU it says how much of the gap is the matmuls'.

Tables go to stdout and, with ``OUT`` set, to ``$OUT/gpu.md`` (and the raw results to ``$OUT/gpu.json``).
Imports torch, lit_internvl and (optionally) torchao, peft; nothing of litdata, omegaconf or jsonargparse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lit_internvl from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step's batch and timing helpers

from train_step import _optimizer, _timed, packed_batch, run_worker  # noqa: E402

# (label, preset, decoder layers (None: all), LoRA rank (None: full training), packed tokens)
MODELS = {
    "1B": ("InternVL3-1B", None, None, 8192),
    "8B-4L": ("InternVL3-8B", 4, None, 8192),  # full width, 4 of 28 decoder layers: the same layer shapes
    "8B-LoRA": ("InternVL3-8B", None, 16, 8192),
    # InternVL3.5: Qwen3-8B (qk-norm, head_dim 128) at full width, 4 of 36 layers, and LoRA at full depth; Qwen3-30B-A3B
    # (128 experts, 8 a token) at full width, 4 of 48 layers, and LoRA (attention and experts) on 12 of them.
    "3.5-8B-4L": ("InternVL3.5-8B", 4, None, 8192),
    "3.5-8B-LoRA": ("InternVL3.5-8B", None, 16, 8192),
    "3.5-30B-A3B-4L": ("InternVL3.5-30B-A3B", 4, None, 8192),
    "3.5-30B-A3B-LoRA-12L": ("InternVL3.5-30B-A3B", 12, 16, 8192),
    "tiny": ("tiny", None, None, 4096),  # packed_batch's documents are 256–1,280 text tokens and a tile
    "tiny-LoRA": ("tiny", None, 4, 4096),
    "tiny-qwen3": ("tiny-qwen3", None, None, 4096),  # the CPU rehearsal of the InternVL3.5 rows
    "tiny-moe": ("tiny-moe", None, None, 4096),
    "tiny-moe-LoRA": ("tiny-moe", None, 4, 4096),
}


def build(preset: str, layers: int | None, device: str):
    from lit_internvl.components.language import LanguageConfig
    from lit_internvl.components.vision import InternViTConfig
    from lit_internvl.models import internvl
    from lit_internvl.models.builders import INTERNVL_PRESETS, vlm_from_configs

    torch.manual_seed(0)
    with torch.device(device):
        if layers is None:
            return internvl(preset)
        spec = INTERNVL_PRESETS[preset]
        language = LanguageConfig.from_name(spec.language, num_layers=layers)
        return vlm_from_configs(InternViTConfig.from_name(spec.vision), language, spec.image_context_id)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory(device: str) -> int:
    import resource

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- one MFU measurement ---------------------------------------------------------------------------------------


def mfu_worker(args) -> dict:
    from torch._dynamo.utils import counters

    from lit_internvl.components.attention import set_attention_backend
    from lit_internvl.components.language import set_fused_projections
    from lit_internvl.distributed import compile_blocks
    from lit_internvl.flops import device_peak_flops, mfu, vlm_flops
    from lit_internvl.losses import language_model_loss, next_token_targets, reduce_token_losses, supervised_positions
    from lit_internvl.models.vlm import CrossEntropy, Logits

    device = args.device
    preset, layers, lora, tokens = MODELS[args.model]
    model = build(preset, layers, device).train()
    set_attention_backend(model, args.backend)
    if lora:
        from lit_internvl.lora import add_lora

        model.requires_grad_(False)
        add_lora(model, ["decoder"], r=lora)
    if args.float8:
        from torchao.float8 import convert_to_float8_training

        # the decoder's block matmuls (dimensions multiples of 16, as float8 GEMMs need); not the head or vision
        convert_to_float8_training(
            model.decoder.layers,
            module_filter_fn=lambda m, name: (
                isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
            ),
        )
    set_fused_projections(model, args.fused)
    if args.compiled:
        compile_blocks(model, backend="inductor" if device == "cuda" else "aot_eager")
    batch, lengths, tiles = packed_batch(model, 1, tokens, device)
    count = vlm_flops(model, lengths, tiles)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, "adamw", fused=device == "cuda")
    labels, documents = batch["labels"], batch["document_ids"]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def loss_of(model) -> torch.Tensor:
        # Bare tiles: the packed row's tiles, each at the model's default budget (packed_batch reserves that many).
        inputs = dict(positions=batch["positions"], document_ids=documents)
        if args.head == "chunked":
            losses = model(batch["input_ids"], batch["pixel_values"], **inputs,
                           head=CrossEntropy(next_token_targets(labels, documents)))  # fmt: skip
            return reduce_token_losses(losses, labels, documents, "token")
        logits = model(batch["input_ids"], batch["pixel_values"], **inputs,
                       head=Logits(supervised_positions(labels, documents)))  # fmt: skip
        return language_model_loss(logits, labels, documents, "token")

    def step() -> float:
        with autocast:
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    start = time.perf_counter()
    step()  # the first step compiles
    _sync(device)
    first_step_s = time.perf_counter() - start
    times, first_loss = _timed(step, args.warmup, args.steps, device)
    median = statistics.median(times)
    graphs = counters["stats"]["unique_graphs"]
    result = {
        "model": args.model, "backend": args.backend, "compiled": args.compiled, "head": args.head,
        "float8": args.float8, "fused": args.fused, "tokens": sum(lengths), "documents": len(lengths), "tiles": tiles,
        "trainable_params": sum(p.numel() for p in trainable), "step_s": median, "step_times": times,
        "first_step_s": first_step_s, "tokens_per_s": sum(lengths) / median, "tflop_per_s": count.training / median / 1e12,
        # With LoRA most weights need no gradient (and the frozen vision no backward): training FLOPs overcount it.
        "mfu": None if lora else mfu(count.training, median, device_peak_flops(torch.device(device), torch.bfloat16)),
        "peak_bytes": _peak_memory(device), "loss": first_loss, "graphs": graphs,
    }  # fmt: skip
    if args.compiled:  # a second batch of other documents and tiles: how many graphs a run of such batches compiles
        other, _, _ = packed_batch(model, 1, tokens - 300, device)
        batch.update(other)
        labels, documents = batch["labels"], batch["document_ids"]
        step()
        result["graphs_after_other_batch"] = counters["stats"]["unique_graphs"]
        result["recompile_limit_hit"] = counters["stats"].get("recompile_limit_hit", 0)
    if args.profile:
        result["breakdown"] = breakdown(model, loss_of, optimizer, device, args.backend)
        result["breakdown_step_s"] = sum(sum(row.values()) for row in result["breakdown"].values()) / 1e6
    return result


PHASES = ("vision fwd", "connector fwd", "decoder fwd", "head + loss fwd", "head + loss bwd", "decoder bwd",
          "connector bwd", "vision bwd", "optimizer")  # fmt: skip


def kernel_class(name: str, backend: str) -> str:
    lower = name.lower()
    if any(word in lower for word in ("flash", "fmha", "mha", "sdpa", "attention", "attn", "flex", "varlen")):
        return "attention"
    if backend == "flex" and lower.startswith("triton_tem"):
        return "attention"
    if any(word in lower for word in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "splitk", "aten::mm", "aten::addmm",
                                      "aten::bmm", "aten::linear", "aten::_scaled_mm")):  # fmt: skip
        return "gemm"
    return "other"


def breakdown(model, loss_of, optimizer, device: str, backend: str) -> dict[str, dict[str, float]]:
    """Device time (µs) by phase and kernel class of one synchronised, profiled step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def mark(phase: str) -> None:
        _sync(device)
        with record_function(f"phase:{phase}"):
            pass

    def forward_marks(module, start: str, end: str | None, backward: str):
        def pre(*_):
            mark(start)

        def post(_, __, output):
            if end:
                mark(end)
            if output.requires_grad:
                output.register_hook(lambda grad: mark(backward))

        return module.register_forward_pre_hook(pre), module.register_forward_hook(post)

    handles = [
        *forward_marks(model.vision, "vision fwd", None, "vision bwd"),
        *forward_marks(model.connector, "connector fwd", None, "connector bwd"),
        *forward_marks(model.decoder, "decoder fwd", "head + loss fwd", "decoder bwd"),
    ]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    with profile(activities=activities) as prof:
        with autocast:
            loss = loss_of(model)
        mark("head + loss bwd")
        loss.backward()
        mark("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("end")
    for handle in handles:
        handle.remove()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    marks = [(e.time_range.start, e.name[len("phase:") :]) for e in events if e.name.startswith("phase:")]
    table = {phase: {"gemm": 0.0, "attention": 0.0, "other": 0.0} for phase in PHASES}

    def phase_at(t: float) -> str | None:
        current = None
        for start, name in marks:
            if start > t:
                break
            current = name
        return current if current in table else None

    for event in events:
        if event.name.startswith("phase:"):
            continue
        if device == "cuda":  # kernels (and copies) by their own device time; the marks follow a synchronisation
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            seconds = event.time_range.end - event.time_range.start
        elif event.device_type == torch.autograd.DeviceType.CPU:  # operators by their own (self) time
            seconds = event.self_cpu_time_total
        else:
            continue
        phase = phase_at(event.time_range.start)
        if phase is not None:
            table[phase][kernel_class(event.name, backend)] += seconds
    return table


# -- the matmul ceiling ----------------------------------------------------------------------------------------


def gemm_shapes(preset: str, layers: int | None, tokens: int, tiles: int, supervised: int) -> list[tuple]:
    """``(what, M, K, N, count)``: the linear maps of one forward of the model, ``(M, K) @ (K, N)`` each."""
    with torch.device("meta"):
        model = build(preset, layers, "meta")
    vision, decoder = model.vision.config, model.decoder.config
    vision_tokens = tiles * (1 + (vision.image_size // vision.patch_size) ** 2)
    d, v, n = vision.hidden_size, vision.intermediate_size, vision.num_layers_run
    q, kv = decoder.num_heads * decoder.head_dim, decoder.num_kv_heads * decoder.head_dim
    h, i, m = decoder.hidden_size, decoder.intermediate_size, decoder.num_layers
    connector_tokens = tiles * model.tokens_per_tile()
    inner = model.connector.fc1.in_features
    return [
        ("vision qkv", vision_tokens, d, 3 * d, n), ("vision proj", vision_tokens, d, d, n),
        ("vision fc1", vision_tokens, d, v, n), ("vision fc2", vision_tokens, v, d, n),
        ("connector fc1", connector_tokens, inner, h, 1), ("connector fc2", connector_tokens, h, h, 1),
        ("decoder q", tokens, h, q, m), ("decoder k, v", tokens, h, kv, 2 * m), ("decoder o", tokens, q, h, m),
        ("decoder gate, up", tokens, h, i, 2 * m), ("decoder down", tokens, i, h, m),
        ("head", supervised, h, decoder.vocab_size, 1),
    ]  # fmt: skip


def ceiling_worker(args) -> dict:
    from lit_internvl.flops import device_peak_flops

    device = args.device
    preset, layers, _, tokens = MODELS[args.model]
    with torch.device("meta"):
        model = build(preset, layers, "meta")
    batch, lengths, tiles = packed_batch(model, 1, tokens, "cpu")
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, total_flops, total_s = [], 0, 0.0
    for what, m, k, n, count in gemm_shapes(preset, layers, tokens, tiles, supervised):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        dy = torch.randn(m, n, device=device, dtype=dtype)

        def gemms() -> None:  # forward, input gradient, weight gradient: the three GEMMs of a trained linear map
            x @ w.T, dy @ w, dy.T @ x  # noqa: B018, B023

        gemms()
        _sync(device)
        repeats = 10 if device == "cuda" else 1
        start = time.perf_counter()
        for _ in range(repeats):
            gemms()
        _sync(device)
        seconds = (time.perf_counter() - start) / repeats
        flops = 3 * 2 * m * k * n
        rows.append({"what": what, "m": m, "k": k, "n": n, "count": count, "tflop_per_s": flops / seconds / 1e12})
        total_flops, total_s = total_flops + count * flops, total_s + count * seconds
    peak = device_peak_flops(torch.device(device), torch.bfloat16)
    return {"model": args.model, "gemms": rows, "tflop_per_s": total_flops / total_s / 1e12,
            "fraction_of_peak": total_flops / total_s / peak if peak else None}  # fmt: skip


# -- the driver ------------------------------------------------------------------------------------------------


def plan(tiny: bool, have_float8: bool, have_xformers: bool) -> list[list[str]]:
    """The measurements in priority order (the budget may end the list early)."""
    one, eight, lora = ("tiny", "tiny", "tiny-LoRA") if tiny else ("1B", "8B-4L", "8B-LoRA")
    dense35, moe35, dense35_lora, moe35_lora = (
        ("tiny-qwen3", "tiny-moe", "tiny-LoRA", "tiny-moe-LoRA") if tiny
        else ("3.5-8B-4L", "3.5-30B-A3B-4L", "3.5-8B-LoRA", "3.5-30B-A3B-LoRA-12L")
    )  # fmt: skip
    fast = "sdpa" if tiny else "varlen"  # varlen has CUDA kernels only
    mfu = ["--mode", "mfu", "--model"]
    runs = [
        [*mfu, one, "--backend", fast, "--compiled", "--profile"],
        ["--mode", "ceiling", "--model", one],
        [*mfu, eight, "--backend", fast, "--compiled", "--profile"],
        [*mfu, one, "--backend", "sdpa"],  # the configuration of the previous (H100) measurement
        [*mfu, dense35, "--backend", fast, "--compiled"],  # InternVL3.5 (Qwen3, Qwen3-MoE): full width, reduced depth
        [*mfu, moe35, "--backend", fast, "--compiled"],
        [*mfu, dense35_lora, "--backend", fast],
        [*mfu, moe35_lora, "--backend", fast],
        [*mfu, one, "--backend", fast],
        [*mfu, one, "--backend", fast, "--compiled", "--fused"],
        [*mfu, one, "--backend", fast, "--compiled", "--head", "unchunked"],
        ["--mode", "ceiling", "--model", eight],
        [*mfu, lora, "--backend", fast],
    ]
    if not tiny:
        runs.insert(6, [*mfu, one, "--backend", "flex"])
        runs.append([*mfu, one, "--backend", "flex", "--compiled"])
        if have_xformers:
            runs.append([*mfu, one, "--backend", "xformers"])
    if have_float8:
        runs.append([*mfu, one if tiny else eight, "--backend", fast, "--compiled", "--float8"])
    return runs


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def tables(results: list[dict], machine: str) -> str:
    out = [f"# benchmarks/gpu.py on {machine}", ""]
    mfus = [r for r in results if r.get("mode") == "mfu"]
    out += ["## MFU (one packed row, bf16 autocast, fused AdamW)", "",
            "| model | backend | compiled | head | fused q/k/v, gate/up | float8 | tokens (documents, tiles) | step (s) | first step (s) | "
            "tokens/s | model TFLOP/s | MFU | peak memory (GiB) | graphs (after another batch) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in mfus:
        if "error" in r:
            out.append(f"| {r['argv']} | | | | | | | {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        graphs = f"{r['graphs']} ({r['graphs_after_other_batch']})" if r["compiled"] else "-"
        out.append(
            f"| {r['model']} | {r['backend']} | {r['compiled']} | {r['head']} | {r['fused']} | {r['float8']} | {r['tokens']} "
            f"({r['documents']}, {r['tiles']}) | {r['step_s']:.3f} | {r['first_step_s']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['tflop_per_s']:.3g} | {mfu} | {gib(r['peak_bytes'])} | {graphs} |"
        )
    for r in mfus:
        if "breakdown" not in r:
            continue
        total = sum(sum(row.values()) for row in r["breakdown"].values()) or 1.0
        out += ["", f"## Where the step goes: {r['model']}, {r['backend']}, compiled {r['compiled']} "
                f"(device time of one synchronised step: {total / 1e3:.1f} ms)", "",
                "| phase | GEMM (ms) | attention (ms) | other (ms) | share |", "|---|---|---|---|---|"]  # fmt: skip
        for phase, row in r["breakdown"].items():
            ms = {k: v / 1e3 for k, v in row.items()}
            share = 100 * sum(row.values()) / total
            out.append(f"| {phase} | {ms['gemm']:.1f} | {ms['attention']:.1f} | {ms['other']:.1f} | {share:.1f}% |")
    for r in (r for r in results if r.get("mode") == "ceiling"):
        if "error" in r:
            out += ["", f"## Matmul ceiling {r['argv']}: {r['error']}"]
            continue
        frac = f"{100 * r['fraction_of_peak']:.1f}% of peak" if r["fraction_of_peak"] else "no peak known"
        out += ["", f"## Matmul ceiling, {r['model']}: the model's GEMMs alone at {r['tflop_per_s']:.3g} TFLOP/s ({frac})",
                "", "| GEMM | M × K × N | per step | TFLOP/s (forward + both gradients) |", "|---|---|---|---|"]  # fmt: skip
        for g in r["gemms"]:
            out.append(f"| {g['what']} | {g['m']} × {g['k']} × {g['n']} | {g['count']} | {g['tflop_per_s']:.3g} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at tiny sizes")
    parser.add_argument("--budget", type=float, default=200, help="seconds for all measurements together")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("mfu", "ceiling"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--head", default="chunked", choices=("chunked", "unchunked"), help=argparse.SUPPRESS)
    parser.add_argument("--float8", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"mfu": mfu_worker, "ceiling": ceiling_worker}[args.mode]
        print("RESULT " + json.dumps({"mode": args.mode, **worker(args)}), flush=True)
        return

    import importlib.util

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU rehearsal")
    machine = f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, " + machine
    print(f"# benchmarks/gpu.py on {machine}", flush=True)
    steps = ["--device", device, "--warmup", str(args.warmup or (1 if args.tiny else 3)),
             "--steps", str(args.steps or (2 if args.tiny else 5))]  # fmt: skip
    have_float8 = importlib.util.find_spec("torchao") is not None
    have_xformers = importlib.util.find_spec("xformers") is not None
    deadline, results = time.monotonic() + args.budget, []
    for argv in plan(args.tiny, have_float8, have_xformers):
        left = deadline - time.monotonic()
        if left < 20:
            results.append({"mode": argv[1], "argv": " ".join(argv[2:]), "error": "skipped: the budget is spent"})
            continue
        start = time.monotonic()
        extra = steps if argv[1] == "mfu" else ["--device", device]
        result = run_worker(argv + extra, min(args.timeout, left), script=__file__)
        result.setdefault("mode", argv[1])
        result["argv"], result["wall_s"] = " ".join(argv[2:]), time.monotonic() - start
        results.append(result)
        print(
            f"{result['argv']}: {result.get('error') or 'ok'} ({result['wall_s']:.0f} s)", file=sys.stderr, flush=True
        )
    text = tables(results, machine)
    print(text, flush=True)
    if os.environ.get("OUT"):
        folder = Path(os.environ["OUT"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu.md").write_text(text)
        (folder / "gpu.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
