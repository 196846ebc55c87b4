"""Tokens the data adds grow the decoder's vocabulary as InternVL's training scripts do: the new rows of the
embeddings and the head are the mean of the old rows, the old ids' logits do not move, a tied head stays tied,
and the grown model exports in transformers' layout and loads there. A tokenizer larger than the model for any
other reason is still refused."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import InternVLForConditionalGeneration

from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
from lit_internvl.data import RecordsDataModule
from lit_internvl.data.shapes import write_records
from lit_internvl.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from lit_internvl.hf import export_vlm
from lit_internvl.models.builders import internvl
from lit_internvl.models.vlm import Logits
from lit_internvl.models.vocabulary import grow_vocabulary
from lit_internvl.stages import SFTStage
from lit_internvl.tools.export import main as export_main
from tests.test_hf import TOLERANCE, _randomise, _tokenizer_folder

NEW = ["<think>", "</think>"]


def _model(tie: bool):
    torch.manual_seed(0)
    model = internvl("tiny")
    if not tie:  # the same model with an untied head
        config = LanguageConfig.from_name("tiny", tie_embeddings=False)
        model.decoder = Decoder(config)
    _randomise(model)
    return model.eval()


def _inputs(model, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(0, vocab, (2, 6), generator=generator)
    image = torch.full((2, model.tokens_per_tile()), model.image_context_id)
    size = model.vision.config.image_size
    return torch.cat([text[:, :2], image, text[:, 2:]], dim=1), torch.randn(2, 3, size, size, generator=generator)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_two_new_tokens_keep_the_old_logits_and_start_at_the_old_mean(tie):
    model = _model(tie)
    old = model.decoder.embed_tokens.weight.detach().double().clone()
    old_head = old if tie else model.decoder.lm_head.weight.detach().double().clone()
    input_ids, pixel_values = _inputs(model, 272)
    with torch.no_grad():
        before = model(input_ids, pixel_values, head=Logits())

    message = grow_vocabulary(model.decoder, 2)
    assert "272 to 274" in message
    decoder = model.decoder
    assert decoder.embed_tokens.weight.shape == (274, 128) and decoder.config.vocab_size == 274
    assert LanguageConfig.from_name("tiny").vocab_size == 272  # the shared preset is not touched
    # The new rows: the mean of the old ones (computed here in float64).
    assert torch.allclose(decoder.embed_tokens.weight[272:].double(), old.mean(0).expand(2, -1), atol=1e-7)
    assert torch.equal(decoder.embed_tokens.weight[:272].double(), old)
    if tie:
        assert decoder.lm_head is None  # still the embedding matrix
    else:
        assert decoder.lm_head.weight.shape == (274, 128)
        assert torch.allclose(decoder.lm_head.weight[272:].double(), old_head.mean(0).expand(2, -1), atol=1e-7)
    with torch.no_grad():
        after = model(input_ids, pixel_values, head=Logits())
        with_new = model(torch.cat([input_ids, torch.tensor([[272], [273]])], dim=1), pixel_values, head=Logits())
    assert after.shape[-1] == 274
    diff = (after[..., :272] - before).abs().max().item()
    print(f"\n[{'tied' if tie else 'untied'}] old ids' logits after growing by two: max |Δ| = {diff:.1e}")
    assert diff <= 1e-6
    # Two new tokens with the same rows give the same logit; their logit is the old rows' mean logit (the head is
    # linear), so a new token starts neither favoured nor impossible.
    assert torch.allclose(after[..., 272], after[..., 273])
    assert torch.allclose(after[..., 272], after[..., :272].mean(-1), atol=1e-5)
    assert torch.isfinite(with_new).all()


def test_the_grown_model_exports_and_loads_in_transformers(tmp_path):
    model = _model(tie=False)
    grow_vocabulary(model.decoder, 2)
    out = export_vlm(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == 274
    exported = InternVLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    input_ids, pixel_values = _inputs(model, 274)  # new ids among the inputs
    input_ids[0, -1], input_ids[1, -1] = 272, 273
    with torch.no_grad():
        diff = exported(input_ids=input_ids, pixel_values=pixel_values).logits - model(
            input_ids, pixel_values, head=Logits()
        )
    print(f"\n[grown export] max |Δlogit| vs transformers = {diff.abs().max().item():.1e}")
    assert diff.abs().max().item() <= TOLERANCE


def _records(tmp_path, tokenizer: str, add_tokens=None) -> RecordsDataModule:
    jsonl = write_records(tmp_path / "records", "conversation", count=4)
    return RecordsDataModule(
        train=str(jsonl), tokenizer=tokenizer, add_tokens=add_tokens, tile_size=56, max_tiles=1,
        use_thumbnail=False, batch_size=2, max_length=512, shuffle=False,
    )  # fmt: skip


def _sft(decoder: str, **options) -> SFTStage:
    torch.manual_seed(0)
    return SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder(decoder), **options)


def test_the_stage_grows_for_add_tokens_and_says_so(tmp_path, caplog):
    data = _records(tmp_path, "shapes", add_tokens=NEW)
    assert data.tokenizer.vocab_size == 396 and data.tokenizer.added_ids == [394, 395]
    assert data.tokenizer.encode("<think>red</think>") == [394, *load_tokenizer("shapes").encode("red"), 395]
    stage = _sft("tiny-shapes").use_data(data)
    with caplog.at_level("INFO"):
        stage.configure_model()
    assert stage.model.decoder.embed_tokens.num_embeddings == 396
    assert "vocabulary grown from 394 to 396" in caplog.text and "data.init_args.tokenizer added" in caplog.text


def test_a_larger_tokenizer_that_added_nothing_is_still_refused(tmp_path):
    stage = _sft("tiny").use_data(_records(tmp_path, "shapes"))  # the shapes words are not added tokens
    with pytest.raises(ValueError, match=r"model.init_args.decoder holds 272 \(ids \[272, 273, 274\]\.\.\. are not"):
        stage.configure_model()


def test_hf_tokenizer_added_tokens_count_as_added(tmp_path):
    tokenizer = HFTokenizer(_tokenizer_folder(tmp_path / "tok"))  # adds the InternVL tokens it lacks (6)
    assert tokenizer.add_tokens(NEW) == 2 and tokenizer.vocab_size == 154
    assert set(tokenizer.added_ids) >= set(range(146, 154))
    byte = ByteTokenizer()
    assert byte.add_tokens([*NEW, "<think>"]) == 2 and byte.added_ids == [268, 269]
    assert byte.decode(byte.encode("a<think>b"), skip_special_tokens=True) == "ab"


def test_lora_with_train_new_tokens_trains_only_the_new_rows(tmp_path):
    # 6 added ids on the byte tokenizer (268 + 6 = 274) grow the tiny decoder's 272 rows by 2.
    tokens = [f"<t{i}>" for i in range(6)]
    data = _records(tmp_path, "byte", add_tokens=tokens)
    stage = _sft("tiny", trainable=["connector"], lora={"parts": ["decoder"], "r": 2}, train_new_tokens=True,
                 learning_rate=1e-2, warmup_steps=1)  # fmt: skip
    stage.use_data(data)
    stage.configure_model()
    weight = stage.model.decoder.embed_tokens.weight  # tied: the head too
    before = weight.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(stage, data)
    after = stage.model.decoder.embed_tokens.weight.detach()
    assert torch.equal(after[:272], before[:272])  # old rows exactly as they were (no gradient, no decay)
    assert not torch.equal(after[272:], before[272:])  # the new head rows trained
    assert stage.model.decoder.layers[0].self_attn.q_proj.base_layer.weight.requires_grad is False


def test_export_command_reads_a_grown_checkpoint(tmp_path):
    model = _model(tie=True)
    grow_vocabulary(model.decoder, 2)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "last.ckpt")
    export_main(["--checkpoint", str(tmp_path / "last.ckpt"), "--arch", "tiny", "--output", str(tmp_path / "out")])
    exported = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    assert exported.get_input_embeddings().weight.shape[0] == 274
    input_ids, pixel_values = _inputs(model, 274)
    with torch.no_grad():
        diff = exported(input_ids=input_ids, pixel_values=pixel_values).logits - model(
            input_ids, pixel_values, head=Logits()
        )
    assert diff.abs().max().item() <= TOLERANCE


def test_a_tokenizer_folder_with_more_ids_than_the_decoder_grows_it(tmp_path):
    """The folder's 146 ids fit a decoder of 146; HFTokenizer adds the 6 InternVL tokens it lacks (<quad>, …):
    the decoder grows by exactly those 6."""
    folder = _tokenizer_folder(tmp_path / "tok")
    data = RecordsDataModule(train=str(tmp_path / "unused.jsonl"), tokenizer=str(folder),
                             tile_size=56)  # fmt: skip
    assert data.tokenizer.vocab_size == 152
    torch.manual_seed(0)
    decoder = Decoder(LanguageConfig.from_name("tiny", vocab_size=146))
    stage = SFTStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=decoder).use_data(data)
    stage.configure_model()
    assert stage.model.decoder.embed_tokens.num_embeddings == 152 and stage.model.image_context_id == 145


def test_train_new_tokens_under_fsdp2_is_refused(tmp_path, monkeypatch):
    import lit_internvl.stages.vision_language as vision_language

    monkeypatch.setattr(vision_language, "data_parallel_mesh", lambda mesh: object())  # as under FSDP2
    data = _records(tmp_path, "byte", add_tokens=[f"<t{i}>" for i in range(6)])
    stage = _sft("tiny", lora={"parts": ["decoder"], "r": 2}, trainable=["connector"], train_new_tokens=True)
    with pytest.raises(ValueError, match="train_new_tokens.*FSDP2"):
        stage.use_data(data).configure_model()
