"""A freeze schedule: parts of the model that start frozen and join training at a given step or epoch."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info


class FreezeSchedule(BaseFinetuning):
    """Unfreezes ``parts`` (children of the stage's model: ``vision``, ``connector``, ``decoder`` of the
    vision-language stages) at training step ``at_step`` or at the start of epoch ``at_epoch``, and adds their
    parameters to the optimiser as new groups (Lightning's ``BaseFinetuning``, which also keeps the groups in
    the checkpoint and rebuilds them when a run resumes).

    The stage freezes them first: leave them out of its ``trainable`` (``model.init_args.trainable: [connector,
    decoder]`` and ``parts: [vision]`` trains the vision encoder from ``at_step`` on); a part that already
    trains is an error. The new groups take ``lr_factor`` times the part's learning rate (its ``part_lr``, else
    ``learning_rate``), the stage's weight decay on matrices and none on vectors, and follow the stage's
    schedule (warm-up and cosine) from where it stands.

    Args:
        parts: the model's children to unfreeze.
        at_step: the optimiser step (``trainer.global_step``) before which they join; or
        at_epoch: the epoch at whose start they join.
        lr_factor: their learning rate relative to the part's.
    """

    def __init__(
        self, parts: list[str], at_step: int | None = None, at_epoch: int | None = None, lr_factor: float = 1.0
    ) -> None:
        super().__init__()
        if (at_step is None) == (at_epoch is None):
            raise ValueError(f"FreezeSchedule: set exactly one of at_step ({at_step}) and at_epoch ({at_epoch})")
        if not parts:
            raise ValueError("FreezeSchedule: parts is empty; name the parts to unfreeze, e.g. [vision]")
        self.parts, self.at_step, self.at_epoch, self.lr_factor = list(parts), at_step, at_epoch, lr_factor
        self.unfrozen = False

    def freeze_before_training(self, pl_module) -> None:
        """The stage's ``trainable`` freezes the parts (its model is built after this hook, in ``configure_model``)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)  # a resumed run: the groups the schedule added, back in place
        model = pl_module.model
        children = dict(model.named_children())
        unknown = [part for part in self.parts if part not in children]
        if unknown:
            raise ValueError(
                f"FreezeSchedule parts {unknown} are not parts of the model; choose from {sorted(children)}"
            )
        in_optimizer = {id(p) for optimizer in trainer.optimizers for g in optimizer.param_groups for p in g["params"]}
        self.unfrozen = any(id(p) in in_optimizer for part in self.parts for p in children[part].parameters())
        if self.unfrozen and not self._internal_optimizer_metadata:
            raise ValueError(
                f"FreezeSchedule unfreezes {self.parts}, but the stage already trains some of them: leave them out of "
                f"model.init_args.trainable (it is {pl_module.hparams.get('trainable')})"
            )
        if self.unfrozen:  # resumed past the switch: the restored groups' parameters train again
            for part in self.parts:
                BaseFinetuning.make_trainable(children[part])
        for optimizer in trainer.optimizers:
            _follow_schedules(trainer, optimizer)

    def finetune_function(self, pl_module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if self.at_epoch is not None and epoch >= self.at_epoch and not self.unfrozen:
            self.unfreeze(pl_module, optimizer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at_step is None or trainer.global_step < self.at_step or self.unfrozen:
            return
        for index, optimizer in enumerate(trainer.optimizers):
            groups = len(optimizer.param_groups)
            self.unfreeze(pl_module, optimizer)
            self._store(pl_module, index, groups, optimizer.param_groups)  # as BaseFinetuning's epoch hook does

    def unfreeze(self, pl_module, optimizer: torch.optim.Optimizer) -> None:
        h = pl_module.hparams
        # By identity: BaseFinetuning.filter_on_optimizer compares values (torch.equal), so a freshly initialised
        # LayerNorm weight (all ones) would pass for a decoder norm already in the optimiser, and be left out.
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for part in self.parts:
            module = getattr(pl_module.model, part)
            BaseFinetuning.make_trainable(module)
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in present]
            lr = (h.get("part_lr") or {}).get(part, h.learning_rate) * self.lr_factor
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            for group, weight_decay in ((decay, h.get("weight_decay", 0.0)), (no_decay, 0.0)):
                if group:
                    optimizer.add_param_group(
                        {"params": group, "lr": lr, "initial_lr": lr, "weight_decay": weight_decay}
                    )
            count = sum(p.numel() for p in params)
            rank_zero_info(
                f"FreezeSchedule: {part} trains from step {pl_module.trainer.global_step} ({count:,} parameters, lr {lr:g})"
            )
        _follow_schedules(pl_module.trainer, optimizer)
        self.unfrozen = True


def _follow_schedules(trainer, optimizer: torch.optim.Optimizer) -> None:
    """Extend the ``LambdaLR`` schedules of ``optimizer`` to groups added after they were made (a ``LambdaLR``
    zips its groups with the multipliers and base rates it was built with, so a new group would keep its rate);
    the new groups' rates are set to where the schedule stands."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if scheduler.optimizer is not optimizer or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            continue
        for group in optimizer.param_groups[len(scheduler.base_lrs) :]:
            scheduler.base_lrs.append(group.setdefault("initial_lr", group["lr"]))
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[0](scheduler.last_epoch)
        if len(scheduler.lr_lambdas) < len(optimizer.param_groups):  # resumed: base rates restored, multipliers not
            scheduler.lr_lambdas += [scheduler.lr_lambdas[0]] * (
                len(optimizer.param_groups) - len(scheduler.lr_lambdas)
            )
