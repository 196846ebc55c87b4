"""The analytic FLOP count equals what torch's FlopCounterMode counts, packed documents are counted by their
own lengths, and the throughput callback logs samples/s, tokens/s, MFU and peak memory."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from lit_internvl.batch import PairBatch, Views
from lit_internvl.callbacks.throughput import TrainingThroughput, count_samples, count_tokens
from lit_internvl.components import Decoder, InternViT, InternViTConfig, LanguageConfig, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.data.views import View
from lit_internvl.flops import batch_flops, document_lengths, vlm_flops
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.vlm import Logits
from lit_internvl.stages import SFTStage
from tests.tiny import record_of, tiny_vlm

CONTEXT = ByteTokenizer().token_to_id(IMG_CONTEXT)


def _vlm(backend: str = "eager") -> VisionLanguageModel:
    # eager attention is plain matmuls, which FlopCounterMode counts (CPU SDPA kernels are not in its table)
    return tiny_vlm(CONTEXT, attn_backend=backend, vision_backend=backend)


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
    assert _counted(lambda: model(ids, pixels, head=Logits())) == count.forward
    assert _counted(lambda: model(ids, pixels, head=Logits()).float().sum().backward()) == count.training


def test_packed_documents_count_their_own_attention():
    """A packed row costs what its documents cost one by one, not the square of the row."""
    model = _vlm()
    documents = [torch.randint(0, 256, (n,)) for n in (7, 19, 12)]
    alone = sum(_counted(lambda d=d: model(d[None], head=Logits())) for d in documents)
    samples = [
        record_of({"input_ids": d, "labels": d, "pixel_values": None, "name": f"doc{i}", "budget": 4})
        for i, d in enumerate(documents)
    ]
    batch = Collator(0, (View("conversation", 4),), pack=True, max_tokens=64)(samples)
    row = batch["conversation"]
    assert row.input_ids.shape[0] == 1 and document_lengths(row.attention_mask, row.document_ids) == [7, 19, 12]
    assert batch_flops(model, batch).forward == alone
    whole_row = vlm_flops(model, [38], tiles=0).forward
    assert whole_row > alone
    assert count_samples(batch) == 3 and count_tokens(batch) == 38


def test_throughput_callback_logs_tokens_samples_mfu_and_peak_memory(tmp_path, one_thread):
    torch.manual_seed(0)
    stage = SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"),
                     image_context_id=CONTEXT, warmup_steps=1)  # fmt: skip
    data = ShapesDataModule(records="questions", train_size=16, val_size=4, batch_size=4)
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
    pixels, ids = torch.randn(3, 3, 56, 56), torch.randint(0, 256, (3, 20))
    mask = torch.ones_like(ids)
    # The math kernel runs attention pooling's scaled_dot_product_attention as matmuls the counter sees.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        counted = _counted(lambda: model(pixels, ids, mask))
    empty = torch.zeros(3, 0, dtype=torch.long)
    pairs = PairBatch(pixels, ids, mask, empty, empty, empty, empty, empty, empty, empty, empty, ["a", "b", "c"])
    assert batch_flops(model, Views({"pair": pairs})).forward == counted


# -- the peak table and MFU -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA H200", "bf16", 989.4),  # Lightning's table: None for this name
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
        ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA A100-SXM4-40GB", "fp8", None),  # no fp8 on Ampere
        ("NVIDIA GeForce GTX 1080", "bf16", None),
    ],
)
def test_peak_table_finds_dense_peaks_by_device_name(name, precision, tflops):
    from lit_internvl.flops import peak_flops

    assert peak_flops(name, precision) == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_mfu_of_internvl3_1b_decoder_equals_a_hand_count():
    """InternVL3-1B's decoder on one 8,192-token document for 0.1 s on an H200, counted by hand."""
    from lit_internvl.flops import mfu, peak_flops, transformer_flops

    # per layer: q and o 896², k and v 896·128, gate/up/down 3·896·4864; 24 layers; head 896·151,674
    weights = 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) + 896 * 151674
    attention = 24 * 4 * 8192 * 8192 * 896  # scores and weighted sum, 14 heads of 64
    training = 3 * (2 * weights * 8192 + attention)
    count = transformer_flops(LanguageConfig.from_name("InternVL3-1B"), [8192])
    assert count.training == training
    assert mfu(count.training, 0.1, peak_flops("NVIDIA H200", "bf16")) == pytest.approx(training / 0.1 / 989.4e12)
    assert mfu(count.training, 0.1, None) is None


def test_throughput_callback_reports_mfu_on_an_h200(monkeypatch):
    """On "NVIDIA H200" in bf16 the callback's peak is the table's dense 989.4 TFLOP/s (the device is faked)."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.trainer.states import RunningStage

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    trainer = SimpleNamespace(
        precision_plugin=MixedPrecision("bf16-mixed", "cuda"), strategy=SimpleNamespace(root_device=torch.device("cuda")),
        enable_validation=False, world_size=1, state=SimpleNamespace(stage=RunningStage.TRAINING),
    )  # fmt: skip
    callback = TrainingThroughput()
    callback.setup(trainer, None, "fit")
    assert callback.available_flops == pytest.approx(989.4e12)
    assert callback._throughputs[RunningStage.TRAINING].available_flops == pytest.approx(989.4e12)
