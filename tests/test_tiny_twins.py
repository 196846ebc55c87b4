"""Every real-size run has a tiny twin that differs only in its model and hardware layers: the run's own layers and
keys with a tiny model layer in place of its model layer (``recipes/models/tiny.yaml``, or the tiny decoder of the
same kind: :data:`TWIN_MODELS`), ``recipes/trainers/cpu.yaml`` in place of
``trainers/gpu8_bf16.yaml`` (and no ``speed/gpu.yaml``: varlen attention is a GPU's), the byte tokenizer for
``$INTERNVL_CHECKPOINT``. Each twin trains two optimiser steps on records written here: the stage, data and script
layers of the GPU runs work end to end on a CPU. The overrides only shorten the run and put it on one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_internvl.cli import main
from lit_internvl.data.shapes import write_records
from lit_internvl.recipes import RECIPES, compose, entry_recipes

GPU_RUNS = sorted(
    str(p.relative_to(RECIPES))
    for p in entry_recipes()
    if any(layer.endswith("trainers/gpu8_bf16.yaml") for layer in yaml.safe_load(p.read_text()).get("layers", []))
)
SWAP = {"trainers/gpu8_bf16.yaml": "trainers/cpu.yaml", "speed/gpu.yaml": None}
# Model layers whose twin keeps the kind of decoder (Qwen3's qk-norm, a mixture of experts); the rest: models/tiny.yaml.
TWIN_MODELS = {
    "models/internvl3_5_1b.yaml": "models/tiny_qwen3.yaml",
    "models/internvl3_5_8b.yaml": "models/tiny_qwen3.yaml",
    "models/internvl3_5_30b_a3b.yaml": "models/tiny_moe.yaml",
    "models/internvl3_5_1b_flash.yaml": "models/tiny_flash.yaml",
    "models/internvl3_5_8b_flash.yaml": "models/tiny_flash.yaml",
}


def _twin(run: str, folder: Path) -> Path:
    """The run's file with its model, hardware and speed layers swapped, every layer by absolute path."""
    path = RECIPES / run
    config = yaml.safe_load(path.read_text())
    layers = []
    for layer in config.pop("layers"):
        name = str((path.parent / layer).resolve().relative_to(RECIPES))
        name = TWIN_MODELS.get(name, "models/tiny.yaml") if name.startswith("models/") else SWAP.get(name, name)
        if name is not None:
            layers.append(str(RECIPES / name))
    twin = folder / "twin.yaml"
    twin.write_text(yaml.safe_dump({"layers": layers, **config}, sort_keys=False))
    return twin


def _records(stage: str, folder: Path) -> str:
    """Records of the kind the stage's views read, as a ``--data.init_args.train`` value."""
    if stage.endswith("MPOStage"):
        return str(write_records(folder, "preference", 8))
    if stage.endswith("NMPStage"):
        return json.dumps([str(write_records(folder, "interleaved", 8)), str(write_records(folder, "text", 8))])
    if stage.endswith("CriticStage"):
        write_records(folder, "pair", 1)  # its image
        steps = {"image": "images/pair_0.png", "question": "Which colour?", "steps": ["1 red", "Answer: red"],
                 "labels": ["+", "+"]}  # fmt: skip
        path = folder / "steps.jsonl"
        path.write_text((json.dumps(steps) + "\n") * 8)
        return str(path)
    return str(write_records(folder, "conversation", 8))


@pytest.mark.parametrize("run", GPU_RUNS)
def test_the_tiny_twin_of_every_gpu_run_trains_on_a_cpu(run, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("INTERNVL_CHECKPOINT", "byte")
    for variable in ("INTERNVIT_CHECKPOINT", "QWEN_CHECKPOINT"):
        monkeypatch.setenv(variable, "byte")
    twin = _twin(run, tmp_path)
    stage = compose(twin)["model"]["class_path"]
    # One CPU process (a script layer may name its GPUs), two optimiser steps of two samples.
    overrides = ["--trainer.devices", "1", "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1",
                 "--trainer.limit_val_batches",
                 "0", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
                 "--data.init_args.train", _records(stage, tmp_path / "data")]  # fmt: skip
    if stage.endswith("RLStage"):  # two short answers a prompt, not sixteen of 2,048 tokens
        overrides += ["--model.init_args.group_size", "2", "--model.init_args.generation.max_new_tokens", "4",
                      "--model.init_args.mini_batches", "1", "--model.init_args.micro_batches", "1"]  # fmt: skip
    if stage.endswith("ViRStage"):  # it starts from the consistency stage's checkpoint, another run's: fresh weights
        overrides += ["--model.init_args.init_from", "null"]
    main(["fit", "--config", str(twin), *overrides])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert sum(v.numel() for k, v in checkpoint["state_dict"].items() if k.startswith("model.")) < 5e6, "tiny"
