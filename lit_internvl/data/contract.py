"""What a stage expects of its datamodule, written down once.

A stage reads these attributes when it builds its model (the model–data handshake: vocabulary,
``<IMG_CONTEXT>`` id, tile size), tells the data the views it trains on with their visual budgets
(:meth:`StageData.use_views`), and reads the rest when it evaluates (class names for zero-shot, question types for
per-type accuracy). The built-in datamodules satisfy it; a user's own datamodule needs only what its stage reads
(``tokenizer`` always; the rest may be None). What the loaders yield is written down once, in
:mod:`lit_internvl.batch`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer interface of :class:`~lit_internvl.data.tokenizer.ByteTokenizer` and ``HFTokenizer``."""

    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids, skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int: ...


@runtime_checkable
class StageData(Protocol):
    """The datamodule side of a stage.

    Attributes:
        tokenizer: turns text into the ids the model embeds.
        tile_size: side in pixels of the image tiles the data yields (None: no images).
        class_names: classes for zero-shot evaluation (None: no zero-shot); class ``i`` is the ``label`` ``i``
            of the pair batch.
        prompt_templates: how a class name becomes a prompt (``["a {}"]``: one prompt per class; several:
            one per template), each turned into ids by :meth:`text_ids`.
        question_types: question type → chance level, for per-type answer accuracy (None: none).
    """

    tokenizer: Tokenizer
    tile_size: int | None
    class_names: list[str] | None
    prompt_templates: list[str] | None
    question_types: dict[str, float] | None

    def use_views(self, views: tuple, stage: str = "the stage") -> None:
        """Give batches of these :class:`~lit_internvl.data.views.View` s (budgets set), or raise
        :class:`~lit_internvl.data.views.ViewError` naming ``stage`` and the data when the records cannot."""
        ...

    def sample_builder(self, train: bool = False, views: tuple | None = None):
        """The :class:`~lit_internvl.data.samples.SampleBuilder` that turns records into samples of ``views``
        (default the stage's)."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """The ids a dual-encoder stage embeds for a zero-shot prompt: the ITC form of ``text``
        (:func:`~lit_internvl.data.pairs.itc_ids`, not normalised)."""
        ...
