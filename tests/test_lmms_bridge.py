"""The lmms-eval bridge answers as ``predict`` does: a tiny SFT checkpoint, two questions about shapes scenes, the
answers ``predict`` writes, and the same questions through the bridge — with lmms-eval's base class stood in for
(always), and through the ``lmms-eval`` command on a local task (tests/lmms_task: jsonl + task YAML, nothing
downloaded) where lmms-eval is installed (the ``eval`` extra)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lit_internvl.cli import main
from lit_internvl.data.shapes import ShapesWorld

REPO = Path(__file__).resolve().parents[1]
SFT = str(REPO / "recipes/sft.yaml")


@pytest.fixture(scope="module")
def checkpoint_and_predictions(tmp_path_factory):
    """A tiny SFT checkpoint (a few steps of recipes/sft.yaml from scratch) and ``predict``'s answers to the first
    two questions of the shapes test split."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft")
    quiet = ["--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0"]
    main(["fit", "--config", SFT, "--model.init_args.init_from", "null", "--trainer.max_steps", "6",
          "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root), "--data.init_args.train_size",
          "384", *quiet])  # fmt: skip
    checkpoint = str(root / "checkpoints/last.ckpt")
    main(["predict", "--config", SFT, "--ckpt_path", checkpoint, "--model.init_args.init_from", "null",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(root / "predict"),
          "--data.init_args.val_size", "2", *quiet])  # fmt: skip
    predictions = [json.loads(line) for line in (root / "predict/predictions.jsonl").read_text().splitlines()]
    return checkpoint, predictions


def _write_task(folder: Path) -> Path:
    """tests/lmms_task with the two questions ``predict`` answered (the test split's first two, images as PNG)."""
    task = folder / "task"
    shutil.copytree(REPO / "tests/lmms_task", task)
    world = ShapesWorld(84, 0, "test")  # recipes/sft.yaml's tile size and seed
    with open(task / "shapes_two.jsonl", "w") as f:
        for index in range(2):
            qa = world.vqa(index)
            qa["image"].save(task / f"{index}.png")
            record = {"image": str(task / f"{index}.png"), "question": qa["question"], "answer": qa["answer"]}
            f.write(json.dumps(record) + "\n")
    return task


def test_the_bridge_answers_as_predict_does(checkpoint_and_predictions, tmp_path, monkeypatch):
    """lmms-eval's ``lmms`` base class stood in for by a plain class: the bridge's own logic (the request's
    arguments, the task's images, the project's prompt and greedy generation) gives ``predict``'s answers."""
    checkpoint, predictions = checkpoint_and_predictions
    stub = types.ModuleType("lmms_eval.api.model")
    stub.lmms = type("lmms", (), {"__init__": lambda self: setattr(self, "task_dict", {})})
    for name in ("lmms_eval", "lmms_eval.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", stub)
    monkeypatch.delitem(sys.modules, "lit_internvl.tools.lmms", raising=False)
    bridge = importlib.import_module("lit_internvl.tools.lmms")
    try:
        model = bridge.LitInternVL(checkpoint=checkpoint, config=SFT)
        docs = [json.loads(line) for line in (_write_task(tmp_path) / "shapes_two.jsonl").read_text().splitlines()]
        model.task_dict = {"shapes_two": {"test": docs}}
        task_module = importlib.import_module("tests.lmms_task.utils")
        requests = [
            types.SimpleNamespace(
                args=(
                    task_module.doc_to_text(doc),
                    {"max_new_tokens": 8, "until": ["\n\n"]},
                    task_module.doc_to_visual,
                    index,
                    "shapes_two",
                    "test",
                )
            )  # fmt: skip
            for index, doc in enumerate(docs)
        ]
        answers = model.generate_until(requests)
    finally:
        sys.modules.pop("lit_internvl.tools.lmms", None)
    assert answers == [p["answer"] for p in predictions]
    assert bridge.cut_at("red\n\nmore", ["\n\n"]) == "red"
    with pytest.raises(ValueError, match="config=RECIPE.yaml"):
        bridge.load_model(checkpoint)


@pytest.mark.slow
def test_lmms_eval_runs_a_local_task_with_the_bridge(checkpoint_and_predictions, tmp_path):
    """``lmms-eval --model lit_internvl`` on tests/lmms_task: its metric printed, its answers ``predict``'s."""
    registry = pytest.importorskip("lmms_eval.models", reason="lmms-eval is the eval extra's")
    if "lit_internvl" not in registry.list_available_models():
        pytest.skip("lit_internvl's lmms_eval.models entry point is not installed: reinstall the package")
    checkpoint, predictions = checkpoint_and_predictions
    task = _write_task(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "lit_internvl", "--model_args",
               f"checkpoint={checkpoint},config={SFT}", "--tasks", "shapes_two", "--include_path", str(task),
               "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    run = subprocess.run(command, cwd=task, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "shapes_two" in run.stdout and "exact_match" in run.stdout
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("*samples_shapes_two.jsonl")
               for line in path.read_text().splitlines()]  # fmt: skip
    answers = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    # lmms-eval strips the model's responses before it scores them (lmms_eval/api/task.py, process_results)
    assert answers == [p["answer"].strip() for p in predictions]
