"""What adding a stage costs: a toy "answer consistency" stage, written here in one file (and one recipe layer,
``tests/consistency.yaml``), trains on the same conversation seen through two visual budgets, the answer read
through 4 tokens a tile pulled towards the answer read through 16 (a KL between the two, as ViCO's consistency
term), beside the usual language-model loss. Nothing in the library changes for it: the stage declares its two
views, the data builds both, the collator batches each, the model splices each at its budget."""

from functools import partial

import torch
import torch.nn.functional as F

from lit_internvl.batch import Views
from lit_internvl.components import Decoder, InternViT, MultiBudgetConnector
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.views import View
from lit_internvl.losses import next_token_targets
from lit_internvl.stages.vision_language import VisionLanguageStage


class ConsistencyStage(VisionLanguageStage):
    """Language-model loss on the answer at the model's first budget (``full``), plus KL(full ‖ compressed) of the
    answer's next-token distributions, the compressed view at ``budget`` 4 tokens a tile."""

    views = (View("conversation", name="full"), View("conversation", budget=4, name="compressed"))

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor | None:
        if batch.empty:
            return None
        full, compressed = batch["full"], batch["compressed"]
        logits = self.forward_batch(full)  # (N, V) at the answer's N supervised positions
        targets = next_token_targets(full.labels, full.document_ids)
        lm = F.cross_entropy(logits.float(), targets[targets != -100])
        small = self.forward_batch(compressed)  # the same answer: the same N positions, in the same order
        kl = F.kl_div(small.float().log_softmax(-1), logits.detach().float().log_softmax(-1), log_target=True,
                      reduction="batchmean")  # fmt: skip
        self.log_dict({"train/lm": lm, "train/kl": kl}, batch_size=full.rows)
        return lm + kl


def _stage() -> ConsistencyStage:
    return ConsistencyStage(
        vision=partial(InternViT, config="tiny"),
        connector=partial(MultiBudgetConnector, downsample_ratios=(0.5, 0.25)),
        decoder=partial(Decoder, config="tiny-shapes"),
        trainable=["connector", "decoder"],
        learning_rate=1e-3,
        warmup_steps=1,
    )


def test_the_data_builds_both_views_of_every_record_at_their_budgets():
    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=112, val_size=4, batch_size=4)
    _stage().use_data(data).configure_model()
    batch = next(iter(data.val_dataloader()))
    full, compressed = batch["full"], batch["compressed"]
    assert full.sample_names == compressed.sample_names
    context = data.tokenizer.token_to_id("<IMG_CONTEXT>")
    assert (full.input_ids == context).sum(1).tolist() == [16] * 4
    assert (compressed.input_ids == context).sum(1).tolist() == [4] * 4
    # the same answers: the labels agree once the image slots are left out
    for row in range(4):
        assert (
            full.labels[row][full.labels[row] != -100].tolist()
            == compressed.labels[row][compressed.labels[row] != -100].tolist()
        )


def test_training_brings_the_compressed_answer_towards_the_full_one(one_thread, tmp_path):
    import lightning as L

    torch.manual_seed(0)
    data = ShapesDataModule(records="questions", tokenizer="shapes", tile_size=112, train_size=64, val_size=4,
                            batch_size=8, system="")  # fmt: skip
    stage = _stage()
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    kls = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kls.append(float(trainer.callback_metrics["train/kl"]))

    trainer.callbacks.append(Record())
    trainer.fit(stage, data)
    assert len(kls) == 8 and all(k >= 0 for k in kls)
    assert sum(kls[-3:]) / 3 < sum(kls[:3]) / 3  # the KL term falls as the two views are pulled together


def test_the_stage_runs_from_the_command_line_as_one_more_layer(tmp_path):
    from pathlib import Path

    from lit_internvl.cli import main

    repo = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(repo / "recipes/sft.yaml"), "--config", str(repo / "tests/consistency.yaml"),
          "--model.init_args.init_from", "null", "--trainer.max_steps", "2", "--trainer.default_root_dir",
          str(tmp_path), "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.batch_size", "4",
          "--data.init_args.num_workers", "0"])  # fmt: skip
    config = (tmp_path / "version_0" / "config.yaml").read_text()
    assert "ConsistencyStage" in config and "MultiBudgetConnector" in config
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert any(name.startswith("model.connector.projectors.1.") for name in checkpoint["state_dict"])
