"""Every run under recipes/, found by walking the folder (layer folders excepted), parses and builds: its
``--print_config`` succeeds and holds every value its layers and itself set (``compose`` reads a recipe as the
command line does), and its stage builds, the CPU-sized ones for real and the real sizes on the meta device. Then
the layers mechanism itself: the order in which files win, interpolation across layers, command-line overrides,
the printed config read back, a layered recipe followed by more layers, and the errors it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_internvl.cli import main
from lit_internvl.recipes import LAYER_FOLDERS, RECIPES, compose, entry_recipes, expand_configs, layer_files
from tests.recipes import stage_on_meta

REPO = RECIPES.parent
ENTRY = [str(p.relative_to(REPO)) for p in entry_recipes()]
FOLDERS = ("INTERNVL_CHECKPOINT", "INTERNVIT_CHECKPOINT", "QWEN_CHECKPOINT")  # the real-size recipes' ${oc.env:…}


def _required_data(config: dict) -> list[str]:
    """A records recipe without a train file of its own takes one on the command line, as its comment says."""
    data = config["data"]
    return [] if "train" in data.get("init_args", {}) or "Records" not in data["class_path"] else [
        "--data.init_args.train", "train.jsonl"]  # fmt: skip


def _print_config(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _leaves(value, path=()):
    """(path, value) of every leaf of a composed config; lists of class_path entries walked entry by entry."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, value


def test_runs_are_found_and_layers_are_not():
    assert {"recipes/stage1.yaml", "recipes/internvl3_1b/mpo.yaml", "recipes/internvl2_5_8b/stage2.yaml"} <= set(ENTRY)
    assert not [r for r in ENTRY if set(Path(r).parts) & set(LAYER_FOLDERS)]
    assert all(compose(REPO / r).get("run_name") for r in ENTRY), "every run is a short file naming its layers"


@pytest.mark.parametrize("recipe", ENTRY)
def test_every_recipe_parses_and_its_stage_builds(recipe, monkeypatch, capsys, tmp_path):
    for variable in FOLDERS:
        monkeypatch.setenv(variable, f"/nonexistent/{variable}")
    composed = compose(REPO / recipe)
    data = _required_data(composed)
    printed = _print_config(["--config", recipe, *data], capsys)

    assert printed["model"]["class_path"].startswith("lit_internvl.stages.")
    assert printed["trainer"]["default_root_dir"] == f"runs/{Path(recipe).relative_to('recipes').with_suffix('')}"
    for path, value in _leaves(composed):
        if "${" in str(value):
            continue  # checked resolved below
        got = printed
        for key in path:
            got = got[key]
        assert got == value, f"{'.'.join(map(str, path))}: printed {got!r}, composed {value!r}"
    assert "${" not in str(printed)

    if printed["trainer"]["accelerator"] == "cpu":  # the embedded default: built for its own data
        cli = main(["--config", recipe, *data, "--model.init_args.init_from", "null", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
        stage = cli.model.use_data(cli.datamodule)
        stage.configure_model()
        assert sum(p.numel() for p in stage.model.parameters()) > 0
    else:  # a real size: the model section on the meta device
        stage = stage_on_meta(REPO / recipe)
        assert all(p.is_meta for p in stage.model.parameters())


# -- the mechanism ---------------------------------------------------------------------------------------------


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def layered(tmp_path) -> Path:
    """recipes/mine/tiny.yaml: a stage, a model, the CPU trainer (interpolating run_name and default_root_dir)
    and data layers, two of them setting the same key, and the recipe's own value."""
    shipped = RECIPES
    folder = tmp_path / "recipes"
    _write(folder, "a.yaml", "model:\n  init_args:\n    learning_rate: 1.0\n    warmup_steps: 7\n")
    _write(folder, "b.yaml", "layers: [a.yaml]\nmodel:\n  init_args:\n    learning_rate: 2.0\n")
    return _write(
        folder,
        "mine/tiny.yaml",
        f"""\
layers:
  - {shipped}/stages/sft.yaml
  - {shipped}/models/tiny_shapes.yaml
  - {shipped}/trainers/cpu.yaml
  - ../b.yaml
model:
  init_args:
    warmup_steps: 3
data:
  class_path: lit_internvl.data.ShapesDataModule
  init_args: {{task: vqa, tile_size: 84, tokens_per_tile: 9, tokenizer: shapes}}
""",
    )


def test_layers_expand_before_the_recipe_each_once_in_order(layered):
    names = [p.name for p in layer_files(layered)]
    assert names == ["sft.yaml", "tiny_shapes.yaml", "cpu.yaml", "a.yaml", "b.yaml"]  # b's own layer before b
    argv = expand_configs(["fit", "--config", str(layered), "--trainer.max_steps", "1"])
    layers = [a for a in argv[2:-4] if a != "--config"]
    assert argv[:2] == ["fit", "--run_name=mine/tiny"] and layers == [str(p) for p in layer_files(layered)]
    assert argv[-4:] == ["--config", str(layered), "--trainer.max_steps", "1"]
    assert expand_configs([f"--config={layered}"])[-1] == f"--config={layered}"
    plain = ["--config=x.yaml", "-c", str(layered.parents[1] / "a.yaml"), "--config", "{trainer: {max_steps: 1}}"]
    assert expand_configs(plain) == plain  # files without layers, and YAML text, pass as they are


def test_later_layers_win_the_recipe_over_them_the_command_line_over_all(layered, capsys):
    printed = _print_config(["--config", str(layered)], capsys)
    assert printed["model"]["init_args"]["learning_rate"] == 2.0  # b.yaml after a.yaml
    assert printed["model"]["init_args"]["warmup_steps"] == 3  # the recipe over its layers
    assert printed["trainer"]["default_root_dir"] == "runs/mine/tiny"  # run_name: its path under recipes/
    assert printed["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "runs/mine/tiny/checkpoints"
    assert "layers" not in printed
    printed = _print_config(["--config", str(layered), "--run_name", "try2"], capsys)
    assert printed["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "runs/try2/checkpoints"
    printed = _print_config(["--config", str(layered), "--model.init_args.learning_rate", "4.0",
                             "--trainer.default_root_dir", "elsewhere"], capsys)  # fmt: skip
    assert printed["model"]["init_args"]["learning_rate"] == 4.0
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == "elsewhere"  # interpolated from the override
    assert printed["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "elsewhere/checkpoints"


def test_the_printed_config_reads_back_to_itself(layered, capsys, tmp_path):
    printed = tmp_path / "printed.yaml"
    printed.write_text(yaml.safe_dump(_print_config(["--config", str(layered)], capsys)))
    assert _print_config(["--config", str(printed)], capsys) == yaml.safe_load(printed.read_text())


def test_a_layered_recipe_composes_with_more_layers_after_it(monkeypatch, capsys):
    monkeypatch.setenv("INTERNVL_CHECKPOINT", "/checkpoints/InternVL3-1B")
    printed = _print_config(["--config", "recipes/internvl3_1b/mpo.yaml", "--config", "recipes/strategies/fsdp2.yaml",
                             "--config", "callbacks/monitoring.yaml", "--data.init_args.train", "t.jsonl"], capsys)  # fmt: skip
    assert printed["trainer"]["strategy"]["class_path"] == "lit_internvl.distributed.FSDP2Strategy"
    kinds = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert kinds == ["ModelCheckpoint", "TrainingThroughput"]
    assert printed["model"]["init_args"]["init_from"] == "hf:/checkpoints/InternVL3-1B"
    assert printed["trainer"]["default_root_dir"] == "runs/internvl3_1b/mpo"


def test_a_recipe_changes_one_argument_of_its_trainer_layers_checkpoint(monkeypatch, capsys):
    """recipes/internvl3_1b/rl.yaml restates the ModelCheckpoint entry with its own interval: the entry merges
    into the trainer layer's (same class, same place), which keeps its other arguments."""
    monkeypatch.setenv("INTERNVL_CHECKPOINT", "/checkpoints/InternVL3-1B")
    printed = _print_config(["--config", "recipes/internvl3_1b/rl.yaml", "--data.init_args.train", "t.jsonl"], capsys)
    (checkpoint,) = printed["trainer"]["callbacks"]
    assert checkpoint["init_args"]["every_n_train_steps"] == 16
    assert checkpoint["init_args"]["save_last"] is True and checkpoint["init_args"]["enable_version_counter"] is False
    assert compose(REPO / "recipes/internvl3_1b/rl.yaml")["trainer"]["callbacks"][0]["init_args"] == {
        key: checkpoint["init_args"][key] for key in ("every_n_train_steps", "save_last", "enable_version_counter")
    } | {"dirpath": "${trainer.default_root_dir}/checkpoints"}


def test_the_1b_and_8b_mpo_recipes_differ_only_in_their_model_layer():
    one, eight = ((REPO / f"recipes/internvl3_{size}/mpo.yaml").read_text().splitlines() for size in ("1b", "8b"))
    assert [(a, b) for a, b in zip(one, eight, strict=True) if a != b] == [
        ("  - ../models/internvl3_1b.yaml", "  - ../models/internvl3_8b.yaml")
    ]


def test_a_missing_layer_and_a_cycle_are_named(tmp_path):
    recipe = _write(tmp_path, "r.yaml", "layers: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="r.yaml: layer 'missing.yaml' is not a file"):
        expand_configs(["--config", str(recipe)])
    _write(tmp_path, "a.yaml", "layers: [b.yaml]\n")
    _write(tmp_path, "b.yaml", "layers: [a.yaml]\n")
    with pytest.raises(ValueError, match="layers form a cycle"):
        compose(tmp_path / "a.yaml")


def test_the_readme_example_of_a_run_of_your_own_builds_internvl3_2b(tmp_path, monkeypatch, capsys):
    """README's "Recipes in layers" example, a file outside recipes/ naming the shipped layers, with the 2B model."""
    import re

    import torch

    from lit_internvl.models import internvl

    (example,) = re.findall(r"```yaml\n(# my_runs/.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (tmp_path / "recipes").symlink_to(RECIPES)
    recipe = _write(tmp_path, example.splitlines()[0].removeprefix("# "), example)
    monkeypatch.setenv("INTERNVL_CHECKPOINT", "/checkpoints/InternVL3-2B")
    printed = _print_config(["--config", str(recipe), "--data.init_args.train", "t.jsonl"], capsys)
    assert printed["model"]["init_args"]["decoder"]["init_args"]["config"] == "InternVL3-2B"
    assert printed["trainer"]["default_root_dir"] == "runs/internvl3_2b_sft"  # its file name, outside recipes/
    stage = stage_on_meta(recipe)
    with torch.device("meta"):
        expected = sum(p.numel() for p in internvl("InternVL3-2B").parameters())
    assert sum(p.numel() for p in stage.model.parameters()) == expected
