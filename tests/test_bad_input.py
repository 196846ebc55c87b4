"""Bad input never ends a lenient run: a jsonl file with one record of every bad kind (a 20,000 ×
20,000 decompression bomb included) trains to the end with each skip named and counted once, and
stops a strict run at the first one, naming file and line."""

import io
import json
import logging
import struct
import zlib
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_internvl.batch import Views
from lit_internvl.data import SampleBuilder, SampleOptions
from lit_internvl.data.images import DEFAULT_MAX_PIXELS, UnusableImage, open_image
from lit_internvl.data.prepare import prepare
from lit_internvl.data.records import (
    PACKING_SKIP_REASONS,
    PAIR_SKIP_REASONS,
    SHARD_SKIP_REASONS,
    SKIP_REASONS,
    BadRecord,
    DatasetSpec,
    Record,
    counter_name,
    resolve_image_path,
)
from lit_internvl.data.tokenizer import ByteTokenizer
from lit_internvl.data.views import View
from tests.tiny import record_of, records

TINY = dict(tile_size=56, max_tiles=1, batch_size=4, shuffle=False, max_length=512)


# -- bad files, made here --------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(width: int, height: int, rows_per_block: int = 100) -> bytes:
    """A valid all-black RGB PNG, written without ever holding its pixels: one deflate block of
    ``rows_per_block`` zero rows, compressed once and repeated (a full flush makes each block
    independent), and the Adler-32 of the whole. 20,000 × 20,000 comes to 1.2 MB: a decompression bomb."""
    assert height % rows_per_block == 0
    block = (b"\x00" * (1 + 3 * width)) * rows_per_block  # each row: filter byte 0, then black pixels
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    body, end = raw.compress(block) + raw.flush(zlib.Z_FULL_FLUSH), raw.flush(zlib.Z_FINISH)
    check = 1
    for _ in range(height // rows_per_block):
        check = zlib.adler32(block, check)
    stream = b"\x78\xda" + body * (height // rows_per_block) + end + struct.pack(">I", check)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def noise_png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def animated_png() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), (i * 100, 0, 0)) for i in range(3)]
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def corrupt_png() -> bytes:
    data = bytearray(noise_png())
    data[100:120] = b"\xff" * 20  # a valid header, then a broken data stream
    return bytes(data)


def _conversation(image: str | None, answer: str = "red", question: str = "<image>\nColour?") -> dict:
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return {"image": image, **record} if image else record


def bad_lines(root) -> dict[str, bytes]:
    """One annotation line of each reason in SKIP_REASONS (its files written under ``root``)."""
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "ok.png")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(root / "secret.png")  # outside the image root
    files = {
        "bomb.png": black_png(20_000, 20_000),
        "truncated.png": noise_png()[:400],
        "empty.png": b"",
        "notes.png": b"these are notes, not an image",
        "animated.png": animated_png(),
        "corrupt.png": corrupt_png(),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)

    def line(record: dict) -> bytes:
        return json.dumps(record, ensure_ascii=False).encode()

    return {
        "not UTF-8": line(_conversation("ok.png", "rouge")).replace(b"rouge", "rougé".encode("latin-1")),
        "malformed JSON": b'{"image": "ok.png", "conversations": [',
        "malformed record": line({"image": "ok.png", "caption": "no known field"}),
        "placeholder mismatch": line(_conversation("ok.png", question="<image> and <image>?")),
        "nothing to train": line(_conversation("ok.png", " \n")),
        "image outside root": line(_conversation("../secret.png")),
        "malformed box": line(_conversation("ok.png", "<ref>it</ref><box>[[10, 20, 30]]</box>")),
        "box outside image": line(_conversation("ok.png", "<ref>it</ref><box>[[10, 20, 1030, 40]]</box>")),
        "missing image": line(_conversation("nowhere.png")),
        "empty image file": line(_conversation("empty.png")),
        "not an image": line(_conversation("notes.png")),
        "image too large": line(_conversation("bomb.png")),
        "too many frames": line(_conversation("animated.png")),
        "truncated image": line(_conversation("truncated.png")),
        "corrupt image": line(_conversation("corrupt.png")),
        "over-long sample": line(_conversation("ok.png", "x" * 600)),
    }


@pytest.fixture(scope="module")
def every_bad_kind(tmp_path_factory):
    """``data.jsonl``: a good record, then one bad record of each reason in SKIP_REASONS' order, then
    a good one; returns (path, image root, {reason: line number})."""
    root = tmp_path_factory.mktemp("bad")
    lines = bad_lines(root)
    assert set(lines) == set(SKIP_REASONS), "one bad record for every reason the README lists"
    good = json.dumps(_conversation("ok.png")).encode()
    body = [good, *lines.values(), good]
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    numbers = {reason: i + 2 for i, reason in enumerate(lines)}
    return path, root / "images", numbers


# -- the claims ------------------------------------------------------------------------------


def test_a_lenient_run_trains_to_the_end_and_counts_each_bad_record_once_by_name(every_bad_kind, caplog, tmp_path):
    from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
    from lit_internvl.stages import SFTStage

    path, images, numbers = every_bad_kind
    stage = SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"), warmup_steps=1
    )
    # 16 of 18 records are bad on purpose: lenient beyond the default half (max_skipped stops such a run).
    data = records(train=str(path), image_root=str(images), max_skipped=1.0, **TINY)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer.fit(stage, data)
    assert trainer.state.finished and trainer.global_step > 0
    metrics = trainer.callback_metrics
    assert metrics["data/skipped"] == len(SKIP_REASONS)
    for reason, number in numbers.items():
        assert metrics[counter_name(reason)] == 1, reason
        assert caplog.text.count(f"data.jsonl:{number}: {reason}") == 1, reason


def test_a_strict_run_stops_at_the_first_bad_record_naming_file_and_line(every_bad_kind):
    path, images, numbers = every_bad_kind
    first = min(numbers, key=numbers.get)
    with pytest.raises(BadRecord, match=f"data.jsonl:2: {first}"):
        list(records(train=str(path), image_root=str(images), strict=True, **TINY).train_dataloader())


@pytest.mark.parametrize("reason", list(SKIP_REASONS))
def test_each_bad_kind_alone_stops_a_strict_run_with_its_file_and_line(every_bad_kind, tmp_path, reason):
    path, images, numbers = every_bad_kind
    lines = path.read_bytes().split(b"\n")
    alone = tmp_path / "alone.jsonl"
    alone.write_bytes(b"\n".join([lines[0], lines[numbers[reason] - 1], lines[0]]) + b"\n")
    data = records(train=str(alone), image_root=str(images), strict=True, **TINY)
    with pytest.raises(BadRecord, match=f"alone.jsonl:2: {reason}:"):
        list(data.train_dataloader())
    lenient = records(train=str(alone), image_root=str(images), **TINY).train_dataloader()
    batches = list(lenient)
    assert [n for b in batches for n in b["conversation"].sample_names] == ["alone.jsonl:1", "alone.jsonl:3"]
    counted = lenient.dataset.skips.counts + sum((Counter(b.skipped) for b in batches), Counter())
    assert dict(counted) == {reason: 1}


def test_prepare_skips_every_bad_kind_and_names_each(every_bad_kind, tmp_path, caplog):
    path, images, numbers = every_bad_kind
    spec = DatasetSpec("data", path, images)
    with caplog.at_level(logging.WARNING):
        summary = prepare([spec], str(tmp_path / "shards"))
    scan = {"not UTF-8", "malformed JSON", "malformed record", "placeholder mismatch", "nothing to train"}
    scan |= {"image outside root", "malformed box", "box outside image"}
    assert summary["skipped_on_scan"] == dict.fromkeys(scan, 1)
    # The workers open the images; over-long depends on the tokenizer and tiles, found at build time.
    opened = set(SKIP_REASONS) - scan - {"over-long sample"}
    assert summary["written"] == 3 and summary["skipped_on_encode"] == len(opened)
    for reason in scan:
        assert f"data.jsonl:{numbers[reason]}: {reason}" in caplog.text
    with pytest.raises(BadRecord, match="data.jsonl:2: not UTF-8"):
        prepare([spec], str(tmp_path / "strict"), strict=True)


def test_the_bomb_is_refused_on_its_header_where_pil_alone_raises():
    bomb = black_png(20_000, 20_000)
    assert len(bomb) < 1_500_000
    with pytest.raises(Image.DecompressionBombError):  # what PIL alone does: a crash, no record named
        Image.open(io.BytesIO(bomb))
    with pytest.raises(UnusableImage, match="image too large: 20000×20000 = 400,000,000 pixels > limit 89,478,485"):
        open_image(bomb)
    small = open_image(black_png(300, 200, rows_per_block=50))  # the same construction decodes
    assert small.size == (300, 200) and small.getextrema() == ((0, 0),) * 3


def test_the_pixel_limit_is_ours_to_set_on_either_side_of_pils(monkeypatch):
    image = noise_png(100, 100)  # 10,000 pixels
    assert DEFAULT_MAX_PIXELS == 89_478_485
    with pytest.raises(UnusableImage, match="image too large"):
        open_image(image, max_pixels=9_999)
    assert open_image(image, max_pixels=10_000).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL alone would refuse it as a bomb
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(image))
    assert open_image(image, max_pixels=None).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1_000, "PIL's own setting is put back"


def test_the_pixel_limit_reaches_samples_from_the_datamodule(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(_conversation("big.png")) + "\n")
    small = records(train=str(tmp_path / "d.jsonl"), max_image_pixels=9_999, **TINY)
    assert list(small.train_dataloader())[0].skipped == {"image too large": 1}
    ample = records(train=str(tmp_path / "d.jsonl"), max_image_pixels=10_000, **TINY)
    assert list(ample.train_dataloader())[0]["conversation"].sample_names == ["d.jsonl:1"]


@pytest.mark.parametrize(
    "path, inside",
    [
        ("a.png", "/data/root/a.png"),
        ("sub/../a.png", "/data/root/a.png"),
        ("./sub/b.png", "/data/root/sub/b.png"),
        ("../a.png", None),
        ("../../etc/passwd", None),
        ("sub/../../root2/a.png", None),  # a sibling whose name starts like the root's
        ("/etc/passwd", None),
    ],
)
def test_image_paths_must_stay_inside_the_root(path, inside):
    if inside is None:
        with pytest.raises(ValueError, match="outside the image root|is absolute"):
            resolve_image_path("/data/root", path)
    else:
        assert resolve_image_path("/data/root", path) == inside


def test_absolute_paths_are_an_explicit_choice(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "elsewhere.png")
    (tmp_path / "root").mkdir()
    jsonl = tmp_path / "root" / "d.jsonl"
    jsonl.write_text(json.dumps(_conversation(str(tmp_path / "elsewhere.png"))) + "\n")
    refused = records(train=str(jsonl), **TINY).train_dataloader()
    assert len(refused.dataset) == 0 and dict(refused.dataset.skips.counts) == {"image outside root": 1}
    allowed = records(train=str(jsonl), allow_absolute_paths=True, **TINY).train_dataloader()
    assert [n for b in allowed for n in b["conversation"].sample_names] == ["d.jsonl:1"]
    with pytest.raises(ValueError, match="outside the image root"):  # relative paths stay inside even so
        resolve_image_path("/r", "../x.png", allow_absolute=True)


def test_a_link_the_dataset_owner_put_inside_the_root_is_followed(tmp_path):
    (tmp_path / "store").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "store" / "a.png")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "images").symlink_to(tmp_path / "store")
    (tmp_path / "root" / "d.jsonl").write_text(json.dumps(_conversation("images/a.png")) + "\n")
    loader = records(train=str(tmp_path / "root" / "d.jsonl"), **TINY).train_dataloader()
    assert [n for b in loader for n in b["conversation"].sample_names] == ["d.jsonl:1"]


def test_a_byte_order_mark_is_utf8_and_latin1_is_not(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")
    line = json.dumps(_conversation("ok.png", "rouge"))
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n" + line.encode("latin-1") + b"\n")
    loader = records(train=str(tmp_path / "d.jsonl"), **TINY).train_dataloader()
    assert len(loader.dataset) == 2 and loader.dataset.skips.total == 0
    (tmp_path / "e.jsonl").write_bytes(line.replace("rouge", "rougé").encode("latin-1") + b"\n")
    with pytest.raises(BadRecord, match=r"e.jsonl:1: not UTF-8: byte \d+ \(0xe9\) is not UTF-8"):
        records(train=str(tmp_path / "e.jsonl"), strict=True, **TINY).train_dataloader()


@pytest.mark.parametrize(
    "answers, trains",
    [(["", " \n"], False), (["", "blue"], True), (["red"], True)],
)
def test_a_conversation_with_every_answer_empty_is_nothing_to_train(tmp_path, answers, trains):
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")
    turns = [t for a in answers for t in ({"from": "human", "value": "Colour?"}, {"from": "gpt", "value": a})]
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "ok.png", "conversations": turns}) + "\n")
    dataset = records(train=str(tmp_path / "d.jsonl"), **TINY).train_dataloader().dataset
    assert len(dataset) == int(trains)
    assert dict(dataset.skips.counts) == ({} if trains else {"nothing to train": 1})


def test_the_sample_builder_refuses_a_record_made_in_memory_with_nothing_to_train():
    builder = SampleBuilder(ByteTokenizer(), SampleOptions(tile_size=56), (View("conversation", 4),))
    record = Record("conversation", "memory:1", _conversation(None, "", question="Colour?"))
    assert builder.safe(record) == {"skipped": "nothing to train", "name": "memory:1"}
    prompt = SampleBuilder(ByteTokenizer(), SampleOptions(tile_size=56), (View("prompt", 4),))
    assert "prompt" in prompt.safe(record)["views"], "a prompt to answer has nothing to train by design"


def test_the_readme_table_lists_every_reason_with_its_counter():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for reason in [*SKIP_REASONS, *PAIR_SKIP_REASONS, *PACKING_SKIP_REASONS, *SHARD_SKIP_REASONS]:
        assert any(f"`{reason}`" in row and f"`{counter_name(reason)}`" in row for row in rows), reason


def test_an_image_path_that_is_a_folder_is_a_missing_image_not_a_crash(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps(_conversation("folder.png")) + "\n")
    batch = list(records(train=str(tmp_path / "d.jsonl"), **TINY).train_dataloader())[0]
    assert batch.skipped == {"missing image": 1}


@pytest.mark.parametrize(
    "line",
    ['{"text": "a"', "[" * 100_000 + "]" * 100_000, '{"text": "a", "n": ' + "9" * 5_000 + "}"],
    ids=["unclosed", "nested too deep", "an int of 5,000 digits"],
)
def test_json_that_python_cannot_read_is_malformed_json_not_a_crash(tmp_path, line):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    # A max_length whose text the 200 kB line fits, or it is an over-long sample, refused unread.
    dataset = records(train=str(tmp_path / "d.jsonl"), **{**TINY, "max_length": 50_000}).train_dataloader().dataset
    assert len(dataset) == 1 and dict(dataset.skips.counts) == {"malformed JSON": 1}


def test_a_relative_image_root_such_as_the_working_directory_contains_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_image_path(".", "a.png") == str(tmp_path / "a.png")
    assert resolve_image_path("data", "sub/../a.png") == str(tmp_path / "data" / "a.png")
    with pytest.raises(ValueError, match="outside the image root"):
        resolve_image_path(".", "../a.png")


def test_a_sample_no_packed_row_can_hold_is_a_counted_skip_not_a_crash():
    """A dataset's max_dynamic_patch may give a sample more tiles than a packed row holds: skipped, the rest packed."""
    from lit_internvl.data.collate import Collator

    def sample(name, tiles):
        return record_of({"input_ids": torch.arange(5), "labels": torch.arange(5), "name": name, "budget": 1,
                          "pixel_values": torch.zeros(tiles, 3, 4, 4)})  # fmt: skip

    views = (View("conversation", 1),)
    batch = Collator(0, views, pack=True, max_tokens=32, max_tiles_per_row=4)(
        [sample("a", 2), sample("b", 7), sample("c", 2)]
    )
    assert batch.skipped == {"too many tiles": 1} and batch["conversation"].sample_names == ["a+c"]
    assert batch.skipped_records == [{"name": "b", "reason": "too many tiles"}]
    assert Collator(0, views, pack=True, max_tiles_per_row=4)([sample("b", 7)]) == Views(
        skipped={"too many tiles": 1}, skipped_records=[{"name": "b", "reason": "too many tiles"}]
    )
