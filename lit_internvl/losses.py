"""Training losses, each readable in a minute."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over the global batch, in the local-loss form.

    Each rank scores its own rows against the columns of every rank, gathered *with* gradients, and
    its labels are offset by ``rank × local batch``. The mean of the per-rank losses is the loss
    of the concatenated batch, and with data-parallel gradient averaging so are the gradients.

    Args:
        image_emb, text_emb: ``(N, E)`` L2-normalised embeddings of this rank's N pairs.
        logit_scale: the temperature's inverse, ``exp`` already applied.
    """
    rank, world_size = _world()
    if world_size > 1:
        all_image = torch.cat(dist_fn.all_gather(image_emb), dim=0)
        all_text = torch.cat(dist_fn.all_gather(text_emb), dim=0)
    else:
        all_image, all_text = image_emb, text_emb
    logits_per_image = logit_scale * image_emb @ all_text.T
    logits_per_text = logit_scale * text_emb @ all_image.T
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + rank * image_emb.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
