"""SFT: generation with and without the KV cache agree, LoRA merges exactly, freezing holds,
per-part learning rates, and the fit → predict → chat path."""

import json
import warnings

import lightning as L
import pytest
import torch
import yaml

from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.inference import generate, sample_next
from lit_internvl.lora import add_lora, lora_disabled, merge_lora
from lit_internvl.models import VisionLanguageModel
from lit_internvl.stages import SFTStage
from tests.tiny import asked, tiny_vlm

TOKENIZER = ByteTokenizer()


def _vlm(seed: int = 0) -> VisionLanguageModel:
    return tiny_vlm(TOKENIZER.token_to_id(IMG_CONTEXT), seed=seed).eval()


def _prompts():
    dm = ShapesDataModule(records="questions", batch_size=3, val_size=3, system="Answer in one word.")
    return next(iter(asked(dm, "prompt").predict_dataloader()))["prompt"]


def _generate(model, batch, **kwargs):
    return generate(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.images,
        **kwargs,
    )


def test_generation_with_cache_equals_generation_without():
    model, batch = _vlm(), _prompts()
    assert (batch.attention_mask[:, 0] == 0).any(), "the prompts are left-padded to different lengths"
    greedy = _generate(model, batch, max_new_tokens=12)
    assert greedy == _generate(model, batch, max_new_tokens=12, use_cache=False)
    sampled = [_generate(model, batch, max_new_tokens=12, temperature=1.0, top_p=0.9, use_cache=cache,
                         generator=torch.Generator().manual_seed(3)) for cache in (True, False)]  # fmt: skip
    assert sampled[0] == sampled[1]
    assert sampled[0] != greedy


def test_left_padding_does_not_change_the_answer():
    model, batch = _vlm(), _prompts()
    together = _generate(model, batch, max_new_tokens=8)
    for row in range(batch.input_ids.shape[0]):
        keep = batch.attention_mask[row] == 1
        alone = generate(
            model,
            batch.input_ids[row][keep][None],
            images=batch.pixel_values[row : row + 1],
            max_new_tokens=8,
        )
        assert alone[0] == together[row]


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(i))) for i in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside
    assert int(sample_next(logits, 0.0)) == 0


def test_add_lora_marks_the_adapters_trainable_and_leaves_every_other_parameter_as_it_was():
    model = _vlm()
    model.decoder.requires_grad_(False)  # frozen before: stays frozen; the connector and vision stay trainable
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    add_lora(model, ["decoder"], r=4)
    after = {
        name.replace(".base_layer.", "."): p.requires_grad
        for name, p in model.named_parameters()
        if "lora_" not in name
    }
    assert after == before
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_lora_merged_and_unmerged_give_the_same_logits():
    model, batch = _vlm(), _prompts()
    model.requires_grad_(False)
    add_lora(model, ["decoder", "vision"], r=4)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters do something
            torch.nn.init.normal_(param, std=0.05)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    inputs = (batch.input_ids, batch.images)
    with torch.no_grad():
        adapted = model(*inputs, attention_mask=batch.attention_mask)
        with lora_disabled(model):
            base = model(*inputs, attention_mask=batch.attention_mask)
        merge_lora(model)
        merged = model(*inputs, attention_mask=batch.attention_mask)
    assert (adapted - base).abs().max() > 1e-3
    assert (adapted - merged).abs().max() <= 1e-5
    assert not any("lora_" in n for n in model.state_dict())
    assert set(model.state_dict()) == set(_vlm().state_dict())


def _stage(**kwargs) -> SFTStage:
    return SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"),
        image_context_id=TOKENIZER.token_to_id(IMG_CONTEXT), warmup_steps=1, **kwargs,
    )  # fmt: skip


def _fit(stage, tmp_path, steps=2, **data_options):
    data = ShapesDataModule(
        records="questions", train_size=16, val_size=8, batch_size=8, system="Answer in one word.", **data_options
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(stage, data)


@pytest.mark.parametrize(
    "options, trained",
    [
        ({"trainable": ["connector"]}, {"connector"}),
        (
            {"trainable": ["connector", "decoder"], "unfreeze_vision_layers": 1},
            {"connector", "decoder", "vision.layers.3."},
        ),
        (
            {"trainable": ["connector", "decoder"], "train_lm_head": False},
            {"connector", "decoder.layers", "decoder.norm"},
        ),
        ({"trainable": ["connector"], "lora": {"parts": ["decoder"], "r": 4}}, {"connector", "decoder.layers"}),
    ],
)
def test_frozen_parameters_do_not_change(tmp_path, options, trained):
    stage = _stage(**options)
    stage.configure_model()
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    _fit(stage, tmp_path)
    for name, param in stage.model.named_parameters():
        should_train = any(name.startswith(prefix) for prefix in trained)
        if options.get("lora") and name.startswith("decoder.layers"):
            should_train = "lora_" in name and "lora_A" in name  # B starts at 0 and moves too, A moves once B does
            if "lora_B" in name:
                assert not torch.equal(before[name], param), name
                continue
        if should_train:
            assert not torch.equal(before[name], param), f"{name} should have trained"
        else:
            assert torch.equal(before[name], param), f"{name} is frozen but changed"


def test_a_tokenizer_with_more_ids_than_the_decoder_vocabulary_is_refused(tmp_path):
    stage = SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"))
    with pytest.raises(
        ValueError, match="tokenizer has 394 ids but the vocabulary of model.init_args.decoder holds 272"
    ):
        _fit(stage, tmp_path, tokenizer="shapes")
    shapes = SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny-shapes"))
    _fit(shapes, tmp_path, steps=1, tokenizer="shapes")
    assert shapes.model.image_context_id == ShapesDataModule(tokenizer="shapes").tokenizer.token_to_id(IMG_CONTEXT)


def test_part_learning_rates_and_vision_layer_decay():
    stage = _stage(part_lr={"vision": 1e-4, "connector": 1e-2}, vision_layer_decay=0.5, learning_rate=1e-3)
    stage.configure_model()
    lr_of = {id(p): g["lr"] for g in stage.parameter_groups() for p in g["params"]}
    model = stage.model
    assert lr_of[id(model.connector.fc1.weight)] == 1e-2
    assert lr_of[id(model.decoder.layers[0].mlp.up_proj.weight)] == 1e-3
    layers = len(model.vision.layers)
    assert lr_of[id(model.vision.layers[layers - 1].attn.qkv.weight)] == pytest.approx(1e-4 * 0.5)
    assert lr_of[id(model.vision.layers[0].attn.qkv.weight)] == pytest.approx(1e-4 * 0.5**layers)
    assert lr_of[id(model.vision.embeddings.patch_embedding.weight)] == pytest.approx(1e-4 * 0.5 ** (layers + 1))


def test_fit_predict_and_chat_through_the_command_line(tmp_path, capsys):
    from lit_internvl.cli import main

    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "logger": False, "limit_val_batches": 1,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
        "model": {"class_path": "lit_internvl.stages.SFTStage", "init_args": {
            "vision": {"class_path": "lit_internvl.components.InternViT", "init_args": {"config": "tiny"}},
            "connector": {"class_path": "lit_internvl.components.PixelShuffleMLP"},
            "decoder": {"class_path": "lit_internvl.components.Decoder", "init_args": {"config": "tiny"}},
            "generation": {"max_new_tokens": 4}}},
        "data": {"class_path": "lit_internvl.data.ShapesDataModule", "init_args": {
            "records": "questions", "train_size": 8, "val_size": 4, "batch_size": 4, "system": "Answer in one word."}},
    }  # fmt: skip
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = main(["fit", "--config", str(path)])
    assert "val/answer_accuracy/colour" in cli.trainer.callback_metrics
    report = json.loads((tmp_path / "metrics.json").read_text())
    chance = {"colour": 1 / 6, "shape": 1 / 5, "count": 1 / 3, "position": 1 / 9}
    reported = {
        key.rsplit("/", 1)[1]: value
        for key, value in report["metrics"].items()
        if key.startswith("val/answer_accuracy/")
    }
    assert reported, "the four validation questions are reported by type"
    for kind, value in reported.items():
        assert value["chance"] == pytest.approx(chance[kind])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["predict", "--config", str(path), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all({"name", "answer", "reference", "finished"} <= set(line) for line in lines)
    # An answer cut off at max_new_tokens (4 here, before the model has learnt to stop) is flagged and warned about.
    cut_warned = any("before an end token" in str(w.message) for w in caught)
    assert cut_warned == (not all(line["finished"] for line in lines))

    image = tmp_path / "scene.png"
    from lit_internvl.data.shapes import ShapesWorld

    ShapesWorld(split="test").vqa(0)["image"].save(image)
    capsys.readouterr()
    answer = main(["chat", "--config", str(path), "--checkpoint", str(tmp_path / "ckpt" / "last.ckpt"),
                   "--image", str(image), "--max-new-tokens", "4", "What colour is the square?"])  # fmt: skip
    assert isinstance(answer, str) and capsys.readouterr().out.strip() == answer.strip()
