"""Rule-based rewards of online RL (and the answer parsing Best-of-N's majority vote shares): plain callables
``reward(answer, reference, meta) -> float``, chosen in YAML by ``class_path``.

A user's own reward is a subclass of :class:`Reward` (or any class with that ``__call__``) in their module::

    rewards:
      - class_path: lit_internvl.rewards.ExactMatch
      - class_path: my_project.rewards.LengthPenalty
        init_args: {per_token: 0.01}
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

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
    """1 when the answer matches ``pattern`` (a regular expression searched in the whole answer, DOTALL), else 0.
    The default asks for the shapes world's form: steps separated by blank lines, the last one ``Answer: ...``;
    e.g. ``<think>.*</think>.*<answer>.*</answer>`` asks for a reasoning model's tags."""

    def __init__(self, pattern: str = r"\S.*\n\n(.*\n\n)*Answer: \S+\s*$") -> None:
        self.pattern = re.compile(pattern, re.DOTALL)

    def __call__(self, answer: str, reference: str | None, meta: dict | None) -> float:
        return float(self.pattern.search(answer) is not None)
