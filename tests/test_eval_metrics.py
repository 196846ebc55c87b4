"""The benchmark-wide scores equal their references: CIDEr-D and BLEU as pycocoevalcap computes them (its numbers on a
fixed corpus written here, and the published definition's limiting cases by hand), COCO's PTB tokenisation as Stanford's
Java tokenizer gives it, POPE and MME as InternVL's evaluation scripts count them; ``evaluate`` prints each."""

from __future__ import annotations

import json
import math
import random

import pytest

from lit_internvl.eval.captions import bleu, caption_scores, cider_d, ptb_tokenize
from lit_internvl.eval.yes_no import mme_answer, mme_scores, pope_answer, pope_scores

# -- PTB tokenisation ------------------------------------------------------------------------------------------------

# Stanford PTBTokenizer 3.4.1 (pycocoevalcap's jar) with -preserveLines -lowerCase on the left-hand captions gave the
# tokens below; COCO's evaluation then drops its punctuation list (ptbtokenizer.py L21-22, L65-66): the right-hand side.
JAVA_PTB = {
    "A man riding a horse, on the beach.": "a man riding a horse on the beach",
    'Two dogs aren\'t playing "fetch" in the park!': "two dogs are n't playing fetch in the park",
    # lower-cased escapes are not on the list: a parenthesis stays as -lrb- / -rrb-
    "The cat's toy (a red ball) is under the table...": "the cat 's toy -lrb- a red ball -rrb- is under the table",
    "A woman -- holding an umbrella -- walks down the street; it's raining.": (
        "a woman holding an umbrella walks down the street it 's raining"
    ),
    "Kids' bikes lean against a wall: blue, green & yellow.": "kids bikes lean against a wall blue green & yellow",
    "A 3.5-inch screen shows U.S. news at 10:30 p.m.": "a 3.5-inch screen shows u.s. news at 10:30 p.m.",
    "He said 'fetch' and it's the dog's.": "he said fetch and it 's the dog 's",
}


@pytest.mark.parametrize(("caption", "tokens"), list(JAVA_PTB.items()))
def test_captions_are_tokenised_as_cocos_java_ptb_tokenizer_does(caption, tokens):
    assert ptb_tokenize(caption) == tokens


# -- CIDEr-D and BLEU ------------------------------------------------------------------------------------------------

REFERENCES = {
    "1": ["a man riding a horse on the beach", "a person rides a brown horse along the shore",
          "a man on horseback near the sea"],
    "2": ["two dogs playing in the park", "a pair of dogs run across the grass", "two dogs chase a ball in a park"],
    "3": ["a red circle at the top left", "the red circle is at the top left"],
    "4": ["a plate of food with broccoli and rice", "rice and broccoli on a white plate"],
}  # fmt: skip
CANDIDATES = {"1": "a man rides a horse on the beach", "2": "two dogs run in the park", "3": "a red circle at the top",
              "4": "a white plate"}  # fmt: skip
# pycocoevalcap 1.2: Cider().compute_score and Bleu(4).compute_score(verbose=0) of the corpus above.
PYCOCOEVALCAP_CIDER = 3.3567044269132364
PYCOCOEVALCAP_CIDER_PER_IMAGE = [2.798284649706148, 2.5278720182187326, 6.207532566417095, 1.8931284733109695]
PYCOCOEVALCAP_BLEU = [0.8046150582553863, 0.7610896504151371, 0.6539386599356845, 0.5655149996120356]


def test_cider_d_equals_pycocoevalcaps_scorer():
    corpus, per_image = cider_d(CANDIDATES, REFERENCES)
    assert corpus == pytest.approx(PYCOCOEVALCAP_CIDER, abs=1e-6)
    assert [per_image[k] for k in "1234"] == pytest.approx(PYCOCOEVALCAP_CIDER_PER_IMAGE, abs=1e-6)


def test_bleu_equals_pycocoevalcaps_scorer():
    assert bleu(CANDIDATES, REFERENCES) == pytest.approx(PYCOCOEVALCAP_BLEU, abs=1e-6)


def test_cider_d_limiting_cases_of_the_published_definition():
    # Each image's one reference is its candidate, no n-gram shared between images: every n-gram has df 1, so both
    # vectors are tf·log(2), the cosine is 1 for n = 1..4, the length penalty 1: 10 · mean(1, 1, 1, 1) = 10.
    apart = {"a": "red circle top left corner", "b": "blue square bottom right side"}
    assert cider_d(apart, {k: [v] for k, v in apart.items()})[0] == pytest.approx(10.0, abs=1e-9)
    # The same caption for every image: each n-gram is in every image's references, log(N) − log(df) = 0: nothing
    # distinguishes one image from another, CIDEr-D 0.
    same = {"a": "a red circle", "b": "a red circle"}
    assert cider_d(same, {k: [v] for k, v in same.items()})[0] == 0.0
    # The Gaussian length penalty exp(−δ²/2σ²), σ = 6: one word more than the only reference, with the n-grams the
    # reference shares with the candidate alone scoring. Image a: candidate "w1..w5 x" against reference "w1..w5".
    # Image b's reference shares no n-gram with a's.
    words = "one two three four five".split()
    candidates = {"a": " ".join(words + ["six"]), "b": "p q r s t"}
    references = {"a": [" ".join(words)], "b": ["p q r s t"]}
    idf = math.log(2)
    penalty = math.exp(-1 / 72)
    # per order n: the candidate's 6−n+1 n-grams, the reference's 5−n+1, all with weight idf; the unseen n-gram
    # ("five six", ...) has df 0 → weight log(2) − log(1) = idf too: cos = (5−n+1) / sqrt((6−n+1)(5−n+1))
    cos = [(5 - n + 1) / ((6 - n + 1) * (5 - n + 1)) ** 0.5 for n in range(1, 5)]
    expected_a = 10 * penalty * sum(cos) / 4
    assert idf > 0 and cider_d(candidates, references)[1]["a"] == pytest.approx(expected_a, abs=1e-9)


def test_bleu_of_a_candidate_equal_to_its_reference_is_one_and_a_short_one_pays_the_brevity_penalty():
    same = {"a": "a red circle at the top left"}
    assert bleu(same, {"a": [same["a"]]}) == pytest.approx([1.0] * 4, abs=1e-8)
    # 4 words; the reference lengths are 8 and 5, the closest 5: r/c = 5/4, every n-gram of the candidate matches
    short = {"a": "a red circle at"}
    refs = {"a": ["a red circle at the top left corner", "a red circle at top"]}
    assert bleu(short, refs)[0] == pytest.approx(math.exp(1 - 5 / 4), abs=1e-8)


def test_against_pycocoevalcap_itself_where_it_is_installed():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu")
    rng = random.Random(0)
    vocabulary = "a the red blue circle square at top left right of on with two small".split()
    references = {str(i): [" ".join(rng.choices(vocabulary, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 5))]
                  for i in range(40)}  # fmt: skip
    candidates = {k: " ".join(rng.choices(vocabulary, k=rng.randint(1, 9))) for k in references}
    theirs, _ = cider_module.Cider().compute_score(references, {k: [v] for k, v in candidates.items()})
    assert cider_d(candidates, references)[0] == pytest.approx(float(theirs), abs=1e-6)
    theirs_bleu, _ = bleu_module.Bleu(4).compute_score(references, {k: [v] for k, v in candidates.items()}, verbose=0)
    assert bleu(candidates, references) == pytest.approx(theirs_bleu, abs=1e-6)


def test_caption_scores_tokenise_and_give_the_shuffled_captions_as_chance():
    records = [{"name": k, "answer": v.capitalize() + ".", "reference": REFERENCES[k]} for k, v in CANDIDATES.items()]
    result = caption_scores(records)
    assert result["overall"]["CIDEr"] == pytest.approx(PYCOCOEVALCAP_CIDER, abs=1e-6)
    assert result["overall"]["BLEU-4"] == pytest.approx(PYCOCOEVALCAP_BLEU[3], abs=1e-6)
    assert result["overall"]["chance"]["CIDEr"] < 0.5 < result["overall"]["CIDEr"]


# -- POPE and MME ----------------------------------------------------------------------------------------------------


def test_pope_answers_are_read_as_eval_pope_reads_them():
    assert pope_answer("No, there is not.") == "no"
    assert pope_answer("There is no dog in the image.") == "no"
    assert pope_answer("Yes. There is no doubt.") == "yes"  # only the first sentence counts
    assert pope_answer("I cannot tell") == "yes"  # neither word: yes, as the reference counts it
    assert pope_answer("NO") == "yes"  # the words are matched case-sensitively


def test_pope_counts_precision_recall_and_f1_per_category():
    # random: 3 yes labels, 1 no; answers yes, yes, no (a missed yes), yes (a false yes): TP 2, FN 1, FP 1, TN 0
    records = [
        {"answer": "Yes", "reference": "yes", "meta": {"category": "random"}},
        {"answer": "Yes", "reference": "yes", "meta": {"category": "random"}},
        {"answer": "No", "reference": "yes", "meta": {"category": "random"}},
        {"answer": "Yes", "reference": "no", "meta": {"category": "random"}},
        {"answer": "No", "reference": "no", "meta": {"category": "adversarial"}},
        {"answer": "Yes", "reference": "yes", "meta": {"category": "adversarial"}},
    ]
    result = pope_scores(records)
    random_split = result["by_type"]["random"]
    assert (random_split["TP"], random_split["FN"], random_split["FP"], random_split["TN"]) == (2, 1, 1, 0)
    assert random_split["precision"] == pytest.approx(2 / 3) and random_split["recall"] == pytest.approx(2 / 3)
    assert random_split["f1"] == pytest.approx(2 / 3) and random_split["accuracy"] == pytest.approx(0.5)
    assert random_split["yes_ratio"] == pytest.approx(0.75)
    assert result["by_type"]["adversarial"]["f1"] == 1.0
    assert result["overall"]["mean_f1"] == pytest.approx((2 / 3 + 1) / 2)
    # a coin flip's F1 with 3 of 4 labels yes: precision 3/4, recall 1/2 → 0.6
    assert random_split["chance"]["f1"] == pytest.approx(0.6)


def test_mme_reads_answers_and_scores_accuracy_plus_accuracy_plus_per_subtask():
    assert mme_answer("Yes, there is a dog.") == "yes"
    assert mme_answer("Not sure") == "no"  # "no" in the first four characters, as calculation.py reads it
    assert mme_answer("There is a dog") == "other"
    records = [  # existence: image 1 both right, image 2 one right → acc 3/4, acc+ 1/2 → 125
        {"answer": "Yes", "reference": "yes", "meta": {"category": "existence", "image": "1.jpg"}},
        {"answer": "No", "reference": "no", "meta": {"category": "existence", "image": "1.jpg"}},
        {"answer": "Yes", "reference": "yes", "meta": {"category": "existence", "image": "2.jpg"}},
        {"answer": "It is", "reference": "no", "meta": {"category": "existence", "image": "2.jpg"}},
        {"answer": "no", "reference": "yes", "meta": {"category": "code_reasoning", "image": "c.png"}},
        {"answer": "no", "reference": "no", "meta": {"category": "code_reasoning", "image": "c.png"}},
    ]
    result = mme_scores(records)
    assert result["by_type"]["existence"]["score"] == pytest.approx(125.0)
    assert result["by_type"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert result["overall"]["perception"] == pytest.approx(125.0)
    assert result["overall"]["cognition"] == pytest.approx(50.0)
    assert result["by_type"]["existence"]["chance"]["score"] == pytest.approx(75.0)


def test_evaluate_prints_each_benchmark_with_its_chance_levels(tmp_path, capsys):
    from lit_internvl.cli import main

    def write(name: str, records: list[dict]):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    captions = [{"name": k, "answer": v, "reference": REFERENCES[k]} for k, v in CANDIDATES.items()]
    result = main(["evaluate", "--predictions", write("captions.jsonl", captions), "--metric", "caption"])
    assert result["overall"]["CIDEr"] == pytest.approx(PYCOCOEVALCAP_CIDER, abs=1e-6)
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "3.3567" in printed and "chance" in printed
    pope = [{"answer": "yes", "reference": "yes", "meta": {"category": "popular"}},
            {"answer": "no", "reference": "yes", "meta": {"category": "popular"}}]  # fmt: skip
    main(["evaluate", "--predictions", write("pope.jsonl", pope), "--metric", "pope"])
    printed = capsys.readouterr().out
    assert "popular" in printed and "mean_f1: 0.6667" in printed
    assert json.loads((tmp_path / "pope.pope.json").read_text())["overall"]["accuracy"] == 0.5
