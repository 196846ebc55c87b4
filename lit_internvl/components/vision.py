"""InternViT, the vision encoder of the InternVL family, in one file.

Both published variants come from one config: the 300M style (LayerNorm, qkv bias, no qk-norm)
and the 6B style (RMSNorm, qk-norm over the full width, no qkv bias). Module and parameter names
follow the original OpenGVLab checkpoints (``embeddings.class_embedding``, ``layers.N.attn.qkv``,
``ls1``/``ls2``, ...), so their weights load by name.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import Backend, attention
from lit_internvl.components.layers import DropPath, NormType, make_norm

log = logging.getLogger(__name__)


@dataclass
class InternViTConfig:
    image_size: int = 448
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    norm_type: NormType = "layer_norm"  # "layer_norm" (300M) or "rms_norm" (6B)
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0
    # Which layer's output the encoder returns, counted as transformers' ``hidden_states``
    # (0 = embeddings, -1 = last layer; 48-layer 6B chat models use -4).
    select_layer: int = -1
    attn_backend: Backend = "sdpa"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside [-{self.num_layers + 1}, {self.num_layers}]")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_layers_run(self) -> int:
        """How many blocks a forward pass runs: blocks past ``select_layer`` are never used."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @classmethod
    def from_name(cls, name: VisionPreset, **overrides) -> InternViTConfig:
        if name not in VISION_PRESETS:
            raise ValueError(f"Unknown InternViT preset {name!r}; known: {sorted(VISION_PRESETS)}")
        return replace(VISION_PRESETS[name], **overrides)


VisionPreset = Literal["InternViT-300M-448px", "InternViT-6B-448px-V1-5", "InternViT-6B-224px", "tiny"]
VISION_PRESETS: dict[str, InternViTConfig] = {
    # InternVL 2.5/3 1B–8B: the published InternViT-300M-448px-V2_5.
    "InternViT-300M-448px": InternViTConfig(drop_path_rate=0.1),
    # InternVL 1.5 / 2 / 2.5 26B+: 45 layers, fed from the last layer.
    "InternViT-6B-448px-V1-5": InternViTConfig(
        hidden_size=3200,
        num_layers=45,
        num_heads=25,
        intermediate_size=12800,
        norm_type="rms_norm",
        qkv_bias=False,
        qk_norm=True,
        drop_path_rate=0.1,
    ),
    # InternVL 1 (the CVPR 2024 paper): 48 layers at 224 px; the chat model reads layer -4.
    "InternViT-6B-224px": InternViTConfig(
        image_size=224,
        hidden_size=3200,
        num_layers=48,
        num_heads=25,
        intermediate_size=12800,
        norm_type="rms_norm",
        qkv_bias=False,
        qk_norm=True,
        drop_path_rate=0.2,
    ),
    # The embedded default: 56 px images (4×4 patches), CPU-sized.
    "tiny": InternViTConfig(image_size=56, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
}


def resize_position_table(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A position table ``(1, 1 + g², C)`` (cls first, a square ``g × g`` grid) for a ``height × width`` grid:
    the cls entry kept, the grid resized bicubically in float32 (``align_corners=False``), as InternVL's
    ``resize_pos_embeddings`` (internvl_g/internvl/model/internvl_stage2/modeling_intern_vit.py) and InternViT's
    forward at other sizes do."""
    grid = math.isqrt(table.shape[1] - 1)
    if (height, width) == (grid, grid):
        return table
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    dim = patch_pos.shape[-1]
    patches = patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(height, width), mode="bicubic", align_corners=False)
    patch_pos = patches.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(cls_pos.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


class VisionEmbeddings(nn.Module):
    """Patches + cls token + learned absolute positions (bicubically interpolated to other sizes).

    The table is a parameter for the model's ``image_size``: :meth:`resize` replaces it once by the table of
    another size (which then trains, as InternVL's ``force_image_size`` does), and a state dict whose table is
    of another size is resized the same way when loaded, so a checkpoint of any size loads into a model of any.
    """

    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, config.grid_size**2 + 1, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.class_embedding, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def resize(self, grid_size: int) -> None:
        """Make the table one for a ``grid_size × grid_size`` patch grid (a new parameter; no-op at the same size)."""
        if grid_size == self.grid_size:
            return
        table = self.position_embedding.detach()
        if table.is_meta:
            resized = torch.empty(1, grid_size**2 + 1, table.shape[-1], device="meta", dtype=table.dtype)
        else:
            resized = resize_position_table(table, grid_size, grid_size)
        self.position_embedding = nn.Parameter(resized, requires_grad=self.position_embedding.requires_grad)
        self.grid_size = grid_size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "position_embedding"
        table = state_dict.get(key)
        if table is not None and table.ndim == 3 and table.shape[1] != self.position_embedding.shape[1]:
            log.info("%s: position table of %d positions resized to the %d² grid", key, table.shape[1], self.grid_size)
            state_dict[key] = resize_position_table(table, self.grid_size, self.grid_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """``(1, 1 + height·width, C)`` for a ``height × width`` patch grid."""
        return resize_position_table(self.position_embedding, height, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        height, width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat((cls, patches), dim=1) + self.position_embeddings(height, width)


class VisionAttention(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.attn_backend = config.attn_backend
        dim = config.hidden_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        # The 6B encoder normalises q and k over the full width, before splitting into heads.
        self.q_norm = make_norm("rms_norm", dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm("rms_norm", dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, backend=self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block with LayerScale and drop-path.

    ::

        x ──► norm1 ─► attn ─► ·ls1 ─► drop_path ─► (+) ──► norm2 ─► mlp ─► ·ls2 ─► drop_path ─► (+) ──►
        └───────────────────────────────────────────┘  └───────────────────────────────────────┘
    """

    def __init__(self, config: InternViTConfig, drop_path: float) -> None:
        super().__init__()
        self.layer_scale_init = config.layer_scale_init
        self.norm1 = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.attn = VisionAttention(config)
        self.ls1 = nn.Parameter(torch.empty(config.hidden_size))
        self.norm2 = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.mlp = VisionMLP(config)
        self.ls2 = nn.Parameter(torch.empty(config.hidden_size))
        self.drop_path = DropPath(drop_path)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.ls1, self.layer_scale_init)
        nn.init.constant_(self.ls2, self.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop_path(self.mlp(self.norm2(x)) * self.ls2)


class InternViT(nn.Module):
    """InternViT vision encoder.

    Contract (shared by every image encoder in lit_internvl): ``forward(pixel_values (N, 3, H, W))
    → features (N, 1 + (H/p)·(W/p), hidden_size)``, the cls token first, then patches row-major;
    attributes ``hidden_size`` and ``patch_size``.

    ``drop_path_rate`` replaces the config's (a training script's ``--drop_path_rate`` beside a preset: the recipes'
    script layers set it without restating the model layer's ``config``).
    """

    def __init__(self, config: InternViTConfig | VisionPreset = "tiny", drop_path_rate: float | None = None) -> None:
        super().__init__()
        if isinstance(config, str):
            config = InternViTConfig.from_name(config)
        if drop_path_rate is not None:
            config = replace(config, drop_path_rate=drop_path_rate)
        self.config = config
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size
        self.embeddings = VisionEmbeddings(config)
        rates = torch.linspace(
            0, config.drop_path_rate, config.num_layers, device="cpu"
        ).tolist()  # also under torch.device("meta")
        self.layers = nn.ModuleList(VisionBlock(config, rate) for rate in rates)

    def resize(self, image_size: int) -> None:
        """Train at ``image_size`` px from now on: ``config.image_size`` and the position table (resized once,
        a parameter of the new size) change together. A no-op at the current size."""
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.embeddings.resize(image_size // self.patch_size)
        self.config = replace(self.config, image_size=image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values ``(N, 3, H, W)`` normalised → ``(N, 1 + H·W/p², hidden_size)``."""
        x = self.embeddings(pixel_values)
        for layer in self.layers[: self.config.num_layers_run]:
            x = layer(x)
        return x
