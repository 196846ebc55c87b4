"""The InternVL3.5-Flash runs: the real sizes (recipes/internvl3_5_{1b,8b}_flash/) build on the meta device with the
released InternVL3.5 architecture plus mlp2 and the router (counted by formula, as tests/test_hf_flash.py counts the
presets), the stage each names; the embedded chain (sft_detail → vico → vir) is tests/test_recipes.py's to build."""

from __future__ import annotations

import pytest
import torch

from lit_internvl.components import FlashConnector
from lit_internvl.models.builders import internvl
from lit_internvl.recipes import RECIPES, entry_recipes
from lit_internvl.stages import ViCOStage, ViRStage
from tests.recipes import stage_on_meta
from tests.test_hf_flash import _count

RUNS = sorted(str(p.relative_to(RECIPES)) for p in entry_recipes() if p.parent.name.endswith("_flash"))


def test_each_flash_size_has_a_consistency_and_a_router_run():
    assert RUNS == [f"internvl3_5_{size}_flash/{stage}.yaml" for size in ("1b", "8b") for stage in ("vico", "vir")]


@pytest.mark.parametrize("run", RUNS)
def test_each_flash_run_builds_the_flash_architecture_on_meta(run):
    size = run.split("_")[2].upper()
    stage = stage_on_meta(RECIPES / run)
    assert isinstance(stage, ViCOStage if run.endswith("vico.yaml") else ViRStage)
    assert isinstance(stage.model.connector, FlashConnector) and stage.model.budgets(448) == (256, 64)
    with torch.device("meta"):
        preset = internvl(f"InternVL3.5-{size}-Flash")
    assert _count(stage.model) == _count(preset)
    trained = {name.split(".")[0] if not name.startswith("connector.") else ".".join(name.split(".")[:2])
               for name, p in stage.model.named_parameters() if p.requires_grad}  # fmt: skip
    if run.endswith("vico.yaml"):
        assert trained == {"connector.mlp1", "connector.mlp2", "decoder"}
    else:
        assert trained == {"connector.router"}
