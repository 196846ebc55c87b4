"""Data loaders that resume mid-epoch exactly: a killed run continues with the next unseen batch.

Lightning saves a loader's ``state_dict()`` in its checkpoints and hands it back to ``load_state_dict``
when a run resumes. Two loaders implement that here:

- :class:`ResumableDataLoader` for map-style datasets (the shapes world, jsonl records): a
  :class:`ResumableSampler` (a seeded permutation per epoch, split across ranks) and the position in that
  permutation in samples, so that a run resumed with another batch size or number of ranks continues with the
  first sample not trained on; resuming skips the indices already trained on without loading them.
- :class:`ResumableStreamingDataLoader` for litdata shards: litdata's own state.

Lightning fetches one batch ahead of the step it runs, so when a checkpoint is written a loader has already
handed out one batch that was not trained on. Both loaders therefore keep their state after each batch they
yielded, and :class:`~lit_internvl.callbacks.resume.ExactResume` (a callback every stage adds) marks each
batch the loop finished with :meth:`~_ConsumedBatches.mark_consumed`; ``state_dict()`` is then the state after
the last finished batch. Outside a Trainer (nothing marks) it is the state after the last yielded batch.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

import torch
from litdata import StreamingDataLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Indices of one rank for one epoch — a permutation seeded by ``seed + epoch`` (or the dataset order),
    split across ``num_replicas`` as ``DistributedSampler`` does — that can start ``skip`` samples into the epoch's
    order (all ranks together): the rest of the order is split across the ranks of this run, however many there were
    when the position was saved.

    Being a ``DistributedSampler``, Lightning keeps it (and calls :meth:`set_epoch`) instead of
    replacing it with its own. ``len()`` is always a whole epoch's.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def order(self) -> list[int]:
        """The epoch's order of every sample, before it is split across ranks (``DistributedSampler``'s)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=generator).tolist()
        return list(range(len(self.dataset)))

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0  # applies to one pass only
        if skip == 0 or self.drop_last:
            indices = list(super().__iter__())
            return iter(indices[skip // self.num_replicas :])
        order = self.order()
        rest = order[skip:]
        # Padded from the head of the epoch's order, as DistributedSampler pads: the same indices for the same ranks.
        rest += (order * (1 + len(rest) // max(len(order), 1)))[: -len(rest) % self.num_replicas]
        return iter(rest[self.rank :: self.num_replicas])

    def remaining(self, skip: int) -> int:
        """How many indices this rank yields in an epoch that starts ``skip`` samples in."""
        if skip == 0 or self.drop_last:
            return self.num_samples - skip // self.num_replicas
        return -(-(len(self.dataset) - skip) // self.num_replicas)


def _own_generator(seed: int) -> torch.Generator:
    """Each new epoch's iterator draws a seed for its workers; from the loader's own generator, that draw
    leaves the global random state (drop-path, dropout) alone, so it is the same in a resumed run."""
    return torch.Generator().manual_seed(seed)


class _ConsumedBatches(ABC):
    """Keeps the loader's state after each yielded batch until the training loop marks the batch done."""

    # Lightning runs at most one batch ahead (its prefetch) plus the batch in flight; 16 leaves room.
    _HISTORY = 16

    @abstractmethod
    def _position(self) -> dict:
        """The loader's state after the batches it has yielded so far."""

    def _track(self, batches: Iterator, start: dict | None = None) -> Iterator:
        self._history = deque([self._position() if start is None else start], maxlen=self._HISTORY)
        for batch in batches:
            self._history.append(self._position())
            yield batch

    def mark_consumed(self) -> None:
        """The training loop finished the oldest batch it had not yet finished."""
        self._marked = True
        history = getattr(self, "_history", None)
        if history is not None and len(history) > 1:
            history.popleft()

    def state_dict(self) -> dict:
        history = getattr(self, "_history", None)
        if getattr(self, "_marked", False) and history:
            return copy.deepcopy(history[0])
        return self._position()


class ResumableDataLoader(_ConsumedBatches, DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state is the position in the epoch's order, in
    samples (all ranks together), and what that order is an order of: ``{"epoch", "batches", "samples", "finished",
    "batch_size", "replicas", "size", "source", "seed", "shuffle"}``.

    Resumed with another batch size or number of ranks, it continues the epoch with the first sample not trained
    (:attr:`resumed_batches` is then the batch the epoch continues at, in this run's batches). Resumed over other
    data (another source, size, seed or order) it refuses: the saved position would be a place in another order."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int = 1, **kwargs) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        kwargs.setdefault("generator", _own_generator(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._start = 0  # the first batch of the next pass, in this run's batches
        self._skip = 0  # the first sample of the next pass, in the epoch's order
        self._batches = 0
        self._samples = 0
        #: ``(saved, now)``: the batch the resumed epoch continues at, as the checkpoint counted it and in this run's
        #: batches (they differ when the batch size or the number of ranks changed); None when not resumed.
        self.resumed_batches: tuple[int, int] | None = None

    def _identity(self) -> dict:
        source = getattr(self.dataset, "source", None) or type(self.dataset).__name__
        return {"size": len(self.dataset), "source": source, "seed": self.sampler.seed, "shuffle": self.sampler.shuffle}

    def _position(self) -> dict:
        return {
            "epoch": self.sampler.epoch, "batches": self._batches, "samples": self._samples,
            "finished": self._batches >= len(self), "batch_size": self.batch_size,
            "replicas": self.sampler.num_replicas, **self._identity(),
        }  # fmt: skip

    def __iter__(self) -> Iterator:
        start, self._start = self._start, 0
        skip, self._skip = self._skip, 0
        self.sampler.skip = skip
        self._batches, self._samples = start, skip
        return self._track(self._count(super().__iter__()))

    def _count(self, batches: Iterator) -> Iterator:
        for batch in batches:
            self._batches += 1
            self._samples += self.batch_size * self.sampler.num_replicas
            yield batch

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state["epoch"]`` after its first ``state["samples"]`` samples (the next epoch from its
        start when that epoch was finished); a position in other data is an error naming both."""
        epoch, batches = state["epoch"], state["batches"]
        if "samples" not in state:  # written before positions were kept in samples: same batch size, same ranks
            state = {**state, "samples": batches * self.batch_size * self.sampler.num_replicas}
            state["finished"] = batches >= len(self)
        else:
            self._check_same_data(state)
        skip = 0 if state["finished"] else state["samples"]
        if state["finished"]:
            epoch, batches = epoch + 1, 0
        # Lightning creates the iterator before it sets the sampler's epoch on a resumed run: set it now.
        self.sampler.set_epoch(epoch)
        left = self.sampler.remaining(skip)
        left_batches = left // self.batch_size if self.drop_last else -(-left // self.batch_size)
        self._skip, self._start = skip, len(self) - left_batches
        self._batches, self._samples = self._start, skip
        self.resumed_batches = (batches, self._start)

    def _check_same_data(self, state: dict) -> None:
        now = self._identity()
        changed = [f"{key} {state.get(key)!r} → {now[key]!r}" for key in now if state.get(key) != now[key]]
        if changed:
            raise ValueError(
                f"The checkpoint's data position is {state['samples']} samples into epoch {state['epoch']} of other "
                f"training data than this run's ({'; '.join(changed)}): resuming would continue another order part-way. "
                "Give the data the run was saved with (data.init_args), or start a new run from the checkpoint's weights "
                "(model.init_args.init_from)."
            )


class ResumableStreamingDataLoader(_ConsumedBatches, StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` whose ``state_dict()`` leaves out batches fetched but not trained on."""

    _loaded: dict | None = None

    def __init__(self, dataset, *args, **kwargs) -> None:
        kwargs.setdefault("generator", _own_generator(getattr(dataset, "seed", 0)))
        super().__init__(dataset, *args, **kwargs)

    def _position(self) -> dict:
        # A copy: litdata returns (and later updates) the dataset's own state dict once one was loaded.
        return copy.deepcopy(StreamingDataLoader.state_dict(self))

    def load_state_dict(self, obj: dict) -> None:
        super().load_state_dict(obj)
        self._loaded = copy.deepcopy(obj)

    def __iter__(self) -> Iterator:
        # Before the pass starts, asking litdata for its state would overwrite the state just loaded
        # (its epoch not yet restored): the position before the first batch is the loaded state itself.
        start, self._loaded = self._loaded, None
        return self._track(super().__iter__(), start)


def replicas(trainer) -> dict:
    """``{"num_replicas", "rank"}`` of the data-parallel group a Trainer runs (``{}`` outside one)."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]} if kwargs else {}
