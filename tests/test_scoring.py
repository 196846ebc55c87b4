"""Each benchmark metric equals a hand-computed case (ANLS and VQA soft accuracy on their published definitions'
worked examples), and ``evaluate`` scores what the SFT recipe's ``predict`` wrote."""

from __future__ import annotations

import json

import pytest

from lit_internvl.cli import main
from lit_internvl.scoring import (
    anls,
    box_iou,
    choice_letter,
    exact_match,
    iou_hit,
    levenshtein,
    multiple_choice,
    normalize_vqa_answer,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)


def test_exact_match_ignores_case_and_outer_spaces_only():
    assert exact_match(" Red ", "red") == 1.0
    assert exact_match("red.", "red") == 0.0
    assert exact_match("circle", ["square", "Circle"]) == 1.0


def _official_vqa_score(prediction: str, annotators: list[str]) -> float:
    """textvqa_eval.py L226-254 as written there: per annotator, the other nine; min(1, matches / 3); mean."""
    answers = list(enumerate(normalize_vqa_answer(a) for a in annotators))
    pred = normalize_vqa_answer(prediction)
    accs = [min(1, len([o for o in answers if o != held and o[1] == pred]) / 3) for held in answers]
    return sum(accs) / len(accs)


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_is_the_published_leave_one_out_average(matches, expected):
    # VQA's definition: Acc(ans) = min(#humans that said ans / 3, 1), averaged over all 10 choose 9 sets of
    # annotators. By hand for 2 of 10: the 2 subsets without one of them give 1/3, the other 8 give 2/3:
    # (2/3 + 16/3) / 10 = 0.6; for 1 of 10: 9 subsets give 1/3, one 0 → 0.3; for 3: (3·2/3 + 7·1) / 10 = 0.9.
    annotators = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("Yes", annotators) == pytest.approx(expected)
    assert vqa_accuracy("Yes", annotators) == pytest.approx(_official_vqa_score("Yes", annotators))


def test_vqa_answer_normalisation_of_the_official_eval():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"  # number word, final period
    assert normalize_vqa_answer("The Cat") == "cat"  # article
    assert normalize_vqa_answer("dont") == "don't"  # contraction restored
    assert normalize_vqa_answer("1,000") == "1000"  # a digit-group comma goes without a space
    assert normalize_vqa_answer("black-and-white") == "black and white"  # a mark inside a word becomes a space
    assert normalize_vqa_answer("3.5") == "3.5"  # a decimal point stays
    annotators = ["2"] * 3 + ["two dogs"] * 7
    assert vqa_accuracy("two", annotators) == pytest.approx(0.9)


def test_anls_on_the_levenshtein_worked_examples():
    # The textbook pair: kitten → sitting is 3 edits; NL = 3 / 7, ANLS = 1 − 3/7.
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("flaw", "lawn") == 2
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls("lawn", "flaw") == pytest.approx(0.5)  # NL = 0.5 exactly: not below the threshold, kept
    assert anls("abc", "xyz") == 0.0  # NL = 1: below the 0.5 threshold → 0
    assert anls("cat", "bat") == pytest.approx(2 / 3)
    assert anls("  The   Cat ", ["dog", "the cat"]) == 1.0  # case, runs of spaces; the best reference counts


def test_relaxed_accuracy_is_five_percent_of_the_reference():
    assert relaxed_accuracy("10.4", "10") == 1.0 and relaxed_accuracy("10.6", "10") == 0.0
    assert relaxed_accuracy("5%", "0.05") == 1.0  # a percentage is a fraction
    assert relaxed_accuracy("Yes", "yes") == 1.0 and relaxed_accuracy("yes.", "yes") == 0.0
    # 9.5 against 10 is 5% of the reference (correct); relative to the answer, as InternVL's swapped call
    # computes it, it is 5.3% (wrong): the published definition is kept.
    assert relaxed_accuracy("9.5", "10") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0  # a zero reference needs the exact string


def test_multiple_choice_letter_extraction_as_mmmu():
    letters = list("ABCD")
    assert choice_letter("(B)", letters) == "B"
    assert choice_letter("The answer is C.", letters) == "C"
    assert choice_letter("A seems close, but (D) is right", letters) == "D"  # a bracketed letter wins
    assert choice_letter("B or C? I would say C", letters) == "C"  # of several, the last mentioned
    options = {"A": "a red circle", "B": "a blue square"}
    assert choice_letter("The picture shows, clearly, a blue square", list(options), options) == "B"
    assert choice_letter("no idea", letters) is None
    assert multiple_choice("no idea", "A") == 0.0 and multiple_choice("(A) a red circle", "A") == 1.0


def test_iou_at_half_on_the_grid():
    # [0, 0, 100, 100] and [50, 0, 150, 100]: intersection 50·100, union 2·100² − 5000 → IoU 1/3.
    assert box_iou((0, 0, 100, 100), (50, 0, 150, 100)) == pytest.approx(1 / 3)
    assert iou_hit("<ref>the square</ref><box>[[50, 0, 150, 100]]</box>", [[0, 0, 100, 100]]) == 0.0
    # [10, 0, 110, 100]: intersection 9000, union 11000 → 0.818.
    assert iou_hit("<box>[[10, 0, 110, 100]]</box>", [[0, 0, 100, 100]]) == 1.0
    assert iou_hit("[[10, 0, 110, 100]]", "[[0, 0, 100, 100]]") == 1.0  # a reference given as text
    assert iou_hit("somewhere on the left", [[0, 0, 100, 100]]) == 0.0


def test_scores_per_type_and_overall():
    records = [
        {"answer": "red", "reference": "red", "meta": {"type": "colour"}},
        {"answer": "blue", "reference": "red", "meta": {"type": "colour"}},
        {"answer": "circle", "reference": "circle", "meta": {"type": "shape"}},
    ]
    result = score(records, "exact_match")
    assert result["overall"] == {"score": pytest.approx(2 / 3), "count": 3}
    assert result["by_type"] == {"colour": {"score": 0.5, "count": 2}, "shape": {"score": 1.0, "count": 1}}
    with pytest.raises(ValueError, match="no reference"):
        score([{"name": "x", "answer": "a", "reference": None}], "exact_match")
    with pytest.raises(ValueError, match="annotators' answers"):
        score([{"answer": "a", "reference": "a"}], "vqa_accuracy")


def test_evaluate_scores_the_sft_recipes_predict_output(tmp_path, capsys):
    """``predict`` of recipes/sft.yaml (tiny overrides, an untrained model) then ``evaluate``: the json holds the
    exact-match rate recomputed here from the written lines, per question type and overall."""
    main(["predict", "--config", "recipes/sft.yaml", "--model.init_args.init_from", "null",
          "--data.init_args.val_size", "6", "--data.init_args.batch_size", "3", "--data.init_args.num_workers", "0",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    predictions = next(tmp_path.rglob("predictions.jsonl"))
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 6 and all(line["meta"]["type"] for line in lines)
    result = main(["evaluate", "--predictions", str(predictions), "--metric", "exact_match"])
    written = json.loads(predictions.with_name("predictions.exact_match.json").read_text())
    assert written["overall"] == result["overall"]
    hits = [line["answer"].strip().lower() == line["reference"].strip().lower() for line in lines]
    assert written["overall"] == {"score": pytest.approx(sum(hits) / 6), "count": 6}
    types = {line["meta"]["type"] for line in lines}
    assert set(written["by_type"]) == types
    assert sum(s["count"] for s in written["by_type"].values()) == 6
    table = capsys.readouterr().out
    assert "overall" in table and "exact_match" in table
    # The untrained model is right by chance at most: make the first two answers right and score again.
    for line in lines[:2]:
        line["answer"] = line["reference"].upper()
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    again = main(["evaluate", "--predictions", str(predictions), "--metric", "exact_match"])
    hits = [line["answer"].strip().lower() == line["reference"].strip().lower() for line in lines]
    assert again["overall"]["score"] == pytest.approx(sum(hits) / 6) and sum(hits) >= 2
    for kind, summary in again["by_type"].items():
        mine = [h for h, line in zip(hits, lines) if line["meta"]["type"] == kind]
        assert summary == {"score": pytest.approx(sum(mine) / len(mine)), "count": len(mine)}
