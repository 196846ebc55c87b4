"""InternVL3.5-Flash's pieces against the Flash checkpoints' remote code (``InternVL3_5-*-Flash``,
``modeling_internvl_chat.py``), whose behaviour is written here in the test as the reference: ``mlp2`` (pixel shuffle
at 0.25 → LayerNorm → a three-layer MLP), the router (``CrossAttentionPooling`` + ``Gating``, with the released
reuse of ``attn2``/``norm2`` for the last three pooling steps) and the decision rule of ``generate_flash``.

The reference modules are built with the remote code's own layers (``nn.MultiheadAttention``, ``nn.Sequential``), so
their ``state_dict`` has the released names; lit_internvl's modules are filled from it through a name map written
here, independent of :mod:`lit_internvl.hf`.
"""

import pytest
import torch
import torch.nn as nn

from lit_internvl.components import FlashConnector, FlashMLP, VisualResolutionRouter
from lit_internvl.components.router import compress_tiles

VISION, TEXT, HEADS = 64, 48, 16  # 16 heads as released: 4 channels a head
SIDE = 8  # a 112 px tile: 8×8 patches → 16 tokens (mlp1) or 4 (mlp2)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


# -- the reference: the remote code's behaviour ------------------------------------------------------------------


def reference_pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``InternVLChatModel.pixel_shuffle``, ps_version "v2": (n, w, h, c) → (n, w·s, h·s, c/s²)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def reference_mlp2(vit: int, llm: int, ratio: float = 0.5) -> nn.Sequential:
    """``self.mlp2``: LayerNorm(vit·(1/r)⁴) → Linear(·, 2·llm) → GELU → Dropout → Linear → GELU → Dropout → Linear."""
    width = vit * int(1 / ratio) ** 4
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, 2 * llm), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * llm, 2 * llm),
        nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * llm, llm),
    )  # fmt: skip


def reference_mlp1(vit: int, llm: int, ratio: float = 0.5) -> nn.Sequential:
    width = vit * int(1 / ratio) ** 2
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))


class ReferenceGating(nn.Module):
    """``Gating``: x += block_i(x) for four blocks, then LayerNorm → Linear(·, 2) → softmax (probabilities)."""

    def __init__(self, hidden: int, expansion: int = 4, dropout: float = 0.1) -> None:
        super().__init__()

        def block():
            return nn.Sequential(
                nn.Linear(hidden, hidden * expansion), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden * expansion, hidden), nn.Dropout(dropout), nn.LayerNorm(hidden),
            )  # fmt: skip

        self.block1, self.block2, self.block3, self.block4 = block(), block(), block(), block()
        self.gate = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))

    def forward(self, x):
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)


class ReferencePooling(nn.Module):
    """``CrossAttentionPooling``: a list of per-sample token tensors, padded with a key padding mask; attn1/norm1
    once, then attn2/norm2 three times (attn3, attn4, norm3, norm4 exist and are never called)."""

    def __init__(self, dim: int, num_heads: int = 16) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, dim))
        for i in (1, 2, 3, 4):
            setattr(self, f"attn{i}", nn.MultiheadAttention(dim, num_heads, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim))

    def forward(self, batched_tokens: list[torch.Tensor]) -> torch.Tensor:
        b, d = len(batched_tokens), batched_tokens[0].shape[-1]
        longest = max(t.shape[0] for t in batched_tokens)
        padded = torch.zeros(b, longest, d, dtype=self.query_token.dtype)
        padding = torch.ones(b, longest, dtype=torch.bool)
        for i, t in enumerate(batched_tokens):
            padded[i, : t.shape[0]], padding[i, : t.shape[0]] = t, False
        out = self.query_token.unsqueeze(0).expand(b, -1, -1)
        out = self.norm1(self.attn1(out, padded, padded, key_padding_mask=padding)[0])
        for _ in range(3):  # the released forward calls attn2 and norm2 for out2, out3 and out4
            out = self.norm2(self.attn2(out, padded, padded, key_padding_mask=padding)[0])
        return out.squeeze(1)


def reference_route(features: torch.Tensor, pooling, gating) -> torch.Tensor:
    """``extract_feature_flash``'s gate: the tiles' last hidden states without cls, one tile a "sample"
    (``generate_flash`` splits the tiles with lengths of ones), pooled and gated → probabilities ``(N, 2)``."""
    patches = features[:, 1:]
    side = int(patches.shape[1] ** 0.5)
    grid = patches.reshape(patches.shape[0], side, side, -1)
    merged = [tile.reshape(-1, tile.shape[-1]) for tile in torch.split(grid, [1] * grid.shape[0])]
    return gating(pooling(merged))


def reference_decision(gate: torch.Tensor, relative: float, absolute: float) -> torch.Tensor:
    """``generate_flash``: compress where gate[:, 0] > quantile(gate[:, 0] in float32, relative) and ≥ absolute."""
    threshold = torch.quantile(gate[:, 0].to(torch.float32), relative)
    return (gate[:, 0] > threshold) & (gate[:, 0] >= absolute)


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight random (norm weights around 1, the rest around 0), so that no swapped tensor goes unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and "norm" in name and name.endswith("weight") or ".gate.0.weight" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif ".5.weight" in name and "block" in name:  # the blocks' LayerNorm
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random Flash connector state under the released names (``mlp1.*``, ``mlp2.*``, ``pooling_before_gating.*``,
    ``gating.*``), made by the reference modules themselves."""
    torch.manual_seed(seed)
    parts = {
        "mlp1": reference_mlp1(VISION, TEXT), "mlp2": reference_mlp2(VISION, TEXT),
        "pooling_before_gating": ReferencePooling(VISION, HEADS), "gating": ReferenceGating(VISION),
    }  # fmt: skip
    return {f"{prefix}.{k}": v for prefix, m in parts.items() for k, v in randomise(m, seed).state_dict().items()}


# The map from the released names to lit_internvl's, written here (lit_internvl.hf has its own).
MLP1 = {"0": "norm", "1": "fc1", "3": "fc2"}
MLP2 = {"0": "norm", "1": "fc1", "4": "fc2", "7": "fc3"}


def ours_from_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        prefix, index, leaf = (name.split(".", 2) + [""])[:3]
        if prefix == "mlp1":
            out[f"mlp1.{MLP1[index]}.{leaf}"] = tensor
        elif prefix == "mlp2":
            out[f"mlp2.{MLP2[index]}.{leaf}"] = tensor
        elif prefix == "pooling_before_gating":
            out["router.pooling." + name.split(".", 1)[1]] = tensor
        else:
            out["router." + name] = tensor
    return out


def reference_modules(state):
    mlp1, mlp2 = reference_mlp1(VISION, TEXT), reference_mlp2(VISION, TEXT)
    pooling, gating = ReferencePooling(VISION, HEADS), ReferenceGating(VISION)
    for prefix, module in (("mlp1", mlp1), ("mlp2", mlp2), ("pooling_before_gating", pooling), ("gating", gating)):
        module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})
    return mlp1.eval(), mlp2.eval(), pooling.eval(), gating.eval()


def flash_connector(state) -> FlashConnector:
    connector = FlashConnector(VISION, TEXT, router_heads=HEADS)
    missing, unexpected = connector.load_state_dict(ours_from_released(state), strict=True)
    assert not missing and not unexpected
    return connector.eval()


def features(tiles: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(tiles, 1 + SIDE * SIDE, VISION, generator=torch.Generator().manual_seed(seed))


# -- the pieces -------------------------------------------------------------------------------------------------


def test_the_released_state_loads_into_the_flash_connector_with_no_missing_or_unexpected_key():
    state = released_state()
    ours = ours_from_released(state)
    assert set(ours) == set(FlashConnector(VISION, TEXT, router_heads=HEADS).state_dict())
    assert any(name.startswith("pooling_before_gating.attn4.") for name in state)  # released, unused: still loaded


def test_mlp2_equals_the_remote_code_on_the_same_weights():
    state = released_state()
    _, mlp2, *_ = reference_modules(state)
    connector = flash_connector(state)
    x = features()
    grid = x[:, 1:].reshape(x.shape[0], SIDE, SIDE, VISION)
    shuffled = reference_pixel_shuffle(grid, 0.25)  # downsample_ratio ** 2
    expected = mlp2(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))
    assert connector.budgets(SIDE * SIDE) == (16, 4)
    torch.testing.assert_close(connector(x, budget=4), expected, **TOLERANCE)
    torch.testing.assert_close(connector.mlp2(x), expected, **TOLERANCE)


def test_mlp1_of_the_flash_connector_is_the_usual_projector():
    state = released_state()
    mlp1, *_ = reference_modules(state)
    x = features()
    grid = reference_pixel_shuffle(x[:, 1:].reshape(x.shape[0], SIDE, SIDE, VISION), 0.5)
    expected = mlp1(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
    torch.testing.assert_close(flash_connector(state)(x), expected, **TOLERANCE)


def test_router_scores_equal_the_remote_code_with_its_reuse_of_attn2():
    state = released_state()
    _, _, pooling, gating = reference_modules(state)
    connector = flash_connector(state)
    x = features(7)
    expected = reference_route(x, pooling, gating)
    torch.testing.assert_close(connector.scores(x), expected, **TOLERANCE)
    # the released order is (1, 2, 2, 2): using attn3/attn4 as well would give other scores
    other = FlashConnector(VISION, TEXT, router_heads=HEADS, router_layer_order=(1, 2, 3, 4))
    other.load_state_dict(ours_from_released(state))
    assert not torch.allclose(other.eval().scores(x), expected, atol=1e-3)


def test_the_decision_rule_equals_generate_flash():
    generator = torch.Generator().manual_seed(3)
    for relative, absolute in ((0.1, 0.5), (0.5, 0.3), (0.0, 0.9), (1.0, 0.0)):
        for n in (1, 2, 9, 33):
            gate = torch.rand(n, 1, generator=generator)
            probs = torch.cat([gate, 1 - gate], dim=1)
            assert torch.equal(compress_tiles(probs, relative, absolute), reference_decision(probs, relative, absolute))
    lone = torch.tensor([[0.99, 0.01]])
    assert not compress_tiles(lone, 0.1, 0.5).any()  # strictly above its own quantile: a lone tile never is


def test_the_decision_rule_in_bfloat16_compares_as_generate_flash_does():
    generator = torch.Generator().manual_seed(4)
    gate = torch.rand(64, 1, generator=generator).to(torch.bfloat16)
    probs = torch.cat([gate, 1 - gate], dim=1)
    assert torch.equal(compress_tiles(probs, 0.3, 0.4), reference_decision(probs, 0.3, 0.4))


def test_pooling_layers_left_out_still_receive_a_zero_gradient():
    router = VisualResolutionRouter(VISION, HEADS)
    router(features()).sum().backward()
    attn4 = router.pooling.attn4.in_proj_weight.grad
    assert attn4 is not None and torch.count_nonzero(attn4) == 0
    assert torch.count_nonzero(router.pooling.attn2.in_proj_weight.grad) > 0


def test_flash_mlp_rejects_a_ratio_that_is_not_one_over_an_integer():
    with pytest.raises(ValueError, match="1/k"):
        FlashMLP(VISION, TEXT, downsample_ratio=0.3)
