"""Image–caption pairs for stages 1–2, as InternVL's internvl_g builds them: the caption forms
(``summarize:`` ITC text, ITM text and its negative, ``English caption:`` ITG text), the reference's caption
normalisation, the negative of another image, one key per image, and the same pair batch from jsonl, meta
files, prepared shards and the shapes world."""

import json
import logging
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from lit_internvl.batch import Views
from lit_internvl.data import RecordsDataModule, ShapesDataModule
from lit_internvl.data.pairs import CaptionForms, caption_sample, itc_ids, normalize_caption, pair_image
from lit_internvl.data.records import BadRecord, parse_record
from lit_internvl.data.tokenizer import ByteTokenizer
from lit_internvl.tools.prepare import main as prepare_main
from tests.tiny import asked

END, PAD = 258, 256  # the byte tokenizer's <|im_end|> and <|endoftext|>
TINY = dict(tile_size=28, batch_size=4, shuffle=False)
BATCH_KEYS = {
    "pixel_values", "input_ids", "attention_mask", "itm_ids", "itm_mask", "negative_ids", "negative_mask",
    "itg_ids", "itg_mask", "itg_labels", "label", "caption_key", "image_id", "sample_names", "skipped",
    "skipped_records",
}  # fmt: skip


# -- caption forms ------------------------------------------------------------------------------


def test_caption_forms_are_internvls_texts_with_the_end_token():
    """ITC = "summarize:" + caption + end; ITM = caption + end; ITG = "English caption:" + caption + end with
    the prefix unsupervised and the labels unshifted (internvl_g/internvl/train/dataset.py:80-132)."""
    tokenizer = ByteTokenizer()
    forms = caption_sample("A dog.", tokenizer, CaptionForms())
    texts = {key: tokenizer.decode(ids) for key, ids in forms.items() if key != "itg_labels"}
    assert texts == {
        "input_ids": "summarize:a dog<|im_end|>",
        "itm_ids": "a dog<|im_end|>",
        "itg_ids": "English caption:a dog<|im_end|>",
    }
    assert forms["itm_ids"] == [97, 32, 100, 111, 103, END]  # "a dog": lower-cased, the full stop gone
    assert forms["input_ids"] == [115, 117, 109, 109, 97, 114, 105, 122, 101, 58, 97, 32, 100, 111, 103, END]
    prefix = [69, 110, 103, 108, 105, 115, 104, 32, 99, 97, 112, 116, 105, 111, 110, 58]  # "English caption:"
    assert forms["itg_ids"] == [*prefix, 97, 32, 100, 111, 103, END]
    assert forms["itg_labels"] == [-100] * 16 + [97, 32, 100, 111, 103, END]


def test_forms_follow_their_options_and_prompts_are_not_normalised():
    tokenizer = ByteTokenizer()
    forms = CaptionForms(itc_prefix="", itg_prefix="Caption: ", normalize=False)
    sample = caption_sample("A Dog.", tokenizer, forms)
    assert tokenizer.decode(sample["input_ids"]) == "A Dog.<|im_end|>"
    assert tokenizer.decode(sample["itg_ids"]) == "Caption: A Dog.<|im_end|>"
    assert sample["itg_labels"][:9] == [-100] * 9 and sample["itg_labels"][9] == ord("A")
    prompt = itc_ids("a photo of a Dog.", tokenizer)
    assert tokenizer.decode(prompt) == "summarize:a photo of a Dog.<|im_end|>"
    assert (
        itc_ids("a photo of a Dog.", tokenizer, normalize=True)
        == caption_sample("a photo of a Dog.", tokenizer)["input_ids"]
    )


def test_caption_normalisation_is_the_references_process_single_caption():
    # by hand: lower-case; . ! " ( ) * # : ; ~ → spaces; ≥ 2 whitespace → one space; strip
    caption = 'A  "Man" (riding) a Horse; over:the~hill!!\n'
    assert normalize_caption(caption) == "a man riding a horse over the hill"
    assert normalize_caption("one*two#three") == "one two three"
    words = [f"w{i}" for i in range(60)]
    assert normalize_caption(" ".join(words)) == " ".join(words[:50])
    assert normalize_caption(" ".join(words), max_words=3) == "w0 w1 w2"
    with pytest.raises(ValueError, match="empty"):
        caption_sample("...", ByteTokenizer())


def test_a_record_with_one_image_and_several_texts_is_a_pair_and_a_document_is_not():
    assert parse_record({"image": "a.png", "texts": ["x", "y"]}, "r:1").kind == "pair"
    document = {"images": ["a.png"], "texts": ["<image> x"]}
    assert parse_record(document, "r:2").kind == "interleaved"
    with pytest.raises(BadRecord, match="malformed"):
        parse_record({"image": "a.png", "texts": ["x", ""]}, "r:3")


# -- records ------------------------------------------------------------------------------------


def _image(path, seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _write(folder, records, images=12):
    """``records`` as ``folder/pairs.jsonl``, images ``folder/img{i}.png`` (distinct noise, 40×32)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        _image(folder / f"img{i}.png", i)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _grouped_records():
    """12 images: image 0 with three captions in one record and a fourth in a record that repeats its path;
    the others one caption each and the label of the image."""
    records = [{"image": "img0.png", "texts": ["zero a", "Zero b.", "zero c"], "label": 0}]
    records += [{"image": f"img{i}.png", "text": f"caption {i}", "label": i % 3} for i in range(1, 12)]
    records.append({"image": "img0.png", "text": "zero d", "label": 0})
    return records


def _assert_contract(batch, size, tile=28):
    assert set(batch) == BATCH_KEYS
    assert batch["pixel_values"].shape == (size, 3, tile, tile) and batch["pixel_values"].dtype == torch.float32
    for ids, mask in [("input_ids", "attention_mask"), ("itm_ids", "itm_mask"), ("negative_ids", "negative_mask"),
                      ("itg_ids", "itg_mask")]:  # fmt: skip
        assert batch[ids].shape == batch[mask].shape and batch[ids].shape[0] == size
        assert (batch[ids][batch[mask] == 0] == PAD).all(), "right-padded with pad_id"
        lengths = batch[mask].sum(1)
        assert (batch[ids][torch.arange(size), lengths - 1] == END).all(), "each text ends with the end token"
        assert (batch[mask].cummin(1).values == batch[mask]).all(), "padding only on the right"
    assert batch["itg_labels"].shape == batch["itg_ids"].shape
    assert (batch["itg_labels"][batch["itg_mask"] == 0] == -100).all()
    supervised = batch["itg_labels"] != -100
    assert torch.equal(batch["itg_labels"][supervised], batch["itg_ids"][supervised]), "labels unshifted"
    assert (batch["itg_labels"][:, :16] == -100).all(), "the 'English caption:' prefix is not supervised"
    for key in ("label", "caption_key", "image_id"):
        assert batch[key].shape == (size,) and batch[key].dtype == torch.long


def _all(loader):
    return [_fields(b) for b in loader]


def _fields(batch: Views) -> dict:
    """A pair loader's batch read as one dict: the pair view's fields, the negative view's texts, the skips."""
    if batch.empty:
        return {"skipped": batch.skipped, "skipped_records": batch.skipped_records}
    negative = batch["negative"]
    return {
        **{f.name: getattr(batch["pair"], f.name) for f in fields(batch["pair"])},
        "negative_ids": negative.input_ids, "negative_mask": negative.attention_mask,
        "skipped": batch.skipped, "skipped_records": batch.skipped_records,
    }  # fmt: skip


def pairs(**options) -> RecordsDataModule:
    """Image–caption records asked for pairs and ITM's negatives, as stage 2 asks."""
    return asked(RecordsDataModule(**options), "pair", "negative")


def test_jsonl_pairs_give_one_sample_per_caption_and_one_key_per_image(tmp_path):
    path = _write(tmp_path, _grouped_records())
    dm = pairs(train=str(path), val=str(path), **TINY)
    batches = _all(dm.val_dataloader())
    for b in batches:
        _assert_contract(b, len(b["label"]))
    names = [n for b in batches for n in b["sample_names"]]
    assert len(names) == 15 and names[:3] == ["pairs.jsonl:1#0", "pairs.jsonl:1#1", "pairs.jsonl:1#2"]
    keys = torch.cat([b["caption_key"] for b in batches])
    image_ids = torch.cat([b["image_id"] for b in batches])
    assert torch.equal(keys, image_ids)
    assert keys[[0, 1, 2, 14]].unique().numel() == 1, "every caption of image 0, the repeated path too"
    assert keys[3:14].unique().numel() == 11 and keys[0] not in keys[3:14]
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 0, 0, *(i % 3 for i in range(1, 12)), 0]
    decoded = dm.tokenizer.decode(batches[0]["itm_ids"][1][batches[0]["itm_mask"][1] == 1])
    assert decoded == "zero b<|im_end|>", "captions are normalised"


def _text(batch, name, row):
    ids, mask = (
        (batch["input_ids"], batch["attention_mask"])
        if name == "itc"
        else (batch[f"{name}_ids"], batch[f"{name}_mask"])
    )
    return ByteTokenizer().decode(ids[row][mask[row] == 1])


def test_the_negative_is_another_images_caption_drawn_repeatably(tmp_path):
    """As InternVL's dataset (dataset.py:137-140): a caption of another image, drawn uniformly; here seeded by
    (seed, index), so a run and its resumption draw the same."""
    path = _write(tmp_path, _grouped_records())

    def draws(seed):
        dm = pairs(train=str(path), val=str(path), seed=seed, **TINY)
        rows = []
        for b in map(_fields, dm.val_dataloader()):
            rows += [
                (_text(b, "itm", i), _text(b, "negative", i), int(b["caption_key"][i])) for i in range(len(b["label"]))
            ]
        return rows

    rows = draws(0)
    key_of = {own: key for own, _, key in rows}  # every caption is one sample's
    assert len(key_of) == 15
    for own, negative, key in rows:
        assert key_of[negative] != key, f"{own!r} drew {negative!r}, a caption of its own image"
    assert rows == draws(0), "the same negatives again"
    assert rows != draws(1)


def test_training_images_are_cropped_repeatably_and_evaluation_images_resized(tmp_path):
    path = _write(tmp_path, _grouped_records())
    dm = pairs(train=str(path), val=str(path), **TINY)
    train = _all(dm.train_dataloader())
    assert [len(b["label"]) for b in train] == [4, 4, 4], "15 samples: the short last batch is dropped"
    again = _all(pairs(train=str(path), **TINY).train_dataloader())
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(train, again))
    val = _all(dm.val_dataloader())
    assert not torch.equal(train[0]["pixel_values"], val[0]["pixel_values"])
    plain = _all(pairs(train=str(path), augment=False, **TINY).train_dataloader())
    assert torch.equal(plain[0]["pixel_values"], val[0]["pixel_values"])
    resized = pair_image(Image.open(tmp_path / "img0.png"), 28)
    assert torch.equal(val[0]["pixel_values"][0], resized)


def test_a_meta_file_and_prepared_shards_give_the_same_pair_batches_as_jsonl(tmp_path):
    path = _write(tmp_path / "data", _grouped_records())
    (tmp_path / "meta.json").write_text(json.dumps({"pairs": {"root": "data", "annotation": "data/pairs.jsonl"}}))
    shards = tmp_path / "shards"
    summary = prepare_main(["--input", str(path), "--image-root", str(path.parent), "--output", str(shards)])
    assert summary["written"] == 15 and summary["skipped_on_encode"] == 0, "one item per caption"
    direct = _all(pairs(train=str(path), **TINY).train_dataloader())
    for source in (tmp_path / "meta.json", shards):
        batches = _all(pairs(train=str(source), **TINY).train_dataloader())
        assert len(batches) == len(direct) == 3
        for a, b in zip(batches, direct):
            _assert_contract(a, 4)
            assert a["sample_names"] == b["sample_names"]
            for key in BATCH_KEYS - {"caption_key", "image_id", "sample_names", "skipped", "skipped_records"}:
                assert torch.equal(a[key], b[key]), (source.name, key)
            # shards key an image by its bytes, jsonl by its path: the same grouping
            same = a["caption_key"][:, None] == a["caption_key"][None, :]
            assert torch.equal(same, b["caption_key"][:, None] == b["caption_key"][None, :])


def test_a_bad_pair_record_is_skipped_by_name_and_counted(tmp_path, caplog):
    records = [{"image": f"img{i}.png", "text": f"caption {i}"} for i in range(6)]
    records[1] = {"image": "nowhere.png", "text": "lost"}
    records[2] = {"image": "img2.png", "text": "... ;"}  # nothing left after normalisation
    records[3] = {"image": "img3.png", "text": "labelled", "label": "cat"}
    records.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    path = _write(tmp_path, records)
    (tmp_path / "img5.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        dm = pairs(train=str(path), **{**TINY, "batch_size": 6})
        batch = _fields(next(iter(dm.train_dataloader())))
    assert batch["sample_names"] == ["pairs.jsonl:1", "pairs.jsonl:5"]
    _assert_contract(batch, 2)
    assert batch["skipped"] == {"missing image": 1, "empty caption": 1, "malformed record": 1, "not an image": 1}
    assert dm.train_dataloader().dataset.skips.counts == {"not a pair": 1}
    assert "pairs.jsonl:3: empty caption" in caplog.text and "pairs.jsonl:7: not a pair" in caplog.text
    strict = dict(TINY, batch_size=6, strict=True)
    with pytest.raises(BadRecord, match="pairs.jsonl:7: not a pair"):
        pairs(train=str(path), **strict).train_dataloader()
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(BadRecord, match="pairs.jsonl:2: missing image"):
        list(pairs(train=str(path), **strict).train_dataloader())


def test_pairs_need_two_images_for_a_negative(tmp_path):
    path = _write(tmp_path, [{"image": "img0.png", "texts": ["a", "b"]}], images=1)
    with pytest.raises(ValueError, match="at least two images"):
        pairs(train=str(path), **TINY).train_dataloader()


def test_zero_shot_classes_come_from_a_file_or_a_list(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nsea lion\n")
    dm = RecordsDataModule(train="unread.jsonl", class_names=str(names))
    assert dm.class_names == ["cat", "dog", "sea lion"] and dm.prompt_templates == ["a photo of a {}."]
    listed = RecordsDataModule(train="unread.jsonl", class_names=["cat"], prompt_templates=["{}"])
    assert listed.class_names == ["cat"] and listed.prompt_templates == ["{}"]
    assert dm.tokenizer.decode(dm.text_ids("a photo of a Cat.")) == "summarize:a photo of a Cat.<|im_end|>"
    names.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line"):
        RecordsDataModule(train="unread.jsonl", class_names=str(names))
    chat = RecordsDataModule(train="unread.jsonl")
    assert chat.class_names is None
    with pytest.raises(ValueError, match="only a single conversation view is packed"):
        asked(RecordsDataModule(train="unread.jsonl", pack=True), "pair")


def test_a_test_source_gives_a_test_loader_for_both_tasks(tmp_path):
    path = _write(tmp_path, _grouped_records())
    data = pairs(train=str(path), test=str(path), **TINY)
    assert sum(len(b["pair"].label) for b in data.test_dataloader()) == 15, "evaluation keeps every sample"
    assert pairs(train=str(path)).test_dataloader() == []


# -- shapes ---------------------------------------------------------------------------------------


def test_shapes_pairs_give_the_pair_batch_with_negatives_of_another_caption_key():
    dm = asked(ShapesDataModule(tile_size=28, train_size=16, val_size=16, batch_size=8), "pair", "negative")
    batch = _fields(next(iter(dm.val_dataloader())))
    _assert_contract(batch, 8)
    assert torch.equal(batch["image_id"], torch.arange(8))
    tokenizer = dm.tokenizer
    for row in range(8):
        own = tokenizer.decode(batch["itm_ids"][row][batch["itm_mask"][row] == 1])
        negative = tokenizer.decode(batch["negative_ids"][row][batch["negative_mask"][row] == 1])
        assert negative != own
        assert tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1]) == "summarize:" + own
    assert dm.prompt_templates == ["a {}"]
    assert tokenizer.decode(dm.text_ids("a red circle")) == "summarize:a red circle<|im_end|>"
    plain = ShapesDataModule(tile_size=28, val_size=4, batch_size=4, itc_prefix="", prompt_templates=["{}", "a {}"])
    assert plain.prompt_templates == ["{}", "a {}"]
    first = _fields(next(iter(asked(plain, "pair", "negative").val_dataloader())))
    assert torch.equal(first["input_ids"], first["itm_ids"]), "no prefix: the ITC text is the ITM text"


def test_a_resumed_pair_loader_continues_with_the_same_crops_and_negatives(tmp_path):
    path = _write(tmp_path, _grouped_records())
    options = dict(TINY, shuffle=True, batch_size=3)
    whole = _all(pairs(train=str(path), **options).train_dataloader())
    first = pairs(train=str(path), **options).train_dataloader()
    iterator = iter(first)
    next(iterator), next(iterator)
    resumed = pairs(train=str(path), **options).train_dataloader()
    resumed.load_state_dict(first.state_dict())
    rest = [_fields(b) for b in resumed]
    assert len(rest) == len(whole) - 2
    for a, b in zip(rest, whole[2:], strict=True):
        assert a["sample_names"] == b["sample_names"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["negative_ids"], b["negative_ids"])
