"""Data faults: bytes of a litdata chunk zeroed, a chunk cut short, an index that does not parse, a run whose records
are all (or mostly) bad, an image root that does not exist, a line of hundreds of megabytes."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_internvl.callbacks.skipped_samples import TooManySkipped
from lit_internvl.data import SampleBuilder, SampleOptions
from lit_internvl.data.records import BadRecord, Record
from lit_internvl.data.shapes import write_records
from lit_internvl.data.tokenizer import ByteTokenizer
from lit_internvl.data.views import View
from lit_internvl.tools.prepare import main as prepare_main
from tests.tiny import records, tiny_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(tile_size=56, max_tiles=1, use_thumbnail=False, batch_size=2, shuffle=False, max_length=512)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    jsonl = write_records(root, "conversation", count=8)
    prepare_main(["--input", str(jsonl), "--image-root", str(root), "--output", str(root / "shards")])
    return root


def _copy(prepared, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(prepared / "shards", shards)
    return shards, next(shards.glob("chunk-*.bin"))


def test_zeroed_bytes_in_a_chunk_are_named_counted_skips(prepared, tmp_path):
    shards, chunk = _copy(prepared, tmp_path)
    data = bytearray(chunk.read_bytes())
    data[100:400] = bytes(300)  # inside the first record's JSON
    chunk.write_bytes(bytes(data))
    batches = list(records(train=str(shards), **TINY).train_dataloader())
    skipped = [r for b in batches for r in b.skipped_records]
    assert skipped == [{"name": f"{shards}/{chunk.name} item 0", "reason": "corrupt shard record"}]
    assert sum(len(b.first.sample_names) for b in batches if not b.empty) == 7, "the other records train"


def test_a_truncated_chunk_is_an_error_naming_it(prepared, tmp_path):
    shards, chunk = _copy(prepared, tmp_path)
    chunk.write_bytes(chunk.read_bytes()[:20_000])
    with pytest.raises(ValueError, match=rf"shard chunk .*{chunk.name} is 20000 bytes where index\.json says \d+"):
        records(train=str(shards), **TINY).train_dataloader()


def test_an_index_that_does_not_parse_is_an_error_naming_it(prepared, tmp_path):
    shards, _ = _copy(prepared, tmp_path)
    (shards / "index.json").write_text('{"chunks": [')
    with pytest.raises(ValueError, match=r"index\.json is not a litdata index \(JSONDecodeError"):
        records(train=str(shards), **TINY).train_dataloader()


def test_an_image_root_that_does_not_exist_is_refused_naming_the_key(prepared):
    with pytest.raises(FileNotFoundError, match=r"data\.init_args\.image_root '.*/imgaes' is not a folder"):
        records(train=str(prepared / "conversation.jsonl"), image_root=str(prepared / "imgaes"), **TINY)


def _fit(tmp_path, data, every_n_train_steps: int = 1) -> L.Trainer:
    stage = tiny_stage(__import__("lit_internvl.stages", fromlist=["SFTStage"]).SFTStage, decoder="tiny",
                       warmup_steps=1)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=every_n_train_steps,
                                   save_last=True)],
    )  # fmt: skip
    trainer.fit(stage, data)
    return trainer


def test_a_run_that_skips_every_record_stops_before_writing_a_checkpoint(prepared, tmp_path):
    """``max_length`` nothing fits: every record is an over-long sample."""
    data = records(train=str(prepared / "conversation.jsonl"), **{**TINY, "max_length": 8})
    with pytest.raises(TooManySkipped, match=r"2 of the 2 records seen were skipped as bad, no record trained"):
        _fit(tmp_path, data)
    assert not list(tmp_path.rglob("*.ckpt")), "no untrained checkpoint for the next stage"


def test_more_skipped_than_max_skipped_stops_the_run_naming_the_key(prepared, tmp_path):
    """Half the records name images that are not there: over a max_skipped of a quarter. A fraction is judged once
    32 records were seen, or at the epoch's end: before the recipes' checkpoint of the epoch."""
    lines = (prepared / "conversation.jsonl").read_text().splitlines()
    for i in range(0, len(lines), 2):
        lines[i] = lines[i].replace("images/", "missing/")
    (tmp_path / "half.jsonl").write_text("\n".join(lines) + "\n")
    data = records(train=str(tmp_path / "half.jsonl"), image_root=str(prepared), max_skipped=0.25, **TINY)
    with pytest.raises(TooManySkipped, match=r"4 of the 8 records .* more than data\.init_args\.max_skipped 0\.25"):
        _fit(tmp_path, data, every_n_train_steps=0)
    assert not list(tmp_path.rglob("*.ckpt"))
    lenient = records(train=str(tmp_path / "half.jsonl"), image_root=str(prepared), max_skipped=0.5, **TINY)
    assert _fit(tmp_path / "lenient", lenient, every_n_train_steps=0).global_step == 4


class CountingTokenizer(ByteTokenizer):
    """Records the longest text it was asked to encode."""

    longest = 0

    def encode(self, text: str) -> list[int]:
        CountingTokenizer.longest = max(CountingTokenizer.longest, len(text))
        return super().encode(text)


def test_an_over_long_line_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    line = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x" * 20_000_000}]})
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n" + json.dumps({"text": "ok"}))
    dataset = records(train=str(tmp_path / "big.jsonl"), **TINY).train_dataloader().dataset
    assert len(dataset) == 2 and dict(dataset.skips.counts) == {"over-long sample": 1}
    assert dataset.skips.records == [{"name": "big.jsonl:2", "reason": "over-long sample"}]


def test_an_over_long_record_is_refused_before_it_is_tokenized():
    """The same from litdata shards, where the record arrives whole: refused on its length in bytes."""
    tokenizer = CountingTokenizer()
    builder = SampleBuilder(tokenizer, SampleOptions(tile_size=56, max_length=512), (View("conversation", 4),))
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x" * 1_000_000}]
    with pytest.raises(
        BadRecord, match=r"over-long sample: 10000\d\d bytes of text cannot fit max_length 512 tokens \(not tokenized\)"
    ):
        builder(Record("conversation", "big.jsonl:2", {"conversations": turns}))
    assert CountingTokenizer.longest < 1000, "the text was never tokenized"
