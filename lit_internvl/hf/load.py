"""Build a :class:`VisionLanguageModel` and fill it: from a Hugging Face folder (either layout) or from
lit_internvl weights (a Lightning ``.ckpt``, a ``.safetensors``) of a named architecture."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from lit_internvl.checkpoints import read_state_dict
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.hf.config import CheckpointSpec, read_config
from lit_internvl.hf.export import refuse_lora
from lit_internvl.hf.files import checkpoint_folder, read_tensors
from lit_internvl.hf.names import preview, to_ours
from lit_internvl.models.builders import internvl, vlm_from_configs
from lit_internvl.models.vlm import VisionLanguageModel
from lit_internvl.models.vocabulary import grow_vocabulary

log = logging.getLogger(__name__)


def read_vlm_state_dict(path: str | Path, spec: CheckpointSpec | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under lit_internvl's names (``vision.…``, ``connector.…``, ``decoder.…``),
    in their stored dtype. This is what ``init_from: hf:/path`` loads."""
    folder = checkpoint_folder(path)
    spec = spec or read_config(folder, image_context_id=-1)  # the weights do not depend on the id
    return to_ours(read_tensors(folder), spec, str(folder))


def build_vlm(spec: CheckpointSpec) -> VisionLanguageModel:
    """An (untrained) model with the architecture ``spec`` describes; build it under ``torch.device("meta")``
    to skip the initialisation."""
    return vlm_from_configs(spec.vision, spec.language, spec.image_context_id, spec.downsample_ratio, flash=spec.flash)


def load_vlm(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    image_context_id: int | None = None,
) -> VisionLanguageModel:
    """A :class:`VisionLanguageModel` with a checkpoint folder's weights, in eval mode.

    ``dtype`` casts floating-point weights (default: as stored); every tensor must match the
    architecture the config describes, or the error lists what is missing and what is left over.
    """
    folder = checkpoint_folder(path)
    spec = read_config(folder, image_context_id)
    if spec.image_context_id is None:
        raise ValueError(f"{folder}: no {IMG_CONTEXT} token in the tokenizer files; pass image_context_id=")
    state = read_vlm_state_dict(folder, spec)
    with torch.device("meta"):
        model = build_vlm(spec)
    load_state_exactly(model, state, str(folder), device=device, dtype=dtype)
    return model.eval()


def model_from_weights(source_path: str | Path, arch: str, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """The ``arch`` architecture (a preset name or the Hugging Face folder a run started from) with the weights of
    a Lightning ``.ckpt`` or a ``.safetensors`` of lit_internvl names, in eval mode. Tensors outside the model
    (a stage's loss modules, say) are ignored; LoRA adapters are refused until merged."""
    source = Path(source_path)
    state = read_state_dict(str(source))  # drops the LightningModule's "model." prefix
    refuse_lora(state)
    arch_dir = Path(arch.removeprefix("hf:"))
    with torch.device("meta"):
        model = build_vlm(read_config(arch_dir)) if arch_dir.is_dir() else internvl(arch)
    table = state.get("vision.embeddings.position_embedding")
    if table is not None and hasattr(model.vision, "resize"):  # the size the run trained at (its table's)
        model.vision.resize(math.isqrt(table.shape[1] - 1) * model.vision.patch_size)
        model.tile_size = model.vision.config.image_size
    # A run that grew the vocabulary for added tokens (models.vocabulary) saved more rows than the arch has.
    rows = state.get("decoder.embed_tokens.weight", torch.empty(0)).shape[0] - model.decoder.embed_tokens.num_embeddings
    if rows > 0:
        log.info("%s: %s", source, grow_vocabulary(model.decoder, rows))
    own = tuple(f"{name}." for name, _ in model.named_children())
    extra = [name for name in state if not name.startswith(own)]
    if extra:
        log.info("%s: %d tensor(s) outside the model ignored%s", source, len(extra), preview(extra))
    load_state_exactly(model, {k: v for k, v in state.items() if k.startswith(own)}, str(source), dtype=dtype)
    return model.eval()


def load_state_exactly(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Load every tensor of ``model`` from ``state`` (names and shapes must match exactly), assigning the
    tensors so that a model built on the meta device is materialised without a second copy."""
    _check_names_and_shapes(model.state_dict(), state, source)

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)

    model.load_state_dict({name: cast(tensor) for name, tensor in state.items()}, assign=True)
    # Non-persistent buffers (RoPE frequencies) are not in a checkpoint: re-create those left on meta.
    target = torch.device(device) if device is not None else torch.device("cpu")
    for module in model.modules():
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            if not hasattr(module, "reset_parameters"):
                raise ValueError(f"{type(module).__name__} has buffers on the meta device and no reset_parameters()")
            module.to_empty(device=target, recurse=False)
            module.reset_parameters()


def _check_names_and_shapes(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str
) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model's architecture: "
            f"{len(missing)} missing{preview(missing)}, {len(unexpected)} unexpected{preview(unexpected)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            shapes = f"{tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            raise ValueError(f"{source}: {name} has shape {shapes}")
