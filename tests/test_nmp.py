"""Native multimodal pretraining: the loss (text tokens only, image spans never targets, square weights) by
hand on a packed batch, the weighted mixture of sources (its ratio and its exact resume), the recipes, and
NMP's starting points (a text-only LLM folder and a vision-encoder folder) loaded by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.mixture import Mixture, slot_counts
from lit_internvl.data.shapes import write_records
from lit_internvl.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from lit_internvl.stages import NMPStage
from tests.recipes import stage_on_meta
from tests.tiny import asked, records

REPO = Path(__file__).resolve().parents[1]


def _stage(data) -> NMPStage:
    from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP

    torch.manual_seed(0)
    stage = NMPStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes"))
    stage.use_data(data)
    stage.configure_model()
    return stage


def test_the_nmp_loss_is_the_square_weighted_text_loss_by_hand():
    data = ShapesDataModule(records="documents", tokenizer="shapes", batch_size=6, train_size=24, pack=True, max_tokens=160,
                            v2pe="random")  # fmt: skip
    stage = _stage(data)
    whole = next(iter(data.train_dataloader()))
    assert stage.hparams.loss_reduction == "square" and all(p.requires_grad for p in stage.model.parameters())
    loss = stage.training_step(whole, 0)
    batch = whole["conversation"]
    tokenizer = data.tokenizer
    image_ids = {tokenizer.token_to_id(t) for t in (IMG_START, IMG_CONTEXT, IMG_END)}
    with torch.no_grad():
        logits = stage.forward_batch(batch, logits_at=False)
    # By hand: every document of every row, its text targets, weight 1/√(its targets).
    total, weights, kinds = 0.0, 0.0, set()
    for row in range(batch.input_ids.shape[0]):
        ids, labels, docs = (
            batch.input_ids[row],
            batch.labels[row],
            batch.document_ids[row],
        )
        for doc in docs.unique().tolist():
            if doc < 0:
                continue
            where = (docs == doc).nonzero().flatten().tolist()
            has_image = any(ids[i].item() in image_ids for i in where)
            kinds.add(has_image)
            terms = []
            for i, j in zip(where[:-1], where[1:]):
                if labels[j] == IGNORE_INDEX:
                    assert ids[j].item() in image_ids, "only the image spans are untrained"
                    continue
                assert ids[j].item() not in image_ids, "an image token is never a target"
                log_probs = logits[row, i].double().log_softmax(-1)
                terms.append(-log_probs[labels[j]].item())
            weight = 1 / len(terms) ** 0.5
            total += weight * sum(terms)
            weights += weight * len(terms)
    assert kinds == {True, False}, "the batch packs interleaved and text-only documents"
    assert loss.item() == pytest.approx(total / weights, rel=1e-5)
    targets = batch.labels.roll(-1, 1)
    token_mean = F.cross_entropy(logits[targets != IGNORE_INDEX].float(), targets[targets != IGNORE_INDEX])
    assert abs(token_mean.item() - loss.item()) > 1e-4, "square weights differ from the token mean"


def test_a_mixture_reads_its_sources_in_the_ratio_of_the_weights():
    assert slot_counts([0.75, 0.25], 10) == [8, 2] and slot_counts([1 / 3] * 3, 10) == [4, 3, 3]
    sources = [list(range(100)), [f"t{i}" for i in range(7)]]
    mixture = Mixture(sources, [3, 1], size=10_000, seed=1)
    read = [mixture[i] for i in range(len(mixture))]
    share = sum(isinstance(x, int) for x in read) / len(read)
    assert abs(share - 0.75) <= 0.02
    assert set(read) == set(sources[0]) | set(sources[1]), "each source read round and round"
    first_half = mixture.source_of[:5000].mean()
    assert abs(first_half - 0.25) <= 0.02, "the sources are interleaved through the epoch, not in blocks"
    assert list(Mixture(sources, [3, 1], size=10_000, seed=1).index_of) == list(mixture.index_of), "seeded"
    assert Mixture(sources, [0, 1], size=50).source_of.tolist() == [1] * 50
    with pytest.raises(ValueError, match="weights"):
        Mixture(sources, [1, 2, 3])


def _records(tmp_path: Path) -> tuple[str, str]:
    return str(write_records(tmp_path / "docs", "interleaved", 40)), str(write_records(tmp_path / "text", "text", 40))


TINY = dict(tile_size=56, max_tiles=1, use_thumbnail=False, batch_size=4)


def test_a_records_mixture_resumes_mid_epoch_with_the_same_sequence(tmp_path):
    docs, text = _records(tmp_path)

    def loader():
        data = records(train=[docs, text], weights=[3, 1], mixture_size=64, seed=2, **TINY)
        return data.train_dataloader()

    whole = [batch["conversation"].sample_names for batch in loader()]
    names = [n for batch in whole for n in batch]
    kinds = [("text" in n.split(":")[0]) for n in names]
    assert len(names) == 64 and sum(kinds) == 16, "3 : 1 exactly over the epoch"
    first = loader()
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch["conversation"].sample_names for batch in resumed] == whole[5:]


def test_a_shards_mixture_streams_through_litdata_in_proportion(tmp_path):
    from lit_internvl.tools.prepare import main as prepare

    docs, text = _records(tmp_path)
    prepare(["--input", docs, "--output", str(tmp_path / "docs_shards")])
    prepare(["--input", text, "--output", str(tmp_path / "text_shards")])
    data = records(train=[str(tmp_path / "docs_shards"), str(tmp_path / "text_shards")], weights=[3, 1],
                             **TINY)  # fmt: skip
    names = [n for batch in data.train_dataloader() for n in batch["conversation"].sample_names]
    text_share = sum("text" in n for n in names) / len(names)
    assert len(names) >= 20 and 0.1 <= text_share <= 0.4, (len(names), text_share)


def test_mixture_options_name_the_option(tmp_path):
    docs, text = _records(tmp_path)
    with pytest.raises(ValueError, match="data.init_args.weights"):
        records(train=[docs, text], weights=[1], **TINY)
    with pytest.raises(ValueError, match="data.init_args.v2pe"):
        records(train=docs, v2pe="sometimes", **TINY)


def test_the_embedded_nmp_recipe_builds_and_its_data_mixes_documents_and_text():
    from lit_internvl.cli import main

    cli = main(["--config", str(REPO / "recipes/nmp.yaml"), "--trainer.logger", "false"], run=False)
    stage = cli.model.use_data(cli.datamodule)
    stage.configure_model()
    assert isinstance(stage, NMPStage) and stage.hparams.trainable == ["vision", "connector", "decoder"]
    assert all(p.requires_grad for p in stage.model.parameters())
    assert cli.datamodule.hparams.v2pe == "random" and cli.datamodule.hparams.weights == [3, 1]
    data = ShapesDataModule(records="documents", tokenizer="shapes", train_size=40, val_size=8, batch_size=8,
                            val_images_per_document=(6, 8), v2pe="random")  # fmt: skip
    val = next(iter(asked(data).val_dataloader()))["conversation"]
    assert all(6 <= tiles <= 8 for tiles in val.tiles_per_sample), "held-out documents of 6-8 pictures"
    assert data.sample_builder(train=False).options.v2pe == {"stride": 64}, "random strides evaluate at 64"


def test_the_real_size_nmp_recipe_parses_and_builds_on_meta(monkeypatch, capsys):
    from lit_internvl.cli import main
    from lit_internvl.components import InternViT, InternViTConfig

    recipe = str(REPO / "recipes/internvl3_1b/nmp.yaml")
    monkeypatch.setenv("INTERNVIT_CHECKPOINT", "/checkpoints/InternViT-300M")
    monkeypatch.setenv("QWEN_CHECKPOINT", "/checkpoints/Qwen2.5-0.5B")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, "--config", str(REPO / "recipes/strategies/fsdp2.yaml"),
              "--data.init_args.train", "[docs.json, text.jsonl]", "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    printed = json.loads(json.dumps(__import__("yaml").safe_load(capsys.readouterr().out)))
    assert printed["model"]["init_args"]["init_from"] == [
        "hf:/checkpoints/InternViT-300M",
        "hf:/checkpoints/Qwen2.5-0.5B",
    ]
    assert printed["data"]["init_args"]["max_tokens"] == 32768 and printed["data"]["init_args"]["v2pe"] == "random"
    stage = stage_on_meta(recipe)
    with torch.device("meta"):
        vision = sum(p.numel() for p in InternViT(InternViTConfig()).parameters())  # InternViT-300M
    assert sum(p.numel() for p in stage.model.vision.parameters()) == vision
    assert stage.model.decoder.embed_tokens.num_embeddings == 151936
    assert all(p.requires_grad for p in stage.model.parameters())


def test_a_text_only_llm_folder_and_a_vision_folder_load_by_name(tmp_path):
    """NMP's starting points: Qwen2ForCausalLM's tensors become the decoder (logits equal transformers'),
    an InternVisionModel folder's the vision encoder; the connector keeps its fresh initialisation."""
    import transformers
    from safetensors.torch import save_file

    from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
    from lit_internvl.models import VisionLanguageModel
    from lit_internvl.stages.base import read_init_weights

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True,
                                      rope_theta=10000.0, rms_norm_eps=1e-6)  # fmt: skip
    qwen = transformers.Qwen2ForCausalLM(config).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    vision = InternViT("tiny")
    (tmp_path / "vit").mkdir()
    opengvlab = {
        ("encoder." + k if k.startswith("layers.") else k): v.contiguous() for k, v in vision.state_dict().items()
    }
    save_file(opengvlab, tmp_path / "vit" / "model.safetensors")  # InternVisionModel's names
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"architectures": ["InternVisionModel"]}))
    ours = LanguageConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=96, rope_theta=10000.0, tie_embeddings=True, qkv_bias=True)  # fmt: skip
    torch.manual_seed(1)
    model = VisionLanguageModel(InternViT("tiny"), PixelShuffleMLP(128, 64), Decoder(ours), image_context_id=299)
    connector = {k: v.clone() for k, v in model.connector.state_dict().items()}
    for source in (f"hf:{tmp_path / 'qwen'}", f"hf:{tmp_path / 'vit'}"):
        state = read_init_weights(source)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected
    ids = torch.randint(0, 299, (2, 12))
    with torch.no_grad():
        ours_logits = model.decoder.head(model.decoder(input_ids=ids))
        theirs = qwen(ids).logits
    torch.testing.assert_close(ours_logits, theirs, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.vision.state_dict().values(), vision.state_dict().values()))
    assert all(torch.equal(v, model.connector.state_dict()[k]) for k, v in connector.items())


@pytest.mark.slow
def test_nmp_on_the_embedded_default_learns_the_documents_that_text_only_data_does_not(tmp_path):
    """A short version of benchmarks/nmp.py (BENCHMARKS.md has the full one): after 60 steps the held-out text loss
    on interleaved documents is below its step-0 value and below the same model's after 60 steps of text only."""
    from lit_internvl.cli import main

    def held_out_loss(overrides: list[str], steps: int) -> float:
        root = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cli = main(["--config", str(REPO / "recipes/nmp.yaml"), "--trainer.default_root_dir", str(root),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_steps",
                    str(max(steps, 1)), "--trainer.val_check_interval", "1.0", "--data.init_args.val_size", "64",
                    *overrides], run=False)  # fmt: skip
        if steps:
            cli.trainer.fit(cli.model, cli.datamodule)
        (metrics,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
        return metrics["val/loss"]

    start = held_out_loss([], 0)
    mixture = held_out_loss([], 60)
    text_only = held_out_loss(["--data.init_args.weights", "[0, 1]"], 60)
    print(f"held-out text loss: step 0 {start:.3f}, NMP mixture {mixture:.3f}, text-only {text_only:.3f}")
    assert mixture < start and mixture < text_only
