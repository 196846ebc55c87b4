"""Shards in object storage: ``prepare --output s3://...`` writes to an S3-compatible server (moto's
server mode, on loopback) and ``RecordsDataModule`` streams them back, batch for batch equal to the
batches read from the jsonl itself.

The endpoint reaches litdata only through ``storage_options`` (``prepare --storage-options``,
``records(storage_options=...)``): no ``AWS_ENDPOINT_URL`` is set, so options that got
lost on the way would send requests to AWS and fail (within the deadline) instead of passing.
"""

import contextlib
import json
import signal

import pytest
import torch

pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
import boto3  # noqa: E402  (a litdata dependency)
import litdata.streaming.downloader as litdata_downloader  # noqa: E402
import litdata.utilities.dataset_utilities as litdata_cache  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from lit_internvl.data.records import KINDS  # noqa: E402
from lit_internvl.data.shapes import write_records  # noqa: E402
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer  # noqa: E402
from lit_internvl.tools.prepare import main as prepare_main  # noqa: E402
from tests.tiny import records

BUCKET = "lit-internvl-test"
# The kinds write_records generates; steps records (the critic's) round-trip through prepare in tests/test_critic.py.
WRITTEN = [kind for kind in KINDS if kind != "steps"]
TINY = dict(tile_size=56, max_tiles=4, batch_size=3, shuffle=False, max_length=512)


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the main thread after ``seconds``: litdata's boto3 client retries a
    failing endpoint up to 1000 times, and a test must fail instead of hanging."""

    def expire(signum, frame):
        raise TimeoutError(f"object-storage step took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """An S3 server on 127.0.0.1 (a free port) with one empty bucket; yields its URL."""
    tmp = tmp_path_factory.mktemp("s3")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))  # not the developer's ~/.aws
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
        # optimize() stages remote output in $TMPDIR/chunks and rmtree's it at start: keep ours
        # private, so a concurrent prepare on this machine neither breaks nor is broken by this one.
        mp.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp / "optimize-chunks"))
        mp.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(tmp / "optimize-data"))
        # litdata 0.2.76 moves chunks with obstore, built with https-only client options (no way to
        # pass allow_http through storage_options): a plain-http endpoint fails with "BadScheme".
        mp.setitem(litdata_downloader._OBSTORE_CLIENT_OPTIONS, "allow_http", "true")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            with deadline(20):
                boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
            yield url
        finally:
            server.stop()


@pytest.fixture(scope="module")
def prepared(endpoint, tmp_path_factory):
    """Each record kind written as jsonl + PNGs and prepared straight into the bucket."""
    root = tmp_path_factory.mktemp("records")
    out = {}
    for kind in WRITTEN:
        jsonl = write_records(root, kind, count=5)
        url = f"s3://{BUCKET}/{kind}"
        with deadline(45):
            summary = prepare_main(
                ["--input", str(jsonl), "--image-root", str(root), "--output", url,
                 "--storage-options", json.dumps({"endpoint_url": endpoint})]
            )  # fmt: skip
        assert summary["skipped_on_scan"] == {}
        out[kind] = (jsonl, url)
    return out


@pytest.fixture
def stream_cache(tmp_path, monkeypatch):
    """A fresh local cache for streamed chunks, so every read goes to the server."""
    monkeypatch.setattr(litdata_cache, "_LITDATA_CACHE_DIR", str(tmp_path / "stream-cache"))
    return tmp_path / "stream-cache"


def _batches(source, *views, **overrides):
    dm = records(*views, train=str(source), **{**TINY, **overrides})
    with deadline(45):
        return list(dm.train_dataloader())


@pytest.mark.parametrize("kind", WRITTEN)
def test_prepare_to_s3_and_stream_back(endpoint, prepared, stream_cache, kind):
    jsonl, url = prepared[kind]
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{kind}/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert f"{kind}/index.json" in keys and any(k.endswith(".bin") for k in keys), keys

    # conversation through two (forked) loader workers, each with its own storage client
    workers = 2 if kind == "conversation" else 0
    views = ("chosen", "rejected") if kind == "preference" else ("conversation",)
    streamed = _batches(url, *views, storage_options={"endpoint_url": endpoint}, num_workers=workers)
    direct = _batches(jsonl, *views)
    assert list(stream_cache.rglob("chunk-*.bin")), "chunks were downloaded from the server"
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
            assert (a.input_ids == context).sum(dim=1).tolist() == [4 * t for t in a.tiles_per_sample]
        if kind == "preference":
            assert torch.equal(whole_a["rejected"].input_ids, whole_b["rejected"].input_ids)
