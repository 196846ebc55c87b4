"""The tests' tiny models, stages and data requests, in one place.

Every factory builds the embedded default's tiny parts (a 4-layer InternViT at 56 px, the pixel-shuffle MLP, a
2-layer decoder), seeded when asked, so that a test names what it varies and nothing else."""

from __future__ import annotations

from functools import partial

import torch

from lit_internvl.components import Decoder, InternViT, InternViTConfig, LanguageConfig, PixelShuffleMLP
from lit_internvl.data.views import VISION_LANGUAGE, View
from lit_internvl.models import VisionLanguageModel


def tiny_vlm(
    image_context_id: int, decoder: str = "tiny", seed: int | None = 0, vision_backend: str | None = None,
    **decoder_config,
) -> VisionLanguageModel:  # fmt: skip
    """vision → pixel shuffle (0.5) → decoder, every part tiny, seeded by ``seed`` (None: as the global generator
    stands); ``decoder_config`` overrides the decoder preset (``attn_backend="eager"``, ``vocab_size=...``),
    ``vision_backend`` the vision tower's attention backend."""
    if seed is not None:
        torch.manual_seed(seed)
    vision = InternViT(
        InternViTConfig.from_name("tiny", **({"attn_backend": vision_backend} if vision_backend else {}))
    )
    language = Decoder(LanguageConfig.from_name(decoder, **decoder_config))
    connector = PixelShuffleMLP(vision.hidden_size, language.hidden_size)
    return VisionLanguageModel(vision, connector, language, image_context_id)


def tiny_stage(cls, decoder: str = "tiny-shapes", **options):
    """A vision-language stage ``cls`` over the tiny parts, given as factories (as YAML gives them)."""
    return cls(
        vision=partial(InternViT, config="tiny"),
        connector=partial(PixelShuffleMLP, downsample_ratio=0.5),
        decoder=partial(Decoder, config=decoder),
        **options,
    )


def asked(data, *kinds: str, budget: int = 4):
    """``data`` asked for views of these kinds (default one conversation) at ``budget`` tokens a tile, as a stage's
    handshake asks it; returns the data."""
    kinds = kinds or ("conversation",)
    data.use_views(tuple(View(kind, budget if kind in VISION_LANGUAGE else None, name=kind) for kind in kinds))
    return data


def record_of(sample: dict, view: str = "conversation") -> dict:
    """A sample made by hand, as the sample builder hands a record's one view to the collator."""
    return {"views": {view: sample}, "name": sample.get("name")}


def records(*kinds: str, budget: int = 4, **options):
    """A :class:`~lit_internvl.data.RecordsDataModule` of ``options``, asked for ``kinds`` (default one
    conversation) at ``budget`` tokens a tile."""
    from lit_internvl.data import RecordsDataModule

    return asked(RecordsDataModule(**options), *kinds, budget=budget)
