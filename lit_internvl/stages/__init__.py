"""One LightningModule per training stage, on two bases: dual-encoder stages (contrastive, generative)
and vision-language-model stages (SFT, MPO, NMP, the critic, RL, ViCO's consistency and router stages, ...); and
the probes of a vision encoder."""

from lit_internvl.stages.base import Stage
from lit_internvl.stages.contrastive import ContrastiveStage
from lit_internvl.stages.critic import CriticStage
from lit_internvl.stages.dual_encoder import DualEncoderStage
from lit_internvl.stages.generative import GenerativeStage
from lit_internvl.stages.mpo import MPOStage
from lit_internvl.stages.nmp import NMPStage
from lit_internvl.stages.probes import LinearProbeStage, SegmentationProbeStage
from lit_internvl.stages.rl import RLStage
from lit_internvl.stages.sft import SFTStage
from lit_internvl.stages.vico import ViCOStage, ViRStage
from lit_internvl.stages.vision_language import VisionLanguageStage

__all__ = [
    "ContrastiveStage", "CriticStage", "DualEncoderStage", "GenerativeStage", "LinearProbeStage", "MPOStage", "NMPStage",
    "RLStage", "SegmentationProbeStage", "SFTStage", "Stage", "ViCOStage", "ViRStage", "VisionLanguageStage",
]  # fmt: skip
