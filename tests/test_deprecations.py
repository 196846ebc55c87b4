"""Renamed and dropped YAML keys: an older config still runs, warned once with the key to use now."""

import warnings

import pytest
import torch
import yaml

from lit_internvl import deprecations
from lit_internvl.cli import main
from lit_internvl.deprecations import dropped, renamed, upgrade
from lit_internvl.recipes import compose


def _old_style(tmp_path, recipe: str) -> str:
    """The recipe as it was written before the image tower of the dual-encoder stages became ``vision``."""
    config = compose(recipe)
    config.pop("layers", None)
    init_args = config["model"]["init_args"]
    config["model"]["init_args"] = {("image_encoder" if k == "vision" else k): v for k, v in init_args.items()}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _printed_config(args, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", ["recipes/stage1.yaml", "recipes/stage2.yaml"])
def test_an_old_stage_config_parses_to_the_current_one_warning_with_the_new_key(recipe, tmp_path, capsys):
    with pytest.warns(FutureWarning) as warned:
        old = _printed_config(["--config", _old_style(tmp_path, recipe)], capsys)
    current = _printed_config(["--config", recipe], capsys)

    assert old == current
    assert [str(w.message) for w in warned if w.category is FutureWarning] == [
        "model.init_args.image_encoder is deprecated; use model.init_args.vision"
    ]


def test_an_old_data_section_with_a_task_and_tokens_per_tile_parses_to_records(tmp_path, capsys):
    """Before stages declared their views, the data chose the batch (``task: vqa``) and typed the budget."""
    config = compose("recipes/sft.yaml")
    config.pop("layers", None)
    data = config["data"]["init_args"]
    data["task"] = {"questions": "vqa"}[data.pop("records")]
    data["tokens_per_tile"] = 9
    old = tmp_path / "old_sft.yaml"
    old.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.warns(FutureWarning) as warned:
        printed = _printed_config(["--config", str(old)], capsys)
    assert printed["data"] == _printed_config(["--config", "recipes/sft.yaml"], capsys)["data"]
    assert [str(w.message) for w in warned if w.category is FutureWarning] == [
        "data.init_args.task is deprecated; use data.init_args.records ('vqa' is now 'questions')",
        "data.init_args.tokens_per_tile is deprecated and ignored: the model tells the data its visual budgets in "
        "the handshake",
    ]


def test_an_old_config_builds_the_same_model(tmp_path):
    with pytest.warns(FutureWarning, match="model.init_args.vision"):
        old = main(["--config", _old_style(tmp_path, "recipes/stage1.yaml")], run=False).model
    current = main(["--config", "recipes/stage1.yaml"], run=False).model

    torch.manual_seed(0)
    old_model = old.build_model()
    torch.manual_seed(0)
    current_model = current.build_model()
    assert old.hparams == current.hparams
    old_state, current_state = old_model.state_dict(), current_model.state_dict()
    assert old_state.keys() == current_state.keys()
    assert all(torch.equal(old_state[name], current_state[name]) for name in current_state)


@pytest.mark.parametrize(
    "override",
    [
        ["--model.init_args.image_encoder.init_args.config", "InternViT-300M-448px"],
        ["--model.image_encoder.init_args.config=InternViT-300M-448px"],  # jsonargparse's short form, without init_args
    ],
)
def test_an_old_key_on_the_command_line_reaches_the_new_one(override, capsys):
    with pytest.warns(FutureWarning, match="model.init_args.image_encoder is deprecated; use model.init_args.vision"):
        config = _printed_config(["--config", "recipes/stage1.yaml", *override], capsys)
    assert config["model"]["init_args"]["vision"]["init_args"]["config"] == "InternViT-300M-448px"


def test_a_key_is_renamed_only_for_the_class_it_belongs_to():
    args = ["fit", "--config", "recipes/stage1.yaml", "--data.init_args.image_encoder", "x"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upgrade(args) == args  # ShapesDataModule never had an image_encoder: jsonargparse reports it


ENTRIES = (
    renamed("lit_internvl.data.ShapesDataModule", "resolution", "tile_size", values={"tiny": 56, "small": 112}),
    dropped("lit_internvl.data.ShapesDataModule", "prefetch", "the shapes are generated on the fly"),
)


@pytest.mark.parametrize("given", ["file", "command line"])
def test_a_value_mapping_maps_and_a_dropped_key_is_ignored(given, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(deprecations, "DEPRECATIONS", ENTRIES)
    if given == "file":
        layer = tmp_path / "data.yaml"
        layer.write_text(yaml.safe_dump({"data": {"init_args": {"resolution": "small", "prefetch": 4}}}))
        args = ["--config", "recipes/stage1.yaml", "--config", str(layer)]
    else:
        args = ["--config", "recipes/stage1.yaml", "--data.init_args.resolution", "small", "--data.prefetch=4"]
    with pytest.warns(FutureWarning) as warned:
        config = _printed_config(args, capsys)

    assert config["data"]["init_args"]["tile_size"] == 112
    assert "prefetch" not in config["data"]["init_args"]
    assert sorted(str(w.message) for w in warned if w.category is FutureWarning) == [
        "data.init_args.prefetch is deprecated and ignored: the shapes are generated on the fly",
        "data.init_args.resolution is deprecated; use data.init_args.tile_size ('small' is now 112)",
    ]


def test_an_old_key_in_sys_argv_reaches_the_new_one_through_the_layers(monkeypatch, capsys):
    """The stage's class is named in a layer of the recipe, not in the recipe: layers are expanded first."""
    argv = ["lit_internvl", "fit", "-c", "recipes/stage1.yaml", "--model.image_encoder.init_args.config=tiny"]
    monkeypatch.setattr("sys.argv", [*argv, "--print_config"])
    with pytest.warns(FutureWarning, match="use model.init_args.vision"), pytest.raises(SystemExit):
        main()
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["vision"]["init_args"]["config"] == "tiny"


def test_the_stage_options_moved_into_blocks_parse_from_their_old_flat_keys(tmp_path, capsys):
    """A vision-language stage's `train` is `trainable` now, its speed and generation options typed blocks."""
    config = compose("recipes/sft.yaml")
    config.pop("layers", None)
    model = config["model"]["init_args"]
    model["train"] = model.pop("trainable")
    model.update(model.pop("generation"))  # max_new_tokens, flat as before
    model.update({"compile_blocks": False, "length_multiple": 16})
    old = tmp_path / "old_sft.yaml"
    old.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.warns(FutureWarning) as warned:
        printed = _printed_config(["--config", str(old), "--model.init_args.temperature", "0.5"], capsys)
    current = _printed_config(
        ["--config", "recipes/sft.yaml", "--model.init_args.speed.length_multiple", "16",
         "--model.init_args.generation.temperature", "0.5"], capsys,
    )  # fmt: skip
    assert printed["model"] == current["model"]
    messages = {str(w.message) for w in warned if w.category is FutureWarning}
    assert "model.init_args.train is deprecated; use model.init_args.trainable" in messages
    assert "model.init_args.max_new_tokens is deprecated; use model.init_args.generation.max_new_tokens" in messages
    assert "model.init_args.temperature is deprecated; use model.init_args.generation.temperature" in messages


def test_a_critic_config_written_before_the_renames_still_builds(tmp_path):
    """``generation.critic_config`` names the recipe a critic was trained with, maybe an older one."""
    from lit_internvl.recipes import stage_of_recipe

    config = compose("recipes/sft.yaml")
    config.pop("layers", None)
    model = config["model"]["init_args"]
    model["train"] = model.pop("trainable")
    model.update(model.pop("generation"))
    old = tmp_path / "old_critic.yaml"
    old.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.warns(FutureWarning, match="use model.init_args.trainable"):
        stage = stage_of_recipe(old)
    assert stage.hparams.trainable == ["connector", "decoder"] and stage.generation.max_new_tokens == 8
