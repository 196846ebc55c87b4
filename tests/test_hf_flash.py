"""InternVL3.5-Flash checkpoints: a folder in OpenGVLab's released layout (``mlp1``, ``mlp2``, ``pooling_before_gating``,
``gating``, the ``flash_*`` config keys) loads by name with no missing or unexpected tensor, routes its generation as
the remote code's ``generate_flash`` does (reference: transformers' InternVL towers on the same weights, with the
router, ``mlp2``, the decision rule and ``compress_visual_tokens_in_sentence`` written in the test), and exports
back to the same tensors.

The tiny checkpoint is tests/test_hf.py's OpenGVLab folder (a Qwen3 decoder) with the Flash tensors of
tests/test_flash.py's reference modules added, as the releases add them.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_internvl.batch import Images
from lit_internvl.components import FlashConnector
from lit_internvl.hf import UnsupportedCheckpointError, load_vlm, read_config
from lit_internvl.hf.flash_export import export_flash
from lit_internvl.inference.generate import generate
from lit_internvl.models.builders import internvl
from tests.test_flash import (
    ReferenceGating,
    ReferencePooling,
    randomise,
    reference_decision,
    reference_mlp2,
    reference_pixel_shuffle,
    reference_route,
)
from tests.test_hf import IMAGE_SIZE, IMAGE_TOKEN, TOKENS_PER_TILE, _transformers_model, _write_opengvlab

VISION, TEXT, SIDE = 48, 72, IMAGE_SIZE // 14  # tests/test_hf.py's tiny towers (Qwen3 decoder)
RELATIVE, ABSOLUTE = 0.25, 0.3


def _flash_modules(seed: int = 5):
    torch.manual_seed(seed)
    pooling, gating = randomise(ReferencePooling(VISION, 16), seed), randomise(ReferenceGating(VISION), seed + 1)
    mlp2 = randomise(reference_mlp2(VISION, TEXT), seed + 2)
    return pooling.eval(), gating.eval(), mlp2.eval()


def _write_flash(tmp_path, flash_mode: bool = True, thresholds: bool = True):
    reference = _transformers_model("qwen3", "300m", tie=False)
    folder = _write_opengvlab(reference, tmp_path / "flash", "qwen3")
    pooling, gating, mlp2 = _flash_modules()
    tensors = load_file(str(folder / "model.safetensors"))
    for prefix, module in (("pooling_before_gating", pooling), ("gating", gating), ("mlp2", mlp2)):
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in module.state_dict().items()})
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["flash_mode"] = flash_mode
    if thresholds:
        config.update(flash_relative_threshold=RELATIVE, flash_absolute_threshold=ABSOLUTE)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, reference, (pooling, gating, mlp2)


def _prompt(tiles: int, seed: int = 2):
    """One row: text, the tiles' <IMG_CONTEXT> run (16 a tile), text; and the tiles' pixels."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 140, (9,), generator=generator)
    ids = torch.cat([text[:4], torch.full((tiles * TOKENS_PER_TILE,), IMAGE_TOKEN), text[4:]])[None]
    return ids, torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


@torch.no_grad()
def _reference_generate_flash(reference, flash, input_ids, pixel_values, steps: int):
    """``generate_flash`` on transformers' towers: score every tile, compress where the rule says, keep the first
    ``T/4`` of each compressed tile's ``T`` slots (``compress_visual_tokens_in_sentence``), splice, decode greedily."""
    pooling, gating, mlp2 = flash
    model = reference.model
    vit = model.vision_tower(pixel_values=pixel_values).last_hidden_state
    compress = reference_decision(reference_route(vit, pooling, gating), RELATIVE, ABSOLUTE)
    grid = vit[:, 1:].reshape(vit.shape[0], SIDE, SIDE, VISION)
    shuffled = reference_pixel_shuffle(grid, 0.25)
    small = mlp2(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))
    full = model.get_image_features(pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default")
    full = full.pooler_output
    ids = input_ids[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    slots = (ids == IMAGE_TOKEN).nonzero().flatten()
    for tile, compressed in enumerate(compress.tolist()):
        if compressed:
            keep[slots[tile * TOKENS_PER_TILE + TOKENS_PER_TILE // 4 : (tile + 1) * TOKENS_PER_TILE]] = False
    ids = ids[keep]
    embeds = model.language_model.get_input_embeddings()(ids).clone()
    features = torch.cat([small[i] if c else full[i] for i, c in enumerate(compress.tolist())])
    embeds[ids == IMAGE_TOKEN] = features
    embeds, out = embeds[None], []
    for _ in range(steps):
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
        token = reference.lm_head(hidden[:, -1]).argmax(-1)
        out.append(int(token))
        embeds = torch.cat([embeds, model.language_model.get_input_embeddings()(token)[:, None]], dim=1)
    return out, compress, len(ids)


def test_a_released_flash_folder_loads_by_name_with_nothing_missing_or_left_over(tmp_path):
    folder, _, _ = _write_flash(tmp_path)
    spec = read_config(folder)
    assert spec.flash == {"relative_threshold": RELATIVE, "absolute_threshold": ABSOLUTE, "route": True}
    model = load_vlm(folder)  # load_state_exactly: raises on any missing or unexpected tensor
    assert isinstance(model.connector, FlashConnector) and model.connector.routing
    assert model.budgets() == (TOKENS_PER_TILE, TOKENS_PER_TILE // 4)
    stored = load_file(str(folder / "model.safetensors"))
    assert "pooling_before_gating.attn4.in_proj_weight" in stored  # released but unused: loaded all the same
    torch.testing.assert_close(
        model.connector.router.pooling.attn4.in_proj_weight, stored["pooling_before_gating.attn4.in_proj_weight"]
    )


def test_flash_weights_without_the_thresholds_in_the_config_are_refused(tmp_path):
    folder, _, _ = _write_flash(tmp_path, thresholds=False)
    with pytest.raises(UnsupportedCheckpointError, match="flash_relative_threshold"):
        read_config(folder)


@pytest.mark.parametrize("tiles", [4, 7])
def test_routed_generation_equals_the_remote_code_generate_flash(tmp_path, tiles):
    folder, reference, flash = _write_flash(tmp_path)
    input_ids, pixel_values = _prompt(tiles)
    expected, compress, length = _reference_generate_flash(reference, flash, input_ids, pixel_values, 8)
    assert 0 < int(compress.sum()) < tiles  # the rule compresses some tiles and keeps others
    ours = load_vlm(folder)
    got = generate(ours, input_ids, None, Images.uniform(pixel_values, [tiles], TOKENS_PER_TILE), max_new_tokens=8)
    assert got[0] == expected
    assert length == input_ids.shape[1] - int(compress.sum()) * (TOKENS_PER_TILE - TOKENS_PER_TILE // 4)


def test_export_writes_the_released_layout_back_tensor_for_tensor(tmp_path):
    folder, _, _ = _write_flash(tmp_path)
    model = load_vlm(folder)
    out = export_flash(model, tmp_path / "exported", tokenizer_dir=folder)
    written, original = load_file(str(out / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(written) == set(original)
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert (config["flash_mode"], config["flash_relative_threshold"], config["flash_absolute_threshold"]) == (
        True, RELATIVE, ABSOLUTE,
    )  # fmt: skip
    again = load_vlm(out)
    input_ids, pixel_values = _prompt(5)
    images = Images.uniform(pixel_values, [5], TOKENS_PER_TILE)
    assert generate(again, input_ids, None, images, max_new_tokens=6) == generate(
        model, input_ids, None, images, max_new_tokens=6
    )


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", ["1B", "8B"])
def test_flash_presets_add_mlp2_and_the_router_to_the_internvl3_5_sizes(size):
    with torch.device("meta"):
        base, flash = internvl(f"InternVL3.5-{size}"), internvl(f"InternVL3.5-{size}-Flash")
    c, d = base.vision.hidden_size, base.decoder.hidden_size
    mlp2 = 2 * 16 * c + (16 * c + 1) * 2 * d + (2 * d + 1) * 2 * d + (2 * d + 1) * d
    attention = 3 * c * c + 3 * c + c * c + c
    pooling = c + 4 * (attention + 2 * c)
    block = (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * c
    gating = 4 * block + 2 * c + (2 * c + 2)
    assert _count(flash) - _count(base) == mlp2 + pooling + gating
    assert flash.budgets(448) == (256, 64)


def test_the_export_command_writes_a_flash_folder_in_opengvlab_layout(tmp_path):
    from lit_internvl.tools.export import main as export_main

    folder, _, _ = _write_flash(tmp_path)
    out = export_main(["--checkpoint", str(folder), "--output", str(tmp_path / "out")])
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(folder / "model.safetensors")))
    assert isinstance(load_vlm(out).connector, FlashConnector)
