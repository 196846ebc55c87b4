"""Rule-based rewards of online RL (and the answer parsing Best-of-N's majority vote shares): plain callables
``reward(answer, reference, meta) -> float``, chosen in YAML by ``class_path``.

A user's own reward is a subclass of :class:`Reward` (or any class with that ``__call__``) in their module::

    rewards:
      - class_path: lit_internvl.rewards.ExactMatch
      - class_path: my_project.rewards.LengthPenalty
        init_args: {per_token: 0.01}

InternVL3.5's online RL (Weiyun1025/verl-internvl, ``shell/internvl3_5_*.sh``) scores an answer with verl's
``geo3k.compute_score`` (``verl/utils/reward_score/geo3k.py``, lines 19-36): 0.9 × accuracy of the last
``\\boxed{}`` + 0.1 × the ``<think>…</think>…\\boxed{}`` format. Here that is two rewards and the stage's weights::

    rewards:
      - class_path: lit_internvl.rewards.BoxedMatch
      - class_path: lit_internvl.rewards.ThinkFormat
    reward_weights: [0.9, 0.1]
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from fractions import Fraction

ANSWER_PREFIX = "Answer:"


def final_answer(response: str, prefix: str = ANSWER_PREFIX) -> str:
    """The final answer of a step-by-step response: what follows its last ``prefix`` (the shapes world writes
    ``Answer: ...``; VisualPRM's prompts ask for ``Final answer: ..``), else its last blank-line step, lower-cased,
    trimmed of spaces and a final full stop."""
    if prefix.lower() in response.lower():
        last = response[response.lower().rindex(prefix.lower()) + len(prefix) :]
    else:
        steps = [step for step in response.split("\n\n") if step.strip()]
        last = steps[-1] if steps else ""
    return last.strip().rstrip(".").strip().lower()


class Reward(ABC):
    """``reward(answer, reference, meta) -> float``: ``answer`` the sampled text, ``reference`` the data's answer
    to it (or None), ``meta`` the sample's ``meta`` (the shapes world's holds ``answer`` and ``type``)."""

    @abstractmethod
    def __call__(self, answer: str, reference: str | None, meta: dict | None) -> float: ...


class ExactMatch(Reward):
    """1 when the answer's final answer (:func:`final_answer`) equals the expected one — ``meta["answer"]`` when
    the sample has it, else the reference's final answer — compared lower-cased; else 0."""

    def __init__(self, prefix: str = ANSWER_PREFIX) -> None:
        self.prefix = prefix

    def __call__(self, answer: str, reference: str | None, meta: dict | None) -> float:
        expected = (meta or {}).get("answer")
        expected = final_answer(reference or "", self.prefix) if expected is None else str(expected).strip().lower()
        return float(final_answer(answer, self.prefix) == expected.rstrip(".").strip())


class FormatReward(Reward):
    """1 when the answer matches ``pattern`` (a regular expression, DOTALL), else 0: searched anywhere in the
    answer, or with ``fullmatch`` matched by the whole of it (as verl's format rewards do). The default asks for
    the shapes world's form: steps separated by blank lines, the last one ``Answer: ...``; e.g.
    ``<think>.*</think>.*<answer>.*</answer>`` asks for a reasoning model's tags."""

    def __init__(self, pattern: str = r"\S.*\n\n(.*\n\n)*Answer: \S+\s*$", fullmatch: bool = False) -> None:
        self.pattern = re.compile(pattern, re.DOTALL)
        self.match = self.pattern.fullmatch if fullmatch else self.pattern.search

    def __call__(self, answer: str, reference: str | None, meta: dict | None) -> float:
        return float(self.match(answer) is not None)


# verl-internvl's format reward (geo3k.py, lines 19-22): reasoning in <think> tags first, then a boxed answer.
THINK_BOXED_FORMAT = r"<think>.*</think>.*\\boxed\{.*\}.*"


class ThinkFormat(FormatReward):
    """1 when the whole answer is ``<think>…</think>`` then text holding ``\\boxed{…}`` (verl-internvl's
    ``format_reward``, geo3k.py lines 19-22: ``re.fullmatch`` with DOTALL), else 0. The answer must start with
    ``<think>``.

    The rollout decodes answers with special tokens skipped: ``<think>`` must reach this reward as text, so it is
    either plain text or a non-special added token (Qwen3's tokenizer has it so), not one of the data's
    ``add_tokens`` (added as special tokens)."""

    def __init__(self) -> None:
        super().__init__(THINK_BOXED_FORMAT, fullmatch=True)


def boxed_answer(text: str) -> str | None:
    """What the last ``\\boxed{`` of ``text`` holds up to its matching ``}`` (nested braces kept), stripped; None
    when there is no ``\\boxed{`` or it is never closed. As mathruler's ``extract_boxed_content``
    (``mathruler/grader.py``), which verl-internvl's reward calls; that one returns the string ``"None"`` instead."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for end in range(start + len("\\boxed{"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth < 0:
            return text[start + len("\\boxed{") : end].strip()
    return None


# Written forms an answer is compared without (a subset of what PRM800K's grader, mathruler's grade_answer, drops).
_DROPPED = ("\\left", "\\right", "\\!", "^{\\circ}", "^\\circ", "\\$", "$", "\\%", "%", " ", "\n")
_NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)")
_FRACTION = re.compile(r"(-?\d+)/(\d+)|\\frac\{(-?\d+)\}\{(\d+)\}|\\frac(\d)(\d)")


def canonical_answer(answer: str) -> str:
    """``answer`` in the written form answers are compared in: a whole ``\\text{…}`` unwrapped, a right-hand unit
    (``\\text{ cm}``) and a leading ``x =`` dropped, ``\\dfrac``/``\\tfrac`` as ``\\frac``, ``\\left``/``\\right``,
    degrees, dollars, percent signs, spaces and newlines dropped, one pair of outer braces or of brackets around a
    single element removed, thousands separators dropped, lower-cased."""
    text = answer.strip()
    text = re.sub(r"^\\text\{(.+?)\}$", r"\1", text)
    text = text.split("\\text{ ")[0]  # MATH's answers write units as "\text{ cm}"
    left, equals, right = text.partition("=")
    if equals and "=" not in right and len(left) <= 2:  # "x = 3", "k=3"
        text = right
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for written in _DROPPED:
        text = text.replace(written, "")
    if len(text) > 2 and (text[0], text[-1]) in {("{", "}"), ("(", ")"), ("[", "]")} and "," not in text:
        text = text[1:-1]
    while re.search(r"\d,\d{3}(\D|$)", text):
        text = re.sub(r"(\d),(\d{3})(\D|$)", r"\1\2\3", text)
    return text.lower()


def _number(text: str) -> tuple[Fraction, str] | None:
    """A canonical answer that is a number: its value and how it is written (``int``, ``decimal`` or
    ``fraction``; a decimal of integer value counts as ``int``, as the reference's normaliser rewrites ``3.0`` as
    ``3``)."""
    if _NUMBER.fullmatch(text):
        value = Fraction(text)
        return value, "int" if value.denominator == 1 else "decimal"
    fraction = _FRACTION.fullmatch(text)
    if fraction:
        numerator, denominator = (int(g) for g in fraction.groups() if g is not None)
        return (Fraction(numerator, denominator), f"fraction {numerator}/{denominator}") if denominator else None
    return None


def same_answer(given: str | None, expected: str) -> bool:
    """Whether ``given`` answers ``expected``: equal written forms (:func:`canonical_answer`), or equal numbers —
    an integer only as an integer (``3`` is not ``6/2``) and a fraction against a fraction only as written
    (``1/2`` is not ``2/4``), as mathruler's ``grade_answer``; a decimal equals the fraction or decimal of its value
    (``0.5`` is ``\\frac{1}{2}`` and ``0.50``).

    Deliberate difference: ``grade_answer`` (PRM800K's grader) also converts LaTeX to text and accepts a difference
    that sympy simplifies to 0 (``2\\sqrt{2}`` is ``\\sqrt{8}``); and it drops unit words (``cm``, ``day``, ...)
    wherever they appear. Neither is done here: such answers score 0."""
    if given is None:
        return False
    given, expected = canonical_answer(given), canonical_answer(expected)
    if given == expected:
        return True
    numbers = _number(given), _number(expected)
    if None in numbers:
        return False
    (value, form), (expected_value, expected_form) = numbers
    if "int" in (form, expected_form) or (form.startswith("fraction") and expected_form.startswith("fraction")):
        return form == expected_form and value == expected_value
    return value == expected_value


class BoxedMatch(Reward):
    """1 when the answer's last ``\\boxed{…}`` (:func:`boxed_answer`) answers the expected one (:func:`same_answer`),
    else 0: verl-internvl's ``acc_reward`` (geo3k.py, lines 25-30). The expected answer is ``meta["answer"]`` when the
    sample has it (the shapes world's), else the reference's own boxed answer, else the whole reference."""

    def __call__(self, answer: str, reference: str | None, meta: dict | None) -> float:
        expected = (meta or {}).get("answer")
        if expected is None:
            expected = boxed_answer(reference or "") or (reference or "")
        return float(same_answer(boxed_answer(answer), str(expected)))
