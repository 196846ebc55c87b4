"""The process-reward critic's conversation (VisualPRM): a question, a solution split into steps, a ``+`` or ``-``
after each step, and the label mask that trains only those answers.

The form is VisualPRM's (OpenGVLab/InternVL, ``internvl_chat/tools/reasoning_data_pipeline/
visualprm_data_pipeline_postprocess.py``, ``item2conv_prm``, lines 20-44): the system prompt
:data:`PRM_SYSTEM_PROMPT` (``utils/constants.py``, verbatim), a first user turn
``### Question:\\n{question}\\n\\n### Solution Process:\\n{step 1}``, each later user turn one step, and the
assistant answering ``+`` (correct up to this step) or ``-`` after each::

    system: PRM_SYSTEM_PROMPT
    user: ### Question:⏎<image>⏎{q}⏎⏎### Solution Process:⏎{step 1}     assistant: +
    user: {step 2}                                                      assistant: -
    ...

Steps are a response split on blank lines (``split_response`` of ``visualprm_data_pieline.py``, ``sep='\\n\\n'``).
The question carries its ``<image>`` placeholder in front (``<image>\\n{q}``), as VisualPRM's pipeline writes its
questions (``VQADataset.__getitem__`` of ``visualprm_data_pieline.py``). Only the ``+``/``-`` tokens are trained:
the assistant's end token, which InternVL's SFT masks would also train, is masked here (it carries no judgement).
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.records import IMAGE_PLACEHOLDER, STEP_LABELS
from lit_internvl.data.templates import ChatTemplate, TemplateName, conversation_segments, get_template

PRM_SYSTEM_PROMPT = """
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide a problem statement followed by the first step of the solution process. For each subsequent turn, I will give you a new step in the solution. Your role is to assess whether the solution process is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process.
""".strip()  # noqa: E501 - the reference's text, verbatim
STEP_SEPARATOR = "\n\n"
GOOD, BAD = STEP_LABELS


def split_steps(response: str) -> list[str]:
    """A response → its steps: split on blank lines (VisualPRM's ``split_response``), empty pieces dropped."""
    return [step.strip() for step in response.split(STEP_SEPARATOR) if step.strip()]


def critic_turns(question: str, steps: Sequence[str], labels: Sequence[str] | None = None, images: int = 1) -> list:
    """The critic's conversation turns (``{"from", "value"}``) for ``question`` and ``steps``; ``labels`` ``+``/``-``
    per step, or None to score (every answer ``+``: the answers are read, not trusted, see
    :func:`~lit_internvl.inference.critic.step_scores`). With one image and no placeholder, ``<image>\\n`` goes in
    front of the question."""
    labels = [GOOD] * len(steps) if labels is None else list(labels)
    if len(labels) != len(steps) or not steps:
        raise ValueError(f"{len(steps)} steps and {len(labels)} labels: a critic needs one label per step, ≥ 1 step")
    if images == 1 and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    turns = []
    for i, (step, label) in enumerate(zip(steps, labels)):
        query = f"### Question:\n{question}\n\n### Solution Process:\n{step}" if i == 0 else step
        turns += [{"from": "human", "value": query}, {"from": "gpt", "value": label}]
    return turns


def label_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids of ``+`` and ``-``: each must be one token (the critic's answer is one next-token choice)."""
    ids = [tokenizer.encode(label) for label in STEP_LABELS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"The critic needs '+' and '-' to be one token each; the tokenizer gives {ids}")
    return ids[0][0], ids[1][0]


def tokenize_critic(
    turns: Sequence[dict],
    tokenizer: Tokenizer,
    template: TemplateName | ChatTemplate = "internvl2_5",
    image_token_counts: Sequence[int] = (),
    system: str | None = PRM_SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """:func:`critic_turns` → ``input_ids``, ``labels``: the template's rendering, with only the ``+``/``-`` answer
    tokens labelled (the assistant's end token, trained by the SFT masks, is masked). ``system`` None: the
    template's default; the default is VisualPRM's prompt."""
    tpl = get_template(template)
    bos = getattr(tokenizer, "bos_id", None)
    ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [] if bos is None else [IGNORE_INDEX]
    for text, trained in conversation_segments(turns, tpl, image_token_counts, system):
        if trained:  # "+<|im_end|>": the answer, then its end token (GPT-OSS: its channel tokens before it)
            end = tpl.last_end if tpl.last_end is not None and text.endswith(tpl.last_end) else tpl.end
            answer = text[len(tpl.answer_prefix) : -len(end)]
            prefix_ids, answer_ids, end_ids = (tokenizer.encode(t) for t in (tpl.answer_prefix, answer, end))
            ids += prefix_ids + answer_ids + end_ids
            labels += [IGNORE_INDEX] * len(prefix_ids) + answer_ids + [IGNORE_INDEX] * len(end_ids)
        else:
            piece = tokenizer.encode(text)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
    return ids, labels
