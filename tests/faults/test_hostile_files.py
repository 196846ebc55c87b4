"""Hostile checkpoints: a pickle whose unpickling runs code, given to ``fit`` and ``validate`` by path or URL, is
refused before anything runs."""

from __future__ import annotations

import pytest

from lit_internvl.checkpoint_io import CheckpointError
from tests.faults.runs import cli, hostile_copy, serve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint of the tiny SFT run (2 steps)."""
    root = tmp_path_factory.mktemp("trained") / "run"
    cli("fit", root)
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("command", ["fit", "validate"])
@pytest.mark.parametrize("where", ["url", "path"])
def test_a_hostile_checkpoint_is_refused_and_nothing_runs(tmp_path, trained, monkeypatch, command, where):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where torch.hub would cache a download
    marker = tmp_path / "code-ran"
    served = tmp_path / "served"
    served.mkdir()
    hostile = hostile_copy(trained, served / "x.ckpt", marker)
    root = tmp_path / "run"
    with serve(served) as url:
        source = f"{url}/x.ckpt" if where == "url" else str(hostile)
        with pytest.raises(CheckpointError, match=r"x\.ckpt was refused: .*weights_only=True"):
            cli(command, root, "--ckpt_path", source)
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (root / "checkpoints").exists(), "the run trained and saved"
