"""The analytic FLOP count equals what torch's FlopCounterMode counts, packed documents are counted by their
own lengths, and the throughput callback logs samples/s, tokens/s, MFU and peak memory."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from lit_internvl.callbacks.throughput import TrainingThroughput, count_samples, count_tokens
from lit_internvl.components import Decoder, InternViT, InternViTConfig, LanguageConfig, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.flops import batch_flops, document_lengths, vlm_flops
from lit_internvl.models import VisionLanguageModel
from lit_internvl.stages import SFTStage

CONTEXT = ByteTokenizer().token_to_id(IMG_CONTEXT)


def _vlm(backend: str = "eager") -> VisionLanguageModel:
    # eager attention is plain matmuls, which FlopCounterMode counts (CPU SDPA kernels are not in its table)
    torch.manual_seed(0)
    vision = InternViT(InternViTConfig.from_name("tiny", attn_backend=backend))
    decoder = Decoder(LanguageConfig.from_name("tiny", attn_backend=backend))
    return VisionLanguageModel(vision, PixelShuffleMLP(128, 128), decoder, CONTEXT)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_count_equals_flop_counter_mode_forward_and_training():
    model = _vlm()
    ids = torch.randint(0, 256, (2, 40))
    ids[:, 3:7] = CONTEXT  # one tile of 4 tokens per row
    pixels = torch.randn(2, 3, 56, 56)
    count = vlm_flops(model, [40, 40], tiles=2)
    assert count.attention > 0 and count.no_input_grad > 0
    assert _counted(lambda: model(ids, pixels)) == count.forward
    assert _counted(lambda: model(ids, pixels).float().sum().backward()) == count.training


def test_packed_documents_count_their_own_attention():
    """A packed row costs what its documents cost one by one, not the square of the row."""
    model = _vlm()
    documents = [torch.randint(0, 256, (n,)) for n in (7, 19, 12)]
    alone = sum(_counted(lambda d=d: model(d[None])) for d in documents)
    samples = [{"input_ids": d, "labels": d, "pixel_values": None, "name": f"doc{i}"} for i, d in enumerate(documents)]
    batch = Collator(pad_id=0, pack=True, max_tokens=64)(samples)
    assert batch["input_ids"].shape[0] == 1 and document_lengths(batch["attention_mask"], batch["document_ids"]) == [
        7,
        19,
        12,
    ]
    assert batch_flops(model, batch).forward == alone
    whole_row = vlm_flops(model, [38], tiles=0).forward
    assert whole_row > alone
    assert count_samples(batch) == 3 and count_tokens(batch) == 38


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_throughput_callback_logs_tokens_samples_mfu_and_peak_memory(tmp_path, one_thread):
    torch.manual_seed(0)
    stage = SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"),
                     image_context_id=CONTEXT, warmup_steps=1)  # fmt: skip
    data = ShapesDataModule(task="vqa", train_size=16, val_size=4, batch_size=4)
    peak = 1e12  # a CPU has no entry in Lightning's table of peak FLOP/s
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[TrainingThroughput(window_size=2, available_flops=peak)],
    )  # fmt: skip
    trainer.fit(stage, data)
    rows = list(csv.DictReader(open(next(tmp_path.glob("run/*/metrics.csv")))))
    logged = [r for r in rows if r.get("train/device/mfu")]
    assert len(logged) >= 2
    for row in logged:
        flops_per_sec = float(row["train/device/flops_per_sec"])
        assert float(row["train/device/mfu"]) == pytest.approx(flops_per_sec / peak)
        tokens_per_sample = float(row["train/device/items_per_sec"]) / float(row["train/device/samples_per_sec"])
        assert 50 < tokens_per_sample < 400  # chat template, a shapes question, its image tokens and its answer
    peaks = [float(r["train/peak_memory_gib"]) for r in rows if r.get("train/peak_memory_gib")]
    assert peaks and all(0.05 < p < 64 for p in peaks)


@pytest.mark.parametrize("image_pooling", ["cls", "attention"])
def test_dual_encoder_flops_equal_flop_counter_mode(image_pooling):
    from lit_internvl.components import TextEncoder
    from lit_internvl.models import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(
        InternViT(InternViTConfig.from_name("tiny", attn_backend="eager")),
        TextEncoder(LanguageConfig.from_name("tiny", attn_backend="eager")),
        image_pooling=image_pooling,
    )
    batch = {"pixel_values": torch.randn(3, 3, 56, 56), "input_ids": torch.randint(0, 256, (3, 20))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    # The math kernel runs attention pooling's scaled_dot_product_attention as matmuls the counter sees.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        counted = _counted(lambda: model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))
    assert batch_flops(model, batch).forward == counted
