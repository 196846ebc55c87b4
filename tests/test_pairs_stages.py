"""Stages 1 and 2 on a user's own image–caption records, through the shipped recipes and the CLI: a jsonl of a few
hundred pairs with labels and a class-names file (written here, as a user's would be), and the same records as
prepared shards. Held-out zero-shot top-1 and R@1 must beat chance by the margins below; the test command reports
every metric beside its chance level."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_internvl.data.shapes.world import ShapesWorld, class_names

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VAL = 480, 192
# Held-out margins over chance (30 classes: zero-shot chance 1/30; R@1 chance ≈ 1/192: every image is its own key,
# and many held-out images share a caption word for word, so R@1 stays low however well the model trains).
ZERO_SHOT_MARGIN, RECALL_MARGIN = 0.10, 0.02


def write_pairs(folder: Path, split: str, count: int) -> Path:
    """``count`` records of the shapes world as a user's jsonl: a PNG per image, its caption and class label; every
    fourth image has two captions (``texts``), as COCO-style data has several."""
    world = ShapesWorld(56, seed=0, split=split)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(count):
            pair = world.pair(i)
            image = f"images/{split}_{i}.png"
            pair["image"].save(folder / image)
            record = {"image": image, "label": pair["label"]}
            if i % 4 == 0:
                record["texts"] = [pair["text"], pair["text"].replace("a ", "one ", 1)]
            else:
                record["text"] = pair["text"]
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user_data")
    (folder / "classes.txt").write_text("\n".join(class_names()) + "\n")
    return {
        "train": write_pairs(folder, "train", TRAIN), "val": write_pairs(folder, "val", VAL),
        "classes": folder / "classes.txt", "folder": folder,
    }  # fmt: skip


def fit(recipe: str, run_dir: Path, data: dict[str, Path], *overrides: str) -> dict[str, dict]:
    command = [
        sys.executable, "-m", "lit_internvl", "fit", "--config", recipe,
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--data.init_args.train", str(data["train"]), "--data.init_args.val", str(data["val"]),
        "--data.init_args.class_names", str(data["classes"]), "--data.init_args.num_workers", "0",
        "--data.init_args.prompt_templates", '["a {}"]', *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final validation metrics" in result.stdout
    report = next(run_dir.rglob("metrics.json"))
    return json.loads(report.read_text())["metrics"]


def above_chance(metrics: dict, name: str, margin: float) -> bool:
    entry = metrics[name]
    return entry["value"] >= entry["chance"] + margin


STAGE1 = ["--trainer.max_epochs", "8"]


@pytest.fixture(scope="module")
def stage1_run(user_data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("stage1")
    return run_dir, fit("recipes/stage1_records.yaml", run_dir, user_data, *STAGE1)


def test_stage1_on_records_beats_chance_at_zero_shot_and_retrieval(stage1_run):
    _, metrics = stage1_run
    assert above_chance(metrics, "val/zero_shot_top1", ZERO_SHOT_MARGIN), metrics["val/zero_shot_top1"]
    assert metrics["val/zero_shot_top1"]["chance"] == pytest.approx(1 / 30)
    for direction in ("image_to_text", "text_to_image"):
        assert above_chance(metrics, f"val/{direction}_R@1", RECALL_MARGIN), metrics[f"val/{direction}_R@1"]
    assert {"val/zero_shot_top5", "val/image_to_text_R@10"} <= set(metrics)


def test_stage2_on_records_from_stage1_trains_internvl_g(stage1_run, user_data, tmp_path):
    stage1_dir, _ = stage1_run
    checkpoint = stage1_dir / "checkpoints" / "last.ckpt"
    metrics = fit(
        "recipes/stage2_records.yaml", tmp_path / "stage2", user_data, "--trainer.max_epochs", "2",
        "--model.init_args.init_from", str(checkpoint),
    )  # fmt: skip
    for direction in ("image_to_text", "text_to_image"):
        assert above_chance(metrics, f"val/internvl_g/{direction}_R@1", RECALL_MARGIN)
    assert "val/internvl_g/zero_shot_top1" in metrics and "val/itm" in metrics and "val/itg" in metrics


def test_test_command_prints_every_metric_beside_its_chance_level(stage1_run, user_data):
    stage1_dir, _ = stage1_run
    command = [
        sys.executable, "-m", "lit_internvl", "test", "--config", "recipes/stage1_records.yaml",
        "--ckpt_path", str(stage1_dir / "checkpoints" / "last.ckpt"), "--trainer.default_root_dir", str(stage1_dir),
        "--data.init_args.train", str(user_data["train"]), "--data.init_args.test", str(user_data["val"]),
        "--data.init_args.class_names", str(user_data["classes"]), "--data.init_args.num_workers", "0",
        "--data.init_args.prompt_templates", '["a {}"]', "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("test/")}
    for name in (
        "zero_shot_top1",
        "zero_shot_top5",
        *(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
    ):
        value, chance = lines[f"test/{name}"]
        assert 0.0 <= float(chance) < float(value) <= 1.0, name


def test_stage1_trains_from_prepared_shards_as_from_the_jsonl(user_data, tmp_path):
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "lit_internvl", "prepare", "--input", str(user_data["train"]), "--output", str(shards)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    metrics = fit("recipes/stage1_records.yaml", tmp_path / "run", {**user_data, "train": shards}, *STAGE1)
    assert above_chance(metrics, "val/zero_shot_top1", ZERO_SHOT_MARGIN), metrics["val/zero_shot_top1"]
    for direction in ("image_to_text", "text_to_image"):
        assert above_chance(metrics, f"val/{direction}_R@1", RECALL_MARGIN)
