"""ShapesDataModule: the generated shapes world as the data of every embedded-default recipe."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from torch.utils.data import DataLoader, Dataset

from lit_internvl.data.collate import Collator, PairCollator
from lit_internvl.data.mixture import Mixture, check_weights
from lit_internvl.data.pairs import CaptionForms, itc_ids
from lit_internvl.data.resumable import ResumableDataLoader, ResumableSampler, replicas
from lit_internvl.data.samples import SampleDataModule, SampleOptions
from lit_internvl.data.shapes.datasets import ShapesInterleaved, ShapesPairs, ShapesPreference, ShapesText, ShapesVQA
from lit_internvl.data.shapes.world import QUESTION_TYPES, ShapesWorld, Split, class_names
from lit_internvl.data.tokenizer import load_tokenizer
from lit_internvl.data.v2pe import V2PEMode, check_v2pe, eval_mode
from lit_internvl.data.views import View

ShapesRecords = Literal["captions", "questions", "preference", "documents"]
#: The views each kind of the world's records can give (:mod:`lit_internvl.data.views`).
OFFERS: dict[str, frozenset[str]] = {
    "captions": frozenset({"pair", "negative"}),
    "questions": frozenset({"conversation", "prompt"}),
    "preference": frozenset({"conversation", "chosen", "rejected", "prompt"}),
    "documents": frozenset({"conversation"}),
}


class ShapesDataModule(SampleDataModule):
    """Generated shapes data for the embedded-default recipes.

    Records (what the world generates; the stage says how it sees them, :mod:`lit_internvl.data.views`):

    - ``"captions"``: image + caption (the ``pair`` view, and ``negative``: stage 1, stage 2). Zero-shot
      classification uses :attr:`class_names` through each of :attr:`prompt_templates`, in the ITC form
      (:meth:`text_ids`).
    - ``"questions"``: one-word questions about scenes of 1..``max_objects`` objects, in the ``internvl2_5`` chat
      template (``conversation``: SFT; ``prompt``: online RL, ``meta`` holding each one's type and answer);
      :attr:`question_types` gives each type's chance level.
    - ``"preference"``: the same questions with a chosen (right) and a wrong (rejected) answer (``chosen`` and
      ``rejected``: MPO).
    - ``"documents"``: native multimodal pretraining's mixture: interleaved documents of ``images_per_document``
      pictures, each followed by what it shows, and the world's text-only sentences, in the proportions of
      ``weights`` (:class:`~lit_internvl.data.mixture.Mixture`); validation and test hold interleaved documents
      only, of ``val_images_per_document`` pictures.

    Train, validation and test splits are different seeds of the same world, so held-out scenes
    are never seen in training. ``predict`` reads the test split, as prompts to answer where the records have them.

    Args:
        records: what the world generates (above).
        tile_size: side in pixels of the scenes, each one tile (no thumbnail).
        train_size, val_size: samples per epoch of the train split, and of the validation and test splits.
        batch_size, num_workers, seed: loading; ``seed`` picks the world and the training order.
        prompt_templates: how a class name becomes a zero-shot prompt (None: ``["a {}"]``).
        itc_prefix, itg_prefix, normalize: the :class:`~lit_internvl.data.pairs.CaptionForms` of ``pairs``
            captions (InternVL's ``"summarize:"``, ``"English caption:"``, caption normalisation).
        max_objects: objects per ``vqa``/``preference`` scene, at most.
        system: system message instead of the template's default (``""``: an empty system turn).
        thinking: InternVL3.5's thinking system message instead of the default (``system`` wins over it).
        describe_ratio: the fraction of *training* ``vqa`` samples that ask "Describe the objects by
            shape." (or "by colour.") and are answered with every object and its region in that order (as
            the captioning data in InternVL's SFT mixtures: one answer supervises every object, not one);
            validation and test ask only the one-word questions, unless ``eval_describe``.
        eval_describe: validation and test ask every question as a description (by shape or by colour, drawn as in
            training): a chat model's captions of held-out scenes, for ``evaluate --metric caption``.
        tokenizer: ``"byte"`` or ``"shapes"``, which makes every word the world writes one token (a
            question and its answer take a third of the tokens); the model's vocabulary must hold its ids.
        weights: ``nmp``: interleaved : text-only samples (InternVL3's token ratio is about 3 : 1).
        images_per_document, val_images_per_document: ``nmp``: the fewest and most pictures of a training
            document, and of a held-out one (None: as training).
        v2pe, v2pe_eval: V2PE positions of training and of held-out samples (:mod:`lit_internvl.data.v2pe`;
            ``v2pe_eval`` None: as training, ``random`` evaluated at ``{stride: 64}``).
        pack, max_tokens: pack training samples into rows of at most ``max_tokens`` tokens (``nmp``).
    """

    def __init__(
        self,
        records: ShapesRecords = "captions",
        tile_size: int = 56,
        train_size: int = 10_000,
        val_size: int = 1_000,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        prompt_templates: list[str] | None = None,
        max_objects: int = 3,
        system: str | None = None,
        thinking: bool = False,
        describe_ratio: float = 0.0,
        eval_describe: bool = False,
        tokenizer: str = "byte",
        itc_prefix: str = CaptionForms.itc_prefix,
        itg_prefix: str = CaptionForms.itg_prefix,
        normalize: bool = CaptionForms.normalize,
        weights: list[float] = [3.0, 1.0],  # noqa: B006 - jsonargparse needs a literal default
        images_per_document: tuple[int, int] = (1, 3),
        val_images_per_document: tuple[int, int] | None = None,
        v2pe: V2PEMode = "off",
        v2pe_eval: V2PEMode | None = None,
        pack: bool = False,
        max_tokens: int = 1024,
    ) -> None:
        super().__init__()
        check_weights(weights, 2, "data.init_args.weights")
        v2pe = check_v2pe(v2pe, "data.init_args.v2pe")
        self.v2pe_eval = check_v2pe(v2pe_eval, "data.init_args.v2pe_eval") if v2pe_eval is not None else eval_mode(v2pe)
        if records not in get_args(ShapesRecords):  # YAML is checked when parsed; Python callers here
            raise ValueError(
                f"Unknown shapes records {records!r}; available: {', '.join(map(repr, get_args(ShapesRecords)))}"
            )
        if not 0.0 <= describe_ratio <= 1.0:
            raise ValueError(f"describe_ratio must lie in [0, 1], got {describe_ratio}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        # A scene is one tile-sized image: one tile, no thumbnail. Generated records are never bad: strict.
        self.sample_options = SampleOptions(
            tile_size=tile_size,
            max_tiles=1,
            use_thumbnail=False,
            max_length=1024,
            system=system,
            thinking=thinking,
            strict=True,
            v2pe=v2pe,
        )
        # No augmentation here: held-out samples differ only in V2PE's setting.
        self.eval_options = replace(self.sample_options, v2pe=self.v2pe_eval)
        self.pack = pack
        self.class_names = class_names()
        self.prompt_templates = list(prompt_templates) if prompt_templates is not None else ["a {}"]
        self.caption_forms = CaptionForms(itc_prefix=itc_prefix, itg_prefix=itg_prefix, normalize=normalize)
        world = ShapesWorld(tile_size)
        self._question_types = {kind: 1 / len(world.answer_options(kind, max_objects)) for kind in QUESTION_TYPES}

    @property
    def question_types(self) -> dict[str, float] | None:
        """Question type → chance level of a guessed answer (per-type accuracy)."""
        return self._question_types

    @property
    def source(self) -> str:
        return f"data.init_args.records {self.hparams.records!r} ({type(self).__name__})"

    def offered_views(self) -> frozenset[str]:
        return OFFERS[self.hparams.records]

    def text_ids(self, text: str) -> list[int]:
        """The ITC form of a zero-shot prompt (not normalised): what the stage embeds for a class."""
        return itc_ids(text, self.tokenizer, self.caption_forms)

    def _dataset(self, split: Split, size: int, views: tuple[View, ...]) -> Dataset:
        h = self.hparams
        world = ShapesWorld(h.tile_size, h.seed, split)
        if h.records == "captions":
            negative = any(view.kind == "negative" for view in views)
            return ShapesPairs(world, size, self.tokenizer, self.caption_forms, negative)
        builder = self.sample_builder(split == "train", views)
        if h.records == "preference":
            return ShapesPreference(world, size, builder)
        if h.records == "documents":
            if split != "train":
                return ShapesInterleaved(world, size, builder, h.val_images_per_document or h.images_per_document)
            documents = ShapesInterleaved(world, size, builder, h.images_per_document)
            return Mixture([documents, ShapesText(world, size, builder)], h.weights, size, h.seed)
        describe = h.describe_ratio if split == "train" else float(h.eval_describe)
        return ShapesVQA(world, size, builder, h.max_objects, describe)

    def collator(self, views: tuple[View, ...], train: bool):
        """The batches of ``views``: pairs, or vision-language views (training rows packed with ``pack``)."""
        if any(view.kind == "pair" for view in views):
            return PairCollator(self.tokenizer.pad_id, negative=any(view.kind == "negative" for view in views))
        # .get: a subclass's hparams hold its own arguments (ShapesStepsDataModule's).
        pack, max_tokens = self.pack and train, self.hparams.get("max_tokens", 1024)
        return Collator(self.tokenizer.pad_id, views, pack=pack, max_tokens=max_tokens)

    def _loader(self, split: Split, size: int, views: tuple[View, ...]) -> DataLoader:
        workers, train = self.hparams.num_workers, split == "train"
        dataset = self._dataset(split, size, views)
        options = dict(
            batch_size=self.hparams.batch_size, num_workers=workers, persistent_workers=workers > 0,
            collate_fn=self.collator(views, train),
        )  # fmt: skip
        if train:  # training: a seeded order that a resumed run continues mid-epoch
            sampler = ResumableSampler(dataset, shuffle=True, seed=self.hparams.seed, **replicas(self.trainer))
            # drop_last: every rank gathers equal-sized batches for the contrastive loss
            return ResumableDataLoader(dataset, sampler, drop_last=True, **options)
        return DataLoader(dataset, shuffle=False, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.train_size, self.views)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_size, self.views)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.val_size, self.views)

    def predict_dataloader(self) -> DataLoader:
        prompts = "prompt" in self.offered_views()
        return self._loader("test", self.hparams.val_size, self.prompt_views() if prompts else self.views)
