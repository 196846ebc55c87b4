"""The embedded default's data: byte and word tokenizers that round-trip, a deterministic shapes world; both
datamodules meet the stage contract, and a misspelt choice fails when the recipe is parsed."""

import json

import numpy as np
import pytest
from jsonargparse import ArgumentError, ArgumentParser

from lit_internvl.data import ByteTokenizer, RecordsDataModule, ShapesDataModule, load_tokenizer
from lit_internvl.data.contract import StageData
from lit_internvl.data.records import Record
from lit_internvl.data.shapes import COLOURS, QUESTION_TYPES, REGIONS, SHAPES, ShapesWorld, class_names, vocabulary
from lit_internvl.data.templates import ChatTemplate
from tests.tiny import asked


def test_byte_tokenizer_round_trips_text_and_special_tokens():
    tok = ByteTokenizer()
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nwhat colour? é<|im_end|>"
    ids = tok.encode(text)
    assert ids.count(tok.token_to_id("<IMG_CONTEXT>")) == 2
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_id
    assert all(i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\nwhat colour? é"
    with pytest.raises(KeyError, match="<nope>"):
        tok.token_to_id("<nope>")


def test_word_tokenizer_makes_each_known_word_one_token_and_round_trips_everything_else():
    tok = ByteTokenizer(["red", "circle", "top", "left"])
    plain = ByteTokenizer()
    assert tok.vocab_size == plain.vocab_size + 8  # each word and each word after a space
    ids = tok.encode("<|im_start|>a red circle at the top left<|im_end|>")
    # "a", " at", " the" are not words here: bytes; " red", " circle", " top", " left" are one token each
    assert len(ids) == 2 + len("a") + 2 + len(" at the") + 2
    assert tok.decode(ids) == "<|im_start|>a red circle at the top left<|im_end|>"
    for text in ("redd circles, red-circle; RED é 3 <IMG_CONTEXT>", " red  red\nred?", ""):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("redd") == list(b"redd")  # a longer run is not the word: bytes
    assert tok.decode(tok.encode("a red<|im_end|>"), skip_special_tokens=True) == "a red"
    assert tok.token_to_id("<IMG_CONTEXT>") == plain.token_to_id("<IMG_CONTEXT>")
    with pytest.raises(ValueError, match="top left"):
        ByteTokenizer(["top left"])


def test_shapes_tokenizer_has_every_word_the_world_writes_and_fits_the_tiny_shapes_decoder():
    import re

    from lit_internvl.components.language import LanguageConfig

    texts = ["Answer in one word.", "system", "user", "assistant"]  # and the internvl2_5 template's roles
    texts += [f"a {name}" for name in class_names()]
    for split in ("train", "val"):
        world = ShapesWorld(84, split=split)
        for i in range(200):
            qa, pair, pref = world.vqa(i, describe_ratio=0.5), world.pair(i), world.preference(i)
            texts += [qa["question"], qa["answer"], pair["text"], pref["rejected"], world.sentence(i)]
            texts += world.interleaved(i)["texts"]
    words = set(vocabulary())
    missing = {run for text in texts for run in re.findall("[A-Za-z0-9]+", text)} - words
    assert not missing, f"words the shapes world writes but its tokenizer spells in bytes: {sorted(missing)}"
    tok = load_tokenizer("shapes")
    assert tok.vocab_size == LanguageConfig.from_name("tiny-shapes").vocab_size
    question = tok.encode("What colour is the square?")
    assert len(question) == 6 and tok.decode(question) == "What colour is the square?"


def test_scenes_are_deterministic_and_splits_differ():
    a, b = ShapesWorld(seed=3, split="train"), ShapesWorld(seed=3, split="train")
    first, again = a.pair(5), b.pair(5)
    assert first["text"] == again["text"]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    val = ShapesWorld(seed=3, split="val")
    assert not np.array_equal(np.asarray(val.pair(5)["image"]), np.asarray(first["image"]))


def test_captions_and_labels_agree():
    world = ShapesWorld(split="val")
    names = class_names()
    assert len(names) == len(COLOURS) * len(SHAPES) >= 24
    for i in range(50):
        pair = world.pair(i)
        assert pair["text"].startswith(f"a {names[pair['label']]} at the ")
        region = pair["text"].split(" at the ")[1]
        assert pair["caption_key"] == pair["label"] * len(REGIONS) + REGIONS.index(region)


def test_object_is_drawn_in_its_colour_at_its_place():
    world = ShapesWorld(image_size=56, split="test")
    for i in range(20):
        rng = world.rng(i)
        obj = world.random_object(rng)
        pixels = np.asarray(world.render([obj], rng)).astype(int)
        x, y = (int(c) for c in obj.centre)
        assert np.abs(pixels[y, x] - np.array(COLOURS[obj.colour])).max() < 60


@pytest.mark.parametrize("image_size", [56, 84])
def test_scene_objects_lie_whole_inside_their_regions(image_size):
    """Every object's drawn pixels (found by rendering it alone over the same background) lie inside the
    grid cell of its region, a pixel away from the cell's border: no object hides or touches another, and the
    region a question names is the one the object is seen in."""
    world = ShapesWorld(image_size=image_size, split="train")
    cell = image_size / 3
    several = 0
    for i in range(60):
        objects, _ = world.scene(i)
        several += len(objects) > 1
        assert len({obj.region(image_size) for obj in objects}) == len(objects)
        background = np.asarray(world.render([], np.random.default_rng(0)))
        for obj in objects:
            mask = (np.asarray(world.render([obj], np.random.default_rng(0))) != background).any(-1)
            assert mask.sum() > 20
            row, col = divmod(REGIONS.index(obj.region(image_size)), 3)
            ys, xs = np.nonzero(mask)
            assert col * cell < xs.min() and xs.max() + 1 < (col + 1) * cell, f"scene {i}: {obj} leaves its cell"
            assert row * cell < ys.min() and ys.max() + 1 < (row + 1) * cell, f"scene {i}: {obj} leaves its cell"
    assert several >= 30


def test_datamodule_batches():
    dm = asked(ShapesDataModule(train_size=8, val_size=4, batch_size=4), "pair")
    batch = next(iter(dm.train_dataloader()))["pair"]
    assert batch.pixel_values.shape == (4, 3, 56, 56)
    assert batch.input_ids.shape == batch.attention_mask.shape
    assert (batch.input_ids[batch.attention_mask == 0] == dm.tokenizer.pad_id).all()
    with pytest.raises(ValueError, match="Unknown shapes records .pairs."):
        ShapesDataModule(records="pairs")


def test_descriptions_name_every_object_in_the_order_asked_for_and_only_in_training():
    world = ShapesWorld(split="train")
    described, orders = 0, {"shape": 0, "colour": 0}
    for i in range(40):
        sample, objects = world.vqa(i, describe_ratio=0.5), world.scene(i)[0]
        if sample["type"] != "description":
            assert sample == world.vqa(i)  # the draw of a description leaves the other questions as they were
            continue
        described += 1
        expected = [f"a {obj.name} at the {obj.region(56)}" for obj in objects]
        parts = sample["answer"].split(", ")
        assert sorted(parts) == sorted(expected)
        order = sample["question"].removeprefix("Describe the objects by ").removesuffix(".")
        orders[order] += 1
        names = [part.split(" at the ")[0].split()[1:] for part in parts]  # [colour, shape] of each, as listed
        if order == "shape":
            assert [SHAPES.index(s) for _, s in names] == sorted(SHAPES.index(obj.shape) for obj in objects)
        else:
            colours = list(COLOURS)
            assert [colours.index(c) for c, _ in names] == sorted(colours.index(obj.colour) for obj in objects)
    assert 10 <= described <= 30 and min(orders.values()) >= 3
    with pytest.raises(ValueError, match="reading"):
        world.description(world.scene(0)[0], "reading")

    dm = asked(ShapesDataModule(records="questions", train_size=64, val_size=64, describe_ratio=1.0))
    train, val = dm._dataset("train", 8, dm.views), dm._dataset("val", 64, dm.views)
    meta = lambda sample: sample["views"]["conversation"]["meta"]  # noqa: E731
    assert {meta(sample)["type"] for sample in train} == {"description"}  # iteration ends at len()
    assert "description" not in {meta(sample)["type"] for sample in val}
    with pytest.raises(IndexError, match="index 8 is outside this train split of 8 samples"):
        train[8]
    with pytest.raises(ValueError, match="describe_ratio"):
        ShapesDataModule(records="questions", describe_ratio=1.5)

    # eval_describe: held-out scenes described (a chat model's captions), the same pictures as the one-word questions
    captions = asked(ShapesDataModule(records="questions", val_size=16, eval_describe=True))
    described = captions._dataset("val", 16, captions.views)
    assert {meta(sample)["type"] for sample in described} == {"description"}
    assert [s["name"] for s in described] == [s["name"] for s in list(val)[:16]]


def test_both_datamodules_are_what_a_stage_reads():
    """Both satisfy the StageData contract; their tile facts come from the one SampleOptions their samples are
    built with, the budgets from the views a stage asked for."""
    shapes = ShapesDataModule(records="questions", tile_size=84)
    records = RecordsDataModule(train="unread.jsonl")
    for dm, budget in ((shapes, 9), (records, 256)):
        assert isinstance(dm, StageData)
        asked(dm, "prompt", budget=budget)
        builder = dm.sample_builder()
        assert builder.options.tile_size == dm.tile_size and [v.budget for v in builder.views] == [budget]
        assert builder.prompt_only and builder.tokenizer is dm.tokenizer
    assert (shapes.tile_size, records.tile_size) == (84, 448)
    assert shapes.class_names == class_names() and shapes.prompt_templates == ["a {}"]
    assert set(shapes.question_types) == set(QUESTION_TYPES)
    assert records.class_names is None and records.question_types is None


def test_jpeg_augmentation_is_for_training_samples_only():
    dm = asked(RecordsDataModule(train="unread.jsonl", jpeg_quality=(75, 100)))
    assert dm.sample_builder(train=True).options.jpeg_quality == (75, 100)
    assert dm.sample_builder(train=False).options.jpeg_quality is None


@pytest.mark.parametrize(
    "datamodule, argument, bad",
    [
        (ShapesDataModule, "records", "pairs"),
        (RecordsDataModule, "template", "internvl25"),
    ],
)
def test_a_misspelt_choice_fails_when_the_config_is_parsed(datamodule, argument, bad):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(datamodule, "data")
    required = ["--data.train", "data.jsonl"] if datamodule is RecordsDataModule else []
    with pytest.raises(ArgumentError, match=f"data.{argument}"):
        parser.parse_args([*required, f"--data.{argument}", bad])


def test_a_recipe_can_spell_out_its_own_chat_template():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RecordsDataModule, "data")
    template = {"name": "mine", "system_message": "S", "system_header": "<s>", "user_header": "<u>",
                "assistant_header": "<a>", "end": "</e>"}  # fmt: skip
    config = parser.parse_args(["--data.train", "data.jsonl", "--data.template", json.dumps(template)])
    dm = parser.instantiate_classes(config).data
    assert dm.sample_options.template == ChatTemplate(**template)
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    sample = asked(dm).sample_builder()(Record("conversation", "data.jsonl:1", {"conversations": turns}))
    assert dm.tokenizer.decode(sample["views"]["conversation"]["input_ids"]) == "<s>S</e><u>q</e><a>a</e>"
