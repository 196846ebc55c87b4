"""ViCO's two stages: the consistency loss is ``KL(reference at the first budget ‖ policy at drawn budgets)`` per
answer token, equal to a float64 computation by hand, on the chunked head path, its gradient reaching only what the
stage trains; the router stage labels each tile by the ratio of the answer's losses with that tile compressed and
uncompressed (by hand), keeps its threshold on a sliding window at the target rate, and trains the router alone."""

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_internvl.batch import Images
from lit_internvl.components import Decoder, FlashConnector, InternViT
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.tokenizer import load_tokenizer
from lit_internvl.data.views import View
from lit_internvl.losses import linear_kl_divergence, next_token_targets, supervised_positions
from lit_internvl.models.routing import at_budgets
from lit_internvl.stages import ViCOStage, ViRStage
from tests.test_routing import FULL, SMALL, _tiled_record, collate, shapes_vqa

TILE = 112


# -- the chunked divergence ------------------------------------------------------------------------------------------


def _kl64(hidden, weight, reference_hidden, reference_weight):
    """KL(q ‖ p) per row in float64, from the whole distributions."""
    log_p = (hidden.double() @ weight.double().T).log_softmax(-1)
    log_q = (reference_hidden.double() @ reference_weight.double().T).log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_kl_and_its_gradients_equal_a_float64_computation_by_hand(chunk_size):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    reference_hidden, reference_weight = (
        torch.randn(7, 16, generator=generator),
        torch.randn(40, 16, generator=generator),
    )
    upstream = torch.rand(7, generator=generator)
    kl = linear_kl_divergence(hidden, weight, reference_hidden, reference_weight, chunk_size)
    (kl * upstream).sum().backward()
    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = _kl64(hidden64, weight64, reference_hidden, reference_weight)
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-4, atol=1e-5)
    assert (kl >= 0).all()
    same = linear_kl_divergence(reference_hidden, reference_weight, reference_hidden, reference_weight, chunk_size)
    assert same.abs().max() < 1e-5  # a distribution is at KL 0 from itself


# -- ViCO stage 1 ----------------------------------------------------------------------------------------------------


def _data(size: int = 8) -> ShapesDataModule:
    return ShapesDataModule(
        records="questions", tokenizer="shapes", tile_size=TILE, train_size=64, val_size=size, batch_size=size,
        system="",
    )  # fmt: skip


def _factories(**connector):
    return dict(
        vision=partial(InternViT, config="tiny"),
        connector=partial(FlashConnector, router_heads=4, **connector),
        decoder=partial(Decoder, config="tiny-shapes"),
    )


def _vico(**options) -> ViCOStage:
    torch.manual_seed(0)
    stage = ViCOStage(**_factories(), warmup_steps=1, **options)
    stage.use_data(_data()).configure_model()
    with torch.no_grad():  # move the policy away from its reference: every row has a divergence, the heads differ
        for param in stage.model.decoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return stage


def _policy_loss(stage: ViCOStage, batch):
    """The stage's loss as training_step computes it, with the budgets it draws."""
    full = batch["conversation"]
    budgets = stage.draw_budgets(full.images)
    policy = at_budgets(full, Images(full.images.pixel_values, full.images.tiles_per_sample, budgets), 261)
    kl = stage.consistency(full, policy)
    per_row = torch.zeros(full.rows).index_add(0, supervised_positions(policy.labels).nonzero()[:, 0], kl)
    counts = supervised_positions(policy.labels).sum(1)
    return (per_row / counts).mean(), budgets, full, policy


def test_the_vico_loss_equals_a_float64_computation_by_hand(one_thread):
    stage = _vico(compressed_probability=0.5, draw="sample")
    stage.model.eval()
    batch = next(iter(stage.data.val_dataloader()))
    loss, budgets, full, policy = _policy_loss(stage, batch)
    assert SMALL in budgets and FULL in budgets
    reference = stage.reference.model()
    with torch.no_grad():
        at_full, at_policy = supervised_positions(full.labels), supervised_positions(policy.labels)
        ref_hidden = reference(full.input_ids, full.images, attention_mask=full.attention_mask,
                               positions=full.positions)[at_full]  # fmt: skip
        hidden = stage.model(policy.input_ids, policy.images, attention_mask=policy.attention_mask,
                             positions=policy.positions)[at_policy]  # fmt: skip
        per_token = _kl64(hidden, stage.model.decoder.head_weight, ref_hidden, reference.decoder.head_weight)
    rows = at_policy.nonzero()[:, 0]
    per_row = torch.zeros(full.rows, dtype=torch.float64).index_add(0, rows, per_token) / at_policy.sum(1)
    torch.testing.assert_close(loss.double(), per_row.mean(), rtol=1e-5, atol=1e-6)
    # the same tokens are compared: the answers' targets agree once the image slots are left out
    assert torch.equal(next_token_targets(full.labels)[at_full], next_token_targets(policy.labels)[at_policy])


def test_draws_are_per_sample_or_per_tile():
    stage = _vico(compressed_probability=0.5)
    images = Images(torch.zeros(40, 3, TILE, TILE), [4] * 10, [FULL] * 40)
    per_sample = stage.draw_budgets(images)
    assert all(len(set(per_sample[i : i + 4])) == 1 for i in range(0, 40, 4)) and len(set(per_sample)) == 2
    stage.hparams.draw = "tile"
    per_tile = stage.draw_budgets(images)
    assert any(len(set(per_tile[i : i + 4])) == 2 for i in range(0, 40, 4))
    # the micro-batches accumulated into one optimiser step draw apart; each draw is a function of its inputs
    assert stage.draw_budgets(images, batch_idx=1) != per_tile == stage.draw_budgets(images, batch_idx=0)


@pytest.mark.parametrize("trainable", [["connector", "decoder"], ["connector"]])
def test_the_vico_gradient_reaches_only_what_the_stage_trains(one_thread, trainable):
    stage = _vico(compressed_probability=0.5, trainable=trainable)
    batch = next(iter(stage.data.val_dataloader()))
    before = {k: v.clone() for k, v in stage.reference.model().state_dict().items()}
    loss, *_ = _policy_loss(stage, batch)
    loss.backward()
    grads = {name: p.grad for name, p in stage.model.named_parameters()}
    trained = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert any(n.startswith("connector.mlp2.") for n in trained) and any(
        n.startswith("connector.mlp1.") for n in trained
    )
    assert all(grads[n] is None for n in grads if n.startswith(("vision.", "connector.router.")))
    assert any(n.startswith("decoder.") for n in trained) == ("decoder" in trainable)
    assert {n for n, p in stage.model.named_parameters() if p.requires_grad} == {
        n for n, g in grads.items() if g is not None
    }
    reference = stage.reference.model()
    assert not any(p.requires_grad or p.grad is not None for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert not any("reference" in name for name in stage.state_dict())  # held out of the checkpoint


def test_training_pulls_the_compressed_answer_towards_the_reference(one_thread, tmp_path):
    torch.manual_seed(0)
    stage = ViCOStage(**_factories(), learning_rate=2e-3, warmup_steps=1, compressed_probability=1.0)
    data = _data()
    kls = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kls.append(float(trainer.callback_metrics["train/kl"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])  # fmt: skip
    trainer.fit(stage, data)
    assert len(kls) == 8 and sum(kls[-3:]) < sum(kls[:3])


def test_vico_refuses_a_connector_without_a_router():
    from lit_internvl.components import MultiBudgetConnector

    stage = ViCOStage(**{**_factories(), "connector": partial(MultiBudgetConnector)})
    with pytest.raises(ValueError, match="FlashConnector"):
        stage.use_data(_data()).configure_model()


# -- ViCO stage 2: the router ----------------------------------------------------------------------------------------


def _vir(**options) -> ViRStage:
    torch.manual_seed(0)
    stage = ViRStage(**_factories(), warmup_steps=1, **options)
    stage.use_data(_data()).configure_model()
    return stage


def _answer_loss(stage, sample) -> float:
    batch = collate([sample], "conversation")
    with torch.no_grad():
        logits = stage.forward_batch(batch)
    targets = next_token_targets(batch.labels)
    return float(F.cross_entropy(logits.double(), targets[targets != -100]))


def test_each_tile_is_labelled_by_the_loss_ratio_with_it_compressed(one_thread):
    stage = _vir(ratio_eps=1e-4)
    stage.model.eval()
    batch = next(iter(stage.data.val_dataloader()))["conversation"]
    _, ratios = stage.tile_ratios(batch)
    full, small = shapes_vqa(FULL, "conversation", 8), shapes_vqa(SMALL, "conversation", 8)
    expected = [
        (_answer_loss(stage, small[i]["views"]["conversation"]) + 1e-4)
        / (_answer_loss(stage, full[i]["views"]["conversation"]) + 1e-4)
        for i in range(8)
    ]
    torch.testing.assert_close(ratios.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_tiles_of_several_tile_rows_are_compressed_one_at_a_time(one_thread):
    stage = _vir(ratio_eps=1e-4)
    stage.model.eval()
    builder = SampleBuilder(load_tokenizer("shapes"), SampleOptions(tile_size=TILE, max_tiles=4, system=""),
                            (View("conversation", FULL),))  # fmt: skip
    records = [_tiled_record("wide", (224, 112), "Where"), _tiled_record("big", (224, 224), "What")]
    batch = collate([builder(r)["views"]["conversation"] for r in records], "conversation")
    _, ratios = stage.tile_ratios(batch)
    assert ratios.shape == (8,)
    for tile in range(8):
        row = 0 if tile < 3 else 1
        one = collate([builder(records[row])["views"]["conversation"]], "conversation")
        budgets = [FULL] * len(one.images.budgets)
        budgets[tile - (0 if row == 0 else 3)] = SMALL
        small = at_budgets(one, Images(one.images.pixel_values, one.images.tiles_per_sample, budgets), 261)
        with torch.no_grad():
            losses = [stage.forward_batch(b, cross_entropy=True).double().mean() for b in (small, one)]
        torch.testing.assert_close(ratios[tile].double(), (losses[0] + 1e-4) / (losses[1] + 1e-4), rtol=1e-4, atol=1e-6)


def test_the_threshold_is_the_target_quantile_of_a_sliding_window():
    stage = _vir(target_compression=0.25, window=5)
    seen = []
    for values in ([5.0, 1.0], [3.0, 2.0, 4.0], [9.0, 0.5]):
        seen += values
        tau = stage.threshold(torch.tensor(values))
        torch.testing.assert_close(tau, torch.quantile(torch.tensor(seen[-5:]), 0.25))
    assert int(stage.ratio_count) == 7 and "ratio_window" in stage.state_dict()  # resumed with the checkpoint


def test_the_router_stage_trains_the_router_alone(one_thread, tmp_path):
    torch.manual_seed(0)
    stage = ViRStage(**_factories(), learning_rate=1e-3, warmup_steps=1, target_compression=0.5, window=64)
    data = _data()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, limit_val_batches=1,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        val_check_interval=3)  # fmt: skip
    stage.use_data(data).configure_model()
    start = {k: v.clone() for k, v in stage.model.state_dict().items()}
    trainer.fit(stage, data)
    changed = {k for k, v in stage.model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith("connector.router.") for k in changed)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["train/labelled_compress"]) <= 1.0
    assert FULL * 0 < float(metrics["val/visual_tokens"]) <= FULL and "val/answer_accuracy_routed" in metrics
