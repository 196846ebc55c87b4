"""Values that would train wrongly are refused when the config is built, naming the YAML key; files that cannot be
read are errors naming the file; an export carries no reference to remote code."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data.tokenizer import HFTokenizer
from lit_internvl.hf.files import copy_tokenizer_files, read_tensors, weight_names
from lit_internvl.stages import RLStage, SFTStage
from tests.tiny import records

PARTS = dict(vision=partial(InternViT, "tiny"), connector=PixelShuffleMLP, decoder=partial(Decoder, "tiny"))


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("warmup_steps", -1, r"model\.init_args\.warmup_steps must be ≥ 0, got -1"),
        ("learning_rate", -1e-3, r"model\.init_args\.learning_rate must be ≥ 0"),
        ("min_lr_ratio", 1.5, r"model\.init_args\.min_lr_ratio must lie in \[0, 1\]"),
        ("betas", (0.9, 1.0), r"model\.init_args\.betas must lie in \[0, 1\)"),
    ],
)
def test_optimiser_values_that_would_train_wrongly_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        SFTStage(**PARTS, **{option: value})


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("group_size", 1, r"model\.init_args\.group_size must be at least 2 .* no advantage"),
        ("clip_low", -0.2, r"model\.init_args\.clip_low must be ≥ 0, got -0\.2"),
        ("clip_high", -0.1, r"model\.init_args\.clip_high must be ≥ 0"),
    ],
)
def test_rl_values_that_can_never_learn_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        RLStage(**PARTS, **{option: value})


def test_min_tiles_above_max_tiles_is_refused_naming_both(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"data\.init_args\.min_tiles 4 and max_tiles 2"):
        records(train=str(tmp_path / "d.jsonl"), min_tiles=4, max_tiles=2)


def test_the_command_line_refuses_before_anything_is_built(tmp_path):
    from tests.faults.runs import cli

    with pytest.raises(ValueError, match=r"model\.init_args\.warmup_steps must be ≥ 0"):
        cli("fit", tmp_path / "run", "--model.init_args.warmup_steps", "-5")
    assert not (tmp_path / "run").exists()


# -- files that cannot be read, named ------------------------------------------------------------------------------


def _weights(folder, **tensors):
    folder.mkdir(exist_ok=True)
    save_file(tensors or {"a": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def test_a_corrupt_safetensors_header_is_an_error_naming_the_file(tmp_path):
    file = _weights(tmp_path / "ckpt")
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    file.write_bytes(bytes(data))
    for read in (read_tensors, weight_names):
        with pytest.raises(ValueError, match=rf"{file}"):
            read(tmp_path / "ckpt")


def test_a_truncated_shard_is_an_error_naming_it(tmp_path):
    file = _weights(tmp_path / "ckpt")
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"{file} is not a whole safetensors file: truncated or corrupt"):
        read_tensors(tmp_path / "ckpt")


def test_an_index_that_does_not_parse_or_names_a_missing_shard_is_named(tmp_path):
    folder = tmp_path / "ckpt"
    _weights(folder)
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model.safetensors"')
    with pytest.raises(ValueError, match=rf"{index} is not valid JSON"):
        read_tensors(folder)
    index.write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors does not exist"):
        read_tensors(folder)


def test_a_corrupt_tokenizer_json_is_an_error_naming_it(tmp_path):
    from tests.test_hf import _tokenizer_folder

    folder = _tokenizer_folder(tmp_path / "tokenizer")
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:200])
    with pytest.raises(ValueError, match=r"tokenizer\.json \(not valid JSON\) cannot be read"):
        HFTokenizer(folder)


def test_export_copies_no_auto_map(tmp_path):
    from tests.test_hf import _tokenizer_folder

    folder = _tokenizer_folder(tmp_path / "tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    copy_tokenizer_files(folder, tmp_path / "out")
    copied = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in copied
    assert copied == {k: v for k, v in config.items() if k != "auto_map"}
