"""``python -m lit_internvl plan --config RECIPE.yaml [--config PRESET.yaml ...] [--gpu H100] [--gpus N]``: whether a
recipe's training step fits its GPUs, before anything is allocated (:mod:`lit_internvl.planner`).

Reads the same ``--config`` files as ``fit`` (a recipe's layers, then the presets after it) and prints the
parameters (total and trainable), the memory per GPU of weights, gradients and optimiser state, the activations a
token (with and without activation checkpointing) and a tile, the step's peak beside the card's memory, the longest
packed row and the most tiles that fit, and the sequence-parallel size the recipe's rows need. ``--tokens`` plans
rows of another length; ``--quick`` skips the searches (one step and the slopes only); ``--show-setup`` prints what
the planner read from the recipe (GPUs, strategy, precision, the micro-batch) without planning.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from lit_internvl.planner import GPUS, Plan, plan, read_config, setup_of

MiB, GiB = 2**20, 2**30


def report(result: Plan, configs: list[str]) -> str:
    s = result.setup
    strategy = {"single": "one device", "ddp": "DDP (replicas)", "fsdp2": f"FSDP2 over {s.devices}"}[s.strategy]
    if s.sequence_parallel > 1:
        strategy += f", rows split over {s.sequence_parallel} (Ulysses)"
    lines = [
        f"plan: {' + '.join(configs)}",
        f"on {s.devices} × {result.gpu} ({result.capacity / GiB:.1f} GiB, {result.usable / GiB:.1f} usable), "
        f"{strategy}, {s.precision}, activation checkpointing {'on' if s.activation_checkpointing else 'off'}",
        f"micro-batch: {s.rows} row(s) × {s.tokens:,} tokens, {s.tiles} tiles{' (packed)' if s.packed else ''}, "
        f"attention {s.attn_backend}",
        "",
        "parameters        total      trainable",
    ]
    for part, (total, trainable) in result.parameters.items():
        lines.append(f"  {part:<12} {_count(total):>9}  {_count(trainable):>9}")
    kinds = result.step.kinds
    weights = kinds.get("Sharded Param", kinds.get("Parameter", 0))
    state = kinds["Optimizer state"]
    lines += [
        "",
        "per GPU",
        f"  weights                          {weights / GiB:8.2f} GiB",
        f"  gradients                        {state / 2 / GiB:8.2f} GiB",
        f"  optimiser state (AdamW)          {state / GiB:8.2f} GiB",
        f"  activations a token, decoder     {result.per_token[False] / MiB:8.3f} MiB "
        f"({result.per_token[True] / MiB:.3f} with activation checkpointing)",
        f"  activations a tile, vision       {result.per_tile / MiB:8.2f} MiB"
        + (" (checkpointed)" if s.activation_checkpointing else "")
        + (f"  (a rank holds 1/{s.sequence_parallel} of a row's tokens and tiles)" if s.sequence_parallel > 1 else ""),
        f"  peak of a step                   {result.step.peak / GiB:8.2f} GiB  "
        f"{'fits' if result.fits else 'DOES NOT FIT'} in {result.usable / GiB:.1f}",
    ]
    if result.longest:
        for size, tokens in result.longest.items():
            lines.append(f"longest packed row that fits (sequence parallel {size}): {tokens:,} tokens")
        lines.append(f"most tiles a sample of {s.tokens:,} tokens holds that fit (one row): {result.most_tiles}")
        needed = result.sp_needed
        lines.append(
            f"sequence-parallel size {s.tokens:,}-token rows need: "
            + (str(needed) if needed else "none up to 8 fits (or the strategy does not shard)")
        )
    lines += [f"note: {note}" for note in dict.fromkeys(s.notes)]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", action="append", required=True, help="a recipe, then presets (as fit)")
    parser.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    parser.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: the trainer's devices × nodes)")
    parser.add_argument("--tokens", type=int, default=None, help="plan rows of this many tokens instead")
    parser.add_argument("--quick", action="store_true", help="one step and the slopes; no searches")
    parser.add_argument("--show-setup", action="store_true", help="print what the recipe says a step is, and stop")
    args = parser.parse_args(argv)
    if args.show_setup:
        setup = setup_of(read_config(args.config), args.gpus)
        print(replace(setup, tokens=args.tokens) if args.tokens else setup)
        return
    result = plan(read_config(args.config), args.gpu, args.gpus, args.tokens, search=not args.quick)
    print(report(result, args.config))
