"""LoRA through peft on any part of a model: add, save, disable, merge.

Targets follow InternVL's recipes: the decoder's ``q, k, v, o, gate, up, down`` projections and
the vision encoder's ``qkv, proj, fc1, fc2``; ``alpha = 2r`` and dropout 0.05 by default. Adapters
are injected in place (parameter names keep their ``vision.`` / ``decoder.`` homes, with peft's
``lora_A``/``lora_B`` added), so checkpoints and ``init_from`` keep working.

A mixture-of-experts decoder's experts are stacked parameters, not ``nn.Linear`` modules
(:class:`~lit_internvl.components.moe.Experts`): peft (≥ 0.17) adapts them through ``target_parameters``, one
``ParamWrapper`` per stacked tensor (``gate_up_proj``, ``down_proj``) holding a rank-r adapter per expert
(``lora_A`` ``(E·r, in)``, ``lora_B`` ``(out, E·r)``) and adding ``B·A`` to the weight for the forward (the router,
``mlp.gate``, is not adapted). peft refuses dropout on such adapters (it cannot be factored out of the weight), so
the experts' adapters have none whatever ``dropout`` says; they are injected as a second pass of the same adapter.
"""

from __future__ import annotations

import warnings
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
    experts: bool = True  # with "decoder": adapters on a mixture-of-experts decoder's experts too


def add_lora(
    model: nn.Module,
    parts: list[str],
    r: int = 16,
    alpha: int | None = None,
    dropout: float = 0.05,
    experts: bool = True,
) -> nn.Module:
    """Inject LoRA adapters into ``parts`` (keys of :data:`LORA_TARGETS`) and mark them trainable; with ``experts``,
    also into the experts of a mixture-of-experts decoder when ``"decoder"`` is a part (module docstring).

    Every other parameter keeps its ``requires_grad`` as it was: freezing the adapted parts'
    base weights is the caller's choice (a stage freezes the parts it gives adapters to).
    """
    unknown = sorted(set(parts) - set(LORA_TARGETS))
    if unknown or not parts:
        raise ValueError(f"LoRA parts {unknown or parts} unknown; choose from {sorted(LORA_TARGETS)}")
    pattern = "|".join(f"({LORA_TARGETS[p]})" for p in parts)
    alpha = 2 * r if alpha is None else alpha
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    training = model.training
    inject_adapter_in_model(config, model)
    stacked = expert_parameters(model) if experts and "decoder" in parts else []
    if stacked:
        experts_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[], target_parameters=stacked
        )
        with warnings.catch_warnings():  # "multiple adapters": the same adapter, its second set of targets
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(experts_config, model)
    model.train(training)  # the injected dropout layers start in training mode
    for name, param in model.named_parameters():
        # peft moves a wrapped layer's weight to ``….base_layer.weight``; it keeps its old setting.
        param.requires_grad = "lora_" in name or before.get(name.replace(".base_layer.", "."), param.requires_grad)
    return model


def expert_parameters(model: nn.Module) -> list[str]:
    """The full names of the stacked expert tensors of a decoder's mixture-of-experts layers."""
    from lit_internvl.components.moe import Experts

    experts = [name for name, module in model.named_modules() if isinstance(module, Experts)]
    return [f"{name}.{tensor}" for name in experts for tensor in ("gate_up_proj", "down_proj")]


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
    ordinary module again (same names and shapes as before LoRA). The experts' wrappers nest (one per stacked
    tensor): each merges its own, and the outermost gives way to the plain module."""
    layers = lora_layers(model)  # outermost first
    for _, layer in layers:
        layer.merge()
    replaced: list[str] = []
    for name, layer in layers:
        if any(name.startswith(f"{outer}.") for outer in replaced):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
        replaced.append(name)
    return model
