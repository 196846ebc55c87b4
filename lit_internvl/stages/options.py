"""The typed blocks of a vision-language stage's options, beside what the stage trains:

- :class:`SpeedOptions` — how a step runs, never what it computes (the GPU recipes' speed layer sets them);
- :class:`GenerationOptions` — how ``predict`` answers prompts, and the critic that judges answers (Best-of-N,
  RL's critic reward).

In YAML each is one mapping (``speed: {compile_blocks: true}``, ``--model.init_args.generation.max_new_tokens 8``);
a stage keeps them in ``hparams`` as plain dicts, since checkpoints are read back with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from lit_internvl.inference.critic import Aggregate
from lit_internvl.losses import HEAD_CHUNK_SIZE, HeadBackend


@dataclass
class SpeedOptions:
    """How a step runs (the same numbers either way, up to rounding).

    Attributes:
        head_chunk_size, head_backend: the training losses run the output head and the cross-entropy together over
            chunks of this many supervised positions (:func:`~lit_internvl.losses.linear_cross_entropy`), so that
            the ``(N, vocab)`` logits never exist at once; ``liger``/``cce`` use those packages' fused kernels (GPU).
        compile_blocks: ``torch.compile`` each transformer block, vision and decoder (regional compilation,
            :func:`~lit_internvl.distributed.compile_blocks`); on in the GPU recipes.
        fuse_projections: compute each decoder block's q/k/v and gate/up projections by one matmul each
            (:func:`~lit_internvl.components.language.set_fused_projections`; the weights stay apart).
        length_multiple: pad the decoder's rows to a multiple of this many tokens, so that compiled blocks see a
            bounded number of lengths (the padding is masked and its outputs dropped).
    """

    head_chunk_size: int = HEAD_CHUNK_SIZE
    head_backend: HeadBackend = "chunked"
    compile_blocks: bool = False
    fuse_projections: bool = False
    length_multiple: int | None = None


@dataclass
class GenerationOptions:
    """How answers are generated and judged.

    Attributes:
        max_new_tokens, temperature, top_p: generation in ``predict`` (and RL's rollouts' length).
        best_of, critic, critic_aggregate: with ``best_of`` N > 1, ``predict`` samples N answers per prompt (at
            ``temperature``, 1.0 if that is 0), scores each step of each with ``critic`` (a ``.ckpt`` of this
            stage's architecture, e.g. a :class:`~lit_internvl.stages.CriticStage` run's, or ``hf:/folder``) and
            returns the best by ``critic_aggregate`` of its steps' P(+), with every candidate and the majority
            vote (:mod:`lit_internvl.inference.best_of_n`); prompts need ``meta["question"]`` (what the critic reads).
        critic_config: the recipe a ``.ckpt`` critic was trained with, when its architecture is not this stage's (a
            deeper decoder, say; the tokenizer and tiling must be this stage's).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    best_of: int = 1
    critic: str | None = None
    critic_config: str | None = None
    critic_aggregate: Aggregate = "mean"


Options = TypeVar("Options", SpeedOptions, GenerationOptions)


def as_options(value: Options | dict | None, kind: type[Options]) -> Options:
    """``value`` as ``kind``: None is the defaults, a dict (hparams read back from a checkpoint) its fields."""
    if value is None:
        return kind()
    return value if isinstance(value, kind) else kind(**value)
