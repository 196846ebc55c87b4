"""``python -m lit_internvl evaluate``: score the answers ``predict`` wrote with a benchmark's metric.

    python -m lit_internvl evaluate --predictions runs/sft/predictions.jsonl --metric exact_match
    python -m lit_internvl evaluate --predictions docvqa.jsonl --metric anls --output docvqa.scores.json

Each line of the predictions file is ``{"name", "answer", "reference", "meta"}`` (what the stages' predict step
writes, :mod:`lit_internvl.callbacks.predictions`); ``meta.type`` groups the questions. The scores go to a json
file (default: beside the predictions, ``<name>.<metric>.json``) and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from tqdm import tqdm

from lit_internvl.scoring import Metric, score, score_table


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
    parser.add_argument("--metric", required=True, choices=get_args(Metric))
    parser.add_argument("--group-by", default="type", help="the meta key that names a question's type")
    parser.add_argument("--output", help="json file to write (default: <predictions>.<metric>.json)")
    args = parser.parse_args(argv)
    result = score(read_predictions(args.predictions), args.metric, args.group_by)
    result["predictions"] = str(args.predictions)
    predictions = Path(args.predictions)
    output = Path(args.output) if args.output else predictions.with_name(f"{predictions.stem}.{args.metric}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(score_table(result), flush=True)
    print(f"scores written to {output}", flush=True)
    return result
