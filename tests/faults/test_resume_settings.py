"""Resume with changed settings refuses or adapts, never silently: another stage's checkpoint, changed options,
a new batch size or world size, a changed data source, a run extended past its ``max_steps``."""

from __future__ import annotations

import pytest

from lit_internvl.checkpoint_io import CheckpointError
from tests.faults.runs import cli, tiny_overrides
from tests.test_resume import _shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _mpo_overrides(root):
    overrides = tiny_overrides(root)
    overrides["model"]["init_args"].pop("warmup_steps")
    return overrides


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft") / "run"
    cli("fit", root, "--trainer.max_steps", "1")
    return root / "checkpoints" / "last.ckpt"


def test_a_checkpoint_of_another_stage_is_refused_naming_both(tmp_path, sft_checkpoint):
    with pytest.raises(CheckpointError, match=r"checkpoint of lit_internvl\.stages\.sft\.SFTStage.*MPOStage"):
        cli("fit", tmp_path / "mpo", "--ckpt_path", str(sft_checkpoint), recipe="mpo.yaml",
            overrides=_mpo_overrides(tmp_path / "mpo"))  # fmt: skip
    assert not (tmp_path / "mpo" / "checkpoints").exists()


def test_an_mpo_checkpoint_is_refused_by_an_sft_run(tmp_path):
    cli(
        "fit",
        tmp_path / "mpo",
        "--trainer.max_steps",
        "1",
        recipe="mpo.yaml",
        overrides=_mpo_overrides(tmp_path / "mpo"),
    )
    with pytest.raises(CheckpointError, match=r"checkpoint of lit_internvl\.stages\.mpo\.MPOStage.*SFTStage"):
        cli("fit", tmp_path / "sft", "--ckpt_path", str(tmp_path / "mpo" / "checkpoints" / "last.ckpt"))


def test_a_changed_option_the_run_cannot_apply_is_refused_naming_the_key(tmp_path, sft_checkpoint):
    with pytest.raises(CheckpointError, match=r"model\.init_args\.loss_reduction: 'square' in the checkpoint, 'token'"):
        cli("fit", tmp_path / "run", "--ckpt_path", str(sft_checkpoint), "--model.init_args.loss_reduction", "token")


def test_a_learning_rate_given_on_resume_is_applied(tmp_path, sft_checkpoint):
    """The resumed run's learning rate is the new one through the schedule, as a run started with it has at that
    step (the checkpoint's optimiser state would otherwise bring back the old one)."""
    lr = "0.0005"
    resumed = cli("fit", tmp_path / "resumed", "--ckpt_path", str(sft_checkpoint), "--model.init_args.learning_rate",
                  lr, "--trainer.max_steps", "2")  # fmt: skip
    fresh = cli("fit", tmp_path / "fresh", "--model.init_args.learning_rate", lr, "--trainer.max_steps", "2")
    assert resumed.trainer.global_step == fresh.trainer.global_step == 2
    for got, want in zip(resumed.trainer.optimizers[0].param_groups, fresh.trainer.optimizers[0].param_groups):
        assert got["initial_lr"] == want["initial_lr"] == float(lr)
        assert got["lr"] == want["lr"]
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [float(lr)] * 2


@pytest.mark.parametrize("every_step", [False, True], ids=["saved-at-the-end", "saved-every-step"])
def test_a_run_extended_past_its_max_steps_continues_the_same_order(tmp_path, every_step):
    """A run of two epochs of 4 batches ended by max_steps 3, then extended to 6 from its last checkpoint, trains
    the samples one run to 6 trains, in that order (its schedule is another one: the cosine ran over 3 steps). Saved
    when the run ended, the checkpoint counts the cut epoch as processed."""
    whole = _fit_steps(tmp_path / "whole", 6, every_step)
    first = _fit_steps(tmp_path / "parts", 3, every_step)
    rest = _fit_steps(tmp_path / "parts", 6, every_step, ckpt_path="last")
    assert len(whole.names) == 6
    assert first.names + rest.names == whole.names


def _fit_steps(root, steps, every_step, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.test_resume import Recorder, _stage

    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, max_steps=steps, max_epochs=2,
        callbacks=[recorder, ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=int(every_step),
                                             save_last=True)],
    )  # fmt: skip
    trainer.fit(_stage(), _shapes(), ckpt_path=ckpt_path)
    return recorder
