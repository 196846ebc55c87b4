"""The shape of the house: imports point one way with no cycle, commands stay out of the library,
model and data meet in one handshake that names both YAML keys, and closed choices fail at parse time."""

import ast
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_internvl.cli import main
from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.stages import SFTStage

PACKAGE = Path(__file__).resolve().parents[1] / "lit_internvl"
# presets composed with a stage recipe (every run's own parse and build: tests/test_recipes.py)
STRATEGIES = sorted(str(p.relative_to(PACKAGE.parent)) for p in (PACKAGE.parent / "recipes/strategies").glob("*.yaml"))


# -- the import graph, lazy imports included ---------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _packages_run_by(target: str, importer: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: the packages above the target,
    less those above the importer itself (already running when it runs)."""
    parts = target.split(".")
    above = {".".join(parts[:i]) for i in range(1, len(parts))}
    own = {importer.rsplit(".", i)[0] for i in range(1, importer.count(".") + 1)} | {importer}
    return {package for package in above if package in MODULES and package not in own}


def _imports(name: str) -> set[str]:
    """Every lit_internvl module that ``name`` imports anywhere in its file (inside functions too), with the
    packages that importing it runs."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import sub``: the submodule when there is one, else the package itself
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                found |= {target} | _packages_run_by(target, name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # importing lit_internvl.data.collate from elsewhere runs lit_internvl.data's __init__ first
    assert "lit_internvl.data" in _packages_run_by("lit_internvl.data.collate", "lit_internvl.stages.base")
    assert "lit_internvl.data" not in _packages_run_by(
        "lit_internvl.data.collate", "lit_internvl.data.shapes.datamodule"
    )


def test_no_import_cycle_among_the_package_modules():
    assert _cycles(GRAPH) == []


def test_no_library_module_imports_a_command():
    offenders = {
        name: sorted(t for t in targets if t.startswith("lit_internvl.tools")) for name, targets in GRAPH.items()
    }
    assert {name: t for name, t in offenders.items() if t and not name.startswith("lit_internvl.tools")} == {}


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("lit_internvl.components", ("models", "stages", "data", "hf", "tools", "inference")),
        ("lit_internvl.models", ("stages", "data", "hf", "tools", "inference")),
        ("lit_internvl.data", ("stages", "models", "hf", "tools", "inference", "losses")),
        ("lit_internvl.hf", ("stages", "tools", "inference")),
        ("lit_internvl.stages", ("tools",)),
    ],
)
def test_imports_point_down(layer, forbidden):
    upward = {
        name: sorted(t for t in targets if t.split(".")[1] in forbidden)
        for name, targets in GRAPH.items()
        if name.startswith(layer)
    }
    assert {name: t for name, t in upward.items() if t} == {}


def _third_party_imports(name: str) -> set[str]:
    """The top-level packages outside lit_internvl that module ``name`` imports anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found - {"lit_internvl"}


def test_no_stage_holds_a_yaml_parser():
    """A stage is configured by its constructor; reading recipes is the CLI's (and lit_internvl.recipes') work."""
    parsers = {"yaml", "jsonargparse", "omegaconf"}
    holding = {n: sorted(_third_party_imports(n) & parsers) for n in MODULES if n.startswith("lit_internvl.stages")}
    assert {n: p for n, p in holding.items() if p} == {}
    assert {"yaml", "jsonargparse"} <= _third_party_imports("lit_internvl.recipes")  # the checker can see one


def test_checkpoints_never_import_hf():
    assert not any(t.startswith("lit_internvl.hf") for t in GRAPH["lit_internvl.checkpoints"])


# -- one handshake between model and data ------------------------------------------------------------------


def _sft(**options) -> SFTStage:
    return SFTStage(
        InternViT("tiny"), lambda v, t: PixelShuffleMLP(v, t), Decoder(options.pop("decoder", "tiny-shapes")), **options
    )


def _vqa(**options) -> ShapesDataModule:
    return ShapesDataModule(**{"records": "questions", "tokenizer": "shapes", "tile_size": 84, **options})


def test_handshake_sets_the_tile_size_and_the_image_context_id_from_the_data():
    stage = _sft().use_data(_vqa())
    stage.configure_model()
    data = stage.data
    assert stage.model.tile_size == 84 and stage.model.tokens_per_tile() == 9  # the encoder itself is native 56 px
    assert stage.model.image_context_id == data.tokenizer.token_to_id(IMG_CONTEXT)
    checkpoint = {}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint["lit_internvl_model"]["tile_size"] == 84


def test_handshake_tells_the_data_the_connectors_budget_at_the_datas_tile_size():
    stage = _sft().use_data(_vqa(tile_size=56))
    stage.configure_model()
    assert [(view.kind, view.budget) for view in stage.data.views] == [("conversation", 4)]  # 4×4 patches → 2×2


def test_handshake_refuses_a_tokenizer_larger_than_the_vocabulary_naming_both_keys():
    stage = _sft(decoder="tiny").use_data(_vqa())  # tiny's 272 ids, the shapes tokenizer's 394
    with pytest.raises(ValueError) as error:
        stage.configure_model()
    message = str(error.value)
    assert "data.init_args.tokenizer has 394 ids" in message and "model.init_args.decoder holds 272" in message


def test_handshake_runs_before_any_step_through_the_cli(tmp_path):
    args = ["fit", "--config", "recipes/sft.yaml", "--model.init_args.init_from", "null",
            "--model.class_path", "lit_internvl.stages.MPOStage", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(ValueError, match="model MPOStage .* data.init_args.records 'questions'"):
        main(args)


def test_both_datamodules_satisfy_the_stage_data_contract(tmp_path):
    from lit_internvl.data import RecordsDataModule
    from lit_internvl.data.contract import StageData

    records = tmp_path / "train.jsonl"
    records.write_text('{"text": "hello"}\n')
    for datamodule in (ShapesDataModule(), _vqa(), RecordsDataModule(train=str(records))):
        assert isinstance(datamodule, StageData), type(datamodule).__name__


# -- configuration: every strategy composes, a wrong choice fails at parse time ----------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes_with_a_recipe(strategy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "recipes/sft.yaml", "--config", strategy, "--print_config"])
    assert exit_info.value.code == 0
    assert "strategy" in yaml.safe_load(capsys.readouterr().out)["trainer"]


@pytest.mark.parametrize(
    "override, listed",
    [
        ("--model.init_args.attn_backend=flsh", "sdpa"),
        ("--model.init_args.loss_reduction=squre", "square"),
        ("--model.init_args.trainable=[connector,decodr]", "decoder"),
        ("--data.init_args.records=questons", "preference"),
    ],
)
def test_a_wrong_choice_fails_at_parse_time_listing_the_valid_ones(override, listed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "recipes/sft.yaml", override, "--print_config"])
    assert exit_info.value.code != 0
    assert listed in capsys.readouterr().err


def test_attn_backend_is_chosen_once_for_the_whole_model():
    from lit_internvl.components.attention import set_attention_backend
    from lit_internvl.models.qllama import QLLaMA

    stage = _sft(attn_backend="eager").use_data(_vqa())
    stage.configure_model()
    backends = {m.attn_backend for m in stage.model.modules() if hasattr(m, "attn_backend")}
    assert backends == {"eager"} and stage.model.decoder.config.attn_backend == "eager"
    with pytest.raises(ValueError, match="QLLaMA cannot run attention backend 'flex'"):
        set_attention_backend(QLLaMA(32, "tiny", num_queries=2), "flex")


# -- the chat command on a Hugging Face folder -------------------------------------------------------------


def test_chat_on_a_transformers_folder_prints_the_answer_transformers_generates(tmp_path, capsys):
    from PIL import Image

    from lit_internvl.inference import load_hf_chat_model
    from tests.test_hf import IMAGE_SIZE, _tokenizer_folder, _transformers_model

    reference = _transformers_model("qwen2", "300m", tie=False)
    reference.save_pretrained(str(tmp_path))
    _tokenizer_folder(tmp_path)
    image = tmp_path / "photo.png"
    pixels = torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=torch.Generator().manual_seed(2))
    Image.fromarray((pixels * 255).byte().numpy()).save(image)

    answer = main(["chat", "--checkpoint", f"hf:{tmp_path}", "--image", str(image), "--max-new-tokens", "4", "w5 w6"])
    assert capsys.readouterr().out.strip() == answer.strip() and answer.strip()

    # The same prompt through transformers' own generate gives the same tokens.
    _, builder = load_hf_chat_model(tmp_path)
    from lit_internvl.data.records import Record

    sample = builder(
        Record("conversation", "chat", {"conversations": [{"from": "human", "value": "w5 w6"}]}, [str(image)])
    )["views"]["prompt"]
    ids = sample["input_ids"][None]
    reference.generation_config.eos_token_id = None  # all four tokens; ours stops at the end token (cut below)
    with torch.no_grad():
        generated = reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=sample["pixel_values"], max_new_tokens=4,
            do_sample=False, pad_token_id=builder.tokenizer.pad_id,
        )[0, ids.shape[1] :]  # fmt: skip
    tokens, eos = generated.tolist(), builder.tokenizer.eos_id
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens  # ours stops at the end token
    assert answer == builder.tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_with_a_recipe_and_its_checkpoint_answers_as_the_trained_model(tmp_path, capsys):
    from lit_internvl.data.shapes import ShapesWorld
    from lit_internvl.inference import answer

    cli = main(["--config", "recipes/sft.yaml", "--model.init_args.init_from", "null"], run=False)
    stage = cli.model.use_data(cli.datamodule)
    torch.manual_seed(3)
    stage.configure_model()
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in stage.model.state_dict().items()}}, checkpoint)
    image = tmp_path / "scene.png"
    ShapesWorld(84).vqa(0)["image"].save(image)
    question = "<image>\nHow many objects are there?"

    printed = main(["chat", "--config", "recipes/sft.yaml", "--checkpoint", str(checkpoint), "--image", str(image),
                    "--max-new-tokens", "3", question])  # fmt: skip
    assert capsys.readouterr().out.strip() == printed.strip()
    builder = cli.datamodule.sample_builder(views=cli.datamodule.prompt_views())
    assert printed == answer(stage.model.eval(), builder, question, [str(image)], max_new_tokens=3)
