"""The CLI trains stages whose parts are chosen by ``class_path`` alone — a user's class included."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from lit_internvl.cli import main
from lit_internvl.components import InternViT


class PatchMeanEncoder(nn.Module):
    """A user's own image encoder, unknown to the package: honours the encoder contract
    ``(N, 3, H, W) → (N, 1 + P, hidden_size)``."""

    def __init__(self, hidden_size: int = 32, patch_size: int = 14) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.patch = nn.Conv2d(3, hidden_size, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch(pixel_values).flatten(2).transpose(1, 2)
        return torch.cat((self.cls.expand(len(patches), -1, -1), patches), dim=1)


def _recipe(tmp_path: Path, vision: dict) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "lit_internvl.stages.ContrastiveStage",
            "init_args": {
                "vision": vision,
                "text_encoder": {"class_path": "lit_internvl.components.TextEncoder", "init_args": {"config": "tiny"}},
                "embed_dim": 16,
                "attn_pool_heads": 4,  # InternVL-C's 16 need a width divisible by 16
                "warmup_steps": 1,
            },
        },
        "data": {
            "class_path": "lit_internvl.data.ShapesDataModule",
            "init_args": {"train_size": 48, "val_size": 32, "batch_size": 16},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_with_a_user_encoder_chosen_by_class_path(tmp_path):
    recipe = _recipe(tmp_path, {"class_path": f"{__name__}.PatchMeanEncoder", "init_args": {"hidden_size": 24}})
    cli = main(["fit", "--config", str(recipe)])

    encoder = cli.model.model.vision
    assert type(encoder).__name__ == "PatchMeanEncoder" and encoder.hidden_size == 24
    assert cli.trainer.global_step == 3
    report = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    top1 = report["metrics"]["val/zero_shot_top1"]
    assert top1["chance"] == pytest.approx(1 / 30)
    assert 0.0 <= top1["value"] <= 1.0
    assert report["metrics"]["val/image_to_text_R@1"]["chance"] > 0
    assert list(tmp_path.rglob("events.out.tfevents.*")), "TensorBoard event files are written"


def test_command_line_override_reaches_interpolated_values(tmp_path):
    recipe = _recipe(tmp_path, {"class_path": "lit_internvl.components.InternViT", "init_args": {"config": "tiny"}})
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"]["text_encoder"]["init_args"]["config"] = {
        "vocab_size": 272, "hidden_size": "${model.init_args.embed_dim}", "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "intermediate_size": 32,
    }  # fmt: skip
    config["trainer"]["max_steps"] = 1
    recipe.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(recipe), "--model.init_args.embed_dim", "24"])

    assert cli.model.model.text_encoder.hidden_size == 24
    assert isinstance(cli.model.model.vision, InternViT)


def test_print_config_shows_the_resolved_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "recipes/stage1.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lit_internvl.stages.ContrastiveStage"
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == "runs/stage1"


def test_validate_test_and_predict_subcommands(tmp_path):
    recipe = _recipe(tmp_path, {"class_path": "lit_internvl.components.InternViT", "init_args": {"config": "tiny"}})
    for command in ("validate", "test"):
        cli = main([command, "--config", str(recipe)])
        assert f"{command if command == 'test' else 'val'}/zero_shot_top1" in cli.trainer.callback_metrics
    cli = main(["predict", "--config", str(recipe), "--trainer.limit_predict_batches", "1"])
    prediction = cli.trainer.predict_loop.predictions[0]
    assert prediction["image_emb"].shape == (16, 16)
    assert prediction["zero_shot_class"].shape == (16,)


def test_the_run_prints_no_figure_it_did_not_measure(tmp_path, capsys):
    """Lightning's summary would print a FLOPs column of zeros (a stage has no ``example_input_array`` to count
    them on) and its rich bar the logger's version as ``v_num: 0.000``."""
    recipe = _recipe(tmp_path, {"class_path": "lit_internvl.components.InternViT", "init_args": {"config": "tiny"}})
    config = yaml.safe_load(recipe.read_text())
    config["trainer"].update(max_steps=2, enable_progress_bar=True, enable_model_summary=True)
    recipe.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(recipe)])

    captured = capsys.readouterr()
    printed = captured.out
    assert "Total params" in printed and "FLOPs" not in printed
    assert "Skipping setting a default" not in printed + captured.err, "no word on a summary it did not add"
    assert "v_num: 0" in printed and "v_num: 0.000" not in printed
