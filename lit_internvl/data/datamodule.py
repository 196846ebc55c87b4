"""RecordsDataModule: training data from records in jsonl files, InternVL meta files or litdata shards."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch.utils.data import DataLoader

from lit_internvl.data.collate import Collator, PairCollator
from lit_internvl.data.datasets import JsonlSamples, Redrawn, StreamingSamples, dataset_specs, is_shards
from lit_internvl.data.images import DEFAULT_MAX_PIXELS
from lit_internvl.data.mixture import Mixture, check_weights
from lit_internvl.data.pairs import CaptionForms, JsonlPairs, PairBuilder, StreamingPairs, itc_ids, read_class_names
from lit_internvl.data.resumable import ResumableDataLoader, ResumableSampler, ResumableStreamingDataLoader, replicas
from lit_internvl.data.samples import SampleDataModule, SampleOptions
from lit_internvl.data.templates import ChatTemplate, TemplateName
from lit_internvl.data.tokenizer import load_tokenizer
from lit_internvl.data.v2pe import V2PEMode, check_v2pe, eval_mode
from lit_internvl.data.views import View


class RecordsDataModule(SampleDataModule):
    """Vision-language training data from records: a jsonl file, an InternVL meta file, or litdata
    shards written by ``python -m lit_internvl prepare`` (a folder or an ``s3://`` URL).

    What a sample is, the stage says (its views, :mod:`lit_internvl.data.views`):

    - vision-language views (``conversation``: SFT, NMP, the critic; ``chosen`` + ``rejected``: MPO; ``prompt``:
      online RL) take every record kind through the chat template
      (:class:`~lit_internvl.data.samples.SampleBuilder`), batched by :class:`~lit_internvl.data.collate.Collator`;
      a record that cannot give a view (a conversation asked for ``rejected``) is a bad record. The ``prompt`` view
      leaves the last answer out (kept as ``reference``; a record's ``meta`` travels with it), the assistant header
      ending the prompt, left-padded (e.g. ``{"image", "conversations": [question, answer], "meta": {"answer": ...}}``).
    - the ``pair`` view (stages 1 and 2, with ``negative`` for stage 2's ITM): image–caption records
      ``{"image", "text"}`` or ``{"image", "texts": [...]}`` (optional ``"label": int``), one sample per caption,
      in the pair batch of :class:`~lit_internvl.data.collate.PairCollator` (:mod:`lit_internvl.data.pairs`). Each
      image is one ``tile_size`` tile: InternVL's random resized crop and flip for training (``augment``),
      a bicubic resize otherwise. Captions of one image share its ``caption_key``/``image_id``. Zero-shot
      classification uses ``class_names`` through each of ``prompt_templates``, in the ITC form (:meth:`text_ids`).

    Shards stream through litdata's ``StreamingDataLoader`` and jsonl records through a seeded
    sampler; both loaders' states are saved in Lightning checkpoints (:mod:`lit_internvl.data.resumable`):
    a resumed run reads exactly the samples an uninterrupted run would have read next. Bad
    records are skipped and counted (``data/skipped`` each epoch) unless ``strict``.

    Several training sources (``train: [a.jsonl, b.json]`` with ``weights: [3, 1]``, NMP's interleaved 3 :
    text-only 1) are one :class:`~lit_internvl.data.mixture.Mixture` of ``mixture_size`` samples an epoch in
    those proportions, in a seeded order that a resumed run continues; several shard folders mix through
    litdata's ``CombinedStreamingDataset`` with the same weights.

    Args:
        train, val, test: data sources (``val`` and ``test`` optional); ``train`` may list several.
        weights, mixture_size: the mixture of several ``train`` sources (None: alike; the sources' total).
        image_root: folder a jsonl file's image paths are relative to (default: the file's folder); it must exist.
        tokenizer: ``"byte"``, ``"shapes"`` (bytes and the shapes world's words) or a local Hugging Face
            tokenizer folder.
        add_tokens: special tokens to add to the tokenizer; a vision-language stage grows its decoder's
            embeddings and head for them (:mod:`lit_internvl.models.vocabulary`).
        template, tile_size, min_tiles, max_tiles, use_thumbnail, max_length, system, thinking,
            pair_prompt, jpeg_quality, strict, seed: the :class:`~lit_internvl.data.samples.SampleOptions`
            of every sample (``jpeg_quality`` augments training samples only). The ``pair`` view reads
            ``tile_size``, ``strict`` and ``seed`` of them.
        max_skipped: the largest fraction of the training records seen that may be skipped as bad; more (or no record
            trained at all) stops the run before it writes a checkpoint
            (:class:`~lit_internvl.callbacks.skipped_samples.SkippedSamples`).
        pack: pack training samples into rows of at most ``max_tokens`` tokens and ``max_tiles_per_row`` tiles (a
            single ``conversation`` view).
        batch_size, num_workers, shuffle: loading (``shuffle``: training data only, seeded by ``seed``);
            ``pair`` drops a last short training batch (every rank gathers equal-sized batches).
        storage_options: passed to the object-storage client (e.g. ``{"endpoint_url": ...}``).
        max_image_pixels: larger images are bad records ("image too large"), checked before decoding
            (default PIL's decompression-bomb threshold; None: no limit).
        allow_absolute_paths: records may name images by absolute path (relative ones must stay
            inside the image root either way).
        itc_prefix, itg_prefix, normalize, max_words: the :class:`~lit_internvl.data.pairs.CaptionForms`
            of ``pair`` (InternVL's by default).
        augment: ``pair`` training images get InternVL's random resized crop (scale 0.5–1) and flip,
            seeded by ``(seed, index)``.
        class_names: zero-shot classes of ``pair``: a list, or a file of one name a line (label = line
            number from 0, the records' ``label``); None: no zero-shot.
        prompt_templates: how a class name becomes a prompt (None: ``["a photo of a {}."]``).
        v2pe, split_long: V2PE positions (``"off"``, ``"random"``, ``{stride: S}``) and splitting over-long
            interleaved/text records between images (:class:`~lit_internvl.data.samples.SampleOptions`);
            ``v2pe_eval`` is what held-out samples use (None: the training setting, ``random`` → ``{stride: 64}``,
            the reference's evaluation setting).
    """

    question_types = None  # no question types

    def __init__(
        self,
        train: str | list[str],
        val: str | None = None,
        test: str | None = None,
        image_root: str | None = None,
        tokenizer: str = "byte",
        add_tokens: list[str] | None = None,
        template: TemplateName | ChatTemplate = "internvl2_5",
        tile_size: int = 448,
        min_tiles: int = 1,
        max_tiles: int = 12,
        use_thumbnail: bool = True,
        max_length: int = 4096,
        system: str | None = None,
        thinking: bool = False,
        pair_prompt: str = "",
        pack: bool = False,
        max_tokens: int = 8192,
        max_tiles_per_row: int = 64,
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        strict: bool = False,
        jpeg_quality: tuple[int, int] | None = None,
        storage_options: dict | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_absolute_paths: bool = False,
        itc_prefix: str = CaptionForms.itc_prefix,
        itg_prefix: str = CaptionForms.itg_prefix,
        normalize: bool = CaptionForms.normalize,
        max_words: int = CaptionForms.max_words,
        augment: bool = True,
        class_names: str | list[str] | None = None,
        prompt_templates: list[str] | None = None,
        weights: list[float] | None = None,
        mixture_size: int | None = None,
        v2pe: V2PEMode = "off",
        v2pe_eval: V2PEMode | None = None,
        split_long: bool = False,
        max_skipped: float = 0.5,
    ) -> None:
        super().__init__()
        sources = [train] if isinstance(train, str) else list(train)
        if not sources:
            raise ValueError("data.init_args.train lists no source")
        check_weights(weights, len(sources), "data.init_args.weights")
        if len({is_shards(source) for source in sources}) > 1:
            raise ValueError("data.init_args.train mixes shard folders and jsonl/meta files; prepare them alike")
        if image_root is not None and not Path(image_root).is_dir():
            raise FileNotFoundError(f"data.init_args.image_root {image_root!r} is not a folder")
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(
                f"data.init_args.min_tiles {min_tiles} and max_tiles {max_tiles}: need 1 ≤ min_tiles ≤ max_tiles"
            )
        if not 0.0 <= max_skipped <= 1.0:
            raise ValueError(f"data.init_args.max_skipped must be a fraction in [0, 1], got {max_skipped}")
        self.max_skipped = max_skipped
        v2pe = check_v2pe(v2pe, "data.init_args.v2pe")
        self.v2pe_eval = check_v2pe(v2pe_eval, "data.init_args.v2pe_eval") if v2pe_eval is not None else eval_mode(v2pe)
        if pack and max_length > max_tokens:
            raise ValueError(
                f"max_length {max_length} exceeds max_tokens {max_tokens}: a packed row could not hold a sample"
            )
        self.save_hyperparameters()
        self.train_sources = train
        self.tokenizer = load_tokenizer(tokenizer, add_tokens or ())
        self.sample_options = SampleOptions(
            template=template, tile_size=tile_size, min_tiles=min_tiles,
            max_tiles=max_tiles, use_thumbnail=use_thumbnail, max_length=max_length, system=system, thinking=thinking,
            pair_prompt=pair_prompt, jpeg_quality=jpeg_quality, strict=strict, seed=seed,
            max_image_pixels=max_image_pixels, v2pe=v2pe, split_long=split_long,
        )  # fmt: skip
        self.eval_options = replace(self.sample_options, jpeg_quality=None, augment=False, v2pe=self.v2pe_eval)
        self.pack = pack
        self.caption_forms = CaptionForms(itc_prefix, itg_prefix, normalize, max_words)
        self.class_names = read_class_names(class_names)
        templates = prompt_templates if prompt_templates is not None else ["a photo of a {}."]
        self.prompt_templates = list(templates)

    @property
    def pairs(self) -> bool:
        """The stage reads image–caption pairs (the ``pair`` view)."""
        return any(view.kind == "pair" for view in self.views)

    def use_views(self, views: tuple[View, ...], stage: str = "the stage") -> None:
        pairs = any(view.kind == "pair" for view in views)
        if pairs and not isinstance(self.train_sources, str) and len(self.train_sources) > 1:
            raise ValueError("data.init_args.train: pairs read one source (mixtures are for conversation views)")
        super().use_views(views, stage)

    def pair_builder(self, train: bool = False) -> PairBuilder:
        """How ``pairs`` records become pair samples; only training images are augmented."""
        o = self.sample_options
        augment = self.hparams.augment and train
        negative = any(view.kind == "negative" for view in self.views)
        return PairBuilder(
            self.tokenizer, self.caption_forms, o.tile_size, augment, o.seed, o.strict, o.max_image_pixels, negative
        )

    def text_ids(self, text: str) -> list[int]:
        """The ITC form of a zero-shot prompt (not normalised): what the stage embeds for a class."""
        return itc_ids(text, self.tokenizer, self.caption_forms)

    def collator(self, views: tuple[View, ...], train: bool) -> Collator | PairCollator:
        h = self.hparams
        if self.pairs:
            return PairCollator(self.tokenizer.pad_id, negative=any(view.kind == "negative" for view in views))
        # Every split packs alike (a held-out loss over packed rows is the training loss's reduction).
        return Collator(self.tokenizer.pad_id, views, self.pack, h.max_tokens, h.max_tiles_per_row)

    def _dataset(self, source: str, train: bool, views: tuple[View, ...]):
        h = self.hparams
        shuffle = h.shuffle and train
        if is_shards(source):
            if self.pairs:
                return StreamingPairs(
                    source, self.pair_builder(train), shuffle=shuffle, seed=h.seed, storage_options=h.storage_options
                )
            builder = self.sample_builder(train, views)
            return StreamingSamples(source, builder, shuffle=shuffle, seed=h.seed, storage_options=h.storage_options)
        if self.pairs:
            return JsonlPairs(dataset_specs(source, h.image_root, h.allow_absolute_paths), self.pair_builder(train))
        return JsonlSamples(source, self.sample_builder(train, views), h.image_root, h.allow_absolute_paths)

    def _mixture(self, sources: list[str]):
        """Several training sources as one data set in the proportions of ``weights``."""
        h = self.hparams
        datasets = [self._dataset(source, True, self.views) for source in sources]
        if is_shards(sources[0]):
            from litdata import CombinedStreamingDataset

            weights = check_weights(h.weights, len(sources))
            return CombinedStreamingDataset(datasets, seed=h.seed, weights=weights, iterate_over_all=False)
        return Mixture(datasets, h.weights, h.mixture_size, h.seed)

    def _loader(self, source: str | list[str], train: bool, views: tuple[View, ...] | None = None):
        h, views = self.hparams, views or self.views
        if isinstance(source, str) or len(source) == 1:
            source = source if isinstance(source, str) else source[0]
            dataset = self._dataset(source, train, views)
        else:
            dataset = self._mixture(list(source))
            source = source[0]
        # pairs: every rank gathers equal-sized batches for the contrastive loss
        drop_last = train and self.pairs
        options = dict(batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=self.collator(views, train))
        if is_shards(source):
            return ResumableStreamingDataLoader(dataset, drop_last=drop_last, **options)
        options["persistent_workers"] = h.num_workers > 0
        if train:  # a seeded order that a resumed run continues mid-epoch
            # Several processes (data- or sequence-parallel) train every step on every rank: a bad record is replaced.
            if getattr(self.trainer, "world_size", 1) > 1:
                dataset = Redrawn(dataset)
            sampler = ResumableSampler(dataset, shuffle=h.shuffle, seed=h.seed, **replicas(self.trainer))
            return ResumableDataLoader(dataset, sampler, drop_last=drop_last, **options)
        return DataLoader(dataset, shuffle=False, **options)

    def train_dataloader(self):
        return self._loader(self.train_sources, train=True)

    def val_dataloader(self):
        return self._loader(self.hparams.val, train=False) if self.hparams.val else []

    def test_dataloader(self):
        return self._loader(self.hparams.test, train=False) if self.hparams.test else []
