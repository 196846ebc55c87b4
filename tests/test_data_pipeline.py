"""Records → prepare → stream → batch: every record kind survives the round trip, a resumed loader
continues exactly, and every kind of bad input is skipped with its name (or raised, strictly)."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lit_internvl.data.records import KINDS, BadRecord
from lit_internvl.data.shapes import write_records
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.tools.prepare import main as prepare_main
from tests.tiny import records

# The kinds write_records generates; steps records (the critic's) round-trip through prepare in tests/test_critic.py.
WRITTEN = [kind for kind in KINDS if kind != "steps"]
TINY = dict(tile_size=56, max_tiles=4, batch_size=3, shuffle=False, max_length=512)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each record kind written as jsonl + PNGs, and prepared into shards."""
    root = tmp_path_factory.mktemp("records")
    out = {}
    for kind in WRITTEN:
        jsonl = write_records(root, kind, count=5)
        shards = root / f"{kind}_shards"
        prepare_main(["--input", str(jsonl), "--image-root", str(root), "--output", str(shards)])
        out[kind] = (jsonl, shards)
    return out


def _batches(source, *views, **overrides):
    dm = records(*views, train=str(source), **{**TINY, **overrides})
    return list(dm.train_dataloader())


@pytest.mark.parametrize("kind", WRITTEN)
def test_prepare_stream_batch_round_trip(prepared, kind):
    jsonl, shards = prepared[kind]
    views = ("chosen", "rejected") if kind == "preference" else ("conversation",)
    streamed, direct = _batches(shards, *views), _batches(jsonl, *views)
    assert sum(len(b[views[0]].sample_names) for b in streamed) == 5
    for whole_a, whole_b in zip(streamed, direct, strict=True):
        a, b = whole_a[views[0]], whole_b[views[0]]
        assert a.sample_names == b.sample_names
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert (a.pixel_values is None) == (b.pixel_values is None)
        if a.pixel_values is not None:
            assert torch.equal(a.pixel_values, b.pixel_values)
            context = ByteTokenizer().token_to_id(IMG_CONTEXT)
            per_row = (a.input_ids == context).sum(dim=1).tolist()
            assert per_row == [4 * t for t in a.tiles_per_sample]
        assert (a.labels != -100).any(dim=1).all(), "every sample has something to learn"
        if kind == "preference":
            assert not torch.equal(whole_a["rejected"].input_ids, a.input_ids)


def test_interleaved_trains_text_not_image_spans(prepared):
    batch = _batches(prepared["interleaved"][0])[0]
    context = ByteTokenizer().token_to_id(IMG_CONTEXT)
    image_slots = batch["conversation"].input_ids == context
    assert image_slots.any()
    assert (batch["conversation"].labels[image_slots] == -100).all()
    assert (batch["conversation"].labels[~image_slots & (batch["conversation"].attention_mask == 1)] != -100).sum() > 20


def test_packed_batches_hold_every_sample_once(prepared):
    jsonl, _ = prepared["conversation"]
    packed = _batches(jsonl, pack=True, max_tokens=700, batch_size=5)[0]
    packed = packed["conversation"]
    assert packed.input_ids.shape[0] < 5
    names = [n for row in packed.sample_names for n in row.split("+")]
    assert sorted(names) == sorted(f"conversation.jsonl:{i}" for i in range(1, 6))
    assert packed.input_ids.shape[1] <= 700
    with pytest.raises(ValueError, match="max_length 512 exceeds max_tokens 300"):
        records(train=str(jsonl), **{**TINY, "pack": True, "max_tokens": 300})


def test_resumed_streaming_loader_continues_exactly(prepared):
    _, shards = prepared["conversation"]
    dm = records(train=str(shards), **{**TINY, "batch_size": 1, "shuffle": True})
    loader = dm.train_dataloader()
    uninterrupted = [b["conversation"].sample_names[0] for b in loader]
    loader = dm.train_dataloader()
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch["conversation"].sample_names[0])
        if i == 1:
            state = loader.state_dict()
            break
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    seen += [b["conversation"].sample_names[0] for b in resumed]
    assert seen == uninterrupted
    assert sorted(seen) == sorted(set(seen)), "no sample repeated or skipped"


# -- bad input --------------------------------------------------------------------------------


def _bad_records(tmp_path, case: str):
    """A jsonl of two good records with one bad record of the given case between them."""
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "ok.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "broken.png")
    data = bytearray((tmp_path / "broken.png").read_bytes())
    data[100:120] = b"\xff" * 20  # a PNG header, then a broken data stream
    (tmp_path / "broken.png").write_bytes(bytes(data))
    good = {
        "image": "ok.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
    }
    bad = {
        "missing image": {**good, "image": "nowhere.png"},
        "corrupt image": {**good, "image": "broken.png"},
        "placeholder mismatch": {
            **good,
            "conversations": [{"from": "human", "value": "<image> <image> twice"}, good["conversations"][1]],
        },
        "over-long sample": {**good, "conversations": [good["conversations"][0], {"from": "gpt", "value": "x" * 600}]},
    }
    lines = [
        json.dumps(good),
        "{this is not json" if case == "malformed JSON" else json.dumps(bad[case]),
        json.dumps(good),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


CASES = ["missing image", "corrupt image", "malformed JSON", "placeholder mismatch", "over-long sample"]


@pytest.mark.parametrize("case", CASES)
def test_bad_record_is_skipped_by_name_and_counted(tmp_path, case, caplog):
    path = _bad_records(tmp_path, case)
    with caplog.at_level(logging.WARNING):
        dm = records(train=str(path), **TINY)
        batches = list(dm.train_dataloader())
    names = [n for b in batches for n in b["conversation"].sample_names]
    assert names == ["data.jsonl:1", "data.jsonl:3"]
    assert f"data.jsonl:2: {case}" in caplog.text
    skipped = sum(sum(b.skipped.values()) for b in batches) + dm.train_dataloader().dataset.skips.total
    assert skipped == 1


@pytest.mark.parametrize("case", CASES)
def test_bad_record_is_an_error_in_strict_mode(tmp_path, case):
    path = _bad_records(tmp_path, case)
    with pytest.raises(BadRecord, match=f"data.jsonl:2: {case}"):
        list(records(train=str(path), **TINY, strict=True).train_dataloader())


@pytest.mark.parametrize("case", CASES)
def test_prepare_skips_bad_records_and_counts_them(tmp_path, case, caplog):
    path = _bad_records(tmp_path, case)
    with caplog.at_level(logging.WARNING):
        summary = prepare_main(
            ["--input", str(path), "--image-root", str(tmp_path), "--output", str(tmp_path / "shards")]
        )
    batches = list(records(train=str(tmp_path / "shards"), **TINY).train_dataloader())
    assert [n for b in batches for n in b["conversation"].sample_names] == ["data.jsonl:1", "data.jsonl:3"]
    if case in ("malformed JSON", "placeholder mismatch"):  # found while scanning, in this process
        assert summary["skipped_on_scan"] == {case: 1}
        assert f"data.jsonl:2: {case}" in caplog.text
    elif case in ("missing image", "corrupt image"):  # found by the worker processes
        assert summary["written"] == 2 and summary["skipped_on_encode"] == 1
    else:  # over-long depends on the tokenizer and tiles: found when samples are built
        assert summary["written"] == 3
        assert sum(sum(b.skipped.values()) for b in batches) == 1


def test_prepare_command_names_bad_images_and_stops_in_strict_mode(tmp_path):
    path = _bad_records(tmp_path, "missing image")
    lines = path.read_text().splitlines()
    lines.insert(2, lines[1].replace("nowhere.png", "broken.png"))
    path.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "lit_internvl", "prepare", "--input", str(path), "--image-root", str(tmp_path)]
    lenient = subprocess.run([*command, "--output", str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert lenient.returncode == 0, lenient.stderr
    assert "data.jsonl:2: missing image" in lenient.stderr and "data.jsonl:3: corrupt image" in lenient.stderr
    assert "'skipped_on_encode': 2" in lenient.stderr
    strict = subprocess.run(
        [*command, "--output", str(tmp_path / "b"), "--strict"], capture_output=True, text=True, timeout=120
    )
    assert strict.returncode != 0
    assert "data.jsonl:2: missing image" in strict.stderr


def test_meta_file_repeats_and_caps_tiles(tmp_path):
    write_records(tmp_path / "a", "conversation", count=4)
    write_records(tmp_path / "b", "text", count=4)
    meta = {
        "shapes_vqa": {"root": "a", "annotation": "a/conversation.jsonl", "repeat_time": 2, "max_dynamic_patch": 1},
        "shapes_text": {"root": "b", "annotation": "b/text.jsonl", "repeat_time": 0.5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    dm = records(train=str(tmp_path / "meta.json"), **{**TINY, "batch_size": 20})
    batch = next(iter(dm.train_dataloader()))
    names = [n for n in batch["conversation"].sample_names]
    assert sum(n.startswith("conversation") for n in names) == 8
    assert sum(n.startswith("text") for n in names) == 2
    assert all(t == 1 for t in batch["conversation"].tiles_per_sample if t), (
        "max_dynamic_patch 1: one tile, no thumbnail"
    )


def test_training_logs_the_count_of_skipped_records_each_epoch(tmp_path):
    import lightning as L

    from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
    from lit_internvl.stages import SFTStage

    path = _bad_records(tmp_path, "missing image")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, "{broken json", lines[1].replace("nowhere.png", "broken.png")]) + "\n")
    stage = SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"), warmup_steps=1
    )
    # 3 of 5 records bad on purpose: lenient beyond the default half (max_skipped stops such a run).
    data = records(train=str(path), max_skipped=1.0, **{**TINY, "max_tiles": 1, "batch_size": 5})
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(stage, data)
    metrics = trainer.callback_metrics
    assert metrics["data/skipped"] == 3
    assert metrics["data/skipped/missing_image"] == 1 and metrics["data/skipped/corrupt_image"] == 1
    assert metrics["data/skipped/malformed_JSON"] == 1
