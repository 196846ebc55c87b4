"""The InternVL3.5 runs build, on the meta device, the released architectures: every run of ``recipes/internvl3_5_*``
has as many parameters as transformers' ``InternVLForConditionalGeneration`` built from the released configuration
(written here from the Qwen3 / Qwen3-MoE base models' config.json and InternViT-300M-448px-V2_5's), and that count
is the model table's (InternVL3.5 paper, Table 1; OpenGVLab's docs/en/internvl3.5/quick_start.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen3Config, Qwen3MoeConfig

from lit_internvl.recipes import RECIPES, entry_recipes
from tests.recipes import stage_on_meta

# InternViT-300M-448px-V2_5 (transformers' InternVLVisionConfig field names).
VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              attention_bias=True, use_qk_norm=False, norm_type="layer_norm", image_size=[448, 448],
              patch_size=[14, 14])  # fmt: skip
QWEN3 = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=False, rope_theta=1e6)
RELEASED = {  # model layer → (text config, the model table's total in billions)
    "internvl3_5_1b": (Qwen3Config(**QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                   num_attention_heads=16, num_key_value_heads=8), 1.1),
    "internvl3_5_8b": (Qwen3Config(**QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8), 8.5),
    "internvl3_5_30b_a3b": (Qwen3MoeConfig(**QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                           num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                                           num_experts_per_tok=8, moe_intermediate_size=768), 30.8),
}  # fmt: skip
# The Flash runs (recipes/internvl3_5_*_flash/) have their own test: tests/test_flash_recipes.py.
RUNS = sorted(
    str(p.relative_to(RECIPES))
    for p in entry_recipes()
    if p.parent.name.startswith("internvl3_5_") and not p.parent.name.endswith("_flash")
)


def _released_count(text_config) -> int:
    config = InternVLConfig(
        vision_config=VISION, text_config=text_config.to_dict(), downsample_ratio=0.5, tie_word_embeddings=False
    )  # transformers ties by the top-level flag
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def test_every_size_has_its_runs():
    assert {run.split("/")[0] for run in RUNS} == set(RELEASED)
    assert {run.split("/")[1] for run in RUNS} == {"sft_full.yaml", "sft_lora.yaml", "mpo.yaml", "rl.yaml",
                                                  "sft_full_sp8.yaml"}  # fmt: skip


@pytest.mark.parametrize("run", RUNS)
def test_each_run_builds_the_released_architecture_on_meta(run):
    text_config, billions = RELEASED[run.split("/")[0]]
    stage = stage_on_meta(RECIPES / run)
    ours = sum(p.numel() for name, p in stage.model.named_parameters() if "lora_" not in name)
    expected = _released_count(text_config)
    print(f"\n[{run}] {ours:,} parameters")
    assert ours == expected
    assert round(ours / 1e9, 1) == billions
