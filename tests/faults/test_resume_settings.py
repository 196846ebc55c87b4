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


# -- the data position, in samples ---------------------------------------------------------------------------------


def _shapes_of(batch_size: int, train_size: int = 16):
    from lit_internvl.data import ShapesDataModule
    from tests.tiny import asked

    def make():
        return asked(ShapesDataModule(records="questions", train_size=train_size, val_size=4, batch_size=batch_size,
                                      system="Answer in one word."))  # fmt: skip

    return make


def _flat(names: list[list[str]]) -> list[str]:
    return [name for batch in names for name in batch]


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)])
def test_a_new_batch_size_on_resume_trains_the_rest_of_the_epoch_once(tmp_path, before, after):
    """Killed after 8 of an epoch's 16 samples, resumed with another batch size: the other 8 samples, in the order
    the uninterrupted run trains them, and the epoch ends there (Lightning counts the new batches)."""
    from tests.test_resume import _fit

    kill_at = 8 // before
    whole = _fit(_shapes_of(before), tmp_path / "whole", ends="max_epochs")
    killed = _fit(_shapes_of(before), tmp_path / "run", kill_at=kill_at, ends="max_epochs")
    resumed = _fit(_shapes_of(after), tmp_path / "run", ckpt_path="last", ends="max_epochs")
    first_epoch = _flat(whole.names)[:16]
    assert _flat(killed.names) + _flat(resumed.names)[:8] == first_epoch
    assert sorted(_flat(resumed.names)[8:]) == sorted(first_epoch) and len(resumed.names) == 8 // after + 16 // after


def test_resumed_on_other_data_is_refused_naming_what_changed(tmp_path):
    from tests.test_resume import _fit

    _fit(_shapes_of(4), tmp_path, kill_at=2, ends="max_epochs")
    with pytest.raises(ValueError, match=r"other training data than this run's \(size 16 → 20"):
        _fit(_shapes_of(4, train_size=20), tmp_path, ckpt_path="last", ends="max_epochs")


@pytest.mark.parametrize("before, after", [(2, 3), (2, 1), (1, 2)])
def test_a_position_saved_by_some_ranks_continues_on_others_with_every_sample_once(before, after):
    """The loaders of ``before`` ranks train 2 batches of 3 each; ``after`` ranks continue from the saved state: the
    epoch's 25 samples are each trained once (the last ranks' padding repeats the order's head, as
    DistributedSampler pads)."""
    from lit_internvl.data.resumable import ResumableDataLoader, ResumableSampler

    dataset = list(range(25))

    def loader(rank: int, replicas: int):
        sampler = ResumableSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=3)
        return ResumableDataLoader(dataset, sampler, batch_size=3, collate_fn=list)

    trained, state = [], None
    for rank in range(before):
        first = loader(rank, before)
        iterator = iter(first)
        for _ in range(2):
            trained += next(iterator)
            first.mark_consumed()
        state = first.state_dict()
    assert state["samples"] == 6 * before
    for rank in range(after):
        rest = loader(rank, after)
        rest.load_state_dict(state)
        trained += [index for batch in rest for index in batch]
    assert set(trained) == set(dataset)
    padding = len(trained) - len(dataset)
    assert padding < after, "only the last ranks' padding repeats"


def test_another_number_of_processes_says_the_random_state_is_not_restored():
    from lit_internvl.callbacks.resume import ExactResume, rng_states

    with pytest.warns(UserWarning, match="random state of 2 processes and this run has 1"):
        ExactResume().load_state_dict({"rng": [rng_states(), rng_states()]})


# -- MPO's reference -------------------------------------------------------------------------------------------------


def test_mpo_refuses_a_reference_rebuilt_from_a_changed_init_from(tmp_path, sft_checkpoint):
    """MPO's reference is rebuilt from init_from on resume: the same file resumes; the file replaced since (another
    SFT run written to the same path, as re-running a chain's earlier stage does) is refused."""
    import shutil

    start = tmp_path / "sft.ckpt"
    shutil.copy(sft_checkpoint, start)
    mpo = tmp_path / "mpo"
    args = ("--model.init_args.init_from", str(start))
    cli("fit", mpo, *args, "--trainer.max_steps", "1", recipe="mpo.yaml", overrides=_mpo_overrides(mpo))
    last = str(mpo / "checkpoints" / "last.ckpt")
    resumed = cli("fit", mpo, *args, "--ckpt_path", last, "--trainer.max_steps", "2", recipe="mpo.yaml",
                  overrides=_mpo_overrides(mpo))  # fmt: skip
    assert resumed.trainer.global_step == 2

    cli("fit", tmp_path / "sft2", "--trainer.max_steps", "2")  # other weights
    shutil.copy(tmp_path / "sft2" / "checkpoints" / "last.ckpt", start)
    with pytest.raises(CheckpointError, match=r"reference model is rebuilt from model\.init_args\.init_from .* differ"):
        cli("fit", mpo, *args, "--ckpt_path", last, "--trainer.max_steps", "3", recipe="mpo.yaml",
            overrides=_mpo_overrides(mpo))  # fmt: skip
