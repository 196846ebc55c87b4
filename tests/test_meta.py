"""A meta file means what it means in InternVL (internvl_chat/internvl/train/internvl_chat_finetune.py):
``max_dynamic_patch`` replaces the global maximum, ``repeat_time`` keeps the first ⌊n·r⌋ lines or
whole copies, ``data_augment`` is per dataset; ``root`` is read from the meta file's folder (ours),
with a warning when the working directory would name another existing path (InternVL's). Each case
is computed by hand."""

import json
import logging

import numpy as np
import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

from lit_internvl.data.prepare import prepare
from lit_internvl.data.records import decode_record, kept_lines, read_meta, read_record
from tests.tiny import records

TINY = dict(tile_size=56, batch_size=50, shuffle=False, max_length=512)


def _dataset(folder, lines: int, size=(168, 56), blank: tuple[int, ...] = ()) -> str:
    """``folder/d.jsonl`` of ``lines`` lines (those in ``blank`` empty), each a conversation about
    ``folder/img.png`` (noise, so a JPEG re-encode changes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "img.png")
    record = {
        "image": "img.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "noise"}],
    }
    rows = ["" if i in blank else json.dumps(record) for i in range(1, lines + 1)]
    (folder / "d.jsonl").write_text("\n".join(rows) + "\n")
    return f"{folder.name}/d.jsonl"


def _meta(tmp_path, entries: dict) -> str:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(entries))
    return str(path)


def _names(meta: str, **options) -> list[str]:
    loader = records(train=meta, **{**TINY, **options}).train_dataloader()
    return [name for batch in loader for name in batch["conversation"].sample_names]


def test_max_dynamic_patch_replaces_the_global_max_tiles_even_upwards(tmp_path):
    # A 168×56 image (aspect 3) with 56-pixel tiles: at most 6 tiles → grid 3×1 + thumbnail = 4;
    # at most 2 → grid 2×1 (aspect 2 is closest) + thumbnail = 3; at most 1 → 1 tile, no thumbnail.
    meta = {
        "raised": {"root": "a", "annotation": _dataset(tmp_path / "a", 1), "max_dynamic_patch": 6},
        "global": {"root": "b", "annotation": _dataset(tmp_path / "b", 1)},
        "lowered": {"root": "c", "annotation": _dataset(tmp_path / "c", 1), "max_dynamic_patch": 1},
    }
    loader = records(train=_meta(tmp_path, meta), max_tiles=2, **TINY).train_dataloader()
    batch = next(iter(loader))
    assert batch["conversation"].tiles_per_sample == [4, 3, 1]


@pytest.mark.parametrize(
    "lines, repeat_time, blank, expected",
    [
        (10, 0.3, (), [1, 2, 3]),  # the first ⌊10·0.3⌋ = 3 lines, not a random 3
        (4, 0.5, (2,), [1]),  # the first 2 *lines*, one of them blank
        (3, 1, (), [1, 2, 3]),
        (2, 3, (), [1, 2, 1, 2, 1, 2]),  # whole copies, in file order
        (2, 2.0, (), [1, 2, 1, 2]),  # a whole number written as a float
    ],
)
def test_repeat_time_keeps_the_first_lines_or_whole_copies(tmp_path, lines, repeat_time, blank, expected):
    meta = {"d": {"root": "a", "annotation": _dataset(tmp_path / "a", lines, blank=blank), "repeat_time": repeat_time}}
    assert _names(_meta(tmp_path, meta)) == [f"d.jsonl:{n}" for n in expected]


def test_repeat_time_fraction_rounds_as_the_reference_does():
    # InternVL computes int(len(lines) * repeat_time): 100 · 0.29 = 28.999999999999996 → 28.
    assert kept_lines(100, 0.29) == (28, 1)
    assert kept_lines(10, 0.7) == (7, 1) and kept_lines(7, 0.1) == (0, 1) and kept_lines(5, 4) == (5, 4)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("repeat_time", 2.5, "repeat_time is 2.5; above 1 it must be a whole number"),
        ("repeat_time", 0, "repeat_time is 0; it must be > 0"),
        ("repeat_time", "2", "repeat_time must be a number"),
        ("max_dynamic_patch", 0, "max_dynamic_patch must be an integer ≥ 1, got 0"),
        ("max_dynamic_patch", "6", "max_dynamic_patch must be an integer ≥ 1, got '6'"),
        ("data_augment", "yes", "data_augment must be true or false, got 'yes'"),
    ],
)
def test_a_bad_meta_option_names_the_dataset_and_the_option(tmp_path, option, value, message):
    meta = {"vqa": {"root": "a", "annotation": _dataset(tmp_path / "a", 1), option: value}}
    with pytest.raises(ValueError, match=f"meta.json: dataset 'vqa': {message}"):
        read_meta(_meta(tmp_path, meta))


@pytest.mark.parametrize(
    "global_quality, expected",
    [
        (None, {"on": (75, 100), "off": None, "unset": None}),
        ((90, 95), {"on": (90, 95), "off": None, "unset": (90, 95)}),
    ],
)
def test_data_augment_turns_the_jpeg_augmentation_on_or_off_per_dataset(tmp_path, global_quality, expected):
    meta = {
        "on": {"root": "a", "annotation": _dataset(tmp_path / "a", 1), "data_augment": True},
        "off": {"root": "b", "annotation": _dataset(tmp_path / "b", 1), "data_augment": False},
        "unset": {"root": "c", "annotation": _dataset(tmp_path / "c", 1)},
    }
    path = _meta(tmp_path, meta)
    data = records(train=path, val=path, jpeg_quality=global_quality, max_tiles=1, **TINY)
    train, val = data.train_dataloader().dataset, data.val_dataloader().dataset
    by_name = dict(zip(meta, (read_record(item) for item in train.items)))
    assert {name: train.builder.jpeg_quality(r) for name, r in by_name.items()} == expected
    assert {name: val.builder.jpeg_quality(r) for name, r in by_name.items()} == dict.fromkeys(meta), "never in val"
    # What that means for the pixels: the same image, re-encoded only where augmentation is on.
    pixels = dict(zip(meta, (train[i]["views"]["conversation"]["pixel_values"] for i in range(3))))
    plain = val[0]["views"]["conversation"]["pixel_values"]
    for name, quality in expected.items():
        assert torch.equal(pixels[name], plain) == (quality is None), name


def test_data_augment_survives_prepare(tmp_path):
    meta = {
        "on": {"root": "a", "annotation": _dataset(tmp_path / "a", 1), "data_augment": True},
        "off": {"root": "b", "annotation": _dataset(tmp_path / "b", 1), "data_augment": False},
        "unset": {"root": "c", "annotation": _dataset(tmp_path / "c", 1), "max_dynamic_patch": 2},
    }
    prepare(read_meta(_meta(tmp_path, meta)), str(tmp_path / "shards"))
    shards = StreamingDataset(str(tmp_path / "shards"))
    records = [decode_record(shards[i]) for i in range(len(shards))]
    assert [(r.augment, r.max_tiles) for r in records] == [(True, None), (False, None), (None, 2)]


def test_root_is_read_from_the_meta_file_and_a_differing_working_directory_warns(tmp_path, monkeypatch, caplog):
    metas = tmp_path / "metas"
    _dataset(metas / "imgs", 2)  # metas/imgs/d.jsonl: ours
    _dataset(tmp_path / "imgs", 5)  # imgs/d.jsonl from the working directory: InternVL's
    meta = {"vqa": {"root": "imgs", "annotation": "imgs/d.jsonl"}}
    (metas / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        (spec,) = read_meta(metas / "meta.json")
    assert spec.root == metas / "imgs" and spec.annotation == metas / "imgs" / "d.jsonl"
    assert len(_names(str(metas / "meta.json"))) == 2, "the meta file's folder's 2 records, not the 5"
    for option, path in (("root", tmp_path / "imgs"), ("annotation", tmp_path / "imgs" / "d.jsonl")):
        assert f"dataset 'vqa': {option} " in caplog.text and str(path) in caplog.text
    caplog.clear()
    monkeypatch.chdir(metas)  # both readings name the same folder: nothing to say
    with caplog.at_level(logging.WARNING):
        read_meta(metas / "meta.json")
    assert "InternVL would read" not in caplog.text
