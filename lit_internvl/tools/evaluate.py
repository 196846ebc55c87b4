"""``python -m lit_internvl evaluate``: score the answers ``predict`` wrote with a benchmark's metric.

    python -m lit_internvl evaluate --predictions runs/sft/predictions.jsonl --metric exact_match
    python -m lit_internvl evaluate --predictions docvqa.jsonl --metric anls --output docvqa.scores.json
    python -m lit_internvl evaluate --predictions coco_captions.jsonl --metric caption
    python -m lit_internvl evaluate --predictions pope.jsonl --metric pope

Each line of the predictions file is ``{"name", "answer", "reference", "meta"}`` (what the stages' predict step
writes, :mod:`lit_internvl.callbacks.predictions`); ``meta.type`` groups the questions. The per-answer metrics are
:mod:`lit_internvl.scoring`'s; three score a benchmark as a whole (:mod:`lit_internvl.eval`): ``caption`` (COCO's
CIDEr-D and BLEU-1…4, one record per image, the reference a caption or a list), ``pope`` (accuracy, precision,
recall, F1 and the yes ratio per ``meta.category``) and ``mme`` (accuracy + accuracy+ per subtask ``meta.category``,
questions paired by ``meta.image``). The scores go to a json file (default: beside the predictions,
``<name>.<metric>.json``) and are printed as a table, chance levels beside them where the metric has one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from tqdm import tqdm

from lit_internvl.eval.captions import caption_scores
from lit_internvl.eval.yes_no import mme_scores, pope_scores
from lit_internvl.scoring import Metric, score, score_table

#: Metrics of a benchmark as a whole (not an average of per-answer scores), and the columns their table prints.
CORPUS_METRICS = {
    "caption": (caption_scores, ("CIDEr", "BLEU-4", "BLEU-1")),
    "pope": (pope_scores, ("f1", "accuracy", "precision", "recall", "yes_ratio")),
    "mme": (mme_scores, ("score", "accuracy", "accuracy_plus")),
}


def read_predictions(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        # disable=None: tqdm's own switch, a bar on a terminal and nothing in logs or tests
        for number, line in enumerate(tqdm(f, desc="reading predictions", unit=" lines", disable=None), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not a JSON object: {error}") from None
    if not records:
        raise ValueError(f"{path} holds no predictions")
    return records


def main(argv: list[str]) -> dict:
    """Score the predictions; returns the result written to the json file."""
    parser = argparse.ArgumentParser(prog="python -m lit_internvl evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="a predictions.jsonl written by predict")
    parser.add_argument("--metric", required=True, choices=[*get_args(Metric), *CORPUS_METRICS])
    parser.add_argument("--group-by", default="type", help="the meta key that names a question's type")
    parser.add_argument("--output", help="json file to write (default: <predictions>.<metric>.json)")
    args = parser.parse_args(argv)
    records = read_predictions(args.predictions)
    if args.metric in CORPUS_METRICS:
        scorer, columns = CORPUS_METRICS[args.metric]
        result = scorer(records)
        table = corpus_table(result, columns)
    else:
        result = score(records, args.metric, args.group_by)
        table = score_table(result)
    result["predictions"] = str(args.predictions)
    predictions = Path(args.predictions)
    output = Path(args.output) if args.output else predictions.with_name(f"{predictions.stem}.{args.metric}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(table, flush=True)
    print(f"scores written to {output}", flush=True)
    return result


def corpus_table(result: dict, columns: tuple[str, ...]) -> str:
    """A fixed-width table of a benchmark's scores: a row per group (``by_type``) and the overall row, each named
    column with its chance level beside it in brackets where there is one; the overall row's own headline scores
    (CIDEr's, POPE's mean F1, MME's totals) follow it."""
    rows = [(name, scores) for name, scores in result.get("by_type", {}).items()] + [("overall", result["overall"])]
    width = max(len("type"), *(len(name) for name, _ in rows))
    shown = [c for c in columns if any(c in scores for _, scores in rows)]
    lines = [f"{'type':<{width}}  " + "  ".join(f"{c:>20}" for c in shown) + f"  {'count':>6}"]
    for name, scores in rows:
        cells = []
        for column in shown:
            value, chance = scores.get(column), (scores.get("chance") or {}).get(column)
            cells.append(
                f"{'':>20}"
                if value is None
                else f"{value:>10.4f}" + (f" ({chance:.4f})" if chance is not None else " " * 9).rjust(10)
            )
        lines.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {scores.get('count', ''):>6}")
    headline = {k: v for k, v in result["overall"].items() if isinstance(v, float) and k not in shown}
    for key, value in headline.items():
        chance = result["overall"].get("chance", {}).get(key)
        lines.append(f"{key}: {value:.4f}" + (f" (chance {chance:.4f})" if chance is not None else ""))
    lines.append("(chance levels in brackets)" if any((s.get("chance") or {}) for _, s in rows) else "")
    return "\n".join(line for line in lines if line)
