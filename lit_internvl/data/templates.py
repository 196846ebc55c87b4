"""Chat templates and label masks: the one place that turns a conversation into ``(input_ids, labels)``.

The templates are InternVL's (``internvl_chat/internvl/conversation.py``) with their default system
messages verbatim; the masks follow InternVL's ``preprocess_*`` functions. For ``internvl2_5``:

    <|im_start|>system⏎{system}<|im_end|>⏎<|im_start|>user⏎{q}<|im_end|>⏎<|im_start|>assistant⏎{a}<|im_end|>⏎
    └───────────────────────────────────── masked (-100) ─────────────────────────────────────┘└─ trained ─┘└ masked

(⏎ is a newline.) The InternVL 2.0 templates (``Hermes-2``, ``internlm2-chat``, ``phi3-chat``) put no
newline after the end token; otherwise the same mask.

Each ``<image>`` placeholder in a human turn becomes ``<img>`` + ``<IMG_CONTEXT>``×n + ``</img>`` with
n taken in order from ``image_token_counts`` (the tiles' budgets summed, per image). The text is
tokenized piece by piece — masked prefix, trained answer, masked separator — so the mask boundaries
are exact for any tokenizer.
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
TemplateName = Literal["internvl2_5", "Hermes-2", "internlm2-chat", "phi3-chat"]


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
    """One chat format. A turn renders as ``header + text + end + separator``.

    Masked: the system and human turns whole, the assistant ``header`` and the ``separator``. Trained:
    the assistant's text and its ``end``. ``strip`` strips each message first (InternVL's
    ``preprocess_internlm`` does). A BOS is put first (masked) when the tokenizer adds one itself.
    """

    name: str
    system_message: str
    system_header: str
    user_header: str
    assistant_header: str
    end: str
    separator: str = ""
    strip: bool = False


# InternVL's two default system messages (conversation.py): InternVL 2.5/3 use the first; the 2.0
# templates keep the older one "to avoid changes in benchmark performance".
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
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
        # InternVL 2.5 / 3 (Qwen2.5, InternLM2.5 decoders): ChatML with "\n" after every <|im_end|>.
        ChatTemplate("internvl2_5", INTERNVL2_5_SYSTEM, separator="\n", **_CHATML),
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


def conversation_segments(
    conversations: Sequence[dict],
    template: TemplateName | ChatTemplate = "internvl2_5",
    image_token_counts: Sequence[int] = (),
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``[(text, trained), ...]``; joined, the texts are the full prompt.

    ``conversations``: ``[{"from": "system" | "human" | "gpt", "value": str}, ...]`` (a system turn
    only first). The system message is, by precedence: the conversation's own system turn, then
    ``system``, then the template's default. ``<image>`` placeholders are expanded in human turns only
    (as InternVL 2.5 does); if the sample has one image and no placeholder, ``<image>\\n`` is put in
    front of the first human turn (InternVL). Any other count mismatch raises
    :class:`PlaceholderMismatchError`. ``add_generation_prompt`` appends the assistant header (masked)
    for generation.
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
    else:
        system_text = tpl.system_message if system is None else system

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
    for role, value in expanded:
        if role == "human":
            segments.append((tpl.user_header + value + tpl.end + tpl.separator, False))
        else:
            segments.append((tpl.assistant_header, False))
            segments.append((value + tpl.end, True))
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
) -> tuple[list[int], list[int]]:
    """Conversation → ``input_ids (L,)``, ``labels (L,)``, with ``labels = -100`` where not trained.

    Trained: each assistant answer and its end token (``<|im_end|>``, ``<|end|>`` for phi3-chat).
    Masked: BOS (if the tokenizer adds one), the system and human turns, the assistant header and the
    separator after the end token. Arguments as in :func:`conversation_segments`; the caller puts the
    record's name on a :class:`PlaceholderMismatchError`.
    """
    segments = conversation_segments(conversations, template, image_token_counts, system, add_generation_prompt)
    bos = getattr(tokenizer, "bos_id", None)
    input_ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [] if bos is None else [IGNORE_INDEX]
    for text, trained in segments:
        ids = tokenizer.encode(text)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels
