"""Evaluation metrics (torchmetrics, so that they sync across ranks) and their chance levels."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def recall_chance(relevant: torch.Tensor, k: int) -> float:
    """Expected recall@k of a random ranking: mean over queries of 1 − C(N−r, k) / C(N, k),
    where each query has ``relevant[i] = r`` relevant items among ``N = len(relevant)``."""
    n = relevant.shape[0]
    relevant = relevant.double()
    miss = torch.ones_like(relevant)
    for j in range(min(k, n)):
        miss = miss * ((n - relevant - j).clamp(min=0) / (n - j))
    return float((1 - miss).mean())


class CrossModalRecall(Metric):
    """Image→text and text→image recall@k over every pair seen in an epoch.

    A retrieved item counts as a hit when its ``key`` equals the query's: captions that assert the
    same thing (in the shapes world: class and region) describe each other's images equally well.
    ``compute()`` returns ``{"image_to_text_R@k": ..., "text_to_image_R@k": ...}`` and leaves the
    recall of a random ranking over the same (all-rank) keys in :attr:`chance`.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        super().__init__()
        self.ks = ks
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.chance: dict[str, float] = {}

    def update(self, image_emb: torch.Tensor, text_emb: torch.Tensor, keys: torch.Tensor) -> None:
        self.image.append(image_emb.float())
        self.text.append(text_emb.float())
        self.keys.append(keys)

    def compute(self) -> dict[str, torch.Tensor]:
        image, text, keys = dim_zero_cat(self.image), dim_zero_cat(self.text), dim_zero_cat(self.keys)
        relevant = keys[:, None] == keys[None, :]
        relevant_counts = relevant.sum(dim=1)
        self.chance = {
            f"{name}_R@{k}": recall_chance(relevant_counts, k)
            for k in self.ks
            for name in ("image_to_text", "text_to_image")
        }
        similarity = image @ text.T
        out = {}
        for k in self.ks:
            k_eff = min(k, similarity.shape[1])
            for name, scores, rel in (
                ("image_to_text", similarity, relevant),
                ("text_to_image", similarity.T, relevant.T),
            ):
                top = scores.topk(k_eff, dim=1).indices
                out[f"{name}_R@{k}"] = rel.gather(1, top).any(dim=1).float().mean()
        return out
