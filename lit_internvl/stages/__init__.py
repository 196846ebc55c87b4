"""One LightningModule per training stage."""

from lit_internvl.stages.base import Stage
from lit_internvl.stages.contrastive import ContrastiveStage

__all__ = ["ContrastiveStage", "Stage"]
