"""Tiny runs through the command line, hostile files and an HTTP server on 127.0.0.1, for the fault tests."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from lit_internvl.cli import main

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(root: Path, **data) -> dict:
    """``recipes/sft.yaml`` made tiny: no init_from, 8 training samples in batches of 4 (2 steps), one validation
    batch, no logger or progress bar, checkpoints in ``root/checkpoints``."""
    return {
        "trainer": {
            "default_root_dir": str(root), "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "limit_val_batches": 1, "num_sanity_val_steps": 0,
        },
        "model": {"init_args": {"init_from": None, "warmup_steps": 1}},
        "data": {"init_args": {"train_size": 8, "val_size": 4, "batch_size": 4, "num_workers": 0, **data}},
    }  # fmt: skip


def cli(command: str, root: Path, *args: str, recipe: str = "sft.yaml", overrides: dict | None = None):
    """``python -m lit_internvl <command> --config recipes/<recipe> --config <tiny overrides> <args>``, in process."""
    path = root.parent / f"{root.name}-overrides.yaml"
    path.write_text(yaml.safe_dump(overrides or tiny_overrides(root)))
    return main([command, "--config", str(REPO / "recipes" / recipe), "--config", str(path), *args])


class Hostile:
    """An object whose unpickling creates the file ``marker``: what any code in a checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_copy(checkpoint: Path, out: Path, marker: Path) -> Path:
    """``checkpoint`` (a real one: a run would resume from it) with a :class:`Hostile` object added."""
    state = torch.load(checkpoint, weights_only=True)
    state["payload"] = Hostile(marker)
    torch.save(state, out)
    return out


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on 127.0.0.1 in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass
