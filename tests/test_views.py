"""A stage says which views of a record it trains on; every image carries its own visual budget.

Claims: one batch that mixes tiles of two budgets (16 and 4 tokens a 112 px tile of the tiny tower) computes, row
for row, what each sample computes alone; a stage asking for a view its data cannot give fails in the handshake,
naming both; the data builds only what the stage asks for."""

from functools import partial

import pytest
import torch

from lit_internvl.batch import Images
from lit_internvl.components import Decoder, InternViT, MultiBudgetConnector, PixelShuffleMLP, TextEncoder
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.shapes.world import ShapesWorld
from lit_internvl.data.views import View, ViewError
from lit_internvl.models import VisionLanguageModel
from lit_internvl.stages import ContrastiveStage, MPOStage, SFTStage

TILE = 112  # 8×8 patches of 14 px: 16 tokens after pixel shuffle at 0.5, 4 at 0.25


def _model() -> VisionLanguageModel:
    torch.manual_seed(0)
    vision, decoder = InternViT("tiny"), Decoder("tiny-shapes")
    connector = MultiBudgetConnector(vision.hidden_size, decoder.hidden_size, downsample_ratios=(0.5, 0.25))
    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=TILE, system="")
    return VisionLanguageModel(vision, connector, decoder, data.tokenizer.token_to_id("<IMG_CONTEXT>"), TILE).eval()


def _samples(budgets: tuple[int, ...]) -> list[dict]:
    """Question ``i`` of the shapes world's validation split, its tiles at ``budgets[i]`` tokens each."""
    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=TILE, val_size=len(budgets), system="")
    out = []
    for index, budget in enumerate(budgets):
        data.use_views((View("conversation", budget),))
        out.append(data._dataset("val", len(budgets), data.views)[index]["views"]["conversation"])
    return out


def test_the_model_and_its_connector_declare_two_budgets():
    model = _model()
    assert model.budgets() == (16, 4)
    assert model.budgets(224) == (64, 16)  # 16×16 patches


def test_a_batch_mixing_two_budgets_equals_each_sample_alone():
    model, samples = _model(), _samples((16, 4))
    slots = [int((s["input_ids"] == model.image_context_id).sum()) for s in samples]
    assert slots == [16, 4]  # the data reserved each tile's budget
    batch = Collator(0, (View("conversation"),)).collate(samples, View("conversation"))
    assert batch.images.budgets == [16, 4] and batch.images.tiles_per_sample == [1, 1]
    with torch.no_grad():
        together = model(batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions)
        for row, sample in enumerate(samples):
            alone_batch = Collator(0, (View("conversation"),)).collate([sample], View("conversation"))
            alone = model(alone_batch.input_ids, alone_batch.images, positions=alone_batch.positions)[0]
            torch.testing.assert_close(together[row, : len(alone)], alone, atol=1e-5, rtol=1e-5)
    # Each budget went through its own projector: the 4-token tile is not the 16-token one cut short.
    features = model.embed_images(batch.images)
    assert features.shape[0] == 20
    short = model.embed_images(Images.uniform(batch.images.pixel_values[1:], [1], 16))
    assert not torch.allclose(features[16:], short[:4])


def test_a_tile_whose_slots_disagree_with_its_budget_is_named():
    model, samples = _model(), _samples((16,))
    batch = Collator(0, (View("conversation"),)).collate(samples, View("conversation"))
    wrong = Images(batch.images.pixel_values, [1], [4])
    with pytest.raises(ValueError, match="shapes-val:0.* has 16 <IMG_CONTEXT> tokens but its 1 tile"):
        model(batch.input_ids, wrong, sample_names=batch.sample_names)


def _sft(cls=SFTStage, connector=None, **options):
    return cls(
        vision=partial(InternViT, config="tiny"),
        connector=connector or partial(PixelShuffleMLP, downsample_ratio=0.5),
        decoder=partial(Decoder, config="tiny-shapes"),
        **options,
    )


def test_a_stage_asking_for_a_view_its_data_cannot_give_fails_in_the_handshake_naming_both():
    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=84, system="")
    stage = _sft(MPOStage).use_data(data)
    with pytest.raises(ViewError, match=r"model MPOStage .*chosen, rejected.*data.init_args.records 'questions'"):
        stage.configure_model()


def test_a_budget_the_connector_cannot_give_names_the_connector():
    class SixteenOnly(SFTStage):
        views = (View("conversation", budget=16),)

    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=84, system="")
    with pytest.raises(ViewError, match=r"16 tokens a tile, but model.init_args.connector PixelShuffleMLP .* gives 9"):
        _sft(SixteenOnly).use_data(data).configure_model()


def test_the_handshake_tells_the_data_the_budgets_so_recipes_need_not():
    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=84, system="")
    _sft().use_data(data).configure_model()
    assert data.views == (View("conversation", 9, name="conversation"),)  # the stage reads it by its kind
    sample = next(iter(data.val_dataloader()))["conversation"]
    assert sample.images.budgets == [9] * sample.images.pixel_values.shape[0]


def test_stage_one_asks_for_no_negative_and_none_is_drawn(monkeypatch):
    drawn = []
    pair = ShapesWorld.pair
    monkeypatch.setattr(ShapesWorld, "pair", lambda self, index: drawn.append(index) or pair(self, index))
    data = ShapesDataModule(records="captions", tile_size=56, val_size=8, batch_size=8)
    stage = ContrastiveStage(vision=partial(InternViT, config="tiny"), text_encoder=partial(TextEncoder, config="tiny"))
    stage.use_data(data).configure_model()
    batch = next(iter(data.val_dataloader()))
    assert set(batch.views) == {"pair"}
    assert sorted(drawn) == list(range(8))  # one scene a sample: no other scene rendered for an ITM negative


def test_a_records_file_whose_records_cannot_give_the_view_stops_naming_the_record(tmp_path):
    """MPO on plain conversations: every record would be skipped and nothing trained, so it is an error instead."""
    import json

    from tests.tiny import records

    path = tmp_path / "chat.jsonl"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    data = records("chosen", "rejected", train=str(path), tile_size=56)
    with pytest.raises(ViewError, match=r"chat.jsonl:1 is a conversation record: it has no chosen, rejected view"):
        next(iter(data.train_dataloader()))


def test_every_projector_of_a_multi_budget_connector_gets_a_gradient_whatever_the_budget():
    """DDP (find_unused_parameters off) and FSDP2's reduce-scatter need every parameter in every step's graph."""
    connector = MultiBudgetConnector(128, 64)
    features = torch.randn(2, 1 + 64, 128)
    connector(features, budget=4).sum().backward()
    grads = {name: p.grad for name, p in connector.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all(not g.any() for name, g in grads.items() if name.startswith("projectors.0."))  # idle: zero
    assert any(g.any() for name, g in grads.items() if name.startswith("projectors.1."))
