"""Native multimodal pretraining (InternVL3, Zhu et al. 2025, section 2.2): vision encoder, connector and
language model trained together from the start on interleaved image-text documents mixed with text-only
corpora, the loss on text tokens only."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn as nn

from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.sft import SFTStage


class NMPStage(SFTStage):
    """Next-token prediction of every text token of interleaved documents and text-only samples; the image
    spans ``<img>…</img>`` are context, never targets (:class:`~lit_internvl.data.samples.SampleBuilder` masks
    them). Everything is :class:`~lit_internvl.stages.sft.SFTStage`'s, with NMP's defaults:

    - every part trains (``trainable: [vision, connector, decoder]``): the connector may start from scratch and the
      decoder from a text-only checkpoint (``init_from`` takes a list, e.g. an InternViT folder and a Qwen2.5
      folder: :func:`~lit_internvl.stages.base.read_init_weights`);
    - square averaging (``loss_reduction: square``), InternVL3's;
    - V2PE positions and the mixture of sources come with the data (``v2pe``, ``weights`` of the datamodule).

    Validation logs ``val/loss``, the token-mean text loss of the held-out documents, beside the uniform
    baseline ``ln(vocabulary)``.
    """

    def __init__(
        self, vision: ModuleFactory, connector: Callable[[int, int], nn.Module], decoder: ModuleFactory, **options
    ) -> None:
        super().__init__(vision, connector, decoder, **options)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        tokenizer = getattr(self.data, "tokenizer", None)
        if tokenizer is not None:
            self.chance_levels["val/loss"] = math.log(tokenizer.vocab_size)
