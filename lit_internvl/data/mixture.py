"""Several sources read as one data set in given proportions (NMP's interleaved 3 : text-only 1).

:class:`Mixture` is map-style: its ``size`` slots are assigned to the sources in proportion to the weights
(largest remainders, so the ratio over an epoch is the weights' to within one sample a source), the
assignment shuffled by ``seed``, and slot i reads its source's next sample in a seeded permutation of that
source (a source with fewer samples than its slots is read round and round). The mapping is a fixed function
of the index, so the seeded, resumable sampler over it (:class:`~lit_internvl.data.resumable.ResumableSampler`)
gives an order that a resumed run continues exactly, mixture and all.

Litdata shards mix through litdata's own ``CombinedStreamingDataset`` (weighted sampling, resumable state),
:meth:`~lit_internvl.data.RecordsDataModule.train_dataloader`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from lit_internvl.data.records import SkipCounter


def check_weights(weights: Sequence[float] | None, sources: int, key: str = "weights") -> list[float]:
    """``weights`` (one a source, ≥ 0, not all 0) normalised to sum 1; None: every source alike."""
    weights = [1.0] * sources if weights is None else [float(w) for w in weights]
    if len(weights) != sources:
        raise ValueError(f"{key} has {len(weights)} entries for {sources} sources")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"{key} must be ≥ 0 and not all 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def slot_counts(weights: Sequence[float], size: int) -> list[int]:
    """Slots of each source among ``size``: ``floor(w·size)``, the remainder to the largest fractions."""
    exact = [w * size for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: size - sum(counts)]:
        counts[i] += 1
    return counts


class Mixture(Dataset):
    """``datasets`` sampled in proportion to ``weights``: ``size`` samples an epoch (default: all of the
    sources' samples together), ``source_of[i]``/``index_of[i]`` say where slot i reads.

    Each source dataset keeps its own bad-record handling; :attr:`skips` of every source are summed.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float] | None = None,
        size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.datasets = list(datasets)
        self.weights = check_weights(weights, len(self.datasets))
        lengths = [len(d) for d in self.datasets]
        size = sum(lengths) if size is None else size
        counts = slot_counts(self.weights, size)
        empty = [i for i, (count, length) in enumerate(zip(counts, lengths)) if count and not length]
        if empty:
            raise ValueError(f"source(s) {empty} of the mixture have no samples but a weight above 0")
        rng = np.random.default_rng(seed)
        source_of = np.repeat(np.arange(len(counts)), counts)
        rng.shuffle(source_of)
        index_of = np.zeros(size, dtype=np.int64)
        for source, (count, length) in enumerate(zip(counts, lengths)):
            if count:
                order = np.concatenate([rng.permutation(length) for _ in range(-(-count // length))])
                index_of[source_of == source] = order[:count]
        self.source_of, self.index_of = source_of, index_of
        # What a resumed run's saved position is a position in (ResumableDataLoader): the sources and the weights.
        sources = [getattr(d, "source", None) or type(d).__name__ for d in self.datasets]
        self.source = f"mixture of {sources} weighted {self.weights}"

    def __len__(self) -> int:
        return len(self.source_of)

    def __getitem__(self, index: int) -> dict:
        return self.datasets[self.source_of[index]][int(self.index_of[index])]

    @property
    def skips(self) -> SkipCounter:
        total = SkipCounter()
        for dataset in self.datasets:
            skips = getattr(dataset, "skips", None)
            for reason, count in getattr(skips, "counts", {}).items():
                total.counts[reason] += count
            total.records += getattr(skips, "records", [])
        return total
