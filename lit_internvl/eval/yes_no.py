"""The yes/no hallucination and perception benchmarks of InternVL's tables, as its evaluation code scores them:
POPE (accuracy, precision, recall, F1 and the yes ratio per category; the mean F1 over categories) and MME (per
subtask accuracy + accuracy+ in points, the perception and cognition totals).

Records are ``predict``'s (``{"name", "answer", "reference", "meta"}``), the reference ``"yes"`` or ``"no"``;
``meta.category`` names the POPE split (``random``, ``popular``, ``adversarial``) or the MME subtask, and MME's
``meta.image`` names the image whose two questions count together in accuracy+. Beside each score is the score of a
coin flip (a uniform random yes or no for every question), the chance level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

#: internvl_chat/eval/mme/calculation.py L10-13: MME's subtasks, by the total they count in.
MME_SUBTASKS: dict[str, tuple[str, ...]] = {
    "perception": (
        "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
    ),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}  # fmt: skip


def _label(reference, name: str) -> Literal["yes", "no"]:
    label = str(reference).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"record {name!r}: a yes/no benchmark's reference must be 'yes' or 'no', got {reference!r}")
    return label  # type: ignore[return-value]


def _category(record: dict) -> str:
    return str((record.get("meta") or {}).get("category", "all"))


# -- POPE ------------------------------------------------------------------------------------------------------------


def pope_answer(text: str) -> Literal["yes", "no"]:
    """internvl_chat/eval/pope/eval_pope.py L12-21: the first sentence, commas dropped, split on spaces; "no" when
    one word is ``No``, ``not`` or ``no``, else "yes" (an answer that says neither counts as yes)."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def _pope_counts(pairs: list[tuple[str, str]]) -> dict:
    """eval_pope.py L36-63 on (prediction, label) pairs; a precision or recall with no case to count is 0 (where the
    reference divides by zero)."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    positives = (tp + fn) / len(pairs)
    return {
        "accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs), "TP": tp, "FP": fp, "TN": tn, "FN": fn, "count": len(pairs),
        # a coin flip: accuracy 1/2; precision the share of yes labels, recall 1/2, so F1 = p / (p + 1/2)
        "chance": {"accuracy": 0.5, "f1": positives / (positives + 0.5), "yes_ratio": 0.5},
    }  # fmt: skip


def pope_scores(records: Sequence[dict]) -> dict:
    """POPE per ``meta.category`` and overall: ``{"metric": "pope", "overall": {..., "mean_f1"}, "by_type": {...}}``;
    the benchmark's headline is ``mean_f1``, the F1 averaged over the categories (eval_pope.py L75-88)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    everything = []
    for record in records:
        pair = (pope_answer(record["answer"]), _label(record.get("reference"), record.get("name", "?")))
        groups.setdefault(_category(record), []).append(pair)
        everything.append(pair)
    if not everything:
        raise ValueError("no POPE records to score")
    by_type = {name: _pope_counts(pairs) for name, pairs in sorted(groups.items())}
    overall = _pope_counts(everything)
    overall["mean_f1"] = sum(s["f1"] for s in by_type.values()) / len(by_type)
    overall["chance"]["mean_f1"] = sum(s["chance"]["f1"] for s in by_type.values()) / len(by_type)
    return {"metric": "pope", "overall": overall, "by_type": by_type}


# -- MME -------------------------------------------------------------------------------------------------------------


def mme_answer(text: str) -> Literal["yes", "no", "other"]:
    """internvl_chat/eval/mme/calculation.py L24-38: lower-cased, ``yes`` or ``no`` as it stands, else by which of
    them its first four characters hold (yes first), else ``other`` (wrong whatever the label)."""
    answer = text.lower()
    if answer in ("yes", "no"):
        return answer  # type: ignore[return-value]
    return "yes" if "yes" in answer[:4] else "no" if "no" in answer[:4] else "other"


def mme_scores(records: Sequence[dict]) -> dict:
    """MME per subtask (``meta.category``): accuracy × 100 + accuracy+ × 100 (accuracy+: the share of images, by
    ``meta.image``, whose questions are all answered right; MME asks two of each), out of 200
    (calculation.py L97-147); totals ``perception`` (out of 2000) and ``cognition`` (800) over the subtasks present.
    ``{"metric": "mme", "overall": {"perception", "cognition", "total"}, "by_type": {subtask: {...}}}``."""
    tasks: dict[str, dict[str, list[bool]]] = {}
    for record in records:
        meta = record.get("meta") or {}
        if "image" not in meta:
            raise ValueError(f"MME record {record.get('name', '?')!r} has no meta.image (its two questions pair by it)")
        right = mme_answer(record["answer"]) == _label(record.get("reference"), record.get("name", "?"))
        tasks.setdefault(_category(record), {}).setdefault(str(meta["image"]), []).append(right)
    if not tasks:
        raise ValueError("no MME records to score")
    by_type = {}
    for name, images in sorted(tasks.items()):
        answers = [right for image in images.values() for right in image]
        accuracy, accuracy_plus = sum(answers) / len(answers), sum(all(i) for i in images.values()) / len(images)
        # a coin flip: each answer right half the time, both of an image's two a quarter: 50 + 25
        chance = 50.0 + 100.0 * sum(0.5 ** len(i) for i in images.values()) / len(images)
        by_type[name] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus,
                         "score": 100 * (accuracy + accuracy_plus), "count": len(answers),
                         "chance": {"score": chance}}  # fmt: skip
    overall: dict = {"chance": {}}
    for total, subtasks in MME_SUBTASKS.items():
        present = [by_type[s] for s in subtasks if s in by_type]
        if present:
            overall[total] = sum(s["score"] for s in present)
            overall["chance"][total] = sum(s["chance"]["score"] for s in present)
    overall["total"] = sum(s["score"] for s in by_type.values())
    overall["chance"]["total"] = sum(s["chance"]["score"] for s in by_type.values())
    overall["count"] = sum(s["count"] for s in by_type.values())
    return {"metric": "mme", "overall": overall, "by_type": by_type}
