"""Grounding: a record's ``<ref>…</ref><box>[[x1, y1, x2, y2]]</box>`` round-trips through ``prepare``
from pixels, 0–1 or 0–1000 to the same 0–1000 boxes (hand-computed), boxes outside the image are
bad records, and tiling leaves the boxes alone (they are relative to the whole image)."""

import json
import logging
import random

import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

from lit_internvl.data import SampleBuilder, SampleOptions
from lit_internvl.data.grounding import BoxError, convert_record, convert_text, to_grid
from lit_internvl.data.records import (
    BadRecord,
    DatasetSpec,
    Record,
    SkipCounter,
    decode_record,
    encode_record,
    index_records,
)
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.data.views import View
from lit_internvl.tools.prepare import main as prepare_main
from tests.tiny import records

WIDTH, HEIGHT = 640, 480
# Two boxes of one image 640 × 480, in each scale. On the grid, round(1000·v/size), halves up:
# 1000·1/640 = 1.5625 → 2, 1000·3/480 = 6.25 → 6, 1000·333/640 = 520.3125 → 520, 1000·479/480 = 997.92 → 998.
BOXES = {
    "pixel": [[1, 3, 333, 479], [0, 0, 640, 480]],
    "unit": [[1 / 640, 3 / 480, 333 / 640, 479 / 480], [0, 0, 1, 1]],
    "1000": [[2, 6, 520, 998], [0, 0, 1000, 1000]],
}
ON_GRID = "[[2, 6, 520, 998], [0, 0, 1000, 1000]]"


def _record(boxes, image: str = "scene.png") -> dict:
    return {
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhere are the square and the scene?"},
            {"from": "gpt", "value": f"<ref>the square and the scene</ref><box>{json.dumps(boxes)}</box>"},
        ],
    }


def _write(tmp_path, *records) -> str:
    Image.new("RGB", (WIDTH, HEIGHT), (30, 60, 90)).save(tmp_path / "scene.png")
    path = tmp_path / "ground.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _prepared(tmp_path, scale: str, *records) -> tuple[dict, list[Record]]:
    jsonl = _write(tmp_path, *records)
    out = tmp_path / f"shards_{scale}"
    summary = prepare_main(
        ["--input", jsonl, "--image-root", str(tmp_path), "--output", str(out), "--box-scale", scale]
    )
    if not summary["written"]:
        return summary, []
    shards = StreamingDataset(str(out))
    return summary, [decode_record(shards[i]) for i in range(len(shards))]


@pytest.mark.parametrize("scale", list(BOXES))
def test_a_grounding_record_round_trips_through_prepare_to_the_same_0_1000_boxes(tmp_path, scale):
    _, (record,) = _prepared(tmp_path, scale, _record(BOXES[scale]))
    answer = record.fields["conversations"][1]["value"]
    assert answer == f"<ref>the square and the scene</ref><box>{ON_GRID}</box>"
    assert record.fields["conversations"][0] == _record(BOXES[scale])["conversations"][0], "other text as it was"


@pytest.mark.parametrize(
    "scale, box",
    [("pixel", [0, 0, 641, 10]), ("unit", [0, 0, 0.5, 1.01]), ("1000", [0, 0, 1001, 10]), ("1000", [-1, 0, 5, 5])],
)
def test_a_box_outside_the_image_is_a_named_counted_bad_record(tmp_path, caplog, scale, box):
    good = _record(BOXES[scale])
    with caplog.at_level(logging.WARNING):
        summary, records = _prepared(tmp_path, scale, good, _record([box]), good)
    assert [r.name for r in records] == ["ground.jsonl:1", "ground.jsonl:3"]
    if scale == "pixel":  # found by the worker that opened the image (its log is its own)
        assert summary["skipped_on_encode"] == 1
        (_, item, _) = index_records(
            DatasetSpec("g", tmp_path / "ground.jsonl", tmp_path), True, SkipCounter(), "pixel"
        )
        with pytest.raises(BadRecord, match=r"ground.jsonl:2: box outside image: \[0, 0, 641, 10\] leaves the image"):
            list(encode_record(item, strict=True, box_scale="pixel"))
    else:  # no image needed: found on the scan
        assert summary["skipped_on_scan"] == {"box outside image": 1}
        assert "ground.jsonl:2: box outside image" in caplog.text


def test_boxes_are_checked_when_a_jsonl_file_is_read_directly(tmp_path):
    jsonl = _write(tmp_path, _record(BOXES["1000"]), _record([[0, 0, 1001, 10]]), _record([[5, 0, 4, 10]]))
    dataset = records(train=jsonl, tile_size=56).train_dataloader().dataset
    assert len(dataset) == 1
    assert dict(dataset.skips.counts) == {"box outside image": 1, "malformed box": 1}
    with pytest.raises(BadRecord, match="ground.jsonl:2: box outside image"):
        records(train=jsonl, tile_size=56, strict=True).train_dataloader()


@pytest.mark.parametrize(
    "text, message",
    [
        ("<box>[[1, 2, 3]]</box>", "is not \\[\\[x1, y1, x2, y2\\]"),
        ("<box>[[1, 2, 3, 4]]", "unbalanced"),
        ("<box>[[9, 2, 3, 4]]</box>", "needs x1 ≤ x2"),
        ("<box>[[1, 2, 3, true]]</box>", "is not \\[\\[x1"),
        ("<box>[]</box>", "is not \\[\\[x1"),
    ],
)
def test_a_malformed_box_is_refused(text, message):
    with pytest.raises(BoxError, match=f"malformed box: .*{message}"):
        convert_text(text, "1000")


def test_rounding_is_to_the_nearest_grid_point_halves_up():
    assert to_grid([2.5, 3.5, 4.4999, 4.5], "1000") == [3, 4, 4, 5]  # not Python's round-half-even (2, 4, 4, 4)
    assert to_grid([0.0005, 0, 0.9995, 1], "unit") == [1, 0, 1000, 1000]
    assert to_grid([0.32, 0, 639.68, 480], "pixel", (640, 480)) == [1, 0, 1000, 1000]


def test_the_reference_maps_a_grid_box_back_within_half_a_grid_step():
    # InternVL's RefCOCO evaluation turns an answer back into pixels as v / 1000 · size
    # (evaluate_grounding.py, lines 197-200): from the nearest grid point that lands within size / 2000.
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        grid = to_grid([x1, y1, x2, y2], "pixel", (width, height))
        back = [grid[0] / 1000 * width, grid[1] / 1000 * height, grid[2] / 1000 * width, grid[3] / 1000 * height]
        limits = [width / 2000, height / 2000] * 2
        assert all(abs(b - v) <= limit + 1e-9 for b, v, limit in zip(back, [x1, y1, x2, y2], limits))


def test_pixel_boxes_need_exactly_one_image_to_scale_by():
    fields = {"images": ["a.png", "b.png"], "conversations": _record(BOXES["pixel"])["conversations"]}
    with pytest.raises(BoxError, match="exactly one image"):
        convert_record("conversation", fields, "pixel", [(640, 480), (640, 480)])
    assert convert_record("conversation", fields, "1000", [(640, 480)] * 2) is not None  # the grid needs no size


def test_tiling_leaves_the_boxes_alone(tmp_path):
    # Boxes are relative to the whole image: one tile or a 4×3 grid + thumbnail, the text is the same.
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "scene.png")
    record = Record("conversation", "g:1", _record(BOXES["1000"]), [str(tmp_path / "scene.png")])
    context = ByteTokenizer().token_to_id(IMG_CONTEXT)
    samples = {}
    for max_tiles in (1, 12):
        options = SampleOptions(tile_size=56, max_tiles=max_tiles, max_length=4096)
        views = (View("conversation", 4),)
        samples[max_tiles] = SampleBuilder(ByteTokenizer(), options, views)(record)["views"]["conversation"]
    tiles = {m: s["pixel_values"].shape[0] for m, s in samples.items()}
    assert tiles == {1: 1, 12: 13}
    text = {m: s["input_ids"][s["input_ids"] != context] for m, s in samples.items()}
    assert torch.equal(text[1], text[12])
    decoded = ByteTokenizer().decode(text[12].tolist())
    assert f"<box>{ON_GRID}</box>" in decoded
