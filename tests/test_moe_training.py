"""Training a mixture-of-experts decoder: the stages add ``aux_loss_coef`` × the load-balancing loss of the policy's
own forward (MPO: not of its reference's), LoRA adapts attention and experts and merges exactly, and the FLOP count
counts the experts a token runs, not all of them."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.flops import transformer_flops
from lit_internvl.lora import add_lora, lora_disabled, merge_lora
from lit_internvl.stages import MPOStage, SFTStage
from tests.tiny import asked, tiny_vlm

TOKENIZER = ByteTokenizer()
IMAGE = TOKENIZER.token_to_id(IMG_CONTEXT)


def _stage(cls, aux_loss_coef: float = 0.01, **options):
    torch.manual_seed(0)
    decoder = Decoder(LanguageConfig.from_name("tiny-moe", attn_backend="eager"))
    decoder.config.moe.aux_loss_coef = aux_loss_coef
    stage = cls(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=decoder, image_context_id=IMAGE,
        warmup_steps=1, **options,
    )  # fmt: skip
    return stage


def _conversations():
    data = ShapesDataModule(records="questions", train_size=8, val_size=4, batch_size=4, system="Answer in one word.")
    return next(iter(asked(data).train_dataloader()))


LOG_OUTSIDE_TRAINER = "ignore:You are trying to `self.log"  # training_step called by hand


@pytest.mark.filterwarnings(LOG_OUTSIDE_TRAINER)
def test_sft_loss_is_the_language_model_loss_plus_coef_times_the_aux_loss():
    stage = _stage(SFTStage, aux_loss_coef=0.5)
    stage.configure_model()
    batch = _conversations()
    with_aux = stage.training_step(batch, 0)
    aux = stage.model.decoder.aux_loss()
    stage.model.decoder.config.moe.aux_loss_coef = 0.0
    without = stage.training_step(batch, 0)
    assert aux > 0.9, "E·Σ f·P is at least about 1"
    torch.testing.assert_close(with_aux - without, 0.5 * aux)
    with_aux.backward()
    router = stage.model.decoder.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


@pytest.mark.filterwarnings(LOG_OUTSIDE_TRAINER)
def test_mpo_adds_the_aux_loss_of_the_policy_forward_not_of_the_reference_pass():
    """Under LoRA the reference runs through the same decoder (adapters off) after the policy: the aux loss must be
    read before it. With adapters that change the routing, the two forwards' aux losses differ, so a loss that read
    the reference's would fail the check."""
    stage = _stage(MPOStage, aux_loss_coef=0.1, trainable=[], lora={"parts": ["decoder"], "r": 4})
    stage.configure_model()
    for name, param in stage.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    stage.model.eval()  # no LoRA dropout: the policy forward repeats exactly below
    data = ShapesDataModule(records="preference", train_size=8, val_size=4, batch_size=4, system="Answer in one word.")
    batch = next(iter(asked(data, "chosen", "rejected").train_dataloader()))
    terms = stage.preference_terms(batch)
    h, coef = stage.hparams, stage.model.decoder.config.moe.aux_loss_coef
    added = terms["loss"] - (h.preference_weight * terms["dpo"] + h.quality_weight * terms["bco"] + terms["sft"])
    inputs = stage.concatenated(batch)
    with torch.no_grad():
        stage.forward_batch(inputs, cross_entropy=True)
        policy = stage.model.decoder.aux_loss()
        stage.reference_log_probs(inputs)
        reference = stage.model.decoder.aux_loss()
    assert abs(policy - reference) > 1e-3
    torch.testing.assert_close(added, coef * policy, rtol=0, atol=1e-5)  # added: a difference of terms of size ~10
    assert abs(coef * (policy - reference)) > 1e-4


def test_sft_on_the_moe_decoder_logs_the_aux_loss(tmp_path):
    stage = _stage(SFTStage)
    data = ShapesDataModule(records="questions", train_size=8, val_size=4, batch_size=4, system="Answer in one word.")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(stage, data)
    assert "train/aux_loss" in trainer.callback_metrics and trainer.callback_metrics["train/aux_loss"] > 0.9


# -- LoRA on the experts ---------------------------------------------------------------------------------------------


def _moe_vlm():
    return tiny_vlm(IMAGE, decoder="tiny-moe").eval()


def test_lora_adapts_attention_and_every_experts_tensor_and_merges_exactly():
    model = _moe_vlm()
    model.requires_grad_(False)
    add_lora(model, ["decoder"], r=4)
    adapters = {name for name, p in model.named_parameters() if "lora_" in name}
    for layer in range(2):
        prefix = f"decoder.layers.{layer}."
        assert any(n.startswith(prefix + "self_attn.q_proj.lora_A") for n in adapters)
        # two nested wrappers on the experts: one for gate_up_proj, one for down_proj
        assert {n for n in adapters if n.startswith(prefix + "mlp.experts.") and "lora_A" in n} == {
            prefix + "mlp.experts.lora_A.default.weight",
            prefix + "mlp.experts.base_layer.lora_A.default.weight",
        }
        assert not any(n.startswith(prefix + "mlp.gate.") for n in adapters), "the router is not adapted"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make every adapter do something
            torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
        with lora_disabled(model):
            base = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert (adapted - base).abs().max() > 1e-3
    assert (adapted - merged).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(_moe_vlm().state_dict())
    assert type(model.decoder.layers[0].mlp.experts).__name__ == "Experts"


def test_expert_adapters_train_while_the_experts_stay_frozen(tmp_path):
    stage = _stage(SFTStage, trainable=["connector"], lora={"parts": ["decoder"], "r": 4})
    stage.configure_model()
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    data = ShapesDataModule(records="questions", train_size=8, val_size=4, batch_size=4, system="Answer in one word.")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(stage, data)
    after = dict(stage.model.named_parameters())
    experts_b = [n for n in after if ".mlp.experts." in n and "lora_B" in n]
    assert len(experts_b) == 4 and all(not torch.equal(before[n], after[n]) for n in experts_b)
    stacked = [n for n in after if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(stacked) == 4 and all(torch.equal(before[n], after[n]) for n in stacked)


def test_lora_on_the_decoder_can_leave_the_experts_alone():
    model = _moe_vlm()
    add_lora(model, ["decoder"], r=4, experts=False)
    assert not any(".mlp.experts." in n for n, _ in model.named_parameters() if "lora_" in n)


# -- FLOPs -----------------------------------------------------------------------------------------------------------


def test_flops_count_the_top_k_experts_and_the_router_not_every_expert():
    dense, moe = LanguageConfig.from_name("tiny-qwen3"), LanguageConfig.from_name("tiny-moe")
    lengths = [10, 7]
    tokens = sum(lengths)
    difference = transformer_flops(moe, lengths).linear - transformer_flops(dense, lengths).linear
    # per token and layer: dense 3·H·384 against 2 experts of 3·H·192 (equal) plus the router H·8
    assert difference == 2 * tokens * moe.num_layers * moe.hidden_size * moe.moe.num_experts
    with torch.device("meta"):
        model = Decoder(moe)
    all_experts = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    assert transformer_flops(moe, lengths).linear < 2 * tokens * all_experts  # fewer than every expert's


def test_moe_flop_count_equals_flop_counter_mode_on_the_loop_over_experts():
    """The loop backend runs exactly the routed tokens through their experts, so torch's FlopCounterMode counts what
    the model needs: the analytic count must equal it (the batched backends also compute padding or sort)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = LanguageConfig.from_name("tiny-moe", attn_backend="eager")
    config.moe.experts_backend = "loop"
    torch.manual_seed(0)
    model = Decoder(config)
    ids = torch.randint(0, 300, (2, 23))
    with FlopCounterMode(display=False) as counter:
        model.head(model(ids))
    assert counter.get_total_flops() == transformer_flops(config, [23, 23]).forward


def test_an_rl_step_on_the_moe_decoder_adds_the_aux_loss(tmp_path):
    """Rollouts (generation with the KV cache through the experts), then the policy loss plus each micro-batch's share
    of the load-balancing loss."""
    from lit_internvl.stages import RLStage
    from lit_internvl.stages.options import GenerationOptions

    class AnswerLength:
        def __call__(self, answer, reference, meta) -> float:
            return float(len(answer))

    torch.manual_seed(0)
    config = LanguageConfig.from_name("tiny-moe")
    config.moe.aux_loss_coef = 0.1
    decoder = Decoder(config)
    router = decoder.layers[0].mlp.gate.weight.detach().clone()
    stage = RLStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=decoder, group_size=3, micro_batches=2,
        generation=GenerationOptions(max_new_tokens=4), learning_rate=1e-3, warmup_steps=1, rewards=[AnswerLength()],
        rollout_temperature=1.5,
    )  # fmt: skip
    data = ShapesDataModule(records="questions", tokenizer="shapes", batch_size=2, train_size=4, val_size=2, system="")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(stage, data)
    assert trainer.callback_metrics["train/aux_loss"] > 0.9
    assert not torch.equal(router, stage.model.decoder.layers[0].mlp.gate.weight)
