"""Evaluation metrics (torchmetrics, so that they sync across ranks) and their chance levels."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def recall_chance(relevant: torch.Tensor, k: int, n: int | None = None) -> float:
    """Expected recall@k of a random ranking: mean over queries of 1 − C(N−r, k) / C(N, k),
    where each query has ``relevant[i] = r`` relevant items among ``N`` (default ``len(relevant)``)."""
    n = relevant.shape[0] if n is None else n
    relevant = relevant.double()
    miss = torch.ones_like(relevant)
    for j in range(min(k, n)):
        miss = miss * ((n - relevant - j).clamp(min=0) / (n - j))
    return float((1 - miss).mean())


class CrossModalRecall(Metric):
    """Image→text and text→image recall@k over every pair seen in an epoch.

    A retrieved item counts as a hit when its ``key`` equals the query's: captions that assert the
    same thing (in the shapes world: class and region), or the captions of one image (real data),
    describe each other's images equally well. With ``image_ids`` each image counts once however many of
    its captions were seen (the COCO/Flickr protocol: every image queries all captions, every caption
    queries the distinct images). ``compute()`` returns ``{"image_to_text_R@k": ..., "text_to_image_R@k": ...}``
    and leaves the recall of a random ranking over the same (all-rank) keys in :attr:`chance`.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10)) -> None:
        super().__init__()
        self.ks = ks
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.chance: dict[str, float] = {}

    def update(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, keys: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> None:
        self.image.append(image_emb.float())
        self.text.append(text_emb.float())
        self.keys.append(keys)
        self.image_ids.append(image_ids if image_ids is not None else torch.full_like(keys, -1))  # -1: no id

    def compute(self) -> dict[str, torch.Tensor]:
        image, text, keys = dim_zero_cat(self.image), dim_zero_cat(self.text), dim_zero_cat(self.keys)
        seen: set[int] = set()
        first = []  # each distinct image once (rows without an id are all distinct)
        for row, image_id in enumerate(dim_zero_cat(self.image_ids).tolist()):
            if image_id < 0 or image_id not in seen:
                first.append(row)
                seen.add(image_id)
        first = torch.tensor(first, device=keys.device)
        image, image_keys = image[first], keys[first]
        relevant = image_keys[:, None] == keys[None, :]  # (images, texts)
        self.chance = {}
        for k in self.ks:
            self.chance[f"image_to_text_R@{k}"] = recall_chance(relevant.sum(dim=1), k, relevant.shape[1])
            self.chance[f"text_to_image_R@{k}"] = recall_chance(relevant.sum(dim=0), k, relevant.shape[0])
        similarity = image @ text.T
        out = {}
        for k in self.ks:
            for name, scores, rel in (
                ("image_to_text", similarity, relevant),
                ("text_to_image", similarity.T, relevant.T),
            ):
                top = scores.topk(min(k, scores.shape[1]), dim=1).indices
                out[f"{name}_R@{k}"] = rel.gather(1, top).any(dim=1).float().mean()
        return out


class MeanIoU(Metric):
    """Semantic segmentation's mean intersection over union, as mmsegmentation's ``mean_iou`` computes it: per class,
    the pixels predicted and labelled that class (intersection) and predicted or labelled it (union) summed over every
    image of the epoch, IoU their ratio, the mean over the classes that occur (union > 0); pixels labelled
    ``ignore_index`` count nowhere. ``compute()`` returns ``{"mIoU", "pixel_accuracy", "chance_mIoU",
    "chance_pixel_accuracy"}``, chance being every pixel given the most frequent labelled class: its IoU is its
    share of the pixels, every other class's 0."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        for name in ("intersection", "union", "labelled"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """``predicted``, ``target``: ``(B, H, W)`` class ids."""
        keep = target != self.ignore_index
        predicted, target = predicted[keep], target[keep]
        classes = self.num_classes
        hit = predicted[predicted == target]
        intersection = torch.bincount(hit, minlength=classes).double()
        predicted_area = torch.bincount(predicted, minlength=classes).double()
        labelled_area = torch.bincount(target, minlength=classes).double()
        self.intersection += intersection
        self.union += predicted_area + labelled_area - intersection
        self.labelled += labelled_area

    def compute(self) -> dict[str, torch.Tensor]:
        present = self.union > 0
        total = self.labelled.sum().clamp(min=1)
        occurring = (self.labelled > 0).sum().clamp(min=1)
        majority = self.labelled.max() / total
        return {
            "mIoU": (self.intersection[present] / self.union[present]).mean(),
            "pixel_accuracy": self.intersection.sum() / total,
            # the majority class everywhere: its IoU = its share; the classes that occur are the ones averaged
            "chance_mIoU": majority / occurring,
            "chance_pixel_accuracy": majority,
        }
