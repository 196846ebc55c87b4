"""The planner reads a recipe as ``fit`` does and plans a step from fake tensors: what it counts is what the model
holds, sharding and sequence parallelism divide what they should, and (slow) its peak is within 15% of a real step's
on the CPU (``benchmarks/planner_accuracy.py``)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest

from lit_internvl import planner
from lit_internvl.tools.plan import main as plan_command

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("planner_accuracy", REPO / "benchmarks" / "planner_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(name: str = "tiny", **changes) -> tuple[dict, planner.Setup]:
    config = _benchmark().config(name)
    setup = replace(planner.setup_of(config), device="cpu", tokens=1024, tiles=4, **changes)
    return config, setup


def _measure(config: dict, setup: planner.Setup) -> planner.Step:
    return planner.measure(planner.stage_factory(config), setup, planner.tile_size_of(config))


def test_the_setup_is_read_from_the_recipe_and_its_presets():
    config = planner.read_config(["recipes/internvl3_5_8b/sft_full.yaml", "recipes/strategies/sp4.yaml"])
    setup = planner.setup_of(config)
    assert (setup.devices, setup.strategy, setup.sequence_parallel, setup.precision) == (8, "fsdp2", 4, "bf16-mixed")
    assert (setup.rows, setup.tokens, setup.tiles, setup.packed) == (1, 32768, 13, True)  # 12 tiles + the thumbnail
    assert setup.attn_backend == "varlen" and not setup.activation_checkpointing
    unpacked = planner.setup_of(planner.read_config(["recipes/internvl3_1b/sft_full.yaml"]))
    assert (unpacked.rows, unpacked.tokens, unpacked.strategy) == (4, 16384, "ddp")  # 8 devices, no sharding preset


def test_what_a_recipe_leaves_to_the_datamodule_is_planned_at_its_defaults():
    """RecordsDataModule's defaults: batches of 4 samples of 4,096 tokens, 12 tiles and a thumbnail each."""
    config = {"data": {"class_path": "lit_internvl.data.RecordsDataModule", "init_args": {"train": "train.jsonl"}}}
    setup = planner.setup_of(config)
    assert (setup.rows, setup.tokens, setup.tiles, setup.packed) == (4, 4096, 4 * 13, False)
    given = planner.setup_of({"data": {**config["data"], "init_args": {"max_tiles": 6, "batch_size": 1}}})
    assert (given.rows, given.tiles) == (1, 7)


def test_a_planned_step_holds_the_weights_and_the_optimiser_state_of_the_model():
    config, setup = _tiny()
    step = _measure(config, setup)
    counts = planner.parameters_of(planner.stage_factory(config), 56)
    total, trainable = counts["total"]
    assert step.kinds["Parameter"] == pytest.approx(4 * total, rel=0.01)  # float32, rounded up per tensor
    assert step.kinds["Optimizer state"] == 8 * trainable  # two float32 moments
    assert step.peak > step.kinds["Parameter"] + step.kinds["Optimizer state"]  # and activations


def test_checkpointing_and_sharding_lower_the_peak():
    config, setup = _tiny()
    plain = _measure(config, setup)
    assert _measure(config, replace(setup, activation_checkpointing=True)).peak < plain.peak
    sharded = _measure(config, replace(setup, devices=4, strategy="fsdp2"))
    assert sharded.kinds["Sharded Param"] == pytest.approx(plain.kinds["Parameter"] / 4, rel=0.05)


@pytest.mark.slow  # a wider model and longer rows: ~40 s on the shared 2-core machine
def test_lora_and_sequence_parallelism_lower_the_peak():
    lora_config, setup = _tiny("wide, LoRA")
    full_config = {
        **lora_config,
        "model": {**lora_config["model"], "init_args": dict(lora_config["model"]["init_args"])},
    }
    del full_config["model"]["init_args"]["lora"]
    with_lora, without = (_measure(c, setup).kinds["Optimizer state"] for c in (lora_config, full_config))
    assert with_lora < without / 10
    config, _ = _tiny()
    long = replace(setup, tokens=4096, devices=2, strategy="fsdp2", packed=False)  # no dense mask: the whole row's
    split = _measure(config, replace(long, sequence_parallel=2))
    assert split.peak < 0.7 * _measure(config, long).peak, "half the row's activations on each rank"


def test_the_plan_command_prints_the_plan_of_a_recipe(capsys):
    plan_command(["--config", "recipes/sft.yaml", "--quick", "--tokens", "512"])
    out = capsys.readouterr().out
    assert "parameters" in out and "peak of a step" in out and "fits in" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split()[1:3] == ["1.4", "M"]  # the tiny vision tower, connector and decoder


def test_rows_shorter_than_two_row_steps_are_planned(capsys):
    """A 256-token row (recipes/nmp.yaml's): the slope a token is taken against a row twice as long."""
    plan_command(["--config", "recipes/nmp.yaml", "--quick"])
    out = capsys.readouterr().out
    per_token = next(line for line in out.splitlines() if "activations a token" in line)
    assert float(per_token.split()[4]) > 0 and "peak of a step" in out


@pytest.mark.slow  # a real step in a fresh process: ~1 min on the 2-core machine
def test_the_predicted_peak_is_within_15_percent_of_a_measured_one():
    benchmark = _benchmark()
    got = benchmark.run_worker("wide, checkpointed", timeout=900)
    predicted = benchmark.predict("wide, checkpointed", got["tiles"])["predicted"]
    print(f"predicted {predicted / 2**20:.0f} MiB, measured {got['measured'] / 2**20:.0f} MiB")
    assert math.isclose(predicted, got["measured"], rel_tol=0.15)
