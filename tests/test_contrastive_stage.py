"""ContrastiveStage: the temperature rule of InternVL/CLIP, instances from a notebook, and learning."""

import math

import lightning as L
import pytest
import torch

from lit_internvl.components import InternViT, TextEncoder
from lit_internvl.data import ShapesDataModule
from lit_internvl.losses import contrastive_loss
from lit_internvl.models.dual_encoder import ImageProjection
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


def test_attention_pooling_is_internvl_c_clip_projector_by_hand():
    """The mean token, LayerNormed, queries all LayerNormed tokens, head by head; the heads' outputs,
    concatenated, go through the output projection."""
    torch.manual_seed(0)
    pool = ImageProjection(hidden_size=12, embed_dim=5, pooling="attention", num_heads=3)
    for param in pool.parameters():  # LayerNorms away from the identity, so that a skipped norm shows
        torch.nn.init.normal_(param, std=0.5)
    features = torch.randn(2, 7, 12)
    expected = []
    for x in features:
        ln = lambda norm, t: torch.nn.functional.layer_norm(t, (12,), norm.weight, norm.bias)  # noqa: E731
        q = ln(pool.norm_q, x.mean(0)) @ pool.q.weight.T + pool.q.bias
        k = ln(pool.norm_k, x) @ pool.k.weight.T
        v = ln(pool.norm_v, x) @ pool.v.weight.T + pool.v.bias
        heads = []
        for h in range(3):
            cols = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(k[:, cols] @ q[cols] / 2.0, dim=0)  # 1/sqrt(head_dim 4)
            heads.append(weights @ v[:, cols])
        expected.append(torch.cat(heads) @ pool.proj.weight.T + pool.proj.bias)
    torch.testing.assert_close(pool(features), torch.stack(expected), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="Unknown image_pooling 'max'"):
        ImageProjection(12, 5, pooling="max")


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
    stage.configure_model()
    batch = next(iter(datamodule.train_dataloader()))

    def loss() -> float:
        with torch.no_grad():
            return contrastive_loss(*stage.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))

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
    with pytest.raises(ValueError, match="image_projection.proj.weight has shape"):
        wrong.configure_model()
