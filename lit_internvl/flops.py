"""Model FLOPs of lit_internvl's networks, counted analytically from their configs and a batch's shapes.

What MFU divides by the device's peak: the multiply-adds the model needs (2 FLOPs each), not what the
kernels happen to execute. Counted:

- every linear map and the patch-embedding convolution, on the tokens that exist: vision tokens of every
  tile (cls + patches), connector tokens, and the decoder's *real* tokens (padding excluded);
- attention scores and the weighted sum, ``4·n²·heads·head_dim`` per layer for a sequence of ``n``
  tokens, with ``n`` the length of each *document* of a packed row (documents do not attend to each
  other) and the full square also for causal attention (the PaLM convention, as
  ``torch.utils.flop_counter`` counts it);
- a training step is forward + backward = 3 × forward, less the patch embedding's input gradient (the
  pixels need none). Recomputation (activation checkpointing, a kernel that recomputes attention in its
  backward) is hardware work, not model work, and is not counted.

Norms, activations, RoPE and the softmax are left out (they are memory-bound and small).
``tests/test_throughput.py`` checks the count against ``FlopCounterMode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from lit_internvl.batch import Views
from lit_internvl.components.connectors import MultiBudgetConnector, PixelShuffleMLP
from lit_internvl.components.language import LanguageConfig
from lit_internvl.components.vision import InternViTConfig


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs by kind; :attr:`training` is those of a forward + backward pass."""

    linear: int = 0  # linear maps and the patch-embedding convolution
    attention: int = 0  # q·kᵀ and attention·v
    no_input_grad: int = 0  # part of ``linear`` whose input needs no gradient (the patch embedding)

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(
            self.linear + other.linear, self.attention + other.attention, self.no_input_grad + other.no_input_grad
        )

    @property
    def forward(self) -> int:
        return self.linear + self.attention

    @property
    def training(self) -> int:
        """Backward costs two forwards (gradients of inputs and of weights), except one for the layers whose
        input needs no gradient."""
        return 3 * self.forward - self.no_input_grad


def vision_flops(config: InternViTConfig, tiles: int, height: int | None = None, width: int | None = None) -> FlopCount:
    """InternViT on ``tiles`` images of ``height × width`` pixels (default: the config's image size)."""
    height, width = height or config.image_size, width or config.image_size
    patches = (height // config.patch_size) * (width // config.patch_size)
    length, dim = 1 + patches, config.hidden_size
    patch_embedding = 2 * patches * 3 * config.patch_size**2 * dim
    per_block_linear = 2 * length * (dim * 3 * dim + dim * dim + 2 * dim * config.intermediate_size)
    per_block_attention = 4 * length * length * dim
    blocks = config.num_layers_run
    return FlopCount(
        linear=tiles * (patch_embedding + blocks * per_block_linear),
        attention=tiles * blocks * per_block_attention,
        no_input_grad=tiles * patch_embedding,
    )


def connector_flops(connector: nn.Module, tiles: int, patches: int) -> FlopCount:
    """The pixel-shuffle MLP exactly; another connector as 2 × its linear weights × its output tokens."""
    if isinstance(connector, MultiBudgetConnector):  # the default budget's projector: what a tile runs through
        connector = connector.projectors[0]
    tokens = connector.tokens_per_tile(patches)
    if isinstance(connector, PixelShuffleMLP):
        inner, text_dim = connector.fc1.in_features, connector.fc1.out_features
        return FlopCount(linear=tiles * 2 * tokens * (inner * text_dim + text_dim * text_dim))
    weights = sum(m.weight.numel() for m in connector.modules() if isinstance(m, nn.Linear))
    return FlopCount(linear=tiles * 2 * tokens * weights)


def transformer_flops(config: LanguageConfig, lengths: Sequence[int], head: bool = True) -> FlopCount:
    """A LLaMA-family stack over documents of the given lengths (the output head on every token when ``head``).

    A mixture-of-experts layer counts what a token runs: the router (``H·E``) and its ``top_k`` experts, not all E
    (the model FLOPs of an MoE, as MFU counts them for Qwen3-MoE / DeepSeek-style models)."""
    dim, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention_weights = dim * q_dim + 2 * dim * kv_dim + q_dim * dim
    moe = config.moe
    mlp_weights = 0
    for layer in range(config.num_layers):
        if moe is not None and moe.is_sparse(layer):
            mlp_weights += dim * moe.num_experts + moe.top_k * 3 * dim * moe.intermediate_size
        else:
            mlp_weights += 3 * dim * config.intermediate_size
    per_token = 2 * (config.num_layers * attention_weights + mlp_weights)
    if head:
        per_token += 2 * dim * config.vocab_size
    attention = config.num_layers * sum(4 * n * n * q_dim for n in lengths)
    return FlopCount(linear=per_token * sum(lengths), attention=attention)


def document_lengths(attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None, shape=None) -> list[int]:
    """Token counts of every document of a batch: each packed document, or each row's real tokens."""
    if document_ids is not None:
        lengths = []
        for row in document_ids:
            ids = row[row >= 0]
            lengths += torch.unique_consecutive(ids, return_counts=True)[1].tolist()
        return lengths
    if attention_mask is not None:
        return attention_mask.sum(dim=1).tolist()
    batch, length = shape
    return [length] * batch


def vlm_flops(model: nn.Module, lengths: Sequence[int], tiles: int, image_size: int | None = None) -> FlopCount:
    """A :class:`~lit_internvl.models.VisionLanguageModel` (InternViT vision, any connector, a Decoder)
    on ``tiles`` image tiles and decoder documents of the given lengths."""
    vision = model.vision.config
    size = image_size or vision.image_size
    patches = (size // vision.patch_size) ** 2
    count = transformer_flops(model.decoder.config, lengths, head=True)
    if tiles:
        count = count + vision_flops(vision, tiles, size, size) + connector_flops(model.connector, tiles, patches)
    return count


def batch_flops(model: nn.Module, batch: Views) -> FlopCount | None:
    """The FLOPs of ``model`` on the first view of a batch of lit_internvl's collators: a VisionLanguageModel on
    conversation batches (packed or padded), or a DualEncoder on pair batches; None for other models."""
    from lit_internvl.models.dual_encoder import DualEncoder
    from lit_internvl.models.vlm import VisionLanguageModel

    if batch.empty:
        return None
    view = batch.first
    ids, pixels = view.input_ids, getattr(view, "pixel_values", None)
    tiles = 0 if pixels is None else int(pixels.shape[0])
    image_size = None if pixels is None else int(pixels.shape[-1])
    lengths = document_lengths(view.attention_mask, getattr(view, "document_ids", None), tuple(ids.shape))
    if isinstance(model, VisionLanguageModel):
        return vlm_flops(model, lengths, tiles, image_size)
    towers = (getattr(model, "vision", None), getattr(model, "text_encoder", None))
    if isinstance(model, DualEncoder) and all(hasattr(tower, "config") for tower in towers):
        count = transformer_flops(model.text_encoder.config, lengths, head=False)
        count = count + vision_flops(model.vision.config, tiles, image_size, image_size)
        text = model.text_projection.weight.numel()
        pool = model.image_projection
        image = sum(p.numel() for p in pool.parameters() if p.dim() == 2)  # each matrix once a tile...
        pooling_attention = 0
        if pool.pooling == "attention":  # ...but keys and values once a token (cls and every patch)
            tokens = (image_size // model.vision.config.patch_size) ** 2 + 1
            attn = pool.cross_attn
            image += (attn.k.weight.numel() + attn.v.weight.numel()) * (tokens - 1)
            pooling_attention = 2 * 2 * tokens * attn.q.out_features * tiles  # one query: scores, weighted sum
        return count + FlopCount(linear=2 * (image * tiles + text * len(lengths)), attention=pooling_attention)
    return None


# -- the devices' peaks ------------------------------------------------------------------------------------------

Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8"]

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (which print the sparse figure for
# tf32/bf16/fp16/fp8: halved here). Lightning's table lacks "NVIDIA H200" and lists sparse figures for some chips, so
# MFU is counted against this one. fp32 is the non-tensor-core peak; tf32 is what fp32 matmuls run at when torch
# allows it (``torch.set_float32_matmul_precision("high")``). Keys are matched against the lower-cased device name in
# this order (the first key all of whose words occur in it), so that the specific variants come before the family.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h200 nvl": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "h200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},  # SXM: an H100 SXM's compute
    "h100 nvl": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "h100 pcie": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0},
    "h100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},  # SXM ("H100 80GB HBM3")
    "a100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},  # SXM and PCIe alike; no fp8
    "l40s": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1, "fp8": 733.0},
    "l40": {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0, "fp8": 362.0},
    "l4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
    "a10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
}


def peak_flops(device_name: str, precision: Precision) -> float | None:
    """Dense peak FLOP/s of one device, by its name (``torch.cuda.get_device_name()``) and the precision of its
    matmuls; None for a device or precision not in :data:`PEAK_TFLOPS`."""
    words = set(device_name.lower().replace("-", " ").split())
    for key, peaks in PEAK_TFLOPS.items():
        if set(key.split()) <= words:
            return peaks[precision] * 1e12 if precision in peaks else None
    return None


def matmul_precision(dtype: torch.dtype) -> Precision | None:
    """The :data:`Precision` a compute dtype's matmuls run at (float32 as tf32 where torch allows it)."""
    if dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8"}.get(dtype)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """:func:`peak_flops` of a CUDA device at the matmul precision of ``dtype``; None elsewhere (a CPU has no entry)."""
    precision = matmul_precision(dtype)
    if device.type != "cuda" or precision is None:
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the model's FLOPs per second over the device's peak (None without a peak)."""
    return None if not peak else flops / seconds / peak
