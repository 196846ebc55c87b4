"""InternVL3.5-Flash on the embedded default: held-out accuracy, visual tokens a sample and CPU prefill time of the
fine-detail questions (lit_internvl.data.shapes.detail) answered (a) with every tile at 16 tokens, (b) at 4 before
ViCO, (c) at 4 after ViCO's consistency stage, (d) routed by the trained router (the released rule, the connector's
thresholds), with chance beside each accuracy; then the router's thresholds swept, and routing by the scene's kind
(the oracle a router could at best learn), and the paired comparison of (d) with (a).

    python benchmarks/flash.py --sft runs/sft_detail/checkpoints/last.ckpt --vico runs/vico/checkpoints/last.ckpt \\
        --vir runs/vir/checkpoints/last.ckpt --questions 600

Accuracy is the stages' exact match (every answer token the argmax given the reference prefix: exactly when greedy
decoding gives the answer) on the test split (never trained or validated on). Prefill is the forward over the
prompts (the question up to the assistant header): the vision tower, the router where it routes, the connector and
the decoder, in batches of ``--batch`` prompts, one thread, the fastest of ``--repeats`` passes over all prompts.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from lit_internvl.batch import Batch, Images
from lit_internvl.data.collate import Collator
from lit_internvl.data.samples import SampleBuilder
from lit_internvl.data.shapes.detail import DETAILS, DetailWorld, ShapesDetailVQA
from lit_internvl.data.views import View
from lit_internvl.losses import next_token_targets, supervised_positions
from lit_internvl.models.routing import at_budgets, route_batch
from lit_internvl.models.vlm import Logits
from lit_internvl.stages.vico import exact_answers
from lit_internvl.tools.chat import load_from_recipe


def samples(data, kind: str, budget: int, questions: int, seed: int) -> list[dict]:
    """The test split's first ``questions`` questions as ``kind`` samples at ``budget`` tokens a tile."""
    view = View(kind, budget)
    builder = SampleBuilder(data.tokenizer, data.eval_options, (view,))
    world = DetailWorld(data.tile_size, seed, "test", data.fine_ratio)
    dataset = ShapesDetailVQA(world, questions, builder)
    return [dataset[i]["views"][kind] for i in range(questions)]


def batches(items: list[dict], kind: str, size: int, pad_id: int) -> list[Batch]:
    view = View(kind, 16)
    collate = Collator(pad_id, (view,))
    return [collate.collate(items[i : i + size], view) for i in range(0, len(items), size)]


def side(batch: Batch) -> str:
    """Prompts (nothing supervised) are left-padded, conversations right-padded."""
    return "left" if bool(batch.labels.eq(-100).all()) else "right"


def compressed(model, batch: Batch, which) -> Batch:
    """``batch`` with the tiles ``which(row) → bool`` says at the second budget (one tile a scene)."""
    second = model.budgets()[1]
    budgets = [second if which(r) else b for r, b in enumerate(batch.images.budgets)]
    images = Images(batch.images.pixel_values, batch.images.tiles_per_sample, budgets)
    return at_budgets(batch, images, model.image_context_id, side(batch))


@torch.no_grad()
def evaluate(model, full: list[Batch], how) -> dict:
    """Exact match and visual tokens of every question, ``how(model, batch) → batch`` setting the budgets."""
    right, tokens, metas = [], [], []
    for batch in full:
        batch = how(model, batch)
        logits = model(batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions,
                       head=Logits(_supervised(batch)))  # fmt: skip
        right += exact_answers(logits, batch).tolist()
        tokens += batch.images.tokens_per_sample()
        metas += batch.meta
    return {"right": right, "tokens": tokens, "metas": metas}


def _supervised(batch: Batch) -> torch.Tensor:
    return supervised_positions(batch.labels)


@torch.no_grad()
def prefill_seconds(model, prompts: list[Batch], how, repeats: int) -> dict[str, float]:
    """The prompts' prefill, the fastest of ``repeats`` passes of each part: ``budgets`` (``how``: routing, with the
    vision tower it runs, or cutting the compressed tiles' slots), ``embed`` (the vision tower unless routing ran it,
    the connector, the splice) and ``decoder``; ``total`` is the fastest whole pass."""
    best = {"budgets": math.inf, "embed": math.inf, "decoder": math.inf, "total": math.inf}
    for _ in range(repeats):
        spent = dict.fromkeys(best, 0.0)
        for batch in prompts:
            start = time.perf_counter()
            batch = how(model, batch)
            routed = time.perf_counter()
            embeds = model.embed(batch.input_ids, batch.images)
            embedded = time.perf_counter()
            model.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, positions=batch.positions)
            done = time.perf_counter()
            spent["budgets"] += routed - start
            spent["embed"] += embedded - routed
            spent["decoder"] += done - embedded
            spent["total"] += done - start
        best = {k: min(best[k], spent[k]) for k in best}
    return best


@torch.no_grad()
def answer_losses(model, full: list[Batch], how) -> torch.Tensor:
    """``(Q,)`` each question's answer cross-entropy (mean over its tokens), the budgets set by ``how``."""
    out = []
    for batch in full:
        batch = how(model, batch)
        targets = next_token_targets(batch.labels)
        logits = model(batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions,
                       head=Logits(targets != -100))  # fmt: skip
        losses = F.cross_entropy(logits.float(), targets[targets != -100], reduction="none")
        rows = (targets != -100).nonzero()[:, 0]
        total = torch.zeros(batch.rows).index_add(0, rows, losses)
        out.append(total / torch.zeros(batch.rows).index_add(0, rows, torch.ones_like(losses)))
    return torch.cat(out)


def chance(metas: list[dict], world: DetailWorld) -> float:
    return sum(1 / len(world.answer_options(m["type"])) for m in metas) / len(metas)


def accuracy(result: dict, detail: str | None = None) -> float:
    rows = [r for r, m in zip(result["right"], result["metas"]) if detail is None or m["detail"] == detail]
    return sum(rows) / max(len(rows), 1)


def sign_test(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Questions only ``a`` gets right, only ``b``, and the exact two-sided sign test's p-value (McNemar's exact)."""
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n if n else 1.0
    return wins, losses, min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", default="runs/sft_detail/checkpoints/last.ckpt")
    parser.add_argument("--vico", default="runs/vico/checkpoints/last.ckpt")
    parser.add_argument("--vir", default="runs/vir/checkpoints/last.ckpt")
    parser.add_argument("--questions", type=int, default=600)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.6, help="the router stage's target_compression")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lit_internvl.cli import main as cli_main

    data = cli_main(["--config", "recipes/vir.yaml", "--model.init_args.init_from", "null"], run=False).datamodule
    sft, _ = load_from_recipe("recipes/sft_detail.yaml", args.sft)
    vico, _ = load_from_recipe("recipes/vico.yaml", args.vico)
    vir, _ = load_from_recipe("recipes/vir.yaml", args.vir)
    for model in (sft, vico, vir):
        model.eval()
    first, second = vir.budgets()[:2]
    pad = data.tokenizer.pad_id
    full = batches(samples(data, "conversation", first, args.questions, args.seed), "conversation", args.batch, pad)
    prompts = batches(samples(data, "prompt", first, args.questions, args.seed), "prompt", args.batch, pad)
    world = DetailWorld(data.tile_size, args.seed, "test", data.fine_ratio)

    def at(budget):
        return lambda model, batch: batch if budget == first else compressed(model, batch, lambda r: True)

    def routed(model, batch):
        return route_batch(model, batch, side(batch))

    def by_kind(model, batch):  # the oracle: coarse scenes compressed, fine ones not
        return compressed(model, batch, lambda r: batch.meta[r]["detail"] == "coarse")

    vir.connector.routing = True
    rows = [
        ("(a) every tile at 16 (SFT model)", sft, at(first)),
        ("(b) every tile at 4, before ViCO (SFT model)", sft, at(second)),
        ("(c) every tile at 4, after ViCO", vico, at(second)),
        ("(d) routed by the trained router", vir, routed),
        ("every tile at 16, after ViCO", vico, at(first)),
        ("routed by scene kind (oracle), after ViCO", vico, by_kind),
    ]
    results = {name: evaluate(model, full, how) for name, model, how in rows}
    base = results[rows[0][0]]
    times = {}
    for name, model, how in rows[:4]:
        times[name] = prefill_seconds(model, prompts, how, args.repeats)
    level = chance(base["metas"], world)
    print(f"{args.questions} held-out questions ({sum(m['detail'] == 'fine' for m in base['metas'])} fine); chance "
          f"{level:.3f} (coarse {chance([m for m in base['metas'] if m['detail'] == 'coarse'], world):.3f}, fine "
          f"{chance([m for m in base['metas'] if m['detail'] == 'fine'], world):.3f})\n")  # fmt: skip
    print(
        "| run | accuracy | coarse | fine | of (a) | visual tokens / sample | of (a) | prefill ms / sample | of (a) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    tokens_a = sum(base["tokens"]) / len(base["tokens"])
    total_a = times[rows[0][0]]["total"]
    for name, *_ in rows:
        r = results[name]
        tokens = sum(r["tokens"]) / len(r["tokens"])
        prefill = times[name]["total"] if name in times else None
        ms = f"{1000 * prefill / args.questions:.2f}" if prefill else "–"
        rel = f"{prefill / total_a:.2f}" if prefill else "–"
        print(f"| {name} | {accuracy(r):.3f} | {accuracy(r, 'coarse'):.3f} | {accuracy(r, 'fine'):.3f} | "
              f"{accuracy(r) / max(accuracy(base), 1e-9):.3f} | {tokens:.2f} | {tokens / tokens_a:.3f} | {ms} | {rel} |")  # fmt: skip
    print(
        "\nThe prefill in parts, ms a sample (budgets: routing with its vision pass, or cutting the slots; embed: the"
        " vision tower where routing did not run it, the connector and the splice; decoder: the language model):\n"
    )
    print("| run | budgets | embed | decoder | total |")
    print("|---|---:|---:|---:|---:|")
    for name, part in times.items():
        print(f"| {name} | " + " | ".join(f"{1000 * part[k] / args.questions:.2f}" for k in
                                          ("budgets", "embed", "decoder", "total")) + " |")  # fmt: skip
    print("\nThe router's thresholds (the connector's relative quantile, absolute floor) swept on (d)'s model:\n")
    print(
        "| relative | absolute | accuracy | coarse | fine | visual tokens / sample | compressed coarse | compressed fine |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    connector = vir.connector
    for relative, absolute in ((0.1, 0.3), (0.1, 0.5), (0.1, 0.7), (0.1, 0.9), (0.0, 0.5), (0.3, 0.5)):
        connector.relative_threshold, connector.absolute_threshold = relative, absolute
        r = evaluate(vir, full, routed)
        share = defaultdict(list)
        for t, m in zip(r["tokens"], r["metas"]):
            share[m["detail"]].append(t == second)
        print(f"| {relative} | {absolute} | {accuracy(r):.3f} | {accuracy(r, 'coarse'):.3f} | {accuracy(r, 'fine'):.3f} "
              f"| {sum(r['tokens']) / len(r['tokens']):.2f} | "
              + " | ".join(f"{sum(share[d]) / max(len(share[d]), 1):.2f}" for d in DETAILS) + " |")  # fmt: skip
    wins, losses, p = sign_test(results[rows[3][0]]["right"], base["right"])
    print(f"\n(d) against (a): {wins} questions only (d) gets right, {losses} only (a); sign test p = {p:.3f}")
    # The router stage's labels (ViRStage): how well the loss ratio with ratio_eps ranks the scenes that need their
    # 16 tokens above those that do not, on the consistency model the router stage starts from.
    small = answer_losses(vico, full, at(second))
    large = answer_losses(vico, full, at(first))
    fine = torch.tensor([m["detail"] == "fine" for m in base["metas"]])
    print(f"\nRouter labels from the answer losses of the model after ViCO ({fine.sum()} fine of {len(fine)}; "
          f"the lowest {args.target:.0%} of the ratios labelled compress):\n")  # fmt: skip
    print("| ratio_eps | AUC fine above coarse | fine among those labelled compress | coarse labelled compress |")
    print("|---:|---:|---:|---:|")
    for eps in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        ratio = (small + eps) / (large + eps)
        labelled = ratio < torch.quantile(ratio, args.target)
        print(f"| {eps:g} | {_auc(ratio[fine], ratio[~fine]):.3f} | {labelled[fine].float().sum() / labelled.sum():.3f} "
              f"| {labelled[~fine].float().mean():.3f} |")  # fmt: skip


def _auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive's score > a negative's), ties counting half."""
    greater = (positive[:, None] > negative[None, :]).float().mean()
    ties = (positive[:, None] == negative[None, :]).float().mean()
    return float(greater + ties / 2)


if __name__ == "__main__":
    main()
