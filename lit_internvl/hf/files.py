"""The files of a checkpoint folder: tensors (safetensors, ``weights_only`` pickles), JSON, token ids from
tokenizer files, sharded saving and tokenizer-file copying. Nothing from a folder is executed."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a folder has a tokenizer if it has one of these
# Files of a tokenizer folder that travel with an export (never ``.py`` files: no remote code).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip
# Image-processor files: copied only from a transformers-layout folder (OpenGVLab's describe another processor).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


class UnsupportedCheckpointError(ValueError):
    """The checkpoint asks for something lit_internvl's components do not implement, or stores it in a form
    lit_internvl does not read (a pickle that would run code)."""


def checkpoint_folder(path: str | Path) -> Path:
    """``path`` (``hf:`` prefix allowed) as a folder that exists."""
    folder = Path(str(path).removeprefix("hf:")).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (config.json + weights)")
    return folder


def read_json(file: Path) -> dict:
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        with open(file, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{file} is not valid JSON ({error})") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (named by {file.parent / 'model.safetensors.index.json'})")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{file} is not a whole safetensors file: truncated or corrupt ({error})") from None


# -- tensors ---------------------------------------------------------------------------------------------------


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: safetensors (single file or sharded index) first, else plain-tensor pickles."""
    tensors: dict[str, torch.Tensor] = {}
    files = _safetensors_files(folder)
    if files:
        for file in files:
            tensors.update(_load_safetensors(file))
        return tensors
    pickles = _pickle_files(folder)
    if not pickles:
        raise FileNotFoundError(f"No weights in {folder}: expected *.safetensors (or a plain-tensor pytorch_model.bin)")
    for file in pickles:
        tensors.update(_read_pickle(file))
    return tensors


def weight_names(folder: Path) -> list[str]:
    """The tensor names of the folder, read from an index or the safetensors headers where there is one."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return list(_weight_map(index))
    files = _safetensors_files(folder)
    if files:
        names: list[str] = []
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    names.extend(handle.keys())
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{file} has no readable safetensors header ({error})") from None
        return names
    return [name for file in _pickle_files(folder) for name in _read_pickle(file)]


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no weight_map of tensor names to files")
    return weight_map


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(_weight_map(index).values()))]
    return sorted(folder.glob("*.safetensors"))


def _pickle_files(folder: Path) -> list[Path]:
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(_weight_map(index).values()))]
    files = (file for pattern in ("*.bin", "*.pt", "*.pth") for file in folder.glob(pattern))
    return sorted(file for file in files if file.name != "training_args.bin")


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:  # mmap (no copy) works for the zip format of torch.save only
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as error:  # noqa: BLE001 - any refusal of the restricted unpickler ends here
        raise UnsupportedCheckpointError(
            f"{file} is a pickle that torch.load(weights_only=True) refuses, so it was not read: lit_internvl never "
            f"unpickles arbitrary objects. Convert it to safetensors with a tool you trust. ({error})"
        ) from error
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise UnsupportedCheckpointError(f"{file} holds no state dict")
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def save_sharded(state: Mapping[str, torch.Tensor], output: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or numbered shards of at most ``max_shard_bytes`` each (a tensor alone may exceed
    it) with the ``model.safetensors.index.json`` that transformers reads."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(output / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(output / "model.safetensors.index.json", "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)


# -- tokenizer files -------------------------------------------------------------------------------------------


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in TOKENIZER_CORE)


def token_id(folder: Path, token: str) -> int | None:
    """A special token's id from the tokenizer files, read as JSON (no tokenizer code runs)."""
    added = folder / "added_tokens.json"
    if added.exists() and token in (table := read_json(added)):
        return int(table[token])
    config = folder / "tokenizer_config.json"
    if config.exists():
        for index, entry in (read_json(config).get("added_tokens_decoder") or {}).items():
            if entry.get("content") == token:
                return int(index)
    fast = folder / "tokenizer.json"
    if fast.exists():
        for entry in read_json(fast).get("added_tokens") or []:
            if entry.get("content") == token:
                return int(entry["id"])
    return None


def copy_tokenizer_files(tokenizer_dir: str | Path, output: Path) -> list[str]:
    """Copy a tokenizer folder's files (and a transformers folder's image-processor files) to ``output``;
    returns the names copied. JSON files lose their ``auto_map`` (classes of remote code the exported folder does
    not hold, and that loading it must never look for)."""
    source = checkpoint_folder(tokenizer_dir)
    if not has_tokenizer(source):
        raise FileNotFoundError(f"No tokenizer in {source}: expected one of {', '.join(TOKENIZER_CORE)}")
    names = list(TOKENIZER_FILES)
    if (source / "config.json").exists() and read_json(source / "config.json").get("model_type") == "internvl":
        names += PROCESSOR_FILES
    copied = [name for name in names if (source / name).exists()]
    for name in copied:
        if name.endswith(".json") and "auto_map" in (content := read_json(source / name)):
            content = {key: value for key, value in content.items() if key != "auto_map"}
            (output / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(source / name, output / name)
    return copied
