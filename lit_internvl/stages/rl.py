"""Online RL with verifiable rewards (InternVL3.5's Cascade RL, second half): GSPO or GRPO on answers sampled
from the current policy, after MPO (or SFT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lit_internvl.batch import IGNORE_INDEX, Batch, Views
from lit_internvl.data.critic import split_steps
from lit_internvl.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from lit_internvl.data.v2pe import next_position
from lit_internvl.data.views import View
from lit_internvl.distributed import data_parallel_rank, unsharded
from lit_internvl.inference.critic import aggregate, score_solutions
from lit_internvl.inference.generate import generate
from lit_internvl.inference.rollout import BuiltinSampler, RolloutEngine
from lit_internvl.losses import PolicyLoss, group_advantages, policy_loss, supervised_positions
from lit_internvl.models.vlm import Logits
from lit_internvl.rewards import ExactMatch, Reward
from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.frozen import Frozen
from lit_internvl.stages.vision_language import VisionLanguageStage


class RLStage(VisionLanguageStage):
    """Each training step takes B prompts (the data's left-padded prompt batches, ``meta`` holding the expected
    answer), samples G answers to each from the current policy in one batched generation (the vision tower once a
    prompt, any mix of tile counts: :mod:`lit_internvl.inference.rollout`), scores them with the rewards, and
    optimises the policy on group-relative advantages (:func:`~lit_internvl.losses.group_advantages`,
    :func:`~lit_internvl.losses.policy_loss`), as verl's ``ray_trainer`` step: rollout → old log-probs → advantages
    → ``ppo_epochs`` passes, each over ``mini_batches`` of the rollout's prompts with one optimiser step each, a
    mini-batch's gradient accumulated over ``micro_batches`` (verl's ``ppo_mini_batch_size`` and
    ``ppo_micro_batch_size``).

    π_old is the sampling policy (its log-probs computed before the first update), so the first pass starts at
    ratio 1. Every forward of a step runs in eval mode (no drop-path: sampling and the ratio see the same
    network). Groups whose rewards are all equal have zero advantage and contribute nothing; their share is
    logged. The rollout seeds are a function of (``seed``, optimiser step, rank, row), so a resumed run samples
    what the uninterrupted one would have. The learning-rate schedule advances once a rollout.

    Logged per step (``rl/``): ``reward`` (mean), ``reward_std`` (within a group, mean over groups),
    ``answer_length``, ``no_signal`` (share of groups with equal rewards), and the last pass's ``clip_fraction``,
    ``approx_kl`` (to π_old), ``kl`` (k3 to the reference, with ``kl_weight``), ``ratio_mean/min/max``, ``loss``.
    Validation: greedy decoding's accuracy per question type (``val/accuracy/<type>``, with chance when the data
    gives ``question_types``) and overall ``val/accuracy``.

    Args (beyond :class:`VisionLanguageStage`'s):
        rewards: reward callables (YAML ``class_path``; :mod:`lit_internvl.rewards`); default exact match.
        reward_weights: one weight a reward (default 1 each); an answer's reward is the weighted sum.
        algorithm: ``gspo`` (InternVL3.5's) or ``grpo``.
        group_size: G, answers a prompt (InternVL3.5: 16).
        clip_low, clip_high: ε of the ratio's clip range ``[1 − ε_low, 1 + ε_high]``.
        kl_weight: β of the k3 KL term to a frozen copy of the starting policy (0: none, InternVL3.5's setting).
        max_log_ratio: GSPO's clamp of the log sequence ratio.
        ppo_epochs, mini_batches, micro_batches: μ optimisation passes over each rollout; each pass takes this many
            optimiser steps, on as many mini-batches of prompts, each mini-batch's gradient accumulated over this
            many micro-batches (InternVL3.5-1B's script: 512 prompts a rollout in mini-batches of 32: 16 steps).
        rollout_temperature, rollout_top_p: sampling of the rollouts (``generation.max_new_tokens`` bounds an answer).
        gradient_clip: the gradient-norm clip of each optimiser step (manual optimisation: not the Trainer's).
        rollout_engine: how answers are sampled (default :class:`~lit_internvl.inference.rollout.BuiltinSampler`).
        critic_reward_weight: w > 0 adds w × the process critic's score of each answer to its reward (the critic
            of the test-time scaling path as a reward model: ``generation.critic``, a ``.ckpt`` of this architecture
            or ``hf:/folder``, sharing the stage's tokenizer; the answer split on blank lines, its steps' P(``+``)
            aggregated by ``generation.critic_aggregate``, the prompt's ``meta["question"]`` and image read by the
            critic).
        seed: the rollout seeds' base.
    """

    factory_arguments = ("vision", "connector", "decoder", "rewards", "rollout_engine")
    views = (View("prompt"),)

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        rewards: list[Reward] | None = None,
        reward_weights: list[float] | None = None,
        algorithm: PolicyLoss = "gspo",
        group_size: int = 8,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        kl_weight: float = 0.0,
        max_log_ratio: float = 10.0,
        ppo_epochs: int = 1,
        mini_batches: int = 1,
        micro_batches: int = 1,
        rollout_temperature: float = 1.0,
        rollout_top_p: float = 1.0,
        gradient_clip: float | None = 1.0,
        rollout_engine: RolloutEngine | None = None,
        critic_reward_weight: float = 0.0,
        seed: int = 0,
        learning_rate: float = 1e-5,
        **options,
    ) -> None:
        super().__init__(vision, connector, decoder, learning_rate=learning_rate, **options)
        self.automatic_optimization = False
        self.rewards = list(rewards) if rewards else [ExactMatch()]
        weights = reward_weights if reward_weights is not None else [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ValueError(
                f"model.init_args.reward_weights has {len(weights)} entries for {len(self.rewards)} rewards"
            )
        self.reward_weights = [float(w) for w in weights]
        if min(ppo_epochs, mini_batches, micro_batches) < 1:
            raise ValueError("model.init_args.ppo_epochs, mini_batches and micro_batches must be at least 1")
        if group_size < 2:  # an answer's advantage is its reward against its group's: alone, always 0
            raise ValueError(
                f"model.init_args.group_size must be at least 2 (answers a prompt), got {group_size}: a group of one "
                "has no advantage to learn from"
            )
        for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("kl_weight", kl_weight)):
            if value < 0:
                raise ValueError(f"model.init_args.{name} must be ≥ 0, got {value}")
        if max_log_ratio <= 0:
            raise ValueError(f"model.init_args.max_log_ratio must be > 0, got {max_log_ratio}")
        if critic_reward_weight and not self.generation.critic:
            raise ValueError(
                f"model.init_args.critic_reward_weight is {critic_reward_weight}: set model.init_args.generation.critic "
                "to the critic's .ckpt or hf:/folder"
            )
        self.engine = rollout_engine or BuiltinSampler()
        self.reference: Frozen | None = None
        self.accuracy = nn.ModuleDict()

    # -- the reference model (only with kl_weight) --------------------------------------------

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        if self.hparams.kl_weight:
            self.reference = Frozen.copy(model, self.parallelize)

    # -- rollouts -----------------------------------------------------------------------------

    def rollout_seeds(self, rows: int) -> list[int]:
        """One seed a row: a function of the seed, the optimiser step, the rank and the row (exact resume); the ranks
        of a sequence-parallel group, which hold the same rows, share their seeds."""
        rank, world_size = data_parallel_rank(self.device_mesh)
        base = ((self.hparams.seed * 1_000_003 + self.global_step) * world_size + rank) * 100_003
        return [base + r for r in range(rows)]

    def score(self, texts: Sequence[str], references: Sequence[str | None], metas: Sequence[dict | None]):
        """``(len(texts),)`` rewards: the weighted sum of every reward of each answer."""
        return torch.tensor(
            [sum(w * f(t, ref, meta) for w, f in zip(self.reward_weights, self.rewards))
             for t, ref, meta in zip(texts, references, metas)], dtype=torch.float32,
        )  # fmt: skip

    def critic_rewards(self, batch: Batch, texts: Sequence[str]) -> torch.Tensor:
        """``(B·G,)`` the critic's score of each answer (``generation.critic_aggregate`` of its steps' P(``+``); an
        answer with no step scores 0), the G answers of prompt b scored in one critic batch on its tiles and
        ``meta["question"]``."""
        g, names = self.hparams.group_size, batch.sample_names
        metas = batch.meta or [None] * len(names)
        scores = []
        for b, name in enumerate(names):
            question = (metas[b] or {}).get("question")
            if question is None:
                raise ValueError(f"{name}: model.init_args.critic_reward_weight needs the prompt's meta['question']")
            own = batch.images.select([b]) if batch.images is not None else None
            pixels = None if own is None else own.pixel_values
            steps = [split_steps(text) for text in texts[b * g : (b + 1) * g]]
            rows = score_solutions(self.critic_model(), self.data.tokenizer, self.data.sample_options, question, steps,
                                   pixels)  # fmt: skip
            how = self.generation.critic_aggregate
            scores += [aggregate(row if own else [], how) for row, own in zip(rows, steps)]
        return torch.tensor(scores, dtype=torch.float32)

    def answer_log_probs(self, model: nn.Module, batch: Batch, answers: torch.Tensor, answer_mask: torch.Tensor,
                         prompts: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """``(len(prompts)·G, L)`` log-probabilities (at the rollout temperature; 0 off the answers) of the answers to
        ``prompts`` (rows of ``batch``): each prompt followed by each of its G answers, in one forward of ``model``
        whose images run through the vision tower once a prompt (``repeat_images``), the answer tokens at positions
        ``ceil(last prompt position) + 1, + 2, …``; only the answer positions go through the head."""
        g, prompts = self.hparams.group_size, list(prompts)
        images = batch.images.select(prompts) if batch.images is not None else None
        repeat = torch.tensor(prompts, device=answers.device).repeat_interleave(g)
        rows = torch.tensor([i * g + k for i in prompts for k in range(g)], device=answers.device)
        answers, answer_mask = answers[rows], answer_mask[rows]
        width = batch.input_ids.shape[1]
        prompt_positions = batch.positions[repeat]
        start = next_position(prompt_positions[:, -1:])
        positions = torch.cat([prompt_positions, start + torch.arange(answers.shape[1], device=start.device)], dim=1)
        labels = torch.full((len(rows), width + answers.shape[1]), IGNORE_INDEX, device=answers.device)
        labels[:, width:] = answers.masked_fill(~answer_mask, IGNORE_INDEX)
        logits = model(
            torch.cat([batch.input_ids[repeat], answers], dim=1), images,
            attention_mask=torch.cat([batch.attention_mask[repeat], answer_mask.long()], dim=1),
            positions=positions, head=Logits(supervised_positions(labels)), repeat_images=g,
        )  # fmt: skip
        logits = logits.float() / max(self.hparams.rollout_temperature, 1e-6)
        logits[:, self.image_token_ids()] = float("-inf")  # as the sampler: never drawn
        out = torch.zeros(answers.shape, dtype=torch.float32, device=answers.device)
        out[answer_mask] = torch.gather(F.log_softmax(logits, dim=-1), 1, answers[answer_mask][:, None]).squeeze(-1)
        return out

    def image_token_ids(self) -> list[int]:
        """``<img>``, ``</img>``, ``<IMG_CONTEXT>``: banned from answers (an answer holding ``<IMG_CONTEXT>`` would
        claim image features it has none of), in sampling and in the log-probs alike."""
        tokenizer = self.data.tokenizer
        return [tokenizer.token_to_id(token) for token in (IMG_START, IMG_END, IMG_CONTEXT)]

    # -- the step -----------------------------------------------------------------------------

    def training_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return None
        h, batch = self.hparams, batch["prompt"]
        tokenizer = self.data.tokenizer
        prompts, g = batch.rows, h.group_size
        was_training = self.model.training
        self.model.eval()
        with unsharded(self.model):  # FSDP2 gathers the root's parameters around forward only
            tokens = self.engine.sample(
                self.model, batch, self.rollout_seeds(prompts * g), max_new_tokens=self.generation.max_new_tokens,
                eos_id=tokenizer.eos_id, temperature=h.rollout_temperature, top_p=h.rollout_top_p,
                banned_tokens=self.image_token_ids(),
            )  # fmt: skip
        texts = [
            tokenizer.decode([t for t in row if t != tokenizer.eos_id], skip_special_tokens=True) for row in tokens
        ]
        references = [r for r in (batch.reference or [None] * prompts) for _ in range(g)]
        metas = [m for m in (batch.meta or [None] * prompts) for _ in range(g)]
        rewards = self.score(texts, references, metas)
        if h.critic_reward_weight:
            critic = self.critic_rewards(batch, texts)
            rewards = rewards + h.critic_reward_weight * critic
        rewards = rewards.to(self.device).view(prompts, g)
        advantages = group_advantages(rewards).flatten()
        length = max(max(len(row) for row in tokens), 1)
        answers = torch.full((prompts * g, length), tokenizer.pad_id, dtype=torch.long, device=self.device)
        answer_mask = torch.zeros((prompts * g, length), dtype=torch.bool, device=self.device)
        for r, row in enumerate(tokens):
            answers[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            answer_mask[r, : len(row)] = True
        everything = range(prompts)
        with torch.no_grad():
            old = self.answer_log_probs(self.model, batch, answers, answer_mask, everything)
            ref = None
            if self.reference is not None:
                with self.reference.use(self.device) as reference:
                    ref = self.answer_log_probs(reference, batch, answers, answer_mask, everything)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        for _ in range(h.ppo_epochs):
            for mini in torch.arange(prompts).chunk(h.mini_batches):
                mini_rows = [i * g + k for i in mini.tolist() for k in range(g)]
                # The mini-batch's normaliser: its answer tokens (GRPO's token mean) or answers (GSPO's sequence mean).
                count = answer_mask[mini_rows].sum() if h.algorithm == "grpo" else answer_mask[mini_rows].any(1).sum()
                for micro in mini.chunk(h.micro_batches):
                    rows = [i * g + k for i in micro.tolist() for k in range(g)]
                    log_probs = self.answer_log_probs(self.model, batch, answers, answer_mask, micro.tolist())
                    loss, stats = policy_loss(
                        log_probs, old[rows], advantages[rows], answer_mask[rows], h.algorithm, h.clip_low,
                        h.clip_high, ref_log_probs=None if ref is None else ref[rows], kl_weight=h.kl_weight,
                        max_log_ratio=h.max_log_ratio, all_reduce=h.all_reduce_loss, count=count,
                    )  # fmt: skip
                    aux = self.moe_aux_loss(prompts)  # experts: the micro-batch's share of the load-balancing loss
                    if aux is not None:
                        loss = loss + aux * len(micro) / len(mini)
                    self.manual_backward(loss)
                if h.gradient_clip:
                    self.clip_gradients(optimizer, gradient_clip_val=h.gradient_clip, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        self.model.train(was_training)
        no_signal = (rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean()
        logged = {
            "reward": rewards.mean(), "reward_std": rewards.std(dim=1).mean() if g > 1 else rewards.new_zeros(()),
            "answer_length": answer_mask.sum(dim=1).float().mean(), "no_signal": no_signal, "loss": loss.detach(),
            **stats,
        }  # fmt: skip
        if h.critic_reward_weight:
            logged["critic_reward"] = critic.mean()
        for name, value in logged.items():
            self.log(f"rl/{name}", value, prog_bar=name == "reward", batch_size=prompts)

    # -- evaluation: greedy accuracy per question type ----------------------------------------

    def setup_metrics(self) -> None:
        self.type_metrics(self.accuracy, "accuracy")

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return
        tokenizer, batch = self.data.tokenizer, batch["prompt"]
        with unsharded(self.model):
            answers = generate(
                self.model, batch.input_ids, batch.attention_mask, batch.images,
                max_new_tokens=self.generation.max_new_tokens, eos_id=tokenizer.eos_id, positions=batch.positions,
            )  # fmt: skip
        texts = [
            tokenizer.decode([t for t in row if t != tokenizer.eos_id], skip_special_tokens=True) for row in answers
        ]
        metas = batch.meta or [None] * len(texts)
        correct = ExactMatch()
        for text, reference, meta in zip(texts, batch.reference or [None] * len(texts), metas):
            kind = (meta or {}).get("type", "all")
            if kind not in self.accuracy:
                self.accuracy[kind] = MeanMetric().to(self.device)
            self.accuracy[kind].update(correct(text, reference, meta))

    def on_validation_epoch_end(self) -> None:
        self.log_type_metrics(self.accuracy, "accuracy")
