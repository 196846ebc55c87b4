"""What a stage expects of its datamodule, written down once.

A stage reads these attributes when it builds its model (the model–data handshake: vocabulary,
``<IMG_CONTEXT>`` id, tokens per tile at the data's tile size) and when it evaluates (class names
for zero-shot, question types for per-type accuracy). Both built-in datamodules satisfy it; a
user's own datamodule needs only what its stage reads (``tokenizer`` always; the rest may be None). The
batch of the dual-encoder stages is written down once, in :class:`~lit_internvl.data.collate.PairCollator`.
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
        tokens_per_tile: ``<IMG_CONTEXT>`` slots reserved per tile (None: no images); the model's
            connector must give exactly this many at ``tile_size``.
        class_names: classes for zero-shot evaluation (None: no zero-shot); class ``i`` is the ``label`` ``i``
            of the pair batch.
        prompt_templates: how a class name becomes a prompt (``["a {}"]``: one prompt per class; several:
            one per template), each turned into ids by :meth:`text_ids`.
        question_types: question type → chance level, for per-type answer accuracy (None: none).
    """

    tokenizer: Tokenizer
    tile_size: int | None
    tokens_per_tile: int | None
    class_names: list[str] | None
    prompt_templates: list[str] | None
    question_types: dict[str, float] | None

    def sample_builder(self, train: bool = False, generation: bool = False):
        """The :class:`~lit_internvl.data.samples.SampleBuilder` that turns records into samples."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """The ids a dual-encoder stage embeds for a zero-shot prompt: the ITC form of ``text``
        (:func:`~lit_internvl.data.pairs.itc_ids`, not normalised)."""
        ...
