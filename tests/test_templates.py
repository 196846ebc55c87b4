"""Chat templates render InternVL's exact text, and the labels train the answers and their end tokens only."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lit_internvl.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    PlaceholderMismatchError,
    conversation_segments,
    expand_video_placeholder,
    tokenize_conversation,
)
from lit_internvl.data.tokenizer import INTERNVL_TOKENS, ByteTokenizer, HFTokenizer

# Transcribed by hand from InternVL's internvl_chat/internvl/conversation.py.
SYSTEM_2_5 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SYSTEM_2_0 = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
IMG3 = "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>"

QA = [
    {"from": "human", "value": "<image>\nWhat shape is it?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "At the top left."},
]

# template → (conversation, image_token_counts, system argument, expected text, expected trained parts)
CASES = {
    "internvl2_5-multi-turn": (
        "internvl2_5", QA, [3], None,
        "<|im_start|>system\n" + SYSTEM_2_5 + "<|im_end|>\n"
        "<|im_start|>user\n" + IMG3 + "\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n"
        "<|im_start|>assistant\nAt the top left.<|im_end|>\n",
        ["A red circle.<|im_end|>", "At the top left.<|im_end|>"],
    ),
    "internvl2_5-system-turn": (
        "internvl2_5", [{"from": "system", "value": "Answer briefly."}, *QA[:2]], [3], "ignored: the turn wins",
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n" + IMG3 + "\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n",
        ["A red circle.<|im_end|>"],
    ),
    "internvl2_5-system-argument-text-only": (
        "internvl2_5", [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!\n"}], [], "Be kind.",
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nSay hi.<|im_end|>\n"
        "<|im_start|>assistant\nHi!\n<|im_end|>\n",
        ["Hi!\n<|im_end|>"],
    ),
    "Hermes-2": (
        "Hermes-2", QA, [3], None,
        "<|im_start|>system\n" + SYSTEM_2_0 + "<|im_end|>"
        "<|im_start|>user\n" + IMG3 + "\nWhat shape is it?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|>"
        "<|im_start|>user\nWhere is it?<|im_end|>"
        "<|im_start|>assistant\nAt the top left.<|im_end|>",
        ["A red circle.<|im_end|>", "At the top left.<|im_end|>"],
    ),
    "internlm2-chat-strips": (
        "internlm2-chat",
        [{"from": "human", "value": "  <image>\nWhat shape is it?\n"}, {"from": "gpt", "value": " A red circle.  "}],
        [3], None,
        "<|im_start|>system\n" + SYSTEM_2_0 + "<|im_end|>"
        "<|im_start|>user\n" + IMG3 + "\nWhat shape is it?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|>",
        ["A red circle.<|im_end|>"],
    ),
    "phi3-chat": (
        "phi3-chat", [{"from": "system", "value": "You see shapes."}, *QA], [3], None,
        "<|system|>\nYou see shapes.<|end|>"
        "<|user|>\n" + IMG3 + "\nWhat shape is it?<|end|>"
        "<|assistant|>\nA red circle.<|end|>"
        "<|user|>\nWhere is it?<|end|>"
        "<|assistant|>\nAt the top left.<|end|>",
        ["A red circle.<|end|>", "At the top left.<|end|>"],
    ),
}  # fmt: skip


def trained_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of trained positions; trained labels must equal their input ids."""
    assert len(input_ids) == len(labels)
    spans, run = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if run:
                spans.append(tokenizer.decode(run))
            run = []
        else:
            assert label == token
            run.append(token)
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def tiny_hf_tokenizer(path, bos: bool = False, internvl_tokens: bool = True) -> None:
    """A byte-level BPE trained on a few sentences, with the chat special tokens; saved to ``path``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["What shape is it? A red circle at the top left.", "Where is it?"] * 10, trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    specials += list(INTERNVL_TOKENS) if internvl_tokens else []
    extra = {}
    if bos:
        specials.append("<s>")
        tok.add_special_tokens(["<s>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        extra["bos_token"] = "<s>"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials,
        **extra,
    ).save_pretrained(path)  # fmt: skip


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_hf_tokenizer(path)
    return HFTokenizer(path)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tokenizer_kind", ["byte", "hf"])
def test_template_text_and_trained_parts_are_exactly_as_written(case, tokenizer_kind, hf_tokenizer):
    template, conversation, counts, system, text, trained = CASES[case]
    tokenizer = ByteTokenizer() if tokenizer_kind == "byte" else hf_tokenizer
    input_ids, labels = tokenize_conversation(conversation, tokenizer, template, counts, system=system)
    assert tokenizer.decode(input_ids) == text
    assert trained_spans(tokenizer, input_ids, labels) == trained
    assert "".join(segment for segment, _ in conversation_segments(conversation, template, counts, system)) == text
    img_context = tokenizer.token_to_id("<IMG_CONTEXT>")
    assert input_ids.count(img_context) == sum(counts)
    assert all(label == IGNORE_INDEX for token, label in zip(input_ids, labels) if token == img_context)


def test_the_answer_end_token_is_one_trained_special_token_and_the_newline_after_it_is_masked(hf_tokenizer):
    im_end = hf_tokenizer.token_to_id("<|im_end|>")
    input_ids, labels = tokenize_conversation(QA[:2], hf_tokenizer, "internvl2_5", [3])
    assert input_ids[-2] == labels[-2] == im_end
    assert hf_tokenizer.decode(input_ids[-1:]) == "\n" and labels[-1] == IGNORE_INDEX
    header = hf_tokenizer.encode("<|im_start|>assistant\n")
    start = len(input_ids) - 1 - len(hf_tokenizer.encode("A red circle.<|im_end|>")) - len(header)
    assert input_ids[start : start + len(header)] == header
    assert labels[start : start + len(header)] == [IGNORE_INDEX] * len(header)
    phi_ids, phi_labels = tokenize_conversation(QA[:2], hf_tokenizer, "phi3-chat", [3])
    end = hf_tokenizer.token_to_id("<|end|>")
    assert phi_ids[-1] == phi_labels[-1] == end


def test_bos_comes_first_and_is_masked_when_the_tokenizer_adds_one(tmp_path):
    tiny_hf_tokenizer(tmp_path, bos=True)
    tokenizer = HFTokenizer(tmp_path)
    assert tokenizer.bos_id == tokenizer.token_to_id("<s>")
    assert tokenizer.encode("What")[0] != tokenizer.bos_id  # encode itself adds nothing
    input_ids, labels = tokenize_conversation(CASES["internlm2-chat-strips"][1], tokenizer, "internlm2-chat", [3])
    assert input_ids[0] == tokenizer.bos_id and labels[0] == IGNORE_INDEX
    assert input_ids.count(tokenizer.bos_id) == 1
    assert tokenizer.decode(input_ids[1:]) == CASES["internlm2-chat-strips"][4]
    assert trained_spans(tokenizer, input_ids, labels) == ["A red circle.<|im_end|>"]


def test_hf_tokenizer_interface_and_missing_internvl_tokens(tmp_path, hf_tokenizer):
    assert hf_tokenizer.added_tokens == []
    assert hf_tokenizer.eos_id == hf_tokenizer.token_to_id("<|im_end|>")
    assert hf_tokenizer.pad_id == hf_tokenizer.token_to_id("<|endoftext|>")
    assert hf_tokenizer.bos_id is None
    tokens = ("<img>", "<IMG_CONTEXT>", "</img>")
    assert hf_tokenizer.encode("".join(tokens)) == [hf_tokenizer.token_to_id(t) for t in tokens]
    with pytest.raises(KeyError, match="<nope>"):
        hf_tokenizer.token_to_id("<nope>")
    tiny_hf_tokenizer(tmp_path, internvl_tokens=False)
    with pytest.raises(ValueError, match="lacks InternVL tokens.*<IMG_CONTEXT>"):
        HFTokenizer(tmp_path, add_missing_tokens=False)
    added = HFTokenizer(tmp_path)
    assert added.added_tokens == list(INTERNVL_TOKENS)
    assert added.encode("<IMG_CONTEXT>") == [added.token_to_id("<IMG_CONTEXT>")]
    assert added.vocab_size == len(added.tokenizer)


def test_one_image_without_placeholder_goes_before_the_first_human_turn():
    tokenizer = ByteTokenizer()
    conversation = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Shapes."}]
    input_ids, _ = tokenize_conversation(conversation, tokenizer, "internvl2_5", [2], system="S")
    assert tokenizer.decode(input_ids) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe.<|im_end|>\n"
        "<|im_start|>assistant\nShapes.<|im_end|>\n"
    )
    assert conversation[0]["value"] == "Describe."  # the record is not modified


def test_images_fill_placeholders_in_order_across_turns():
    tokenizer = ByteTokenizer()
    conversation = [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"},
        {"from": "gpt", "value": "No."},
        {"from": "human", "value": "And <image>?"},
        {"from": "gpt", "value": "Yes."},
    ]
    input_ids, labels = tokenize_conversation(conversation, tokenizer, "internvl2_5", [1, 2, 3], system="S")
    text = tokenizer.decode(input_ids)
    one, two = "<img><IMG_CONTEXT></img>", "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
    assert f"Image-1: {one}\nImage-2: {two}\nSame?" in text and f"And {IMG3}?" in text
    assert trained_spans(tokenizer, input_ids, labels) == ["No.<|im_end|>", "Yes.<|im_end|>"]


@pytest.mark.parametrize(
    "conversation,counts,placeholders",
    [
        ([{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Ok."}], [4, 4], 0),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "Ok."}], [4], 2),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Ok."}], [], 1),
        ([{"from": "gpt", "value": "<image> is not a human turn"}], [4], 0),
    ],
)
def test_placeholder_and_image_counts_must_agree(conversation, counts, placeholders):
    with pytest.raises(
        PlaceholderMismatchError, match=f"{placeholders} <image> placeholder.* {len(counts)} image"
    ) as e:
        tokenize_conversation(conversation, ByteTokenizer(), "internvl2_5", counts)
    assert (e.value.placeholders, e.value.images) == (placeholders, len(counts))
    assert isinstance(e.value, ValueError)


def test_bad_inputs_name_the_option():
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="Unknown chat template 'chatml'.*internvl2_5"):
        tokenize_conversation(QA, tokenizer, "chatml", [3])
    with pytest.raises(ValueError, match="Unknown role 'user' in turn 0"):
        tokenize_conversation([{"from": "user", "value": "hi"}], tokenizer)
    with pytest.raises(ValueError, match="system turn may only come first; found one at turn 2"):
        tokenize_conversation([*QA[:2], {"from": "system", "value": "late"}], tokenizer, image_token_counts=[3])
    with pytest.raises(ValueError, match="at least one <IMG_CONTEXT>"):
        tokenize_conversation(QA, tokenizer, image_token_counts=[0])


def test_generation_prompt_and_custom_template():
    tokenizer = ByteTokenizer()
    ids, labels = tokenize_conversation(QA[:1], tokenizer, "internvl2_5", [1], system="S", add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("What shape is it?<|im_end|>\n<|im_start|>assistant\n")
    assert set(labels) == {IGNORE_INDEX}
    plain = ChatTemplate("plain", "sys", "SYS: ", "USER: ", "BOT: ", end="</s>", separator="\n")
    ids, labels = tokenize_conversation(QA[:2], tokenizer, plain, [1])
    assert (
        tokenizer.decode(ids)
        == "SYS: sys</s>\nUSER: <img><IMG_CONTEXT></img>\nWhat shape is it?</s>\nBOT: A red circle.</s>\n"
    )
    assert trained_spans(tokenizer, ids, labels) == ["A red circle.</s>"]
    assert set(TEMPLATES) == {"internvl2_5", "internvl3_5_gpt_oss", "Hermes-2", "internlm2-chat", "phi3-chat"}


def test_video_frames_become_numbered_image_placeholders():
    conversation = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A circle."}]
    frames = expand_video_placeholder(conversation, 3)
    assert frames[0]["value"] == "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat moves?"
    assert conversation[0]["value"] == "<video>\nWhat moves?"
    implicit = expand_video_placeholder([{"from": "human", "value": "What moves?"}], 2)
    assert implicit[0]["value"] == "Frame-1: <image>\nFrame-2: <image>\nWhat moves?"
    ids, _ = tokenize_conversation(frames, ByteTokenizer(), "internvl2_5", [1, 1, 1])
    assert ByteTokenizer().decode(ids).count("<img><IMG_CONTEXT></img>") == 3
    with pytest.raises(ValueError, match="one <video>"):
        expand_video_placeholder([{"from": "human", "value": "<video><video>"}], 2)


def test_the_template_names_a_recipe_may_choose_are_the_registered_templates():
    from typing import get_args

    from lit_internvl.data.templates import TemplateName

    assert set(get_args(TemplateName)) == set(TEMPLATES)
