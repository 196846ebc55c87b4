"""The answer metrics of the benchmarks in InternVL's tables, one function per metric, each scoring one answer
against its references in [0, 1]; :func:`score` averages them per question type and overall.

Each follows the evaluation code InternVL reports with (OpenGVLab/InternVL ``internvl_chat/eval/``), cited where
a rule comes from; where that code has a quirk, the comment says which behaviour is kept.

    metric            benchmarks                    reference
    exact_match       GQA, OCRBench-style, shapes   one string or a list (any may match)
    vqa_accuracy      VQAv2, OK-VQA, TextVQA, VizWiz the annotators' answers (10 in VQAv2)
    anls              DocVQA, InfographicVQA        one string or a list
    relaxed_accuracy  ChartQA                       one string or a list
    multiple_choice   AI2D, MMMU, MMBench-style     the right letter (options in ``meta.options``)
    iou               RefCOCO/+/g (IoU ≥ 0.5)       ``[[x1, y1, x2, y2]]`` on the 0–1000 grid
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal, get_args

Metric = Literal["exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "multiple_choice", "iou"]


def _as_list(reference) -> list:
    return list(reference) if isinstance(reference, (list, tuple)) else [reference]


# -- exact match ---------------------------------------------------------------------------------------------------


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1 when the answer equals a reference after strip and lower-casing (evaluate_vqa.py L199-210)."""
    answer = prediction.strip().lower()
    return float(any(answer == ref.strip().lower() for ref in _as_list(reference)))


# -- VQA soft accuracy ---------------------------------------------------------------------------------------------

# The answer normalisation of the official VQA evaluation as InternVL runs it (internvl_chat/eval/vqa/
# textvqa_eval.py L8-219, EvalAIAnswerProcessor: word_tokenize, processPunctuation, processDigitArticle).
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in (
        "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
        "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
        "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
        "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
        "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
        "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
        "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
        "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
        "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
        "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
        "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
        "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
        "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
        "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've "
        "twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll "
        "whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've "
        "whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll "
        "whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
        "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
        "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll "
        "youre:you're youve:you've"
    ).split()
)
_NUMBERS = dict(
    zip("none zero one two three four five six seven eight nine ten".split(), "0 0 1 2 3 4 5 6 7 8 9 10".split())
)
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# Kept as written there (L153): "(?!<=\d)" is a lookahead, not the lookbehind it meant, so every period not followed
# by a digit goes ("1.5" keeps its point, "5." loses it), as in the official scores.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(text: str) -> str:
    """textvqa_eval.py L187-197: a mark beside a space (or any mark when a digit group comma is present) is
    deleted, one inside a word becomes a space; then periods go (above)."""
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """textvqa_eval.py L199-212: number words to digits, articles dropped, contractions restored."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """textvqa_eval.py L214-219 (word_tokenize L182-185 first: lower-case, drop ``,`` and ``?``, split ``'s``)."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, reference: Sequence[str]) -> float:
    """VQA soft accuracy: ``min(#annotators who gave the answer / 3, 1)`` averaged over the leave-one-out subsets
    of the annotators (10 subsets of 9 in VQAv2), on normalised answers (textvqa_eval.py L226-258)."""
    answers = [normalize_vqa_answer(a) for a in _as_list(reference)]
    if len(answers) < 2:
        raise ValueError(f"vqa_accuracy needs the annotators' answers (a list, 10 in VQAv2); got {reference!r}")
    answer = normalize_vqa_answer(prediction)
    matches = sum(a == answer for a in answers)
    # Leaving out an annotator who gave the answer leaves matches − 1 in the subset; any other leaves matches.
    return sum(min(1.0, (matches - (a == answer)) / 3) for a in answers) / len(answers)


# -- ANLS ----------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, reference: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA, InfographicVQA): ``1 − NL`` for the
    closest reference, 0 when that is below ``threshold``; NL = edit distance / the longer length, on answers
    stripped, lower-cased and with runs of spaces collapsed (internvl_chat/eval/vqa/infographicsvqa_eval.py
    L134-147, the official script; as there, the length is that of the answers before collapsing spaces)."""
    values = []
    for ref in _as_list(reference):
        gt, det = " ".join(ref.strip().lower().split()), " ".join(prediction.strip().lower().split())
        length = max(len(ref.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    similarity = 1 - min(values)
    return 0.0 if similarity < threshold else similarity


# -- relaxed accuracy ----------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    """A number, percentages as fractions (``"5%"`` → 0.05), else None (evaluate_vqa.py L166-174)."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, reference: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: a number within ``tolerance`` (5%) of a numeric reference, relative to the
    reference; otherwise an exact case-insensitive match (pix2struct metrics.py L81, evaluate_vqa.py L143-183).

    InternVL's evaluate_relaxed_accuracy (evaluate_vqa.py L192) passes the model's answer as the ``target``, so its
    5% is relative to the answer; here it is relative to the reference, as the ChartQA and pix2struct papers define
    it (the two differ only for answers near the 5% edge).
    """

    def correct(ref: str) -> bool:
        answer, gold = prediction.strip(), ref.strip()
        predicted, target = _to_float(answer), _to_float(gold)
        if predicted is not None and target:
            return abs(predicted - target) / abs(target) <= tolerance
        return answer.lower() == gold.lower()

    return float(any(correct(ref) for ref in _as_list(reference)))


# -- multiple choice -----------------------------------------------------------------------------------------------


def choice_letter(response: str, choices: Sequence[str], options: dict[str, str] | None = None) -> str | None:
    """The option letter a free-form response picks (MMMU's parse_multi_choice_response, internvl_chat/eval/mmmu/
    eval_utils.py L11-63): ``(B)`` first, else ``B`` standing alone, else (responses over 5 words, with
    ``options``: letter → text) the option whose text it contains; of several, the one mentioned last. None when
    nothing matches, where MMMU picks a random letter: an unparsed answer counts as wrong here, reproducibly."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in choices if f"({c})" in response]
    if candidates:
        return max(candidates, key=lambda c: response.rfind(f"({c})"))
    candidates = [c for c in choices if f" {c} " in response]
    if candidates:
        return max(candidates, key=lambda c: response.rfind(f" {c} "))
    if options and len(response.split()) > 5:
        text = response.lower()
        candidates = [c for c, option in options.items() if option.lower() in text]
        if candidates:
            return max(candidates, key=lambda c: text.rfind(options[c].lower()))
    return None


def multiple_choice(prediction: str, reference: str, options: dict[str, str] | None = None) -> float:
    """1 when the letter the response picks is the reference letter; the letters are ``options``' keys when given,
    else A–Z."""
    choices = list(options) if options else [chr(ord("A") + i) for i in range(26)]
    return float(choice_letter(prediction, choices, options) == str(reference).strip())


# -- grounding -----------------------------------------------------------------------------------------------------

# evaluate_grounding.py L257: the first "[[x1, y1, x2, y2]]" (brackets optional past the first) in the answer.
_BOX = re.compile(r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*")


def parse_box(text) -> tuple[float, float, float, float] | None:
    """The first box of an answer (``"<box>[[x1, y1, x2, y2]]</box>"``) or a box given as numbers."""
    if isinstance(text, (list, tuple)):
        flat = text[0] if text and isinstance(text[0], (list, tuple)) else text
        return tuple(float(v) for v in flat) if len(flat) == 4 else None
    found = _BOX.findall(str(text))
    try:
        return tuple(float(v) for v in found[0]) if found else None
    except ValueError:
        return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (evaluate_grounding.py L29-42)."""
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_hit(prediction: str, reference, threshold: float = 0.5) -> float:
    """RefCOCO's Precision@1: 1 when the first predicted box overlaps the reference box with IoU ≥ ``threshold``
    (evaluate_grounding.py L186-205); an answer without a box scores 0. Both on the 0–1000 grid: InternVL scales
    both to pixels first, which scales x and y each by one factor, and IoU is unchanged by that."""
    predicted, target = parse_box(prediction), parse_box(reference)
    if target is None:
        raise ValueError(f"iou needs a reference box [[x1, y1, x2, y2]]; got {reference!r}")
    return float(predicted is not None and box_iou(predicted, target) >= threshold)


# -- per question type and overall ---------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "multiple_choice": multiple_choice,
    "iou": iou_hit,
}
assert set(METRICS) == set(get_args(Metric))


def score_one(metric: Metric, prediction: str, reference, meta: dict | None = None) -> float:
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose from {sorted(METRICS)}")
    if metric == "multiple_choice":
        return multiple_choice(prediction, reference, (meta or {}).get("options"))
    return METRICS[metric](prediction, reference)


def score(records: Sequence[dict], metric: Metric, group_by: str = "type") -> dict:
    """``{"metric", "overall": {"score", "count"}, "by_type": {type: {"score", "count"}}}`` over records with
    ``answer``, ``reference`` and optionally ``meta`` (the ``predict`` output); a record's type is
    ``meta[group_by]`` (records without one count in the overall score only)."""
    groups: dict[str, list[float]] = {}
    values = []
    for record in records:
        if record.get("reference") is None:
            raise ValueError(f"record {record.get('name', '?')!r} has no reference to score against")
        meta = record.get("meta") or {}
        value = score_one(metric, record["answer"], record["reference"], meta)
        values.append(value)
        if meta.get(group_by) is not None:
            groups.setdefault(str(meta[group_by]), []).append(value)

    def summary(scores: list[float]) -> dict:
        return {"score": sum(scores) / len(scores) if scores else float("nan"), "count": len(scores)}

    return {
        "metric": metric,
        "overall": summary(values),
        "by_type": {name: summary(scores) for name, scores in sorted(groups.items())},
    }


def score_table(result: dict) -> str:
    """The scores as a fixed-width table: one row per question type, then the overall row."""
    rows = [(name, s["score"], s["count"]) for name, s in result["by_type"].items()]
    rows.append(("overall", result["overall"]["score"], result["overall"]["count"]))
    width = max(len("type"), *(len(name) for name, _, _ in rows))
    lines = [f"{'type':<{width}}  {result['metric']:>16}  {'count':>6}"]
    lines += [f"{name:<{width}}  {value:>16.4f}  {count:>6}" for name, value, count in rows]
    return "\n".join(lines)
