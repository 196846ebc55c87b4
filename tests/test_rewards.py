"""InternVL3.5's online-RL reward scores what verl-internvl's scores: 0.9 × the boxed answer's accuracy + 0.1 × the
``<think>…</think>…\\boxed{}`` format (``verl/utils/reward_score/geo3k.py``), on worked examples; and the shapes
world's RL prompts can be rewarded so."""

import re

import pytest

from lit_internvl.rewards import BoxedMatch, FormatReward, ThinkFormat, boxed_answer, same_answer


# The reference's two rule parts, transcribed: geo3k.py lines 19-22 and mathruler's extract_boxed_content.
def reference_format(response: str) -> float:
    return 1.0 if re.fullmatch(re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL), response) else 0.0


def reference_extract(text: str) -> str:
    depth, start, end = 0, text.rfind(r"\boxed{"), -1
    if start != -1:
        content = text[start + len(r"\boxed{") :]
        for i, char in enumerate(content):
            depth += 1 if char == "{" else -1 if char == "}" else 0
            if depth == -1:
                end = i
                break
    return content[:end].strip() if end != -1 else "None"


def as_reference(boxed: str | None) -> str:
    return "None" if boxed is None else boxed


THINK = "<think>\nThe shape has no corners.\n</think>\n\n"

# (response, ground truth, verl-internvl's compute_score): the accuracy read off mathruler's grade_answer by hand —
# its MATH normalisation (math_normalize.py), then its own (lower case, no spaces, "3.0" → "3", "1,000" → "1000",
# "%" and "^\circ" dropped, one-element tuples unwrapped), then sympy on the difference; an integer ground truth
# needs an integer answer, two fractions compare as written.
WORKED = [
    (THINK + r"It is a \boxed{circle}.", "circle", 1.0),
    (r"It is a \boxed{circle}.", "circle", 0.9),  # right, but no thinking
    (THINK + r"\boxed{square}", "circle", 0.1),  # the format alone
    (THINK + "circle", "circle", 0.0),  # no box: "None" is graded, and the format wants a box
    (r"Sure. <think>x</think> \boxed{circle}", "circle", 0.9),  # the whole answer must start with <think>
    (r"<think>x</think> \boxed{3", "3", 0.0),  # never closed
    (THINK + r"\boxed{1}, no: \boxed{2}", "2", 1.0),  # the last box
    (THINK + r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # nested braces; MATH writes 0.5 as \frac{1}{2}
    (THINK + r"\boxed{0.25}", r"\frac{1}{4}", 1.0),  # sympy: 1/4 - 0.25 = 0
    (THINK + r"\boxed{\text{Red}}", "red", 1.0),
    (THINK + r"\boxed{3.0}", "3", 1.0),
    (THINK + r"\boxed{6/2}", "3", 0.1),  # an integer needs an integer
    (THINK + r"\boxed{2/4}", "1/2", 0.1),  # fractions as written
    (THINK + r"\boxed{1,000}", "1000", 1.0),
    (THINK + r"\boxed{50\%}", "50", 1.0),
    (THINK + r"\boxed{90^\circ}", "90", 1.0),
    (THINK + r"\boxed{x = 3}", "3", 1.0),  # MATH drops a short "k =" in front
    (THINK + r"\boxed{A}", "(A)", 1.0),  # a one-element tuple
    (THINK + r"\boxed{top left}", "top left", 1.0),
    (THINK + r"\boxed{top-left}", "top left", 0.1),
]


@pytest.mark.parametrize("response,truth,score", WORKED, ids=[f"{i}" for i in range(len(WORKED))])
def test_the_reward_of_a_worked_example_is_verl_internvls(response, truth, score):
    accuracy, form = BoxedMatch()(response, None, {"answer": truth}), ThinkFormat()(response, None, None)
    assert 0.9 * accuracy + 0.1 * form == pytest.approx(score)
    assert form == reference_format(response)
    assert as_reference(boxed_answer(response)) == reference_extract(response)


def test_boxed_answer_and_the_format_follow_the_reference_on_odd_text():
    texts = [
        r"\boxed{}", r"\boxed{ a }", r"\boxed{\boxed{1}}", r"\boxed{{1}{2}}", r"\boxed{1}}", r"}\boxed{",
        r"\boxed {1}", "<think></think>\\boxed{}", "<think>\n</think>\n\\boxed{x}\n", "<think>a</think>b\\boxed{c",
        "<think>a<think>b</think>c</think>\\boxed{d}e", "<THINK>a</THINK>\\boxed{d}", "",
    ]  # fmt: skip
    for text in texts:
        assert as_reference(boxed_answer(text)) == reference_extract(text), text
        assert ThinkFormat()(text, None, None) == reference_format(text), text
    assert boxed_answer(r"\boxed{}") == "" and not same_answer("", "0")


def test_the_expected_answer_is_meta_then_the_references_box_then_the_reference():
    reward = BoxedMatch()
    assert reward(r"\boxed{red}", r"Thinking... \boxed{blue}", {"answer": "Red"}) == 1.0
    assert reward(r"\boxed{blue}", r"Thinking... \boxed{blue}", None) == 1.0
    assert reward(r"\boxed{blue}", " Blue ", {}) == 1.0
    assert reward("blue", "blue", None) == 0.0, "no box, no answer"


def test_what_is_left_to_sympy_scores_zero_here():
    """A documented difference: mathruler's grade_answer accepts answers that sympy proves equal."""
    assert not same_answer(r"\sqrt{8}", r"2\sqrt{2}")  # the reference: 1
    assert not same_answer("5 cm", "5")  # the reference drops unit words: 1


def test_format_reward_matches_the_whole_answer_or_searches_it():
    assert FormatReward("a+", fullmatch=True)("baa", None, None) == 0.0
    assert FormatReward("a+")("baa", None, None) == 1.0


def test_the_shapes_worlds_rl_prompts_are_rewarded_by_the_yaml_rewards():
    from jsonargparse import ArgumentParser

    from lit_internvl.data import ShapesDataModule
    from lit_internvl.data.views import View
    from lit_internvl.recipes import compose
    from lit_internvl.stages.base import Stage

    config = compose("recipes/rl.yaml")["model"]
    config["init_args"].update(
        init_from=None, image_context_id=0, reward_weights=[0.9, 0.1],
        rewards=[{"class_path": "lit_internvl.rewards.BoxedMatch"}, {"class_path": "lit_internvl.rewards.ThinkFormat"}],
    )  # fmt: skip
    parser = ArgumentParser()
    parser.add_subclass_arguments(Stage, "model")
    stage = parser.instantiate_classes(parser.parse_object({"model": config})).model

    data = ShapesDataModule(records="questions", tokenizer="shapes", batch_size=6, val_size=6, system="")
    data.use_views((View("prompt", 4),))
    batch = next(iter(data.val_dataloader()))["prompt"]
    answers = [meta["answer"] for meta in batch.meta]
    assert len(set(answers)) > 1 and batch.reference == answers
    right = [f"<think>\nI look at the scene.\n</think>\n\nThe answer is \\boxed{{{a}}}." for a in answers]
    wrong = [r.replace(f"{{{a}}}", "{nothing}") for r, a in zip(right, answers)]
    bare = [f"\\boxed{{{a.upper()}}}" for a in answers]
    for texts, score in ((right, 1.0), (wrong, 0.1), (bare, 0.9)):
        rewards = stage.score(texts, batch.reference, batch.meta)
        assert rewards.tolist() == pytest.approx([score] * len(answers))
