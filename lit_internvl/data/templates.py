"""Chat templates and label masks: the one place that turns a conversation into ``(input_ids, labels)``.

The templates are InternVL's (``internvl_chat/internvl/conversation.py``; InternVL3.5's in
``internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py``) with their default system messages
verbatim; the masks follow InternVL's ``preprocess_*`` functions. For ``internvl2_5`` (InternVL 2.5, 3 and the
Qwen3 sizes of 3.5):

    <|im_start|>system⏎{system}<|im_end|>⏎<|im_start|>user⏎{q}<|im_end|>⏎<|im_start|>assistant⏎{a}<|im_end|>⏎
    └───────────────────────────────────── masked (-100) ─────────────────────────────────────┘└─ trained ─┘└ masked

(⏎ is a newline.) The InternVL 2.0 templates (``Hermes-2``, ``internlm2-chat``, ``phi3-chat``) put no
newline after the end token; otherwise the same mask. ``internvl3_5_gpt_oss`` (InternVL3.5-20B-A4B, OpenAI's
harmony format) trains everything of an answer but its ``<|start|>assistant``, and ends the last one with
``<|return|>``:

    <|start|>system<|message|>{system}<|end|><|start|>user<|message|>{q}<|end|><|start|>assistant   masked
    <|channel|>final<|message|>{a}<|return|>                                                         trained

(one line, cut here where the mask changes).

Thinking mode (``thinking=True``) puts the template's reasoning system message in place of its default; answers
hold their reasoning as ``<think>…</think>`` before the answer, trained like the rest of the answer. GPT-OSS moves
it to the analysis channel (:func:`answer_text`).

Each ``<image>`` placeholder in a human turn becomes ``<img>`` + ``<IMG_CONTEXT>``×n + ``</img>`` with
n taken in order from ``image_token_counts`` (the tiles' budgets summed, per image). The text is
tokenized piece by piece — masked prefix, trained answer, masked separator — so the mask boundaries
are exact for any tokenizer.

Two faults of InternVL3.5's released preprocessing (``internvl_chat_gpt_oss``) are not copied; the intended
format is rendered:

- A system turn is recognised by its text, not its role (``internvl_chat_finetune.py`` lines 433, 490, 546:
  ``conversations[0]['value'] == 'system'``), so with a system turn the missing ``<image>\\n`` of a record is put
  in front of the *system* message. The ``preprocess_*`` functions expand placeholders in human turns only: a
  record whose question holds its ``<image>`` trains with a literal ``<image>\\n`` in its system message, and one
  whose question does not fails the image count assertion and is replaced by another record. Here the placeholder
  goes in front of the first human turn.
- The GPT-OSS answer's end token tests ``i == len(conversations) - 1`` (``dataset.py`` line 538), ``i`` being the
  loop variable left over from expanding the images: a one-image question and its answer end with ``<|end|>``,
  not ``<|return|>``; whether any answer gets ``<|return|>`` depends on the placeholder count of the last human
  turn that has one, and a text-only record raises (``i`` unbound) and is replaced. Here the answer that ends the
  conversation ends with ``<|return|>`` and earlier ones with ``<|end|>``, as the comment on that line and the
  template's ``MPT_TWO`` style (``conversation.py`` lines 251-267) say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.records import IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER
from lit_internvl.data.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

# The registered templates (:data:`TEMPLATES`), so that a misspelt name fails when a recipe is parsed.
TemplateName = Literal["internvl2_5", "internvl3_5_gpt_oss", "Hermes-2", "internlm2-chat", "phi3-chat"]
# How an answer holds its reasoning in thinking mode (InternVL3.5's data and its system prompt's words).
THINK_START, THINK_END = "<think>", "</think>"


class PlaceholderMismatchError(ValueError):
    """The human turns hold a different number of ``<image>`` placeholders than the sample has images."""

    def __init__(self, placeholders: int, images: int) -> None:
        self.placeholders, self.images = placeholders, images
        super().__init__(
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the human turns but {images} image(s) "
            f"(image_token_counts has {images} entries)"
        )


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format. A turn renders as ``header + text + end + separator``; an answer as
    ``assistant_header + answer_prefix + text + end + separator``.

    Masked: the system and human turns whole, the assistant ``header`` and the ``separator``. Trained:
    ``answer_prefix``, the assistant's text and its ``end`` — ``last_end`` instead for an answer that ends the
    conversation, when set. ``strip`` strips each message first (InternVL's ``preprocess_internlm`` does). A BOS
    is put first (masked) when the tokenizer adds one itself.

    Thinking mode: ``thinking_system_message`` replaces ``system_message`` (None: the template has no thinking
    mode); with ``analysis_prefix`` set, an answer ``<think>r</think>a`` is written as two messages, the reasoning
    on its own channel (:func:`answer_text`).
    """

    name: str
    system_message: str
    system_header: str
    user_header: str
    assistant_header: str
    end: str
    separator: str = ""
    strip: bool = False
    answer_prefix: str = ""
    last_end: str | None = None
    thinking_system_message: str | None = None
    analysis_prefix: str | None = None


# InternVL's two default system messages (conversation.py): InternVL 2.5/3 use the first; the 2.0
# templates keep the older one "to avoid changes in benchmark performance".
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
# InternVL3.5's "Thinking System Prompt" (R1_SYSTEM_PROMPT): the system message its model cards set for thinking
# mode, and Weiyun1025/VLMEvalKit's evaluation with cot_prompt_version "r1" (vlmeval/vlm/internvl/internvl_chat.py).
# internvl_chat_gpt_oss/internvl/train/internvl_chat_mpo.py (lines 58-67) holds the same text plus a newline, the
# form in which MMPR's thinking questions carry it in front of the question.
INTERNVL3_5_THINKING_SYSTEM = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the "
    "answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)
# InternVL3.5-20B-A4B (GPT-OSS): harmony's system message (conversation.py, lines 412-422); for thinking, the
# reference raises the reasoning effort and opens the analysis channel (internvl_chat_mpo.py, lines 384-394,
# where the released script has it commented out).
GPT_OSS_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
GPT_OSS_THINKING_SYSTEM = GPT_OSS_SYSTEM.replace("Reasoning: low", "Reasoning: high").replace(
    "Valid channels: final.", "Valid channels: analysis, final."
)

_CHATML = dict(
    system_header=f"{IM_START}system\n",
    user_header=f"{IM_START}user\n",
    assistant_header=f"{IM_START}assistant\n",
    end=IM_END,
)
TEMPLATES: dict[TemplateName, ChatTemplate] = {
    t.name: t
    for t in (
        # InternVL 2.5 / 3 (Qwen2.5, InternLM2.5 decoders) and the Qwen3 sizes of 3.5 (--conv_style internvl2_5):
        # ChatML with "\n" after every <|im_end|>. Thinking keeps <think>…</think> in the (trained) answer.
        ChatTemplate("internvl2_5", INTERNVL2_5_SYSTEM, separator="\n",
                     thinking_system_message=INTERNVL3_5_THINKING_SYSTEM, **_CHATML),
        # InternVL3.5-20B-A4B (--conv_style internvl3_5_gpt_oss): harmony. Only "<|start|>assistant" of an answer is
        # masked (preprocess_internvl3_5_gpt_oss, dataset.py line 572), so its channel tokens train; the answer that
        # ends the conversation ends with <|return|>, earlier ones with <|end|> (the intent of line 538; module docstring).
        ChatTemplate("internvl3_5_gpt_oss", GPT_OSS_SYSTEM, system_header="<|start|>system<|message|>",
                     user_header="<|start|>user<|message|>", assistant_header="<|start|>assistant", end="<|end|>",
                     answer_prefix="<|channel|>final<|message|>", last_end="<|return|>",
                     thinking_system_message=GPT_OSS_THINKING_SYSTEM, analysis_prefix="<|channel|>analysis<|message|>"),
        # InternVL 2.0 (Yi-34B for Hermes-2, InternLM2 for internlm2-chat): turns follow each other
        # without a newline. The two differ in training only by the BOS that InternLM2's tokenizer adds.
        ChatTemplate("Hermes-2", INTERNVL2_SYSTEM, **_CHATML),
        ChatTemplate("internlm2-chat", INTERNVL2_SYSTEM, strip=True, **_CHATML),
        # InternVL 2.0 with Phi-3 (InternVL2-4B).
        ChatTemplate("phi3-chat", INTERNVL2_SYSTEM, system_header="<|system|>\n", user_header="<|user|>\n",
                     assistant_header="<|assistant|>\n", end="<|end|>"),
    )
}  # fmt: skip


def get_template(template: TemplateName | ChatTemplate) -> ChatTemplate:
    """A registered template by name, or a custom :class:`ChatTemplate` passed through."""
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; available: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def image_tokens(count: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>``×count + ``</img>``: the text that stands for one image."""
    if count < 1:
        raise ValueError(f"An image needs at least one {IMG_CONTEXT} token, got {count}")
    return IMG_START + IMG_CONTEXT * count + IMG_END


def expand_video_placeholder(conversations: Sequence[dict], num_frames: int) -> list[dict]:
    """Replace ``<video>`` in the first human turn by one ``Frame-i: <image>`` line per frame.

    As InternVL's ``video_get_item``: a first human turn without ``<video>`` gets ``<video>\\n``
    prepended. Returns new turn dicts (the input is not modified); then pass one image-token count
    per frame to :func:`tokenize_conversation`.
    """
    turns = [dict(turn) for turn in conversations]
    human = next((turn for turn in turns if turn.get("from") == "human"), None)
    if human is None:
        raise ValueError("A video sample needs a human turn to hold its frames; found none")
    total = sum(str(turn.get("value", "")).count(VIDEO_PLACEHOLDER) for turn in turns)
    if total == 0:
        human["value"] = VIDEO_PLACEHOLDER + "\n" + human["value"]
    elif total != 1 or VIDEO_PLACEHOLDER not in human["value"]:
        raise ValueError(f"Expected one {VIDEO_PLACEHOLDER} in the first human turn, found {total} in the conversation")
    frames = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(num_frames))
    human["value"] = human["value"].replace(VIDEO_PLACEHOLDER, frames, 1)
    return turns


def answer_text(tpl: ChatTemplate, value: str, last: bool = False, thinking: bool = False) -> str:
    """The trained text of one answer (what follows the masked ``assistant_header``).

    ``answer_prefix + value + end`` (``last_end`` when the answer ends the conversation and the template has one).
    With ``thinking`` and a template with an analysis channel (GPT-OSS), an answer holding ``<think>`` and
    ``</think>`` becomes two messages, as ``preprocess_internvl3_5_gpt_oss_with_think`` writes them (dataset.py,
    lines 644-654): the text between the first ``<think>`` and the last ``</think>``, stripped, on the analysis
    channel, ended by ``end``; then ``assistant_header`` and what follows ``</think>``, stripped, on the final
    channel — all of it trained, the inner ``<|start|>assistant`` included, as there. One difference: that function
    ends every answer with ``<|return|>``; here an answer before the last ends with ``<|end|>``, as everywhere else.
    """
    end = tpl.last_end if last and tpl.last_end is not None else tpl.end
    if thinking and tpl.analysis_prefix is not None and THINK_START in value and THINK_END in value:
        reasoning, value = value.rsplit(THINK_END, 1)
        reasoning = reasoning.split(THINK_START, 1)[-1]
        analysis = tpl.analysis_prefix + reasoning.strip() + tpl.end + tpl.assistant_header
        return analysis + tpl.answer_prefix + value.strip() + end
    return tpl.answer_prefix + value + end


def conversation_segments(
    conversations: Sequence[dict],
    template: TemplateName | ChatTemplate = "internvl2_5",
    image_token_counts: Sequence[int] = (),
    system: str | None = None,
    add_generation_prompt: bool = False,
    thinking: bool = False,
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``[(text, trained), ...]``; joined, the texts are the full prompt.

    ``conversations``: ``[{"from": "system" | "human" | "gpt", "value": str}, ...]`` (a system turn
    only first). The system message is, by precedence: the conversation's own system turn, then
    ``system``, then (``thinking``) the template's reasoning system message, then its default. ``<image>``
    placeholders are expanded in human turns only (as InternVL 2.5 does); if the sample has one image and no
    placeholder, ``<image>\\n`` is put in front of the first human turn (InternVL) — the first turn whose role is
    human, a system turn before it or not (InternVL3.5's released code finds the system turn by its text: module
    docstring). Any other count mismatch raises :class:`PlaceholderMismatchError`. ``add_generation_prompt``
    appends the assistant header (masked) for generation. ``thinking`` also writes each answer as
    :func:`answer_text` says.
    """
    tpl = get_template(template)
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ValueError(f"Unknown role {role!r} in turn {i}; expected one of {ROLES}")
        if not isinstance(value, str):
            raise ValueError(f"Turn {i} ({role}) has no text value: {value!r}")
        if role == "system" and i != 0:
            raise ValueError(f"A system turn may only come first; found one at turn {i}")
        turns.append((role, value))

    if turns and turns[0][0] == "system":
        system_text = turns.pop(0)[1]
    elif system is not None:
        system_text = system
    elif thinking:
        if tpl.thinking_system_message is None:
            raise ValueError(f"Chat template {tpl.name!r} has no thinking mode; set a system message instead")
        system_text = tpl.thinking_system_message
    else:
        system_text = tpl.system_message

    counts = list(image_token_counts)
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for role, value in turns if role == "human")
    if placeholders == 0 and len(counts) == 1:
        first = next((i for i, (role, _) in enumerate(turns) if role == "human"), None)
        if first is not None:
            turns[first] = ("human", IMAGE_PLACEHOLDER + "\n" + turns[first][1])
            placeholders = 1
    if placeholders != len(counts):
        raise PlaceholderMismatchError(placeholders, len(counts))

    if tpl.strip:
        system_text = system_text.strip()
        turns = [(role, value.strip()) for role, value in turns]
    remaining = iter(counts)
    expanded = []
    for role, value in turns:
        if role == "human":
            pieces = value.split(IMAGE_PLACEHOLDER)
            value = pieces[0] + "".join(image_tokens(next(remaining)) + piece for piece in pieces[1:])
        expanded.append((role, value))

    segments = [(tpl.system_header + system_text + tpl.end + tpl.separator, False)]
    for i, (role, value) in enumerate(expanded):
        if role == "human":
            segments.append((tpl.user_header + value + tpl.end + tpl.separator, False))
        else:
            last = i == len(expanded) - 1 and not add_generation_prompt
            segments.append((tpl.assistant_header, False))
            segments.append((answer_text(tpl, value, last, thinking), True))
            if tpl.separator:
                segments.append((tpl.separator, False))
    if add_generation_prompt:
        segments.append((tpl.assistant_header, False))

    merged: list[tuple[str, bool]] = []  # neighbours with the same mask tokenize as one piece
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def tokenize_conversation(
    conversations: Sequence[dict],
    tokenizer: Tokenizer,
    template: TemplateName | ChatTemplate = "internvl2_5",
    image_token_counts: Sequence[int] = (),
    system: str | None = None,
    add_generation_prompt: bool = False,
    thinking: bool = False,
) -> tuple[list[int], list[int]]:
    """Conversation → ``input_ids (L,)``, ``labels (L,)``, with ``labels = -100`` where not trained.

    Trained: each assistant answer and its end token (``<|im_end|>``, ``<|end|>`` for phi3-chat; GPT-OSS: the
    channel tokens before it too, and ``<|return|>`` last). Masked: BOS (if the tokenizer adds one), the system and
    human turns, the assistant header and the separator after the end token. Arguments as in
    :func:`conversation_segments`; the caller puts the record's name on a :class:`PlaceholderMismatchError`.
    """
    segments = conversation_segments(
        conversations, template, image_token_counts, system, add_generation_prompt, thinking
    )
    bos = getattr(tokenizer, "bos_id", None)
    input_ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [] if bos is None else [IGNORE_INDEX]
    for text, trained in segments:
        ids = tokenizer.encode(text)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels
