"""Each callback in a short fit, checked by what it wrote: TensorBoard event files holding the sample grid, an
exported folder transformers loads, parameters frozen then trained by the optimiser, the bad-sample report."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_internvl.callbacks import SampleLogger
from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP, TextEncoder
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.shapes import ShapesWorld
from lit_internvl.inference.generate import generate
from lit_internvl.models.vlm import Logits
from lit_internvl.stages import ContrastiveStage, SFTStage
from lit_internvl.stages.options import GenerationOptions

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def _sft(**options) -> SFTStage:
    torch.manual_seed(0)
    options = {"warmup_steps": 1, "generation": GenerationOptions(max_new_tokens=3), **options}
    return SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny-shapes"), **options)  # fmt: skip


def _vqa(**options) -> ShapesDataModule:
    return ShapesDataModule(records="questions", tokenizer="shapes", train_size=8, val_size=4, batch_size=4, **options)


def _trainer(tmp_path, callbacks, steps=2, logger=True, **options) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False, callbacks=callbacks, **options,
    )  # fmt: skip


def _events(tmp_path) -> EventAccumulator:
    files = list(tmp_path.glob("tb/*/events.out.tfevents.*"))
    assert files, "no TensorBoard event file written"
    events = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


# -- the sample logger ----------------------------------------------------------------------------------------


def test_sample_logger_writes_the_generated_answers_and_references_of_sft_under_each_image(tmp_path):
    logger = SampleLogger(num_samples=3)
    data = _vqa()
    trainer = _trainer(tmp_path, [logger], limit_val_batches=1)
    # Near its random init (two steps at a tiny rate) the model answers with varied tokens; trained, with the end token.
    trainer.fit(_sft(learning_rate=1e-9), data)
    events = _events(tmp_path)
    images = events.Images("val/samples")
    assert len(images) == 1 and images[0].step == 2  # one validation, at the end of the epoch
    assert images[0].width == 3 * 168 and images[0].height > 168  # three cells with text under the images
    text = events.Tensors("val/samples_text/text_summary")[0].tensor_proto.string_val[0].decode()
    # the references are the validation samples' answers, and each row holds what the model generated
    val = data._dataset("val", 4, data.views)
    for index in range(3):
        answer = val[index]["views"]["conversation"]["meta"]["answer"]
        assert f"reference: {answer}" in text
    assert [row["reference"] for row in logger.rows] == [
        val[i]["views"]["conversation"]["meta"]["answer"] for i in range(3)
    ]
    assert all(row["lines"][1] == f"answer: {row['answer']}" for row in logger.rows)
    assert text.count("answer: ") == 3
    # and the question each answer answers, as the world asked it
    world = ShapesWorld(data.hparams.tile_size, data.hparams.seed, "val")
    assert [row["lines"][0] for row in logger.rows] == [f"question: {world.vqa(i)['question']}" for i in range(3)]
    # the prompt cut from each trained sample is the prompt the data builds for generation: same greedy tokens
    stage = trainer.lightning_module
    views = data.prompt_views()
    prompts = Collator(data.tokenizer.pad_id, views)([data._dataset("val", 4, views)[i] for i in range(3)])["prompt"]
    expected = generate(
        stage.model, prompts.input_ids, prompts.attention_mask, prompts.images, max_new_tokens=3,
        eos_id=data.tokenizer.eos_id, positions=prompts.positions,
    )  # fmt: skip
    assert [row["tokens"] for row in logger.rows] == expected


def test_sample_logger_shows_the_probes_predicted_class_and_mask(tmp_path):
    from lit_internvl.data import ShapesImagesDataModule
    from lit_internvl.stages import LinearProbeStage, SegmentationProbeStage

    torch.manual_seed(0)
    logger = SampleLogger(num_samples=3)
    data = ShapesImagesDataModule("objects", train_size=8, val_size=8, batch_size=8)
    _trainer(tmp_path, [logger], steps=1, limit_val_batches=1).fit(LinearProbeStage(InternViT, feature_cache=""), data)
    truths = [data.class_names[data.dataset("val")[i]["label"]] for i in range(3)]
    assert [row["lines"][1] for row in logger.rows] == [f"true: {t}" for t in truths]
    assert all(row["lines"][0].removeprefix("predicted: ") in data.class_names for row in logger.rows)

    data = ShapesImagesDataModule("scenes", mask_classes="colour", train_size=8, val_size=8, batch_size=8)
    _trainer(tmp_path, [logger], steps=1, limit_val_batches=1).fit(
        SegmentationProbeStage(InternViT, feature_cache=""), data
    )
    assert all(row["lines"][0].startswith("predicted mask: ") for row in logger.rows)
    assert len(_events(tmp_path).Images("val/samples")) >= 1


def test_sample_logger_lists_the_nearest_class_names_of_stage_1(tmp_path):
    torch.manual_seed(0)
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder("tiny"), embed_dim=16)
    logger = SampleLogger(num_samples=4, top_k=2)
    data = ShapesDataModule(train_size=8, val_size=8, batch_size=8)
    _trainer(tmp_path, [logger], steps=1, limit_val_batches=1).fit(stage, data)
    events = _events(tmp_path)
    assert len(events.Images("val/samples")) == 1
    text = events.Tensors("val/samples_text/text_summary")[0].tensor_proto.string_val[0].decode()
    classes = set(data.class_names)
    for row in logger.rows:
        assert row["truth"] in classes and len(row["nearest"]) == 2 and set(row["nearest"]) <= classes
        assert f"true: {row['truth']}" in text
    # the nearest are the argmax of the stage's own zero-shot scores on these images
    with torch.no_grad():
        batch = next(iter(data.val_dataloader()))
        image = stage.model.encode_image(batch["pair"].pixel_values[:4])
        best = (image @ stage.class_embeddings.T).argmax(dim=-1).tolist()
    assert [row["nearest"][0] for row in logger.rows] == [data.class_names[i] for i in best]


def test_sample_logger_needs_tensorboard(tmp_path):
    with pytest.raises(ValueError, match="trainer.logger"):
        _trainer(tmp_path, [SampleLogger()], logger=False).fit(_sft(), _vqa())


# -- the bad-sample report ------------------------------------------------------------------------------------


def test_bad_sample_report_lists_every_skipped_record_with_its_reason_split_and_epoch(tmp_path):
    from PIL import Image

    from lit_internvl.callbacks import BadSampleReport
    from lit_internvl.data import RecordsDataModule

    def conversation(image: str, answer: str = "red") -> str:
        turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": answer}]
        return json.dumps({"image": image, "conversations": turns})

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    lines = [
        conversation("ok.png"),
        '{"image": "ok.png", "conversations": [',  # line 2: malformed JSON, dropped when the file is indexed
        conversation("nowhere.png"),  # line 3: missing image, found when the sample is built
        conversation("ok.png", "x" * 600),  # line 4: over-long sample
        conversation("ok.png", "green"),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    stage = SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"), warmup_steps=1
    )
    data = RecordsDataModule(
        train=str(tmp_path / "data.jsonl"), val=str(tmp_path / "data.jsonl"), image_root=str(tmp_path),
        tile_size=56, max_tiles=1, batch_size=2, shuffle=False, max_length=512,
        max_skipped=1.0,  # 3 of 5 records bad on purpose: lenient beyond the default half
    )  # fmt: skip
    report = BadSampleReport()
    _trainer(tmp_path, [report], steps=4, logger=False, max_epochs=2).fit(stage, data)
    written = [json.loads(line) for line in Path(report.path).read_text().splitlines()]
    found = {(r["split"], r["epoch"], r["when"], r["name"], r["reason"]) for r in written}
    name = "data.jsonl:"  # as the skip logs name records: file and line
    expected = {("train", 0, "scan", f"{name}2", "malformed JSON"), ("val", 0, "scan", f"{name}2", "malformed JSON")}
    for split, epoch in (("train", 0), ("train", 1), ("val", 0), ("val", 1)):
        expected |= {
            (split, epoch, "batch", f"{name}3", "missing image"),
            (split, epoch, "batch", f"{name}4", "over-long sample"),
        }
    assert found == expected and len(written) == len(expected)  # each once, none more
    assert Path(report.path).parent == tmp_path


# -- the freeze schedule ------------------------------------------------------------------------------------


class _Watch(L.Callback):
    """The vision encoder's weights, trainability and the optimiser's groups after every step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.model.vision.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        vision = pl_module.model.vision
        optimizer = trainer.optimizers[0]
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.steps.append({
            "weights": {n: p.detach().clone() for n, p in vision.named_parameters()},
            "trainable": all(p.requires_grad for p in vision.parameters()),
            "in_optimizer": all(id(p) in in_optimizer for p in vision.parameters()),
            "lrs": [g["lr"] for g in optimizer.param_groups],
        })  # fmt: skip


@pytest.mark.parametrize("when", [{"at_step": 2}, {"at_epoch": 1}])
def test_freeze_schedule_trains_the_vision_encoder_from_the_switch_on_with_the_optimiser_stepping_it(tmp_path, when):
    from lit_internvl.callbacks import FreezeSchedule

    stage = _sft(trainable=["connector", "decoder"], learning_rate=1e-3, warmup_steps=0)
    watch = _Watch()
    schedule = FreezeSchedule(parts=["vision"], lr_factor=0.5, **when)
    _trainer(tmp_path, [schedule, watch], steps=4, logger=False, limit_val_batches=0).fit(
        stage, _vqa()
    )  # 2 steps an epoch
    before = watch.before
    frozen, trained = watch.steps[:2], watch.steps[2:]
    for step in frozen:
        assert not step["trainable"] and not step["in_optimizer"]
        assert all(torch.equal(before[n], w) for n, w in step["weights"].items())
    previous = frozen[-1]["weights"]
    for step in trained:
        assert step["trainable"] and step["in_optimizer"]
        moved = [n for n, w in step["weights"].items() if not torch.equal(previous[n], w)]
        assert len(moved) == len(before), f"not stepped: {sorted(set(before) - set(moved))}"
        previous = step["weights"]
    # two new groups (matrices with weight decay, vectors without) at half the rate, on the stage's schedule
    first, last = trained[0]["lrs"], trained[-1]["lrs"]
    assert len(first) == len(frozen[-1]["lrs"]) + 2
    assert first[-1] == pytest.approx(0.5 * first[0]) and last[-1] == pytest.approx(0.5 * last[0])
    assert last[0] < first[0]  # the cosine moved on, the new groups with it


def test_freeze_schedule_refuses_a_part_the_stage_already_trains(tmp_path):
    from lit_internvl.callbacks import FreezeSchedule

    with pytest.raises(ValueError, match="model.init_args.trainable"):
        _trainer(tmp_path, [FreezeSchedule(["vision"], at_step=1)], logger=False).fit(_sft(), _vqa())
    with pytest.raises(ValueError, match="exactly one of at_step"):
        FreezeSchedule(["vision"])


# -- export at the end of fit ----------------------------------------------------------------------------------


def test_export_at_fit_end_writes_a_folder_transformers_loads_with_the_trained_weights(tmp_path):
    from transformers import InternVLForConditionalGeneration

    from lit_internvl.callbacks import ExportAtFitEnd

    export = ExportAtFitEnd()
    stage = _sft()
    _trainer(tmp_path, [export], steps=2, limit_val_batches=0).fit(stage, _vqa())
    assert Path(export.path) == tmp_path / "tb" / "version_0" / "hf"
    exported = InternVLForConditionalGeneration.from_pretrained(export.path, attn_implementation="eager").eval()
    model = stage.model.eval()
    torch.manual_seed(1)
    input_ids = torch.tensor([[5, 6] + [model.image_context_id] * model.tokens_per_tile() + [7, 8, 9]])
    pixel_values = torch.randn(1, 3, model.tile_size, model.tile_size)
    with torch.no_grad():
        theirs = exported(input_ids=input_ids, pixel_values=pixel_values).logits
        ours = model(input_ids, pixel_values, head=Logits())
    assert (theirs - ours).abs().max() <= 1e-4  # the weights the run ended with, at the tile size it trained at


# -- the presets ------------------------------------------------------------------------------------------------


def test_the_presets_add_their_callbacks_to_a_recipe_and_keep_its_checkpointing():
    """``callbacks+:`` appends to the recipe's list (a plain ``callbacks:`` in a second config replaces it)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from lit_internvl.callbacks import BadSampleReport, ExportAtFitEnd, FreezeSchedule
    from lit_internvl.callbacks.throughput import TrainingThroughput
    from lit_internvl.cli import main

    presets = sorted((REPO / "callbacks").glob("*.yaml"))
    assert {p.name for p in presets} >= {"sample_logger.yaml", "export_at_end.yaml", "freeze_schedule.yaml",
                                         "bad_sample_report.yaml", "monitoring.yaml", "lr_monitor.yaml"}  # fmt: skip
    for preset in presets:
        text = preset.read_text()
        assert "callbacks+:" in text and f"--config callbacks/{preset.name}" in text, preset.name
    configs = [REPO / "recipes/sft.yaml", *presets]
    args = [a for c in configs for a in ("--config", str(c))] + ["--model.init_args.init_from", "null"]
    cli = main(args, run=False)
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {
        SampleLogger,
        ExportAtFitEnd,
        FreezeSchedule,
        BadSampleReport,
        TrainingThroughput,
        LearningRateMonitor,
    } <= kinds
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert [Path(c.dirpath).parts[-3:] for c in checkpoints] == [("runs", "sft", "checkpoints")] and checkpoints[
        0
    ].save_last
