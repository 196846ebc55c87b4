"""ContrastiveStage: the temperature rule of InternVL/CLIP, instances from a notebook, and learning."""

import math

import lightning as L
import pytest
import torch

from lit_internvl.components import InternViT, TextEncoder
from lit_internvl.data import ShapesDataModule
from lit_internvl.losses import contrastive_loss
from lit_internvl.stages import ContrastiveStage


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_to_ln_100(tmp_path):
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16)
    stage.configure_model()
    assert stage.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16, init_logit_scale=6.0)
    _trainer(tmp_path, steps=1).fit(stage, ShapesDataModule(train_size=16, val_size=16, batch_size=8))
    assert stage.model.logit_scale.item() == pytest.approx(math.log(100))


def test_training_at_another_size_trains_and_saves_that_sizes_position_table(tmp_path):
    """InternVL's force_image_size: the table is resized once (56 px native → 84 px data), the resized table is
    the parameter that trains, the checkpoint stores it, and a stage rebuilt for 84 px data reloads it exactly."""
    data = ShapesDataModule(tile_size=84, train_size=8, val_size=8, batch_size=8)
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16)
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(stage, data)
    table = stage.model.vision.embeddings.position_embedding
    assert table.shape == (1, 6 * 6 + 1, 128) and stage.model.vision.config.image_size == 84
    assert table.grad is not None or table.requires_grad  # a parameter of the model, trained with the rest
    path = tmp_path / "84px.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]["model.vision.embeddings.position_embedding"]
    assert saved.shape == (1, 37, 128)

    reloaded = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16, init_from=str(path))
    reloaded.use_data(data).configure_model()
    pixels = next(iter(data.val_dataloader()))["pair"].pixel_values
    with torch.no_grad():
        assert torch.equal(reloaded.model.encode_image(pixels), stage.model.eval().encode_image(pixels))

    native = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16)
    native.use_data(data).configure_model()  # the initial table, interpolated once to 84 px
    before = InternViT("tiny").embeddings.position_embedding
    assert native.model.vision.embeddings.position_embedding.shape == (1, 37, 128) and before.shape == (1, 17, 128)


def test_weight_decay_spares_norms_biases_and_scales():
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16)
    stage.configure_model()
    stage.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    groups = stage.configure_optimizers()["optimizer"].param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0
    assert id(stage.model.logit_scale) not in decayed
    assert id(stage.model.vision.layers[0].ls1) not in decayed
    assert id(stage.model.vision.layers[0].attn.qkv.weight) in decayed
    assert sum(map(len, (g["params"] for g in groups))) == len(list(stage.parameters()))


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    datamodule = ShapesDataModule(train_size=32, val_size=16, batch_size=32)
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=32, warmup_steps=5, learning_rate=3e-4)
    stage.use_data(datamodule).configure_model()
    batch = next(iter(datamodule.train_dataloader()))["pair"]

    def loss() -> float:
        with torch.no_grad():
            return contrastive_loss(*stage.model(batch.pixel_values, batch.input_ids, batch.attention_mask))

    before = loss()
    _trainer(tmp_path, steps=30).fit(stage, datamodule)
    assert loss() < 0.6 * before


def test_init_from_a_lightning_checkpoint_loads_by_name_and_reports_partial_loads(tmp_path, caplog):
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(stage, ShapesDataModule(train_size=8, val_size=8, batch_size=8))
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)

    resumed = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16, init_from=str(path))
    resumed.configure_model()
    for (name, a), b in zip(stage.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name

    # Only the image tower, renamed into a differently named home: the rest is reported missing.
    partial = ContrastiveStage(
        InternViT("tiny"), TextEncoder("tiny"), embed_dim=16, init_from=str(path),
        init_from_rename={"text_encoder.": "", "image_projection.": "", "text_projection.": "", "logit_scale": ""},
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        partial.configure_model()
    assert torch.equal(partial.model.vision.layers[0].attn.qkv.weight, stage.model.vision.layers[0].attn.qkv.weight)
    assert not torch.equal(partial.model.text_encoder.embed_tokens.weight, stage.model.text_encoder.embed_tokens.weight)
    assert "missing" in caplog.text and "text_encoder.embed_tokens.weight" in caplog.text

    wrong = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=32, init_from=str(path))
    with pytest.raises(ValueError, match="(?s)init_from .*size mismatch for text_projection.weight"):
        wrong.configure_model()
