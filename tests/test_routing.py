"""Routing (InternVL3.5-Flash): a batch built at the first budget and shortened where tiles are compressed is the batch
the data builds with those tiles at the smaller budget — token for token, labels, positions and padding included —
so that routed generation, rollouts, chat and the training forward equal running each tile at the budget the router
picked, as built by the data pipeline itself."""

from functools import partial

import pytest
import torch
from PIL import Image

from lit_internvl.batch import Images
from lit_internvl.components import Decoder, FlashConnector, InternViT
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.records import Record
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.shapes.datasets import ShapesVQA
from lit_internvl.data.shapes.world import ShapesWorld
from lit_internvl.data.templates import tokenize_conversation
from lit_internvl.data.tokenizer import IMG_CONTEXT, load_tokenizer
from lit_internvl.data.views import View
from lit_internvl.inference.chat import answer
from lit_internvl.inference.generate import generate
from lit_internvl.inference.rollout import sample_groups
from lit_internvl.models.routing import at_budgets, route_batch, route_images
from lit_internvl.models.vlm import VisionLanguageModel
from lit_internvl.stages import SFTStage

TILE, FULL, SMALL = 112, 16, 4
TOKENIZER = load_tokenizer("shapes")
CONTEXT = TOKENIZER.token_to_id(IMG_CONTEXT)


def flash_model(seed: int = 0, route: bool = True) -> VisionLanguageModel:
    """The tiny tower with a Flash connector; the rule compresses tiles scoring above the 30% quantile."""
    torch.manual_seed(seed)
    vision, decoder = InternViT("tiny"), Decoder("tiny-shapes")
    connector = FlashConnector(128, 128, relative_threshold=0.3, absolute_threshold=0.0, route=route, router_heads=4)
    return VisionLanguageModel(vision, connector, decoder, CONTEXT, tile_size=TILE).eval()


def shapes_vqa(budget: int, kind: str = "prompt", size: int = 6) -> ShapesVQA:
    options = SampleOptions(tile_size=TILE, max_tiles=1, use_thumbnail=False, system="", strict=True)
    builder = SampleBuilder(TOKENIZER, options, (View(kind, budget),))
    return ShapesVQA(ShapesWorld(TILE, 0, "val"), size, builder, max_objects=3)


def collate(samples, kind: str = "prompt", pack: bool = False):
    """One view's samples (each at its own budget) collated as the loaders collate them."""
    view = View(kind, FULL)
    return Collator(TOKENIZER.pad_id, (view,), pack=pack).collate(samples, view)


# -- at_budgets is the data at those budgets ------------------------------------------------------------------------


def _tiled_record(name: str, size: tuple[int, int], question: str) -> Record:
    image = Image.new("RGB", size, (40, 90, 200))
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "a red circle"}]
    return Record("conversation", name, {"conversations": turns}, [image])


@pytest.mark.parametrize("kind", ["conversation", "prompt"])
def test_a_batch_shortened_to_per_tile_budgets_is_what_the_template_builds_at_them(kind):
    options = SampleOptions(tile_size=TILE, max_tiles=4, use_thumbnail=True, system="")
    builder = SampleBuilder(TOKENIZER, options, (View(kind, FULL),))
    records = [
        _tiled_record("wide", (224, 112), "What colour is the circle?"),
        _tiled_record("big", (224, 224), "Where"),
    ]
    samples = [builder(record)["views"][kind] for record in records]
    batch = collate(samples, kind)
    assert batch.images.tiles_per_sample == [3, 5]  # 2 tiles + thumbnail, 4 tiles + thumbnail
    budgets = [SMALL, FULL, SMALL, FULL, SMALL, SMALL, FULL, SMALL]
    short = at_budgets(batch, Images(batch.images.pixel_values, [3, 5], budgets), CONTEXT, batch_side(kind))
    for row, (record, tiles) in enumerate(zip(records, ([0, 1, 2], [3, 4, 5, 6, 7]))):
        turns = record.fields["conversations"][:1] if kind == "prompt" else record.fields["conversations"]
        ids, labels = tokenize_conversation(
            turns,
            TOKENIZER,
            "internvl2_5",
            [sum(budgets[i] for i in tiles)],
            "",
            add_generation_prompt=kind == "prompt",
        )
        real = short.attention_mask[row].bool()
        assert short.input_ids[row][real].tolist() == ids
        assert short.labels[row][real].tolist() == (labels if kind != "prompt" else [-100] * len(ids))
        assert short.positions[row][real].tolist() == list(range(len(ids)))
    if kind == "prompt":  # prompts stay left-padded
        assert bool(short.attention_mask[:, -1].all())
    else:
        assert bool(short.attention_mask[:, 0].all())


def batch_side(kind: str) -> str:
    return "left" if kind == "prompt" else "right"


def test_a_packed_row_shortens_each_document_and_restarts_its_positions():
    samples = [shapes_vqa(FULL, "conversation")[i]["views"]["conversation"] for i in range(3)]
    small = [shapes_vqa(SMALL, "conversation")[i]["views"]["conversation"] for i in range(3)]
    packed = collate(samples, "conversation", pack=True)
    assert packed.rows == 1 and packed.images.tiles_per_sample == [3]
    short = at_budgets(packed, Images(packed.images.pixel_values, [3], [SMALL, FULL, SMALL]), CONTEXT)
    expected = collate([small[0], samples[1], small[2]], "conversation", pack=True)
    for field in ("input_ids", "labels", "attention_mask", "positions", "document_ids"):
        assert torch.equal(getattr(short, field), getattr(expected, field)), field


def test_budgets_only_shrink_and_fractional_positions_are_refused():
    batch = collate([shapes_vqa(SMALL)[0]["views"]["prompt"]])
    with pytest.raises(ValueError, match="only shrink"):
        at_budgets(batch, Images(batch.images.pixel_values, [1], [FULL]), CONTEXT, "left")
    full = collate([shapes_vqa(FULL)[0]["views"]["prompt"]])
    full.positions[0, -3:] += 0.5  # V2PE-like
    with pytest.raises(ValueError, match="V2PE"):
        at_budgets(full, Images(full.images.pixel_values, [1], [SMALL]), CONTEXT, "left")


# -- routed inference equals each tile at the budget the router picked -------------------------------------------


def _picked(model, count: int = 6):
    """The prompts at the first budget, the router's picks, and the same prompts built by the data at those picks."""
    full = [shapes_vqa(FULL)[i]["views"]["prompt"] for i in range(count)]
    small = [shapes_vqa(SMALL)[i]["views"]["prompt"] for i in range(count)]
    batch = collate(full)
    routed = route_images(model, batch.images)
    assert SMALL in routed.budgets and FULL in routed.budgets  # the rule compresses some tiles and keeps others
    built = collate([s if b == SMALL else f for f, s, b in zip(full, small, routed.budgets)])
    assert built.images.budgets == routed.budgets
    return batch, built


def test_routed_generation_equals_generating_from_prompts_built_at_the_picked_budgets():
    model = flash_model()
    batch, built = _picked(model)
    routed = generate(model, batch.input_ids, batch.attention_mask, batch.images, max_new_tokens=6,
                      positions=batch.positions)  # fmt: skip
    model.connector.routing = False
    direct = generate(model, built.input_ids, built.attention_mask, built.images, max_new_tokens=6,
                      positions=built.positions)  # fmt: skip
    assert routed == direct
    plain = generate(model, batch.input_ids, batch.attention_mask, batch.images, max_new_tokens=6)
    assert plain != routed  # not routing (every tile at 16) answers otherwise: the comparison can fail


def test_routed_rollouts_equal_rollouts_from_prompts_built_at_the_picked_budgets():
    model = flash_model(1)
    batch, built = _picked(model, 4)
    seeds = list(range(8))
    routed = sample_groups(model, batch.input_ids, batch.attention_mask, batch.images, seeds, batch.positions,
                           max_new_tokens=5, temperature=1.0)  # fmt: skip
    model.connector.routing = False
    direct = sample_groups(model, built.input_ids, built.attention_mask, built.images, seeds, built.positions,
                           max_new_tokens=5, temperature=1.0)  # fmt: skip
    assert routed == direct


def test_chat_routes_a_single_prompt_as_generate_does(tmp_path):
    model = flash_model(2)
    path = tmp_path / "scene.png"
    ShapesWorld(TILE, 0, "val").vqa(0)["image"].save(path)
    options = SampleOptions(tile_size=TILE, max_tiles=4, use_thumbnail=True, system="")
    builder = SampleBuilder(TOKENIZER, options, (View("prompt", FULL),))
    record = Record("conversation", "chat", {"conversations": [{"from": "human", "value": "Where"}]}, [str(path)])
    batch = collate([builder(record)["views"]["prompt"]])
    expected = generate(model, batch.input_ids, batch.attention_mask, batch.images, max_new_tokens=5)[0]
    text = TOKENIZER.decode([t for t in expected if t != TOKENIZER.eos_id], skip_special_tokens=True)
    assert answer(model, builder, "Where", [str(path)], max_new_tokens=5) == text


def test_routing_a_routed_batch_changes_nothing():
    model = flash_model()
    batch = collate([shapes_vqa(FULL)[i]["views"]["prompt"] for i in range(6)])
    once = route_batch(model, batch, "left")
    twice = route_batch(model, once, "left")
    assert torch.equal(once.input_ids, twice.input_ids) and once.images.budgets == twice.images.budgets


# -- the training forward ------------------------------------------------------------------------------------------


def test_a_stage_with_a_routing_connector_trains_on_the_routed_sequence(one_thread):
    data = ShapesDataModule(
        records="questions", tokenizer="shapes", tile_size=TILE, val_size=6, batch_size=6, system=""
    )
    stage = SFTStage(
        vision=partial(InternViT, config="tiny"),
        connector=partial(FlashConnector, relative_threshold=0.3, absolute_threshold=0.0, router_heads=4),
        decoder=partial(Decoder, config="tiny-shapes"),
    )
    stage.use_data(data).configure_model()
    stage.model.eval()
    views = next(iter(data.val_dataloader()))
    full = views["conversation"]
    routed = stage.on_after_batch_transfer(views, 0)["conversation"]
    assert routed.input_ids.shape[1] < full.input_ids.shape[1] and SMALL in routed.images.budgets
    small = [shapes_vqa(SMALL, "conversation")[i]["views"]["conversation"] for i in range(6)]
    large = [shapes_vqa(FULL, "conversation")[i]["views"]["conversation"] for i in range(6)]
    built = collate([s if b == SMALL else f for f, s, b in zip(large, small, routed.images.budgets)], "conversation")
    with torch.no_grad():
        got = stage.forward_batch(routed, cross_entropy=True)
        expected = stage.forward_batch(built, cross_entropy=True)
    torch.testing.assert_close(got, expected)


def test_best_of_n_samples_a_routed_prompt_as_the_prompt_built_at_the_picked_budgets():
    from lit_internvl.inference.best_of_n import sample_n

    model = flash_model(3)
    options = SampleOptions(tile_size=TILE, max_tiles=4, use_thumbnail=True, system="")
    builder = SampleBuilder(TOKENIZER, options, (View("prompt", FULL),))
    image = ShapesWorld(2 * TILE, 0, "val").vqa(1)["image"]  # 4 tiles and a thumbnail that differ: the rule ranks them
    turns = [{"from": "human", "value": "<image>\nWhere"}, {"from": "gpt", "value": "top"}]
    record = Record("conversation", "scene", {"conversations": turns}, [image])
    prompt = collate([builder(record)["views"]["prompt"]])
    routed = route_images(model, prompt.images)
    assert SMALL in routed.budgets and FULL in routed.budgets
    built = at_budgets(prompt, Images(prompt.images.pixel_values, [5], routed.budgets), CONTEXT, "left")
    ids, _ = tokenize_conversation(record.fields["conversations"][:1], TOKENIZER, "internvl2_5",
                                   [sum(routed.budgets)], "", add_generation_prompt=True)  # fmt: skip
    assert built.input_ids[0].tolist() == ids
    seeds = [5, 6, 7]
    got = sample_n(model, prompt.input_ids, prompt.images, seeds, max_new_tokens=5)
    model.connector.routing = False
    assert got == sample_n(model, built.input_ids, built.images, seeds, max_new_tokens=5)
