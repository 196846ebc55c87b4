"""Reading weights safely: Lightning checkpoints and safetensors files, loaded by name.

Nothing here unpickles arbitrary objects: ``.ckpt``/``.pt`` files are read with
``torch.load(weights_only=True)``, everything else through safetensors. Hugging Face folders are
:mod:`lit_internvl.hf`'s (a stage resolves ``init_from: hf:/folder`` there).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


MODEL_FACTS = "lit_internvl_model"  # the Lightning checkpoint's entry of facts about the model (tile size)


def _read_checkpoint(source: str):
    if source.startswith("hf:"):
        raise ValueError(f"{source!r} is a Hugging Face folder: read it with lit_internvl.hf.read_vlm_state_dict")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {source!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unpickling refusal ends up here
        raise ValueError(f"{source!r} cannot be read as plain tensors (weights_only=True): {error}") from error


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, by name: a Lightning checkpoint (``.ckpt``; the LightningModule's
    ``model.`` prefix is dropped) or a ``.safetensors`` file."""
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(source).exists():
            raise FileNotFoundError(f"no checkpoint at {source!r}")
        return load_file(source)
    checkpoint = _read_checkpoint(source)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"{source!r} holds no state dict")
    prefix = "model."
    return {
        (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items() if isinstance(v, torch.Tensor)
    }


def rename_prefixes(state: Mapping[str, torch.Tensor], rename: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Replace the first matching key prefix: ``{"text_encoder.": "qllama."}``; an empty target drops the key."""
    out = {}
    for key, value in state.items():
        for old, new in rename.items():
            if key.startswith(old):
                if new is None or new == "":
                    key = None
                else:
                    key = new + key[len(old) :]
                break
        if key is not None:
            out[key] = value
    return out


def read_model_facts(source: str) -> dict:
    """What the training run recorded about the model beside its weights (``{"tile_size": 448}``);
    empty for a ``.safetensors`` file or a checkpoint written before the facts were kept."""
    if source.endswith(".safetensors"):
        return {}
    checkpoint = _read_checkpoint(source)
    return dict(checkpoint.get(MODEL_FACTS) or {}) if isinstance(checkpoint, Mapping) else {}


def load_into(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str, rename: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Load the tensors ``state`` (read from ``source``, named in messages) into ``module`` by name,
    partially: returns (missing, unexpected) keys and logs them; a shape disagreement is an error
    naming the key (a vision position table of another grid is resized instead, see
    :class:`~lit_internvl.components.vision.VisionEmbeddings`)."""
    if rename:
        state = rename_prefixes(state, rename)
    try:  # modules that adapt a tensor on load (a vision position table of another size) do so here
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # torch names every key whose shape disagrees
        raise ValueError(f"init_from {source!r}: {error}") from None
    loaded = len(state) - len(result.unexpected_keys)
    log.warning(
        "init_from %s: loaded %d tensors; %d missing (kept their initialisation)%s; %d unexpected (ignored)%s",
        source, loaded, len(result.missing_keys), _preview(result.missing_keys), len(result.unexpected_keys),
        _preview(result.unexpected_keys),
    )  # fmt: skip
    if loaded == 0:
        raise ValueError(
            f"init_from {source!r}: no tensor matches the model's names (after rename {dict(rename or {})})"
        )
    return list(result.missing_keys), list(result.unexpected_keys)


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    return f" [{shown}{', …' if len(keys) > limit else ''}]"
