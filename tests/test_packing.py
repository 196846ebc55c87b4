"""Packing: a packed row computes exactly what its samples compute one by one; the loss reductions
follow InternVL's per-sample weighting."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data.collate import Collator, first_fit
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.data.views import View
from lit_internvl.losses import language_model_loss, supervised_positions
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.vlm import Logits
from tests.tiny import record_of, tiny_vlm

TOKENIZER = ByteTokenizer()
VIEWS = (View("conversation", 4),)


def _model(backend: str) -> VisionLanguageModel:
    return tiny_vlm(TOKENIZER.token_to_id(IMG_CONTEXT), attn_backend=backend).eval()


def _sample(text: str, tiles: int, answer_from: int, seed: int) -> dict:
    ids = TOKENIZER.encode("<img>" + IMG_CONTEXT * (4 * tiles) + "</img>" + text if tiles else text)
    labels = [IGNORE_INDEX] * answer_from + ids[answer_from:]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(tiles, 3, 56, 56, generator=generator) if tiles else None
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels, "name": f"s{seed}",
            "budget": 4}  # fmt: skip


SAMPLES = [
    _sample("what is this? a red circle", 1, 10, 0),
    _sample("plain text only, every token trained", 0, 0, 1),
    _sample("two tiles: blue square", 2, 12, 2),
    _sample("short", 1, 7, 3),
]


def _one_by_one(model, sample):
    logits = model(sample["input_ids"][None], sample["pixel_values"], head=Logits())
    return logits[0]


def test_first_fit_respects_token_and_tile_bounds():
    rows = first_fit([5, 4, 3, 6, 2], [1, 0, 2, 1, 0], max_tokens=9, max_tiles_per_row=2)
    assert rows == [[0, 1], [2, 4], [3]]
    with pytest.raises(ValueError, match="exceeds max_tokens 9"):
        first_fit([10], [0], max_tokens=9, max_tiles_per_row=2)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_packed_logits_equal_samples_one_by_one(backend):
    model = _model(backend)
    batch = Collator(TOKENIZER.pad_id, VIEWS, pack=True, max_tokens=64, max_tiles_per_row=4)(
        [record_of(s) for s in SAMPLES]
    )
    assert batch["conversation"].input_ids.shape[0] < len(SAMPLES), "some samples share a row"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU warns that it runs unfused
        packed = model(
            batch["conversation"].input_ids, batch["conversation"].images, attention_mask=batch["conversation"].attention_mask,
            positions=batch["conversation"].positions, document_ids=batch["conversation"].document_ids, head=Logits(),
        )  # fmt: skip
        reference = [_one_by_one(model, s) for s in SAMPLES]
    seen = 0
    for r in range(batch["conversation"].input_ids.shape[0]):
        ids = batch["conversation"].document_ids[r]
        for document in ids.unique():
            if document < 0:
                continue
            span = ids == document
            row_ids = batch["conversation"].input_ids[r, span]
            match = [i for i, s in enumerate(SAMPLES) if torch.equal(s["input_ids"], row_ids)]
            assert len(match) == 1
            assert (packed[r, span] - reference[match[0]]).abs().max() <= 1e-5
            seen += 1
    assert seen == len(SAMPLES)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
@pytest.mark.parametrize("logits_at", ["every position", "supervised positions"])
def test_packed_loss_and_gradients_equal_samples_one_by_one(backend, reduction, logits_at):
    model = _model(backend)
    batch = Collator(TOKENIZER.pad_id, VIEWS, pack=True, max_tokens=64, max_tiles_per_row=4)(
        [record_of(s) for s in SAMPLES]
    )
    supervised = supervised_positions(batch["conversation"].labels, batch["conversation"].document_ids)
    logits = model(
        batch["conversation"].input_ids, batch["conversation"].images, attention_mask=batch["conversation"].attention_mask,
        positions=batch["conversation"].positions, document_ids=batch["conversation"].document_ids,
        head=Logits(supervised if logits_at == "supervised positions" else None),
    )  # fmt: skip
    assert logits.shape[0] == (
        int(supervised.sum()) if logits_at == "supervised positions" else batch["conversation"].input_ids.shape[0]
    )
    packed_loss = language_model_loss(
        logits, batch["conversation"].labels, batch["conversation"].document_ids, reduction
    )
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()), allow_unused=True)

    # The same loss by hand: per-sample summed cross-entropy and supervised-token counts.
    sums, counts = [], []
    for sample in SAMPLES:
        sample_logits = _one_by_one(model, sample)
        targets = sample["labels"][1:]
        keep = targets != IGNORE_INDEX
        sums.append(F.cross_entropy(sample_logits[:-1][keep], targets[keep], reduction="sum"))
        counts.append(int(keep.sum()))
    weight = {"token": lambda x: 1.0, "sample": lambda x: 1.0 / x, "square": lambda x: 1.0 / math.sqrt(x)}[reduction]
    by_hand = sum(s * weight(x) for s, x in zip(sums, counts)) / sum(x * weight(x) for x in counts)
    hand_grads = torch.autograd.grad(by_hand, list(model.parameters()), allow_unused=True)

    assert abs(packed_loss.item() - by_hand.item()) <= 1e-5
    for a, b in zip(packed_grads, hand_grads):
        if a is None:
            assert b is None
            continue
        assert (a - b).abs().max() <= 1e-5


def test_reductions_on_a_hand_computed_case():
    # Two documents in one row: A has 1 supervised target, B has 4. With uniform logits every
    # token's cross-entropy is log(V); then one of B's targets is made cheaper.
    vocab = 5
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, 2, 3, 4, 0]])
    document_ids = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    logits = torch.zeros(1, 7, vocab)
    per_token = torch.full((7,), math.log(vocab))
    # Targets: position 0 → label 1 (doc A); position 1 → crosses into doc B (ignored);
    # positions 2..5 → labels 2,3,4,0 (doc B); position 6 → end (ignored).
    ce_a, ce_b = per_token[0].item(), per_token[2].item()
    x_a, x_b = 1, 4
    expected = {
        "token": (ce_a * x_a + ce_b * x_b) / (x_a + x_b),
        "sample": (ce_a + ce_b) / 2,
        "square": (ce_a * x_a / math.sqrt(x_a) + ce_b * x_b / math.sqrt(x_b))
        / (x_a / math.sqrt(x_a) + x_b / math.sqrt(x_b)),
    }
    for reduction, value in expected.items():
        assert language_model_loss(logits, labels, document_ids, reduction).item() == pytest.approx(value)
    # Now make document B different: its first target (label 2) gets logit 3.
    logits[0, 2, 2] = 3.0
    ce_b_first = -torch.log_softmax(logits[0, 2], -1)[2].item()
    sum_b = ce_b_first + 3 * math.log(vocab)
    assert language_model_loss(logits, labels, document_ids, "sample").item() == pytest.approx((ce_a + sum_b / 4) / 2)
    assert language_model_loss(logits, labels, document_ids, "token").item() == pytest.approx((ce_a + sum_b) / 5)


def test_a_batch_with_nothing_to_learn_is_an_error():
    labels = torch.full((1, 4), IGNORE_INDEX)
    with pytest.raises(ValueError, match="no supervised token"):
        language_model_loss(torch.zeros(1, 4, 3), labels)
    with pytest.raises(ValueError, match="Unknown loss reduction 'mean'"):
        language_model_loss(torch.zeros(1, 4, 3), labels, reduction="mean")


def test_logits_of_the_wrong_positions_are_an_error():
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX]])  # two supervised targets (positions 0 and 1)
    with pytest.raises(ValueError, match="logits for 3 positions but the labels supervise 2"):
        language_model_loss(torch.zeros(3, 5), labels)
