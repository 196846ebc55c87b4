"""Reading weights safely: Lightning checkpoints, safetensors files and Hugging Face folders.

Nothing here unpickles arbitrary objects: ``.ckpt``/``.pt`` files are read with
``torch.load(weights_only=True)``, everything else through safetensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, by name.

    ``source``: a Lightning checkpoint (``.ckpt``; the LightningModule's ``model.`` prefix is
    dropped), a ``.safetensors`` file, or ``hf:/path/to/folder`` (a transformers or OpenGVLab
    InternVL checkpoint, mapped to lit_internvl's names by :mod:`lit_internvl.hf`).
    """
    if source.startswith("hf:"):
        from lit_internvl.hf import read_vlm_state_dict

        return read_vlm_state_dict(source[3:])
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"init_from: no checkpoint at {source!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling refusal ends up here
        raise ValueError(f"{source!r} cannot be read as plain tensors (weights_only=True): {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"{source!r} holds no state dict")
    prefix = "model."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def rename_prefixes(state: Mapping[str, torch.Tensor], rename: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Replace the first matching key prefix: ``{"image_encoder.": "vision."}``; an empty target drops the key."""
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


def load_into(module: nn.Module, source: str, rename: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Load ``source`` into ``module`` by name, partially: returns (missing, unexpected) keys and logs
    them; a shape disagreement is an error naming the key."""
    state = read_state_dict(source)
    if rename:
        state = rename_prefixes(state, rename)
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"init_from {source!r}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    result = module.load_state_dict(state, strict=False)
    loaded = len(state) - len(result.unexpected_keys)
    log.warning(
        "init_from %s: loaded %d tensors; %d missing (kept their initialisation)%s; %d unexpected (ignored)%s",
        source, loaded, len(result.missing_keys), _preview(result.missing_keys), len(result.unexpected_keys),
        _preview(result.unexpected_keys),
    )  # fmt: skip
    if loaded == 0:
        raise ValueError(f"init_from {source!r}: no tensor matches the model's names (after rename {dict(rename or {})})")
    return list(result.missing_keys), list(result.unexpected_keys)


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    return f" [{shown}{', …' if len(keys) > limit else ''}]"
