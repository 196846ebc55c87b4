"""One LightningModule per training stage."""

from lit_internvl.stages.base import Stage
from lit_internvl.stages.contrastive import ContrastiveStage
from lit_internvl.stages.generative import GenerativeStage
from lit_internvl.stages.mpo import MPOStage
from lit_internvl.stages.sft import SFTStage

__all__ = ["ContrastiveStage", "GenerativeStage", "MPOStage", "SFTStage", "Stage"]
