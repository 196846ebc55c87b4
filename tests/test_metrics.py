"""``CrossModalRecall`` and ``recall_chance`` against independent, deliberately naive references."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lit_internvl.metrics import CrossModalRecall, recall_chance

DIRECTIONS = ("image_to_text", "text_to_image")


def naive_recall(image: torch.Tensor, text: torch.Tensor, keys: list[int], k: int, direction: str) -> float:
    """Python loops: for each query, rank the gallery by dot product, hit if a top-k item shares its key."""
    queries, gallery = (image, text) if direction == "image_to_text" else (text, image)
    hits = 0
    for i in range(len(queries)):
        scores = [float(queries[i] @ gallery[j]) for j in range(len(gallery))]
        ranked = sorted(range(len(gallery)), key=lambda j: -scores[j])
        hits += any(keys[j] == keys[i] for j in ranked[:k])
    return hits / len(queries)


def brute_force_chance(keys: list[int], k: int) -> float:
    """Exact expected recall@k of a uniformly random ranking: average over every permutation and query."""
    n = len(keys)
    total, count = 0, 0
    for perm in itertools.permutations(range(n)):
        top = perm[:k]
        for i in range(n):
            total += any(keys[j] == keys[i] for j in top)
            count += 1
    return total / count


def monte_carlo_chance(keys: list[int], k: int, trials: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    n, hits = len(keys), 0
    for _ in range(trials):
        perm = list(range(n))
        rng.shuffle(perm)
        i = rng.randrange(n)
        hits += any(keys[j] == keys[i] for j in perm[:k])
    return hits / trials


def _relevant_counts(keys: list[int]) -> torch.Tensor:
    t = torch.tensor(keys)
    return (t[:, None] == t[None, :]).sum(dim=1)


# ----------------------------------------------------------------------------- CrossModalRecall


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    n, dim = 37, 8
    image = torch.randn(n, dim, generator=g)
    text = torch.randn(n, dim, generator=g)
    keys = torch.randint(0, 6, (n,), generator=g)  # repeated keys: several relevant items per query
    assert len(keys.unique()) < n

    metric = CrossModalRecall(ks=(1, 5))
    for start in range(0, n, 10):  # several batches, as in an epoch
        metric.update(image[start : start + 10], text[start : start + 10], keys[start : start + 10])
    out = metric.compute()

    assert set(out) == {f"{d}_R@{k}" for d in DIRECTIONS for k in (1, 5)}
    for direction in DIRECTIONS:
        for k in (1, 5):
            expected = naive_recall(image, text, keys.tolist(), k, direction)
            assert out[f"{direction}_R@{k}"].item() == pytest.approx(expected, abs=1e-7), (direction, k)


def test_recall_hand_computed():
    """4 pairs, keys [0, 0, 1, 2]. With one-hot images, ``image @ text.T`` is exactly ``S`` below.

    image→text (rows of S), top-3 and hits:
      i0 (key 0): t1 .9, t2 .5, t3 .35  → hit at 1
      i1 (key 0): t2 .8, t3 .7, t0 .2   → hit at 3 (t0)
      i2 (key 1): t0 .9, t1 .6, t2 .3   → hit at 3 (t2)
      i3 (key 2): t0 .4, t3 .3, t2 .2   → hit at 2 (t3)
      R@1 = 1/4, R@2 = 2/4, R@3 = 4/4
    text→image (columns of S):
      t0 (key 0): i2 .9, i3 .4, i1 .2   → hit at 3 (i1)
      t1 (key 0): i0 .9, i2 .6, i1 .1   → hit at 1
      t2 (key 1): i1 .8, i0 .5, i2 .3   → hit at 3 (i2)
      t3 (key 2): i1 .7, i0 .35, i3 .3  → hit at 3 (i3)
      R@1 = 1/4, R@2 = 1/4, R@3 = 4/4
    k = 10 > N retrieves everything: recall 1.
    Chance (relevant counts r = [2, 2, 1, 1], N = 4), mean over queries of 1 − C(N−r, k)/C(N, k):
      k=1: (2+2+1+1)/4/4 = 3/8;  k=2: (5/6·2 + 1/2·2)/4 = 2/3;  k=3: (1·2 + 3/4·2)/4 = 7/8;  k=10: 1.
    """
    S = torch.tensor(
        [
            [0.10, 0.90, 0.50, 0.35],
            [0.20, 0.10, 0.80, 0.70],
            [0.90, 0.60, 0.30, 0.00],
            [0.40, 0.05, 0.20, 0.30],
        ]
    )
    image, text, keys = torch.eye(4), S.T.contiguous(), torch.tensor([0, 0, 1, 2])
    metric = CrossModalRecall(ks=(1, 2, 3, 10))
    metric.update(image[:2], text[:2], keys[:2])
    metric.update(image[2:], text[2:], keys[2:])
    out = {name: value.item() for name, value in metric.compute().items()}

    assert out == pytest.approx(
        {
            "image_to_text_R@1": 0.25,
            "image_to_text_R@2": 0.50,
            "image_to_text_R@3": 1.00,
            "image_to_text_R@10": 1.00,
            "text_to_image_R@1": 0.25,
            "text_to_image_R@2": 0.25,
            "text_to_image_R@3": 1.00,
            "text_to_image_R@10": 1.00,
        }
    )
    chance = {1: 3 / 8, 2: 2 / 3, 3: 7 / 8, 10: 1.0}
    assert metric.chance == pytest.approx({f"{d}_R@{k}": c for k, c in chance.items() for d in DIRECTIONS})


def test_recall_reset_and_low_precision_inputs():
    """``reset`` forgets the epoch; bf16 embeddings are scored like their float32 values."""
    g = torch.Generator().manual_seed(5)
    image, text = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    keys = torch.randint(0, 3, (12,), generator=g)
    metric = CrossModalRecall(ks=(1, 5))
    metric.update(torch.randn(7, 4), torch.randn(7, 4), torch.zeros(7, dtype=torch.long))
    metric.compute()
    metric.reset()
    metric.update(image.bfloat16(), text.bfloat16(), keys)
    out = metric.compute()
    ref_image, ref_text = image.bfloat16().float(), text.bfloat16().float()
    for direction in DIRECTIONS:
        for k in (1, 5):
            expected = naive_recall(ref_image, ref_text, keys.tolist(), k, direction)
            assert out[f"{direction}_R@{k}"].item() == pytest.approx(expected)


# ----------------------------------------------------------------------------- recall_chance


@pytest.mark.parametrize(
    "keys",
    [[0, 0, 1, 2, 2], [0, 1, 2, 3, 4], [7, 7, 7, 7, 7], [0, 0, 0, 1, 2, 3]],
    ids=["mixed", "all-distinct", "all-same", "one-big-class"],
)
def test_recall_chance_equals_brute_force(keys):
    counts = _relevant_counts(keys)
    for k in range(1, len(keys) + 2):  # k = N + 1 exercises k larger than the gallery
        assert recall_chance(counts, k) == pytest.approx(brute_force_chance(keys, k), abs=1e-12), k


def test_recall_chance_spot_values():
    """keys [0, 0, 1, 2, 2], N = 5, r = [2, 2, 1, 2, 2]:
    k=1: mean r/N = 9/25;  k=2: 1 − C(3,2)/C(5,2) = 7/10 for r=2, 1 − C(4,2)/10 = 2/5 for r=1 → (4·7/10 + 2/5)/5 = 16/25."""
    counts = _relevant_counts([0, 0, 1, 2, 2])
    assert recall_chance(counts, 1) == pytest.approx(9 / 25)
    assert recall_chance(counts, 2) == pytest.approx(16 / 25)


@pytest.mark.parametrize("k", [1, 2])
def test_recall_chance_matches_monte_carlo(k):
    keys = [0, 0, 1, 2, 2]
    estimate = monte_carlo_chance(keys, k, trials=20_000)
    # Binomial standard error ≤ 0.5/sqrt(20000) ≈ 0.0035; 0.02 is more than five of them.
    assert recall_chance(_relevant_counts(keys), k) == pytest.approx(estimate, abs=0.02)


def test_metric_chance_matches_brute_force_over_all_ranks_keys():
    keys = [0, 0, 1, 2, 2]
    metric = CrossModalRecall(ks=(1, 2))
    g = torch.Generator().manual_seed(3)
    metric.update(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.tensor(keys[:3]))
    metric.update(torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), torch.tensor(keys[3:]))
    assert metric.chance == {}  # only filled by compute
    metric.compute()
    assert set(metric.chance) == {f"{d}_R@{k}" for d in DIRECTIONS for k in (1, 2)}
    for name, value in metric.chance.items():
        k = int(name.rsplit("@", 1)[1])
        assert value == pytest.approx(brute_force_chance(keys, k), abs=1e-12), name
