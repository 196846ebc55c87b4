"""Online RL's losses against the published formulas written out here: GRPO (Shao et al. 2024, the clipped
token-ratio surrogate with the k3 KL estimate) and GSPO (Zheng et al. 2025, the clipped sequence ratio), with
group-relative advantages, on random log-probs, rewards and masks."""

from __future__ import annotations

import math

import pytest
import torch

from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.losses import group_advantages, policy_loss
from lit_internvl.stages.options import GenerationOptions


def _batch(seed: int = 0, n: int = 6, length: int = 7, shift: tuple[float, ...] = (0.0,) * 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, length, generator=g, dtype=torch.float64) * 3
    # Ratios spread well past 1 ± 0.2 both ways, so both clipping branches occur; ``shift`` moves a whole answer.
    noise = torch.randn(n, length, generator=g, dtype=torch.float64) * 0.4
    log_probs = (old + noise + torch.tensor(shift, dtype=torch.float64)[:, None]).requires_grad_(True)
    ref = old + torch.randn(n, length, generator=g, dtype=torch.float64) * 0.3
    mask = torch.ones(n, length, dtype=torch.float64)
    for row, real in enumerate([7, 5, 3, 7, 1, 4][:n]):
        mask[row, real:] = 0
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)  # the second group: no signal
    return log_probs, old, ref, mask, rewards


def test_group_advantages_are_the_standardised_rewards_of_each_group():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    mean, std = 0.75, math.sqrt(sum((r - 0.75) ** 2 for r in (1, 0, 1, 1)) / 3)  # unbiased, as torch.std
    assert adv[0].tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in (1, 0, 1, 1)])
    assert adv[1].tolist() == [0.0] * 4, "a group whose rewards are all equal has no signal"
    assert group_advantages(rewards, scale=False)[0].tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25])
    assert group_advantages(torch.tensor([[3.0], [1.0]])).tolist() == [[3.0], [1.0]], "a group of one: r"


def _grpo_by_hand(log_probs, old, ref, mask, adv, eps_low, eps_high, beta):
    terms = []
    for i in range(log_probs.shape[0]):
        for t in range(log_probs.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(log_probs[i, t] - old[i, t])
            surrogate = torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
            kl = torch.exp(ref[i, t] - log_probs[i, t]) - (ref[i, t] - log_probs[i, t]) - 1
            terms.append(-surrogate + beta * kl)
    return torch.stack(terms).mean()


def _gspo_by_hand(log_probs, old, mask, adv, eps_low, eps_high):
    losses = []
    for i in range(log_probs.shape[0]):
        real = mask[i].bool()
        s = torch.exp((log_probs[i][real] - old[i][real]).mean())  # the sequence ratio, gradient through it
        losses.append(-torch.minimum(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_loss_and_gradient_equal_the_formula(beta):
    log_probs, old, ref, mask, rewards = _batch()
    adv = group_advantages(rewards).flatten()
    loss, stats = policy_loss(log_probs, old, adv, mask, "grpo", 0.2, 0.28, ref_log_probs=ref, kl_weight=beta)
    (grad,) = torch.autograd.grad(loss, log_probs)
    expected = _grpo_by_hand(log_probs, old, ref, mask, adv, 0.2, 0.28, beta)
    (expected_grad,) = torch.autograd.grad(expected, log_probs)
    assert abs(loss.item() - expected.item()) <= 1e-6
    assert (grad - expected_grad).abs().max() <= 1e-6
    assert 0 < stats["clip_fraction"] < 1, "some tokens clipped, some not"
    ratio = torch.exp(log_probs - old).detach()
    clipped = ((ratio > 1.28) & (adv[:, None] > 0)) | ((ratio < 0.8) & (adv[:, None] < 0))
    if not beta:
        assert (grad[clipped & mask.bool()] == 0).all(), "a clipped token gets no gradient"
        assert grad[3:].abs().max() == 0, "the group with equal rewards contributes nothing"
    assert stats["kl"] > 0 if beta else stats["kl"] == 0


def test_gspo_loss_and_gradient_equal_the_sequence_level_formula():
    log_probs, old, _, mask, rewards = _batch(seed=1, shift=(0.6, 0.0, -0.5, 0.3, 0.0, 0.1))
    adv = group_advantages(rewards).flatten()
    loss, stats = policy_loss(log_probs, old, adv, mask, "gspo", 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss, log_probs)
    expected = _gspo_by_hand(log_probs, old, mask, adv, 0.2, 0.28)
    (expected_grad,) = torch.autograd.grad(expected, log_probs)
    assert abs(loss.item() - expected.item()) <= 1e-6
    assert (grad - expected_grad).abs().max() <= 1e-6
    s = torch.exp(((log_probs - old) * mask).sum(1) / mask.sum(1)).detach()
    clipped = ((s > 1.28) & (adv > 0)) | ((s < 0.8) & (adv < 0))
    assert clipped.any() and (~clipped[:3]).any(), "the batch exercises both branches"
    assert (grad[clipped] == 0).all() and grad[3:].abs().max() == 0
    for row in range(3):  # within an answer every token's gradient is the same: A·s/|y| (GSPO's equal weighting)
        real = mask[row].bool()
        assert torch.allclose(grad[row][real], grad[row][real][0].expand(int(real.sum())))


def test_gspo_clamps_the_log_ratio_and_rejects_an_unknown_kind():
    log_probs = torch.zeros(1, 2, requires_grad=True)
    old = torch.full((1, 2), -30.0)
    loss, stats = policy_loss(log_probs, old, torch.tensor([-1.0]), torch.ones(1, 2), "gspo")
    assert stats["ratio_max"].item() == pytest.approx(math.exp(10.0), rel=1e-5), "exp(clamp(30, max=10))"
    with pytest.raises(ValueError, match="grpo"):
        policy_loss(log_probs, old, torch.tensor([1.0]), torch.ones(1, 2), "ppo")


def test_batched_rollouts_of_prompts_with_different_tile_counts_equal_one_by_one_seeded_sampling():
    from PIL import Image

    from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
    from lit_internvl.data.collate import Collator
    from lit_internvl.data.records import Record
    from lit_internvl.data.samples import SampleBuilder, SampleOptions
    from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
    from lit_internvl.data.views import View
    from lit_internvl.inference.generate import generate
    from lit_internvl.inference.rollout import sample_groups
    from lit_internvl.models import VisionLanguageModel

    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    vision, decoder = InternViT("tiny"), Decoder("tiny")
    model = VisionLanguageModel(vision, PixelShuffleMLP(128, 128), decoder, tokenizer.token_to_id(IMG_CONTEXT)).eval()
    views = (View("prompt", 4),)
    builder = SampleBuilder(tokenizer, SampleOptions(tile_size=56, max_tiles=4, v2pe={"stride": 64}), views)
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (168, 56), "blue"), Image.new("RGB", (112, 112))]
    prompts = [
        builder(
            Record("conversation", f"q{i}", {"conversations": [{"from": "human", "value": f"<image>\n{q}"}]}, [image])
        )  # fmt: skip
        for i, (q, image) in enumerate(zip(["what?", "which colour is it", "where"], images))
    ]
    assert [p["views"]["prompt"]["pixel_values"].shape[0] for p in prompts] == [1, 4, 5], "1; 3 + thumbnail; 4 + it"
    batch = Collator(tokenizer.pad_id, views)(prompts)["prompt"]
    seeds = [11, 12, 13, 21, 22, 23, 31, 32, 33]
    calls = []
    hook = model.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    rows = sample_groups(model, batch.input_ids, batch.attention_mask, batch.images, seeds, positions=batch.positions,
                         max_new_tokens=8)  # fmt: skip
    hook.remove()
    assert calls == [10], "one vision pass over the 10 tiles of the 3 prompts, not one per answer"
    for r, tokens in enumerate(rows):
        prompt = Collator(tokenizer.pad_id, views)([prompts[r // 3]])["prompt"]
        alone = generate(model, prompt.input_ids, prompt.attention_mask, prompt.images, max_new_tokens=8,
                         temperature=1.0, positions=prompt.positions,
                         generator=torch.Generator().manual_seed(seeds[r]))[0]  # fmt: skip
        assert tokens == alone, f"row {r}"
    assert len({tuple(t) for t in rows}) > 3, "different seeds draw different answers"


class AnswerLength:
    """A reward that differs between an untrained model's answers: their length in characters."""

    def __call__(self, answer, reference, meta) -> float:
        return float(len(answer))


def _rl_stage():
    from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
    from lit_internvl.stages import RLStage

    torch.manual_seed(0)
    return RLStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes"), group_size=4,
                   generation=GenerationOptions(max_new_tokens=6), learning_rate=1e-3, warmup_steps=1,
                   rollout_temperature=1.5,
                   rewards=[AnswerLength()])  # fmt: skip


def _prompts():
    from lit_internvl.data import ShapesDataModule

    return ShapesDataModule(records="questions", tokenizer="shapes", batch_size=2, train_size=8, val_size=2, system="")


def test_an_rl_run_killed_and_resumed_samples_and_trains_what_the_whole_run_does(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    def trainer(root, steps, **kwargs):
        return L.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=root, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, **kwargs)  # fmt: skip

    whole = _rl_stage()
    logger = TensorBoardLogger(tmp_path / "tb", name="")
    trainer(tmp_path / "whole", 3, logger=logger, enable_checkpointing=False).fit(whole, _prompts())
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)

    class Kill(L.Callback):  # the run is killed before its third step (the checkpoint of step 2 on disk)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                raise RuntimeError("killed before step 3")

    with pytest.raises(RuntimeError, match="killed"):
        trainer(tmp_path / "first", 3, logger=False, callbacks=[saver, Kill()]).fit(_rl_stage(), _prompts())
    resumed = _rl_stage()
    checkpoint = next((tmp_path / "ckpt").glob("*step=2*"))
    trainer(tmp_path / "second", 3, logger=False, enable_checkpointing=False).fit(
        resumed, _prompts(), ckpt_path=checkpoint
    )
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the same rollouts (seeded by step) and the same updates"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rl/reward", "rl/reward_std", "rl/answer_length", "rl/clip_fraction", "rl/no_signal", "rl/kl"} <= tags
    assert len(events.Scalars("rl/reward")) == 3, "the reward curve: one point a step"
    assert all(e.value > 0 for e in events.Scalars("rl/reward_std")), "every step had a signal to train on"


def test_the_process_critic_is_an_optional_reward_model(tmp_path):
    """With ``critic_reward_weight`` w an answer's reward is its rules' plus w × the critic's mean step P(+), each
    answer's critic score equal to scoring it alone on its prompt's image and question."""
    import lightning as L

    from lit_internvl.checkpoints import read_state_dict
    from lit_internvl.data.critic import split_steps
    from lit_internvl.data.shapes.steps import ShapesStepsDataModule
    from lit_internvl.inference.critic import aggregate, score_solutions
    from lit_internvl.stages import RLStage

    def data():
        return ShapesStepsDataModule(records="solutions", batch_size=2, train_size=2, val_size=2)

    torch.manual_seed(3)
    critic = RLStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes")).use_data(
        data()
    )
    critic.configure_model()
    path = tmp_path / "critic.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in critic.model.state_dict().items()}}, path)
    with pytest.raises(ValueError, match="model.init_args.generation.critic "):
        RLStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes"),
                critic_reward_weight=0.5)  # fmt: skip
    torch.manual_seed(0)
    stage = RLStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes"), group_size=3,
                    generation=GenerationOptions(max_new_tokens=6, critic=str(path)), rollout_temperature=1.5,
                    rewards=[AnswerLength()],
                    critic_reward_weight=0.5)  # fmt: skip
    seen = {}
    scored = stage.critic_rewards

    def spy(batch, texts):
        seen.update(batch=batch, texts=list(texts), scores=scored(batch, texts))
        return seen["scores"]

    stage.critic_rewards = spy
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = data()
    trainer.fit(stage, module)
    model = critic.model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), read_state_dict(str(path)).values()))
    batch, texts = seen["batch"], seen["texts"]  # the prompt view's Batch
    assert len(texts) == 2 * 3
    alone = []
    for r, text in enumerate(texts):
        b = r // 3
        pixels = batch.pixel_values[b : b + 1]  # one tile a shapes prompt
        steps = split_steps(text)
        row = score_solutions(model, module.tokenizer, module.sample_options, batch.meta[b]["question"], [steps],
                              pixels)[0]  # fmt: skip
        alone.append(aggregate(row if steps else []))
    assert seen["scores"].tolist() == pytest.approx(alone, abs=1e-5)
    expected = sum(len(t) + 0.5 * c for t, c in zip(texts, alone)) / len(texts)
    assert trainer.callback_metrics["rl/reward"].item() == pytest.approx(expected, rel=1e-5)
    assert trainer.callback_metrics["rl/critic_reward"].item() == pytest.approx(sum(alone) / len(alone), rel=1e-5)


def test_the_real_size_rl_recipe_parses_and_builds_on_meta():
    from pathlib import Path

    from lit_internvl.rewards import ExactMatch
    from lit_internvl.stages import RLStage
    from tests.recipes import stage_on_meta

    stage = stage_on_meta(Path(__file__).resolve().parents[1] / "recipes/internvl3_1b/rl.yaml")
    assert isinstance(stage, RLStage) and stage.hparams.algorithm == "gspo" and stage.hparams.group_size == 16
    assert [type(r) for r in stage.rewards] == [ExactMatch] and stage.hparams.kl_weight == 0.0
    assert sum(p.numel() for p in stage.model.decoder.parameters()) > 4e8, "InternVL3-1B's decoder"


def test_the_embedded_rl_recipe_runs_from_the_command_line(tmp_path):
    import json
    from pathlib import Path

    from lit_internvl.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes/rl.yaml"
    main(["fit", "--config", str(recipe), "--model.init_args.init_from", "null", "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar",
          "false", "--data.init_args.train_size", "4", "--data.init_args.val_size", "4", "--data.init_args.batch_size",
          "2", "--data.init_args.num_workers", "0", "--model.init_args.group_size", "2",
          "--model.init_args.generation.max_new_tokens", "4"])  # fmt: skip
    report = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["metrics"]
    assert report["val/accuracy/locate"]["chance"] == pytest.approx(1 / 9)
    assert report["val/accuracy/compare"]["chance"] == 0.5
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_answer_log_probs_equal_each_answer_scored_alone():
    """The loss's log-probs (prompts left-padded, G answers after each, one vision pass a prompt) equal each
    prompt + answer scored alone, unpadded, at the positions generation gave them (the first answer token at
    ceil(last prompt position) + 1)."""
    from lit_internvl.data.v2pe import next_position
    from lit_internvl.models.vlm import Logits

    stage = _rl_stage()
    data = _prompts()
    stage.use_data(data)
    stage.configure_model()
    model = stage.model.eval()
    batch = next(iter(data.train_dataloader()))["prompt"]
    g = stage.hparams.group_size
    gen = torch.Generator().manual_seed(0)
    answers = torch.randint(300, 390, (batch.rows * g, 5), generator=gen)
    mask = torch.ones_like(answers, dtype=torch.bool)
    mask[1, 3:] = False  # answers of different lengths
    with torch.no_grad():
        got = stage.answer_log_probs(model, batch, answers, mask, range(batch.rows))
    tiles = batch.tiles_per_sample
    for row in range(answers.shape[0]):
        p = row // g
        real = batch.attention_mask[p].bool()
        prompt, positions = batch.input_ids[p][real], batch.positions[p][real]
        answer = answers[row][mask[row]]
        ids = torch.cat([prompt, answer])[None]
        pos = torch.cat([positions, next_position(positions[-1:]) + torch.arange(len(answer))])[None]
        pixels = batch.pixel_values[sum(tiles[:p]) : sum(tiles[: p + 1])]
        with torch.no_grad():
            logits = model(ids, pixels, positions=pos, head=Logits())[0].float() / stage.hparams.rollout_temperature
        logits[:, stage.image_token_ids()] = float("-inf")  # the image tokens are never drawn
        alone = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(1, answer[:, None]).squeeze(1)
        assert (got[row][mask[row]] - alone).abs().max() <= 1e-5, row
        assert (got[row][~mask[row]] == 0).all()


def test_rollouts_never_draw_a_banned_token():
    from lit_internvl.inference.rollout import sample_groups

    stage = _rl_stage()
    data = _prompts()
    stage.use_data(data)
    stage.configure_model()
    batch = next(iter(data.train_dataloader()))["prompt"]
    banned = stage.image_token_ids()
    args = (stage.model.eval(), batch.input_ids, batch.attention_mask, batch.images, list(range(2 * 16)))
    free = sample_groups(*args, max_new_tokens=12, temperature=50.0)  # nearly uniform: every token comes up
    assert any(t in banned for row in free for t in row), "the test can fail: unbanned, they are drawn"
    kept = sample_groups(*args, max_new_tokens=12, temperature=50.0, banned_tokens=banned)
    assert not any(t in banned for row in kept for t in row)
