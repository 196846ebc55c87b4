"""The real-size recipes reduce the loss and pack as OpenGVLab's scripts they cite: InternVL3's second-stage
fine-tunes (and the InternVL2.5 LoRA scripts the LoRA recipes follow) run unpacked with the plain token mean,
InternVL2.5's stage-2 script packs with 1/√x sample weights all-reduced over the ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lit_internvl.recipes import compose, entry_recipes
from tests.recipes import stage_on_meta

REPO = Path(__file__).resolve().parents[1]

# The scripts' flags, read from internvl_chat/shell/ (no flag: internvl_chat_finetune.py's defaults L227-266,
# use_packed_ds False, loss_reduction "token", loss_reduction_all_gather False).
AS_SCRIPTS = {
    # internvl3.0/2nd_finetune/internvl3_{1b,8b}_dynamic_res_2nd_finetune_full.sh: none of the three flags
    "internvl3_1b/sft_full.yaml": ("token", False, False),
    "internvl3_8b/sft_full.yaml": ("token", False, False),
    # VisualPRM's training script is not published: the 1B full fine-tune's, as the recipe says
    "internvl3_1b/critic.yaml": ("token", False, False),
    # internvl2.5/2nd_finetune/internvl2_5_{1b,8b}_dynamic_res_2nd_finetune_lora.sh: none of the three flags
    "internvl3_1b/sft_lora.yaml": ("token", False, False),
    "internvl3_8b/sft_lora.yaml": ("token", False, False),
    # internvl2.5/stage2/internvl2_5_8b_internlm2_5_7b_dynamic_res_stage2.sh L80, L89, L90
    "internvl2_5_8b/stage2.yaml": ("square", True, True),
    # internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_{1b,8b,30b}_sft.sh L85, L94 (no all-gather flag); the
    # LoRA runs take the full script's data settings (recipes/scripts/internvl3_5_sft_lora.yaml)
    **{
        f"internvl3_5_{size}/{run}.yaml": ("square", True, False)
        for size in ("1b", "8b", "30b_a3b")
        for run in ("sft_full", "sft_lora")
    },
    "internvl3_5_8b/sft_full_sp8.yaml": ("square", True, False),  # the 8B script's run, rows split over 8 GPUs
}
# Real-size recipes whose source has no such flags to follow, each with the reason.
WITHOUT_THESE_FLAGS = {
    "internvl3_1b/mpo.yaml": "MPO's loss is the stage's three terms (recipes/stages/mpo.yaml); pairs are not packed",
    "internvl3_8b/mpo.yaml": "MPO's loss is the stage's three terms (recipes/stages/mpo.yaml); pairs are not packed",
    "internvl3_1b/nmp.yaml": "no published NMP script: the paper's packed rows and square averaging",
    "internvl3_1b/rl.yaml": "verl's GSPO (Weiyun1025/verl-internvl): its own loss aggregation, in the recipe's comment",
    **{
        f"internvl3_5_{size}/mpo.yaml": "MPO's loss is the stage's three terms (internvl_chat_mpo.py L906-907); pairs are "
        "not packed"
        for size in ("1b", "8b", "30b_a3b")
    },
    "internvl3_1b/sft_full_32k.yaml": "InternVL3's SFT script (token averaging) on InternVL3.5's packed 32k-token rows "
    "split over pairs of GPUs: no published script runs it",
    **{
        f"internvl3_5_{size}_flash/{run}.yaml": "ViCO has no published training script: "
        f"recipes/scripts/internvl3_5_{run}.yaml says what it takes from the SFT script and why"
        for size in ("1b", "8b")
        for run in ("vico", "vir")
    },
    **{
        f"internvl3_5_{size}/rl.yaml": "verl's GSPO (Weiyun1025/verl-internvl): its own loss aggregation, in "
        "recipes/scripts/internvl3_5_gspo.yaml"
        for size in ("1b", "8b", "30b_a3b")
    },
}
REAL_SIZE = sorted(
    str(p.relative_to(REPO / "recipes")) for p in entry_recipes() if compose(p)["trainer"]["accelerator"] == "gpu"
)


@pytest.mark.parametrize("recipe", sorted(AS_SCRIPTS))
def test_loss_reduction_and_packing_as_the_script(recipe):
    config = compose(REPO / "recipes" / recipe)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    got = (model["loss_reduction"], data["pack"], model.get("all_reduce_loss", False))
    assert got == AS_SCRIPTS[recipe]


def test_every_real_size_recipe_is_checked_or_says_why_not():
    """A new GPU recipe (found by walking recipes/) fails here until it joins one of the two tables."""
    assert not set(AS_SCRIPTS) & set(WITHOUT_THESE_FLAGS)
    assert REAL_SIZE == sorted({*AS_SCRIPTS, *WITHOUT_THESE_FLAGS})


def test_the_internvl2_5_stage2_recipe_parses_and_builds_on_meta(monkeypatch, capsys):
    from lit_internvl.cli import main
    from lit_internvl.models import internvl

    recipe = str(REPO / "recipes/internvl2_5_8b/stage2.yaml")
    monkeypatch.setenv("INTERNVL_CHECKPOINT", "/checkpoints/stage1_5")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, "--data.init_args.train", "mixture.json", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 5500 and printed["trainer"]["accumulate_grad_batches"] == 64
    stage = stage_on_meta(recipe)
    with torch.device("meta"):
        expected = sum(p.numel() for p in internvl("InternVL2.5-8B").parameters())
    assert sum(p.numel() for p in stage.model.parameters()) == expected
    assert all(p.requires_grad for p in stage.model.parameters())  # ViT + MLP + LLM, as the script
