"""InternVL3.5's chat templates render what its training code renders, byte for byte, and train the same tokens.

The reference is InternVL's ``internvl_chat_gpt_oss`` (``internvl/train/dataset.py``, ``preprocess_internvl2_5``
lines 389-488, ``preprocess_internvl3_5_gpt_oss`` 491-594, ``preprocess_internvl3_5_gpt_oss_with_think`` 597-709;
``internvl/train/internvl_chat_finetune.py``, the placeholder rule of ``multi_modal_*_get_item``, lines 433-435 and
490-492), transcribed below — its two faults included, to show where the intended format rendered here differs.
"""

from copy import deepcopy
from functools import partial

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_internvl.data.critic import critic_turns, tokenize_critic
from lit_internvl.data.records import Record
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.templates import IGNORE_INDEX, conversation_segments, tokenize_conversation
from lit_internvl.data.tokenizer import INTERNVL_TOKENS, ByteTokenizer, HFTokenizer
from lit_internvl.data.views import View
from tests.test_templates import SYSTEM_2_5, trained_spans

# Typed from the released model cards ("Thinking System Prompt") and conversation.py (lines 412-422); the thinking
# system message of GPT-OSS is the default with internvl_chat_mpo.py's replacements (lines 393-394).
R1 = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n1. First, conduct a detailed "
    "analysis of the question. Consider different angles, potential solutions, and reason through the problem "
    "step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n\n2. After the thinking "
    "section, provide a clear, concise, and direct answer to the user's question. Separate the answer from the "
    "think section with a newline.\n\nEnsure that the thinking process is thorough but remains focused on the "
    "query. The final answer should be standalone and not reference the thinking section."
)
GPT_OSS = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
GPT_OSS_HIGH = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: high\n\n# Valid channels: analysis, final. Channel must be included for "
    "every message."
)
REFERENCE_SYSTEM = {"internvl2_5": SYSTEM_2_5, "internvl3_5_gpt_oss": GPT_OSS}

# ---------------------------------------------------------------------------------------------------------------
# The reference, transcribed (lists for numpy arrays; the tokenizer is called as there).


def _expand_images(conversations, num_image_token_list, num_image):
    """The image loop of every preprocess_* function; returns its loop variable ``i`` as the loop leaves it (the
    GPT-OSS function reads it afterwards)."""
    current_image_idx = 0
    for conversation in conversations:
        if conversation["from"] == "human":
            image_cnt = conversation["value"].count("<image>")
            for i in range(image_cnt):  # noqa: B007 - the reference reads i after the loop
                if current_image_idx == num_image:
                    break
                image_tokens = f"<img>{'<IMG_CONTEXT>' * num_image_token_list[current_image_idx]}</img>"
                conversation["value"] = conversation["value"].replace("<image>", image_tokens, 1)
                current_image_idx += 1
    assert current_image_idx == num_image, f"{current_image_idx} != {num_image}"
    return i


def _tokenize(tokenizer, batches, roles, header, trained_last=False):
    """Tokenize each turn alone; mask system and human turns, the assistant ``header``'s tokens and (internvl2_5)
    the answer's last token, the newline."""
    add_bos_token = getattr(tokenizer, "add_bos_token", False)
    if add_bos_token:
        batches[0] = tokenizer.bos_token + batches[0]
    input_ids = tokenizer(batches, padding=False, truncation=False).input_ids
    if add_bos_token:
        input_ids = [item[1:] for item in input_ids]
    ignore_ids = tokenizer(header).input_ids
    ignore_len = len(ignore_ids) - 1 if add_bos_token else len(ignore_ids)
    ids, labels = [], []
    for role, input_id in zip(roles, input_ids):
        ids += input_id
        if role in ("system", "human", "function"):
            labels += [IGNORE_INDEX] * len(input_id)
        else:
            target = list(input_id)
            target[:ignore_len] = [IGNORE_INDEX] * min(ignore_len, len(target))
            if not trained_last:
                target[-1:] = [IGNORE_INDEX]
            labels += target
    return ids, labels


def reference_internvl2_5(conversations, tokenizer, num_image_token_list, text_only=False, num_image=1):
    """preprocess_internvl2_5: ``(text, input_ids, labels)``."""
    conversations = deepcopy(conversations)
    if conversations[0]["from"] == "system":
        system_prompt, conversations = conversations[0]["value"], conversations[1:]
    else:
        system_prompt = REFERENCE_SYSTEM["internvl2_5"]
    if not text_only:
        _expand_images(conversations, num_image_token_list, num_image)
    batches, roles = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n"], ["system"]
    for conversation in conversations:
        if conversation["from"] == "human":
            batches.append(f"<|im_start|>user\n{conversation['value']}<|im_end|>\n")
            roles.append("human")
        elif conversation["from"] == "gpt":
            batches.append(f"<|im_start|>assistant\n{conversation['value']}<|im_end|>\n")
            roles.append("gpt")
        else:
            raise NotImplementedError
    text = "".join(batches)
    return (text, *_tokenize(tokenizer, batches, roles, "<|im_start|>assistant\n"))


def reference_gpt_oss(
    conversations, tokenizer, num_image_token_list, text_only=False, num_image=1, with_think=False, intended=False
):
    """preprocess_internvl3_5_gpt_oss (``with_think``: preprocess_internvl3_5_gpt_oss_with_think): ``(text,
    input_ids, labels)``. ``intended``: the end token by the answer's own place (the comment on line 538), not by the
    leftover ``i``; with ``with_think``, ``<|return|>`` for the last answer only (lit_internvl's choice)."""
    conversations = deepcopy(conversations)
    if conversations[0]["from"] == "system":
        system_prompt, conversations = conversations[0]["value"], conversations[1:]
    else:
        system_prompt = REFERENCE_SYSTEM["internvl3_5_gpt_oss"]
    if not text_only:
        i = _expand_images(conversations, num_image_token_list, num_image)
    batches, roles = [f"<|start|>system<|message|>{system_prompt}<|end|>"], ["system"]
    for turn, conversation in enumerate(conversations):
        if conversation["from"] == "human":
            batches.append(f"<|start|>user<|message|>{conversation['value']}<|end|>")
            roles.append("human")
        elif conversation["from"] == "gpt" and with_think:
            value = conversation["value"]
            eos = "<|return|>" if not intended or turn == len(conversations) - 1 else "<|end|>"
            if "<think>" in value and "</think>" in value:
                think, final = value.rsplit("</think>", 1)
                think = think.split("<think>", 1)[-1].strip()
                batches.append(
                    f"<|start|>assistant<|channel|>analysis<|message|>{think}<|end|>"
                    f"<|start|>assistant<|channel|>final<|message|>{final.strip()}{eos}"
                )
            else:
                batches.append(f"<|start|>assistant<|channel|>final<|message|>{value}{eos}")
            roles.append("gpt")
        elif conversation["from"] == "gpt":
            last = (turn if intended else i) == len(conversations) - 1  # the released code: the leftover i
            eos = "<|return|>" if last else "<|end|>"
            batches.append(f"<|start|>assistant<|channel|>final<|message|>{conversation['value']}{eos}")
            roles.append("gpt")
        else:
            raise NotImplementedError(f"Invalid role: {conversation['from']}")
    text = "".join(batches)
    return (text, *_tokenize(tokenizer, batches, roles, "<|start|>assistant", trained_last=True))


def reference_placeholder(conversations, num_images, intended=False):
    """multi_modal_(multi_image_)get_item: ``<image>\\n`` per image in front of the first turn that lacks one —
    the first turn being found by its text (``value == 'system'``), or by its role when ``intended``."""
    conversations = deepcopy(conversations)
    first = conversations[0]["from" if intended else "value"] == "system"
    if "<image>" not in conversations[first]["value"]:
        conversations[first]["value"] = "<image>\n" * num_images + conversations[first]["value"]
    return conversations


# ---------------------------------------------------------------------------------------------------------------

CORPUS = [
    "What shape is the red object? The object is round, so it is a circle.",
    "Which one is red? The first one. Say hi. Hi! Same shapes? No.",
    "<|im_start|>system\nuser\nassistant\n<|start|>system<|message|>user<|channel|>final analysis",
    R1,
    GPT_OSS_HIGH,
]


def build_tokenizer(path, specials, eos, added=()) -> HFTokenizer:
    """A byte-level BPE trained on the texts above, the chat's special tokens and InternVL's, ``added`` as
    ordinary added tokens (Qwen3's ``<think>`` and ``</think>`` are so); saved to ``path``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
        additional_special_tokens=["<|endoftext|>", *specials, *INTERNVL_TOKENS],
    )  # fmt: skip
    hf.add_tokens(list(added))
    hf.save_pretrained(path)
    return HFTokenizer(path, add_missing_tokens=False)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> HFTokenizer:
    path = tmp_path_factory.mktemp("qwen3_like")
    return build_tokenizer(path, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", added=["<think>", "</think>"])


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> HFTokenizer:
    path = tmp_path_factory.mktemp("gpt_oss_like")
    return build_tokenizer(path, ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"], "<|return|>")


QUESTION = {"from": "human", "value": "<image>\nWhat shape is the red object?"}
THOUGHT = "<think>\nThe object is round, so it is a circle.\n</think>\n\nIt is a circle."
TWO_IMAGES = {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame shapes?"}
SYSTEM_TURN = {"from": "system", "value": "Answer briefly."}

# name → (conversation, image token counts, thinking); the reference sees thinking as its system turn.
CASES = {
    "one image": ([QUESTION, {"from": "gpt", "value": "circle"}], [3], False),
    "thinking": ([QUESTION, {"from": "gpt", "value": THOUGHT}], [3], True),
    "two images, two turns, thinking": (
        [TWO_IMAGES, {"from": "gpt", "value": "No."}, {"from": "human", "value": "Which is red?"},
         {"from": "gpt", "value": "<think>The first.</think>\n\nThe first one."}], [2, 3], True,
    ),
    "text only": ([{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}], [], False),
    "the record's system turn": ([SYSTEM_TURN, QUESTION, {"from": "gpt", "value": "circle"}], [3], False),
}  # fmt: skip


def ours(conversation, tokenizer, template, counts, thinking):
    text = "".join(t for t, _ in conversation_segments(conversation, template, counts, thinking=thinking))
    return (text, *tokenize_conversation(conversation, tokenizer, template, counts, thinking=thinking))


def with_system(conversation, system):
    return conversation if conversation[0]["from"] == "system" else [{"from": "system", "value": system}, *conversation]


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_sizes_render_and_train_as_preprocess_internvl2_5(case, qwen3):
    conversation, counts, thinking = CASES[case]
    reference = with_system(conversation, R1) if thinking else conversation
    expected = reference_internvl2_5(reference, qwen3.tokenizer, counts, text_only=not counts, num_image=len(counts))
    text, ids, labels = ours(conversation, qwen3, "internvl2_5", counts, thinking)
    assert text == expected[0]
    assert ids == expected[1], "the same tokens"
    assert labels == expected[2], "the same tokens trained"
    assert qwen3.decode(ids) == text
    answers = [turn["value"] + "<|im_end|>" for turn in conversation if turn["from"] == "gpt"]
    assert trained_spans(qwen3, ids, labels) == answers, "every answer, <think>…</think> and <|im_end|> included"
    system = R1 if thinking else reference[0]["value"] if reference[0]["from"] == "system" else SYSTEM_2_5
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_oss_renders_and_trains_as_preprocess_internvl3_5_gpt_oss_meant_to(case, gpt_oss):
    conversation, counts, thinking = CASES[case]
    reference = with_system(conversation, GPT_OSS_HIGH) if thinking else conversation
    expected = reference_gpt_oss(
        reference, gpt_oss.tokenizer, counts, text_only=not counts, num_image=len(counts), with_think=thinking,
        intended=True,
    )  # fmt: skip
    text, ids, labels = ours(conversation, gpt_oss, "internvl3_5_gpt_oss", counts, thinking)
    assert text == expected[0]
    assert (ids, labels) == expected[1:], "the same tokens, the same trained"
    assert text.endswith("<|return|>") and text.count("<|return|>") == 1, "only the last answer returns"
    spans = trained_spans(gpt_oss, ids, labels)
    assert len(spans) == sum(turn["from"] == "gpt" for turn in conversation)
    assert all(span.startswith("<|channel|>") for span in spans), "an answer trains all but <|start|>assistant"
    if thinking:
        assert spans[-1].startswith("<|channel|>analysis<|message|>")
        assert "<|end|><|start|>assistant<|channel|>final<|message|>" in spans[-1]
        assert "<think>" not in text


def test_the_thinking_answers_read_as_written(qwen3, gpt_oss):
    conversation = [QUESTION, {"from": "gpt", "value": THOUGHT}]
    ids, labels = tokenize_conversation(conversation, qwen3, "internvl2_5", [1], thinking=True)
    assert trained_spans(qwen3, ids, labels) == [THOUGHT + "<|im_end|>"]
    ids, labels = tokenize_conversation(conversation, gpt_oss, "internvl3_5_gpt_oss", [1], thinking=True)
    assert trained_spans(gpt_oss, ids, labels) == [
        "<|channel|>analysis<|message|>The object is round, so it is a circle.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is a circle.<|return|>"
    ]
    assert gpt_oss.decode(ids).startswith(f"<|start|>system<|message|>{GPT_OSS_HIGH}<|end|><|start|>user<|message|>")
    conversation, counts, _ = CASES["two images, two turns, thinking"]
    released = reference_gpt_oss(with_system(conversation, GPT_OSS_HIGH), gpt_oss.tokenizer, counts, num_image=2,
                                 with_think=True)[0]  # fmt: skip
    text = ours(conversation, gpt_oss, "internvl3_5_gpt_oss", counts, True)[0]
    assert released == text.replace("No.<|end|>", "No.<|return|>"), "the released code returns after every answer"
    conversation = [QUESTION, {"from": "gpt", "value": THOUGHT}]
    plain_ids, plain_labels = tokenize_conversation(conversation, gpt_oss, "internvl3_5_gpt_oss", [1])
    assert trained_spans(gpt_oss, plain_ids, plain_labels) == [f"<|channel|>final<|message|>{THOUGHT}<|return|>"], (
        "without thinking mode, <think>…</think> stays in the final message, as the released script trains it"
    )


def test_gpt_oss_end_token_fault_of_the_released_code(gpt_oss):
    """The released code picks the end token with the image loop's leftover ``i`` (dataset.py line 538)."""
    answer = {"from": "gpt", "value": "circle"}
    one_turn = [QUESTION, answer]
    released = reference_gpt_oss(one_turn, gpt_oss.tokenizer, [3])[0]
    intended = ours(one_turn, gpt_oss, "internvl3_5_gpt_oss", [3], False)[0]
    assert intended.endswith("circle<|return|>") and released == intended.removesuffix("<|return|>") + "<|end|>"
    two_turns = [QUESTION, answer, {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "top"}]
    released = reference_gpt_oss(two_turns, gpt_oss.tokenizer, [3])[0]
    assert "<|return|>" not in released, "the released code returns nowhere"
    assert (
        ours(two_turns, gpt_oss, "internvl3_5_gpt_oss", [3], False)[0]
        == released.removesuffix("<|end|>") + "<|return|>"
    )
    two_images = [TWO_IMAGES, {"from": "gpt", "value": "No."}]  # i = 1 = len - 1: right by accident
    assert (
        reference_gpt_oss(two_images, gpt_oss.tokenizer, [2, 3], num_image=2)[0]
        == ours(two_images, gpt_oss, "internvl3_5_gpt_oss", [2, 3], False)[0]
    )
    text_only = CASES["text only"][0]
    with pytest.raises(UnboundLocalError):  # the released code skips every text-only record
        reference_gpt_oss(text_only, gpt_oss.tokenizer, [], text_only=True)
    assert ours(text_only, gpt_oss, "internvl3_5_gpt_oss", [], False)[0].endswith("Hi!<|return|>")


@pytest.mark.parametrize("template", ["internvl2_5", "internvl3_5_gpt_oss"])
def test_system_turn_fault_of_the_released_code(template, qwen3, gpt_oss):
    """The released code finds the system turn by its text (internvl_chat_finetune.py line 433), so the placeholder
    it adds goes into the system message. (GPT-OSS's end tokens as intended, to see this fault alone.)"""
    tokenizer, reference = (qwen3, reference_internvl2_5)
    if template == "internvl3_5_gpt_oss":
        tokenizer, reference = gpt_oss, partial(reference_gpt_oss, intended=True)
    without = [SYSTEM_TURN, {"from": "human", "value": "What shape is the red object?"}, {"from": "gpt", "value": "A"}]
    with pytest.raises(AssertionError, match="0 != 1"):  # the record is replaced by another
        reference(reference_placeholder(without, 1), tokenizer.tokenizer, [3])
    intended = reference(reference_placeholder(without, 1, intended=True), tokenizer.tokenizer, [3])
    assert ours(without, tokenizer, template, [3], False) == intended, "the placeholder goes to the first human turn"
    with_placeholder = [SYSTEM_TURN, QUESTION, {"from": "gpt", "value": "A"}]
    released = reference(reference_placeholder(with_placeholder, 1), tokenizer.tokenizer, [3])[0]
    text = ours(with_placeholder, tokenizer, template, [3], False)[0]
    assert released == text.replace("Answer briefly.", "<image>\nAnswer briefly.", 1), "a literal <image> in system"
    assert "<image>" not in text


def test_the_generation_prompt_of_gpt_oss_ends_at_the_assistant_and_history_answers_end(gpt_oss):
    history = [QUESTION, {"from": "gpt", "value": "circle"}, {"from": "human", "value": "Where?"}]
    ids, labels = tokenize_conversation(history, gpt_oss, "internvl3_5_gpt_oss", [1], add_generation_prompt=True)
    assert gpt_oss.decode(ids).endswith(
        "<|channel|>final<|message|>circle<|end|><|start|>user<|message|>Where?<|end|><|start|>assistant"
    )
    answered = tokenize_conversation([*history, {"from": "gpt", "value": "top"}], gpt_oss, "internvl3_5_gpt_oss", [1])
    assert answered[0][: len(ids)] == ids, "a prompt is the start of its answered conversation"


def test_thinking_is_a_data_option_and_a_system_message_wins_over_it():
    turns = [{"from": "human", "value": "What shape?"}, {"from": "gpt", "value": THOUGHT}]
    record = Record("conversation", "r", {"conversations": turns}, [])
    tokenizer = ByteTokenizer()

    def text(**options) -> str:
        builder = SampleBuilder(tokenizer, SampleOptions(**options), (View("conversation", 1),))
        (sample,) = builder(record)["views"].values()
        return tokenizer.decode(sample["input_ids"].tolist())

    assert text(thinking=True).startswith(f"<|im_start|>system\n{R1}<|im_end|>\n")
    assert text().startswith(f"<|im_start|>system\n{SYSTEM_2_5}<|im_end|>\n")
    assert text(thinking=True, system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    oss = text(thinking=True, template="internvl3_5_gpt_oss")
    assert oss.startswith(f"<|start|>system<|message|>{GPT_OSS_HIGH}<|end|>") and "<|channel|>analysis" in oss
    with pytest.raises(ValueError, match="'Hermes-2' has no thinking mode"):
        text(thinking=True, template="Hermes-2")


def test_the_critic_on_gpt_oss_trains_its_plus_and_minus_only(gpt_oss):
    turns = critic_turns("What shape?", ["It is round.", "So a circle."], ["+", "-"], images=0)
    ids, labels = tokenize_critic(turns, gpt_oss, "internvl3_5_gpt_oss")
    assert trained_spans(gpt_oss, ids, labels) == ["+", "-"]
    assert gpt_oss.decode(ids).endswith("<|channel|>final<|message|>-<|return|>")
