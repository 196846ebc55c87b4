"""LoRA through peft on any part of a model: add, save, disable, merge.

Targets follow InternVL's recipes: the decoder's ``q, k, v, o, gate, up, down`` projections and
the vision encoder's ``qkv, proj, fc1, fc2``; ``alpha = 2r`` and dropout 0.05 by default. Adapters
are injected in place (parameter names keep their ``vision.`` / ``decoder.`` homes, with peft's
``lora_A``/``lora_B`` added), so checkpoints and ``init_from`` keep working.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

# Full-name regexes (peft matches the whole module name) per part of a VisionLanguageModel.
LORA_TARGETS = {
    "decoder": r"decoder\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "vision": r"vision\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
}


LoraPart = Literal["decoder", "vision"]


@dataclass
class LoraOptions:
    """``lora:`` of a vision-language stage: adapters of rank ``r`` on ``parts`` (InternVL's
    ``--use_llm_lora r`` is ``parts: [decoder]``, ``--use_backbone_lora r`` adds ``vision``)."""

    parts: list[LoraPart] = field(default_factory=lambda: ["decoder"])
    r: int = 16
    alpha: int | None = None  # None: 2r, as InternVL's scripts
    dropout: float = 0.05


def add_lora(
    model: nn.Module, parts: list[str], r: int = 16, alpha: int | None = None, dropout: float = 0.05
) -> nn.Module:
    """Inject LoRA adapters into ``parts`` (keys of :data:`LORA_TARGETS`) and mark them trainable.

    Every other parameter keeps its ``requires_grad`` as it was: freezing the adapted parts'
    base weights is the caller's choice (a stage freezes the parts it gives adapters to).
    """
    unknown = sorted(set(parts) - set(LORA_TARGETS))
    if unknown or not parts:
        raise ValueError(f"LoRA parts {unknown or parts} unknown; choose from {sorted(LORA_TARGETS)}")
    pattern = "|".join(f"({LORA_TARGETS[p]})" for p in parts)
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout, target_modules=pattern)
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    training = model.training
    inject_adapter_in_model(config, model)
    model.train(training)  # the injected dropout layers start in training mode
    for name, param in model.named_parameters():
        # peft moves a wrapped layer's weight to ``….base_layer.weight``; it keeps its old setting.
        param.requires_grad = "lora_" in name or before.get(name.replace(".base_layer.", "."), param.requires_grad)
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights alone (peft's naming), e.g. to save with safetensors."""
    return get_peft_model_state_dict(model)


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: adapters off inside the block (the MPO reference model under LoRA)."""
    layers = lora_layers(model)
    for _, layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.enable_adapters(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back: the model is then an
    ordinary module again (same names and shapes as before LoRA)."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model
