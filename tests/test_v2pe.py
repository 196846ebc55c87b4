"""V2PE (OpenGVLab/V2PE, ``internvl_chat_finetune.py`` ``get_rope_pos_id``): the positions of a hand-written
sample, their path through collation, packing and bf16 autocast, plain RoPE at δ = 1, the seeded random
strides, and cached generation that continues them."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image

from lit_internvl.data.collate import Collator
from lit_internvl.data.records import Record
from lit_internvl.data.samples import SampleBuilder, SampleOptions, split_points
from lit_internvl.data.tokenizer import IMG_CONTEXT, IMG_START, ByteTokenizer
from lit_internvl.data.v2pe import RANDOM_STRIDES, check_v2pe, image_runs
from lit_internvl.data.views import View
from lit_internvl.inference.generate import generate
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.vlm import Logits
from tests.tiny import record_of, tiny_vlm

TOKENIZER = ByteTokenizer()
CONTEXT = TOKENIZER.token_to_id(IMG_CONTEXT)


def _builder(v2pe, **options):
    """Records → their conversation view at 4 tokens a tile (a split document: its parts, each that view)."""
    options = dict(tile_size=56, max_tiles=4, use_thumbnail=True, strict=True) | options
    builder = SampleBuilder(TOKENIZER, SampleOptions(v2pe=v2pe, **options), (View("conversation", 4),))

    def build(record: Record) -> dict:
        out = builder(record)
        if "parts" in out:
            return {**out, "parts": [part["views"]["conversation"] for part in out["parts"]]}
        return out["views"]["conversation"]

    return build


def _collate(samples: list[dict], prompt: bool = False, whole: bool = False, **options):
    """Samples of :func:`_builder` in one batch (``prompt``: left-padded, as prompts to answer); ``whole``: the
    loader's :class:`~lit_internvl.batch.Views`, skips and all."""
    view = View("prompt" if prompt else "conversation", 4)
    records = [
        {**s, "parts": [record_of(p) for p in s["parts"]]} if "parts" in s else record_of(s, view.name) for s in samples
    ]
    views = Collator(TOKENIZER.pad_id, (view,), **options)(records)
    return views if whole else views[view.name]


def _document(name: str = "doc") -> Record:
    """Text, an image of 2 tiles + thumbnail (12 tokens), text, an image of 1 tile (4 tokens), text."""
    wide, square = Image.new("RGB", (112, 56), "red"), Image.new("RGB", (56, 56), "blue")
    return Record("interleaved", name, {"texts": ["ab<image>", "c<image>d"]}, [wide, square])


def _text(name: str = "text") -> Record:
    return Record("text", name, {"text": "xy"}, [])


def _reference_positions(input_ids: list[int], tiles: list[int], strides: list[int], tokens_per_tile: int = 4):
    """The reference's loop (get_rope_pos_id, lines 555-624) written out, with its float arange; its
    ``stride / num_image_token`` is ``stride / 256`` (every released InternVL has 256 tokens a tile, and
    lit_internvl divides by 256 whatever a tiny model's ``tokens_per_tile``)."""
    ids = torch.tensor(input_ids)
    starts = torch.where(ids == TOKENIZER.token_to_id(IMG_START))[0]
    out, last, start = [], -1, 0
    for i, (num_tile, stride) in enumerate(zip(tiles, strides)):
        pre = torch.arange(int(starts[i]) + 1 - start) + (last + 1)
        out.append(pre.float())
        last = int(pre[-1])
        small = stride / 256
        count = tokens_per_tile * num_tile
        image = torch.arange(last, last + small * (count + 1), small)[1 : count + 1].float()
        out.append(image)
        last = math.ceil(image[-1].item())
        start = int(starts[i]) + count + 1
    out.append((torch.arange(len(input_ids) - start) + last + 1).float())
    return torch.cat(out)


def _expected(stride: int) -> list[float]:
    """By hand: a b <img> 12×ctx </img> ' ' c <img> 4×ctx </img> d <eos>, δ = S/256."""
    d = stride / 256
    first = [2 + k * d for k in range(1, 13)]
    close = math.ceil(first[-1]) + 1  # </img>
    second_open = close + 3  # ' ', 'c', '<img>'
    second = [second_open + k * d for k in range(1, 5)]
    after = math.ceil(second[-1]) + 1
    return [0, 1, 2, *first, close, close + 1, close + 2, second_open, *second, after, after + 1, after + 2]


def test_the_sample_is_what_the_hand_computed_lists_assume():
    sample = _builder("off")(_document())
    ids = sample["input_ids"].tolist()
    assert sample["pixel_values"].shape[0] == 4, "2 tiles + a thumbnail, then 1 tile"
    assert [end - start for start, end in image_runs(ids, CONTEXT)] == [12, 4]
    assert TOKENIZER.decode(ids[:3]) == "ab" + IMG_START and TOKENIZER.decode(ids[-2:-1]) == "d"
    assert sample["positions"] is None, "off: the collator numbers the tokens"


@pytest.mark.parametrize("stride", [256, 64, 1])
def test_positions_of_a_packed_hand_written_sample_equal_the_hand_computed_list(stride):
    builder = _builder({"stride": stride})
    document, text = builder(_document()), builder(_text())
    expected = _expected(stride)
    assert document["positions"].tolist() == expected
    if stride == 256:
        assert expected == list(range(26)), "S = 256 is plain RoPE"
    if stride == 64:
        assert expected[2:17] == [2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.25, 4.5, 4.75, 5, 6, 7]
    ids = document["input_ids"].tolist()
    assert document["positions"].tolist() == _reference_positions(ids, [3, 1], [stride, stride]).tolist()
    # Packed after a second document, each restarts and keeps its own positions through collation.
    batch = _collate(pack=True, max_tokens=64, samples=[document, text])
    assert batch.positions.dtype == torch.float32
    assert batch.positions[0, : len(expected) + 3].tolist() == expected + [0, 1, 2]
    assert batch.document_ids[0, : len(expected) + 3].tolist() == [0] * len(expected) + [1, 1, 1]


def test_random_strides_are_drawn_per_image_and_seeded_per_record():
    builder = _builder("random", seed=3)

    def strides(name: str) -> list[int]:
        sample = builder(_document(name))
        positions, runs = sample["positions"], image_runs(sample["input_ids"].tolist(), CONTEXT)
        return [round((positions[start + 1] - positions[start]).item() * 256) for start, _ in runs]

    drawn = {name: strides(name) for name in (f"doc{i}" for i in range(40))}
    for name, pair in drawn.items():
        rng = random.Random(f"3/v2pe/{name}")  # the record's own seeded draw, one per image in order
        assert pair == [rng.choice(RANDOM_STRIDES), rng.choice(RANDOM_STRIDES)]
        assert strides(name) == pair, "the same record draws the same strides again"
    assert any(a != b for a, b in drawn.values()), "each image draws its own stride"
    assert len({s for pair in drawn.values() for s in pair}) >= 6
    ids = builder(_document("doc0"))["input_ids"].tolist()
    assert builder(_document("doc0"))["positions"].tolist() == _reference_positions(ids, [3, 1], drawn["doc0"]).tolist()


def test_bad_settings_name_the_option():
    for bad in ("on", {"stride": 0}, {"stride": 512}, {"step": 64}):
        with pytest.raises(ValueError, match="v2pe"):
            check_v2pe(bad)
    assert check_v2pe(None) == "off"


def _model() -> VisionLanguageModel:
    return tiny_vlm(CONTEXT).eval()


def test_delta_one_gives_the_logits_of_plain_rope_exactly():
    model = _model()
    plain = _collate(samples=[_builder("off")(_document())])
    v2pe = _collate(samples=[_builder({"stride": 256})(_document())])
    assert torch.equal(plain.positions, v2pe.positions)
    with torch.no_grad():
        a = model(plain.input_ids, plain.images, positions=plain.positions, head=Logits())
        b = model(v2pe.input_ids, v2pe.images, positions=v2pe.positions, head=Logits())
        c = model(plain.input_ids, plain.images, head=Logits())  # the decoder's own 0..L-1
        fractional = _collate(samples=[_builder({"stride": 16})(_document())])
        d = model(fractional.input_ids, fractional.images, positions=fractional.positions, head=Logits())
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, d), "fractional positions change the logits (the test can fail)"


def test_positions_survive_bf16_autocast_bit_exact():
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = _model()
    batch = _collate(samples=[_builder({"stride": 1})(_document())])
    batch = MixedPrecision("bf16-mixed", "cpu").convert_input(batch)  # what Lightning does to a batch
    assert batch.positions.dtype == torch.float32
    seen = []
    hook = model.decoder.rotary.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(
            batch.input_ids,
            batch.images,
            positions=batch.positions,
        )
    hook.remove()
    (positions, (cos, sin)), *_ = seen
    assert positions.dtype == torch.float32 and torch.equal(positions, batch.positions)
    assert cos.dtype == torch.float32
    angles = batch.positions.double()[..., None] * model.decoder.rotary.inv_freq.double()
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    assert (cos.double() - angles.cos()).abs().max() < 1e-6, "the angles are float32, not bf16-rounded"
    assert torch.bfloat16 != positions.dtype and torch.tensor(2 + 1 / 256, dtype=torch.bfloat16).item() == 2.0, (
        "bf16 would have rounded 2 + 1/256 to 2"
    )


def test_cached_generation_equals_uncached_and_continues_the_v2pe_positions():
    model = _model()
    prompts = [_builder({"stride": 64})(_document(f"p{i}")) for i in range(2)]
    prompts[1] = _builder({"stride": 16})(_document("p1"))
    batch = _collate(prompt=True, samples=prompts)
    kwargs = dict(max_new_tokens=6, positions=batch.positions)
    args = (
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.images,
    )
    cached, uncached = generate(*args, **kwargs), generate(*args, use_cache=False, **kwargs)
    assert cached == uncached
    # By hand: the answer's tokens take the positions after the prompt's last (text) position, one by one.
    for row, tokens in enumerate(cached):
        length = len(prompts[row]["input_ids"])
        ids = prompts[row]["input_ids"].tolist()
        positions = prompts[row]["positions"].tolist()
        pixels = prompts[row]["pixel_values"]
        for token in tokens:
            with torch.no_grad():
                logits = model(torch.tensor([ids]), pixels, positions=torch.tensor([positions]), head=Logits())
            assert logits[0, -1].argmax().item() == token
            ids, positions = ids + [token], positions + [positions[-1] + 1]
        assert len(ids) == length + len(tokens)
    off = _collate(prompt=True, samples=[_builder("off")(_document("p0"))])
    plain = generate(model, off.input_ids, off.attention_mask, off.images, max_new_tokens=6)
    assert plain == generate(model, off.input_ids, off.attention_mask, off.images, max_new_tokens=6,
                             positions=off.positions)  # fmt: skip


def test_split_points_cut_between_images_never_inside_a_span():
    # 30 tokens; images' context runs at 5..9 (span 4..10) and 20..24 (span 19..25).
    runs = [(5, 10), (20, 25)]
    assert split_points(30, runs, 12) == [0, 12, 19, 30], "12 is outside every span; 24 falls in the second"
    assert split_points(30, runs, 8) == [0, 4, 12, 19, 27, 30]
    with pytest.raises(ValueError, match="does not fit max_length"):
        split_points(30, runs, 5)


def test_an_over_long_document_is_split_between_images_keeping_its_positions():
    builder = _builder({"stride": 64}, max_length=20, split_long=True)
    whole = _builder({"stride": 64})(_document())
    split = builder(_document())
    parts = split["parts"]
    assert [len(p["input_ids"]) for p in parts] == [18, 8], "cut before the second image's <img> at 18"
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
    assert torch.equal(torch.cat([p["positions"] for p in parts]), whole["positions"]), "each part keeps its own"
    assert [p["pixel_values"].shape[0] for p in parts] == [3, 1]
    batch = _collate(pack=True, max_tokens=20, samples=[split])
    assert batch.tiles_per_sample == [3, 1] and batch.positions[1, 0].item() == whole["positions"][18].item()
    # A part with nothing to train is dropped and counted.
    masked = _builder("off", max_length=6, split_long=True)
    record = Record("interleaved", "img-only", {"texts": ["<image>", "<image> more text here"]},
                    [Image.new("RGB", (56, 56)), Image.new("RGB", (56, 56))])  # fmt: skip
    sample = masked(record)  # <img>4</img> ' ' <img>4</img> " more text here" <eos>: 29 tokens
    assert [len(p["input_ids"]) for p in sample["parts"]] == [6, 6, 4], "the trained text"
    assert sample["dropped"] == 3, "the two image spans alone and the ' ' between them (no target within)"
    assert _collate(samples=[sample], whole=True).skipped == {"empty split part": 3}
    safe = SampleBuilder(TOKENIZER, SampleOptions(max_length=6, tile_size=56), (View("conversation", 4),)).safe
    assert safe(record)["skipped"] == "over-long sample", "off without split_long"
