"""Stage 2 (QLLaMA / InternVL-G): the ITC mask keeps queries and text apart, ITM lets them meet, ITG
generates text from the queries; cross-attention touches only the queries, in every second block; a
stage-1 checkpoint becomes the trunk; ITM negatives are never positives; the stage trains from YAML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_internvl.cli import main
from lit_internvl.components import Decoder, InternViT, LanguageConfig, TextEncoder
from lit_internvl.data.collate import pad_ids
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.qllama import CrossAttention, QLLaMA, QLLaMAConnector, qllama_mask
from lit_internvl.stages import ContrastiveStage, GenerativeStage
from lit_internvl.stages.generative import itm_pairs, sample_negatives
from lit_internvl.tools.evaluate import main as evaluate

SMALL = LanguageConfig(
    vocab_size=272, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64,
    rope_theta=10_000.0, tie_embeddings=True,
)  # fmt: skip
VISION_DIM, QUERIES, TEXT = 24, 3, 6


def _qllama(**options) -> QLLaMA:
    torch.manual_seed(0)
    return QLLaMA(VISION_DIM, SMALL, num_queries=QUERIES, **options).eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    vision = torch.randn(batch, 5, VISION_DIM, generator=generator)
    ids = torch.randint(0, 256, (batch, TEXT), generator=generator)
    return vision, ids, torch.ones_like(ids)


def _changed(x: torch.Tensor, index) -> torch.Tensor:
    x = x.clone()
    x[index] = (x[index] + 7) % 256 if x.dtype == torch.long else x[index] + 3.0
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-6)


def _differs_everywhere(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every position (dim 1) of every sample changed."""
    return bool(((a - b).abs().amax(dim=-1) > 1e-4).all())


# --------------------------------------------------------------------------------------------------
# Masks, by information flow
# --------------------------------------------------------------------------------------------------


def test_mask_patterns_match_the_paper_for_two_queries_and_three_text_tokens():
    ones = torch.ones(1, 3, dtype=torch.long)
    q, t = torch.ones(2, 2), torch.ones(3, 3)
    z = torch.zeros(2, 3)
    causal = torch.ones(3, 3).tril()
    expected = {
        "itc": torch.cat((torch.cat((q, z), 1), torch.cat((z.T, causal), 1))),
        "itm": torch.ones(5, 5),
        "itg": torch.cat((torch.cat((q, z), 1), torch.cat((torch.ones(3, 2), causal), 1))),
    }
    for mode, pattern in expected.items():
        assert torch.equal(qllama_mask(mode, 2, ones)[0, 0], pattern.bool()), mode
    bidirectional = qllama_mask("itc", 2, ones, text_attention="bidirectional")[0, 0]
    assert torch.equal(bidirectional[2:, 2:], t.bool()) and not bidirectional[2:, :2].any()
    with pytest.raises(ValueError, match="Unknown QLLaMA mode 'itx'"):
        qllama_mask("itx", 2, ones)


def test_itc_mask_hides_the_text_from_the_queries_and_the_queries_and_image_from_the_text():
    model, (vision, ids, mask) = _qllama(), _inputs()
    queries, text = model(vision, ids, mask, mode="itc")

    new_queries, new_text = model(vision, _changed(ids, (slice(None), slice(None))), mask, mode="itc")
    assert _same(new_queries, queries), "queries read the text under ITC"
    assert _differs_everywhere(new_text, text)

    new_queries, new_text = model(_changed(vision, ...), ids, mask, mode="itc")
    assert _same(new_text, text), "text read the image under ITC"
    assert _differs_everywhere(new_queries, queries)

    with torch.no_grad():
        model.query_tokens.add_(1.0)
    assert _same(model(vision, ids, mask, mode="itc")[1], text), "text read the query tokens under ITC"


@pytest.mark.parametrize("text_attention, causal", [("causal", True), ("bidirectional", False)])
def test_itc_text_is_causal_over_text_unless_configured_bidirectional(text_attention, causal):
    model, (vision, ids, mask) = _qllama(text_attention=text_attention), _inputs()
    _, text = model(vision, ids, mask, mode="itc")
    _, new_text = model(vision, _changed(ids, (slice(None), -1)), mask, mode="itc")
    assert _same(new_text[:, :-1], text[:, :-1]) == causal


def test_itg_text_ignores_later_text_but_reads_every_query_and_so_the_image():
    model, (vision, ids, mask) = _qllama(), _inputs()
    queries, text = model(vision, ids, mask, mode="itg")

    new_queries, new_text = model(vision, _changed(ids, (slice(None), 3)), mask, mode="itg")
    assert _same(new_text[:, :3], text[:, :3]), "a text token read a later one under ITG"
    assert _differs_everywhere(new_text[:, 3:], text[:, 3:])
    assert _same(new_queries, queries), "queries read the text under ITG"

    _, new_text = model(_changed(vision, ...), ids, mask, mode="itg")
    assert _differs_everywhere(new_text, text), "even the first text token sees the image through the queries"
    for query in range(QUERIES):  # each query alone reaches every text token
        with torch.no_grad():
            model.query_tokens[query] += 1.0
        _, moved = model(vision, ids, mask, mode="itg")
        with torch.no_grad():
            model.query_tokens[query] -= 1.0
        assert _differs_everywhere(moved, text), f"query {query} is hidden from the text under ITG"


def test_itm_lets_the_queries_read_the_text_and_the_text_read_the_image():
    model, (vision, ids, mask) = _qllama(), _inputs()
    queries, text = model(vision, ids, mask, mode="itm")
    new_queries, new_text = model(vision, _changed(ids, (slice(None), -1)), mask, mode="itm")
    assert _differs_everywhere(new_queries, queries)
    assert _differs_everywhere(new_text, text), "bidirectional: earlier text reads the last token"
    assert _differs_everywhere(model(_changed(vision, ...), ids, mask, mode="itm")[1], text)


@pytest.mark.parametrize("mode", ["itc", "itm", "itg"])
def test_padding_is_hidden_in_every_mode(mode):
    model, (vision, ids, mask) = _qllama(), _inputs()
    mask[0, -2:] = 0
    queries, text = model(vision, ids, mask, mode=mode)
    new_queries, new_text = model(vision, _changed(ids, (0, slice(-2, None))), mask, mode=mode)
    assert _same(new_queries, queries) and _same(new_text[0, :-2], text[0, :-2]) and _same(new_text[1], text[1])


# --------------------------------------------------------------------------------------------------
# Cross-attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every, blocks", [(2, [0, 2]), (1, [0, 1, 2, 3]), (3, [0, 3])])
def test_cross_attention_sits_in_every_second_block_by_default(every, blocks):
    model = QLLaMA(VISION_DIM, SMALL, num_queries=QUERIES, cross_attention_every=every)
    assert [i for i, layer in enumerate(model.layers) if layer.cross_attn is not None] == blocks
    assert sum(isinstance(m, CrossAttention) for m in model.modules()) == len(blocks)
    if every == 2:
        assert len(blocks) == SMALL.num_layers // 2


@pytest.mark.parametrize("mode", ["itc", "itm", "itg"])
def test_cross_attention_reads_only_the_query_positions(mode):
    model, (vision, ids, mask) = _qllama(), _inputs()
    seen = []
    hooks = [
        m.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.shape)))
        for m in model.modules() if isinstance(m, CrossAttention)
    ]  # fmt: skip
    model(vision, ids, mask, mode=mode)
    for hook in hooks:
        hook.remove()
    assert seen == [((2, QUERIES, SMALL.hidden_size), (2, QUERIES, SMALL.hidden_size))] * 2


def test_qllama_connector_honours_the_connector_contract_inside_a_vlm():
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    vision, decoder = InternViT("tiny"), Decoder("tiny")
    connector = QLLaMAConnector(vision.hidden_size, decoder.hidden_size, language=SMALL, num_queries=QUERIES)
    assert connector.tokens_per_tile(16) == QUERIES
    model = VisionLanguageModel(vision, connector, decoder, tokenizer.token_to_id(IMG_CONTEXT))
    ids = torch.tensor([tokenizer.encode("<img>" + IMG_CONTEXT * model.tokens_per_tile() + "</img>\nwhat is it?")])
    pixel_values = torch.randn(1, 3, 56, 56)
    assert connector(vision(pixel_values)).shape == (1, QUERIES, decoder.hidden_size)
    model(ids, pixel_values).logsumexp(-1).mean().backward()
    assert connector.qllama.layers[0].cross_attn.k_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Loading stage 1, mining negatives
# --------------------------------------------------------------------------------------------------

RENAME = {"text_encoder.": "qllama."}  # the stage-1 vision encoder is "vision" in both stages


def _stage1_checkpoint(path: Path) -> ContrastiveStage:
    """A stage-1 checkpoint in Lightning's layout (``state_dict`` with the module's ``model.`` prefix)."""
    torch.manual_seed(0)
    stage = ContrastiveStage(InternViT("tiny"), TextEncoder(SMALL), embed_dim=16)
    stage.configure_model()
    with torch.no_grad():
        stage.model.logit_scale.fill_(3.0)
    torch.save({"state_dict": {f"model.{k}": v for k, v in stage.model.state_dict().items()}}, path)
    return stage


def test_stage1_checkpoint_becomes_vision_trunk_and_projections_and_reports_the_new_parts_missing(tmp_path, caplog):
    stage1 = _stage1_checkpoint(tmp_path / "stage1.ckpt")
    torch.manual_seed(1)  # a different initialisation, so that equality means "loaded"
    stage2 = GenerativeStage(
        InternViT("tiny"), lambda vision_dim: QLLaMA(vision_dim, SMALL, num_queries=QUERIES), embed_dim=16,
        init_from=str(tmp_path / "stage1.ckpt"), init_from_rename=RENAME,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        stage2.configure_model()

    loaded = stage2.model.state_dict()
    for name, value in stage1.model.text_encoder.state_dict().items():
        assert torch.equal(loaded[f"qllama.{name}"], value), name
    for name, value in stage1.model.vision.state_dict().items():
        assert torch.equal(loaded[f"vision.{name}"], value), name
    for name in ("image_projection.cross_attn.proj.weight", "text_projection.weight", "logit_scale"):
        assert torch.equal(loaded[name], stage1.model.state_dict()[name]), name
    new = [
        name for name in loaded
        if name.startswith("qllama.layers.") and ".cross_attn." in name
        or name.split(".")[0] in ("query_projection", "itm_head")
    ]  # fmt: skip
    new.append("qllama.query_tokens")
    # two cross-attention blocks (4 layers) of 6 tensors, queries, the query attention pool (3 LayerNorms,
    # q/k/v weights and biases, output projection: 14), the ITM head (2)
    assert len(new) == 2 * 6 + 1 + 14 + 2
    assert f"{len(new)} missing" in caplog.text and "0 unexpected" in caplog.text
    assert "qllama.query_tokens" in caplog.text and "qllama.layers.0.cross_attn.q_proj.weight" in caplog.text


def test_hard_negative_mining_never_picks_the_positive_nor_a_same_caption_pair():
    torch.manual_seed(0)
    n = 6
    scores = torch.randn(n, n)
    scores.fill_diagonal_(50.0)  # the positive is by far the most similar
    scores[0, 1] = 40.0  # and for row 0, column 1 is a caption with the same key
    keys = torch.tensor([0, 0, 1, 2, 3, 4])
    allowed = (keys[:, None] != keys[None, :]) & ~torch.eye(n, dtype=torch.bool)
    draws = torch.stack([sample_negatives(scores, allowed, "hard") for _ in range(300)])
    assert not (draws == torch.arange(n)).any()
    assert not (draws[:, 0] == 1).any() and not (draws[:, 1] == 0).any()

    nobody = torch.zeros(2, 2, dtype=torch.bool)
    assert sample_negatives(torch.zeros(2, 2), nobody).tolist() == [-1, -1]


def test_itm_pairs_are_half_positive_and_their_negatives_are_mined_ones():
    negative_text = torch.tensor([5, 4, 7, -1, 1, 0, -1, 2])
    negative_image = torch.tensor([3, 2, 1, 6, 7, 6, 0, 5])
    image_index, text_index, labels = itm_pairs(negative_text, negative_image)
    # rows 0, 1, 4, 5: positives; 2: (image 2, text 7); 3: (image 6, text 3); 6: no negative text, left
    # out (its unused -1 in row 3 does not matter); 7: (image 5, text 7)
    assert image_index.tolist() == [0, 1, 2, 6, 4, 5, 5]
    assert text_index.tolist() == [0, 1, 7, 3, 4, 5, 7]
    assert labels.tolist() == [1, 1, 0, 0, 1, 1, 0]
    assert not ((image_index == text_index) & (labels == 0)).any()


def test_hard_negatives_follow_the_similarity_and_random_ones_do_not():
    torch.manual_seed(0)
    scores = torch.zeros(1, 5)
    scores[0, 3] = 4.0  # softmax over the 4 allowed columns gives column 3 about 95 %
    allowed = torch.tensor([[False, True, True, True, True]])
    hard = torch.stack([sample_negatives(scores, allowed, "hard") for _ in range(400)])
    uniform = torch.stack([sample_negatives(scores, allowed, "random") for _ in range(400)])
    assert (hard == 3).float().mean() > 0.85
    assert 0.15 < (uniform == 3).float().mean() < 0.35 and not (uniform == 0).any()
    with pytest.raises(ValueError, match="in-batch negatives, not 'easy'"):
        sample_negatives(scores, allowed, "easy")
    with pytest.raises(ValueError, match="Unknown itm_negatives 'easy'"):
        GenerativeStage(InternViT("tiny"), lambda d: QLLaMA(d, SMALL), itm_negatives="easy")


def test_unknown_frozen_parameter_set_is_an_error_naming_it():
    stage = GenerativeStage(InternViT("tiny"), lambda d: QLLaMA(d, SMALL, num_queries=QUERIES), frozen=["vison"])
    with pytest.raises(ValueError, match=r"frozen: unknown parameter set\(s\) \['vison'\]"):
        stage.configure_model()


# --------------------------------------------------------------------------------------------------
# Training through the CLI
# --------------------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, checkpoint: Path) -> Path:
    small = {k: getattr(SMALL, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                            "intermediate_size", "rope_theta", "tie_embeddings")}  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "lit_internvl.stages.GenerativeStage",
            "init_args": {
                "vision": {"class_path": "lit_internvl.components.InternViT", "init_args": {"config": "tiny"}},
                "qllama": {
                    "class_path": "lit_internvl.models.qllama.QLLaMA",
                    "init_args": {"language": small, "num_queries": QUERIES, "text_attention": "bidirectional"},
                },
                "embed_dim": 16,
                "warmup_steps": 1,
                "init_from": str(checkpoint),
                "init_from_rename": RENAME,
            },
        },
        "data": {
            "class_path": "lit_internvl.data.ShapesDataModule",
            "init_args": {"train_size": 32, "val_size": 16, "batch_size": 16},
        },
    }  # fmt: skip
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_stage2_trains_from_a_stage1_checkpoint_through_the_cli_and_keeps_stage1_frozen(tmp_path):
    stage1 = _stage1_checkpoint(tmp_path / "stage1.ckpt")
    cli = main(["fit", "--config", str(_recipe(tmp_path, tmp_path / "stage1.ckpt"))])

    model = cli.model.model
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert {"train/itc", "train/itm", "train/itg"} <= set(cli.trainer.callback_metrics)
    # InternVL stage 2: the stage-1 parts are frozen, the new parts train.
    before = stage1.model.state_dict()
    for name, value in model.state_dict().items():
        renamed = name.replace("qllama.", "text_encoder.", 1)
        if renamed in before and name != "logit_scale":
            assert torch.equal(value, before[renamed]), f"{name} trained"
    assert not model.vision.training, "a frozen encoder runs in eval mode (no drop-path)"
    sets = model.parameter_sets()
    trainable = {name for name, params in sets.items() if all(p.requires_grad for p in params)}
    assert trainable == {"queries", "cross_attention", "query_projection", "itm_head", "logit_scale"}
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for name in trainable for p in sets[name]}

    report = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["metrics"]
    for embedding in ("stage1", "internvl_g"):
        recall = report[f"val/{embedding}/image_to_text_R@1"]
        assert 0 < recall["chance"] < 1 and 0 <= recall["value"] <= 1
        assert report[f"val/{embedding}/zero_shot_top1"]["chance"] == pytest.approx(1 / 30)


def test_query_embedding_of_the_itc_pass_equals_the_image_only_embedding():
    """InternVL-G embeds an image without any text: possible only because ITC hides the text from the queries."""
    torch.manual_seed(0)
    stage = GenerativeStage(InternViT("tiny"), lambda d: QLLaMA(d, SMALL, num_queries=QUERIES), embed_dim=16)
    stage.configure_model()
    model = stage.model.eval()
    tokenizer = ByteTokenizer()
    ids, mask = pad_ids([torch.tensor(tokenizer.encode(t)) for t in ("a red circle", "the blue cross at the top")], 256)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        features = model.vision(pixels)
        queries, text = model.qllama(features, ids, mask, mode="itc")
        backbone, internvl_g = model.encode_image(pixels)
        assert _same(model.ensemble(model.backbone_embedding(features), model.query_embedding(queries)), internvl_g)
        assert _same(model.text_embedding(text, mask), model.encode_text(ids, mask))


# --------------------------------------------------------------------------------------------------
# Captions by the ITG path
# --------------------------------------------------------------------------------------------------


def _internvl_g() -> GenerativeStage:
    torch.manual_seed(0)
    stage = GenerativeStage(InternViT("tiny"), lambda d: QLLaMA(d, SMALL, num_queries=QUERIES), embed_dim=16)
    stage.configure_model()
    with torch.no_grad():  # larger random weights than the init's, so that the image moves the greedy tokens
        for param in stage.model.qllama.parameters():
            param.normal_(std=0.5)
    return stage


def test_cached_greedy_captions_equal_the_prefix_lm_argmax_of_one_training_pass():
    """Each generated token is the argmax of the ITG training pass (queries bidirectional, text causal over the
    queries) over the prompt and the tokens before it: the cached decoding reads what training reads."""
    model = _internvl_g().model.eval()
    prompt = torch.tensor([ByteTokenizer().encode("English caption:")] * 3)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    captions = model.generate(pixels, prompt, max_new_tokens=10)
    assert captions == model.generate(pixels, prompt, max_new_tokens=10, use_cache=False)
    generated = torch.tensor(captions)
    assert generated.shape == (3, 10) and len({tuple(row) for row in captions}) > 1, "captions must read the image"
    with torch.no_grad():
        _, text = model.qllama(model.vision(pixels), torch.cat((prompt, generated), dim=1), mode="itg")
        teacher_forced = model.qllama.head(text).argmax(dim=-1)[:, prompt.shape[1] - 1 : -1]
    assert torch.equal(teacher_forced, generated)


def test_captions_stop_at_the_end_token_but_not_before_min_new_tokens():
    model = _internvl_g().model.eval()
    prompt = torch.tensor([ByteTokenizer().encode("English caption:")] * 2)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    free = model.generate(pixels, prompt, max_new_tokens=6)
    end = free[0][2]  # call the third token of row 0 the end token: row 0 stops there
    stopped = model.generate(pixels, prompt, max_new_tokens=6, eos_id=end)
    assert stopped[0] == free[0][:3]
    held = model.generate(pixels, prompt, max_new_tokens=6, eos_id=end, min_new_tokens=4)
    assert end not in held[0][:4] and held[0][:2] == free[0][:2]


def test_stage2_predict_writes_captions_that_evaluate_scores_with_cider(tmp_path, capsys):
    _stage1_checkpoint(tmp_path / "stage1.ckpt")
    recipe = _recipe(tmp_path, tmp_path / "stage1.ckpt")
    options = ["--model.init_args.predict_output", "captions", "--model.init_args.caption_max_tokens", "12"]
    cli = main(["predict", "--config", str(recipe), *options])
    path = Path(cli.trainer.log_dir) / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["name"] == "shapes-test:0"
    # the reference is the test split's caption in its ITG form (normalised), the answer at most 12 byte tokens
    assert all(row["reference"].startswith("a ") and " at the " in row["reference"] for row in rows)
    assert all(len(row["answer"].encode()) <= 12 for row in rows)
    capsys.readouterr()
    result = evaluate(["--predictions", str(path), "--metric", "caption"])
    assert result["overall"]["count"] == 16 and 0 <= result["overall"]["CIDEr"] and "CIDEr" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The recipe (minutes): run with `pytest -m slow`
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage2_recipe_internvl_g_retrieves_at_least_as_well_as_the_stage1_embedding():
    root = Path(__file__).resolve().parents[1]
    fit = [sys.executable, "-m", "lit_internvl", "fit", "--config"]
    if not (root / "runs/stage1/checkpoints/last.ckpt").exists():
        subprocess.run([*fit, "recipes/stage1.yaml"], cwd=root, check=True)
    subprocess.run([*fit, "recipes/stage2.yaml"], cwd=root, check=True)
    latest = max((root / "runs/stage2").glob("version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    metrics = {k: v["value"] for k, v in json.loads(latest.read_text())["metrics"].items()}
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"val/internvl_g/{direction}_R@1"] >= metrics[f"val/stage1/{direction}_R@1"], direction
