"""Views: what a stage trains on, said as data.

A record (a conversation, a preference pair, an image with captions, …) can be seen several ways; a *view* is
one of them, and a stage lists the views it needs (:attr:`~lit_internvl.stages.base.Stage.views`):

============== ==================================================================== =====================
view kind      the sample                                                           stages
============== ==================================================================== =====================
conversation   the record as trained: its answers (or document, or steps) supervised SFT, NMP, critic
chosen         a preference record's question answered with ``chosen``              MPO
rejected       the same question answered with ``rejected``                         MPO
prompt         the conversation up to its last answer, left out (``reference``)      RL, predict
pair           an image and its caption's ITC / ITM / ITG texts                     stage 1, stage 2
negative       another image's caption (ITM's negative)                             stage 2
image          an image and its class label                                         linear probe
mask           an image and its pixel mask (a class per pixel)                      segmentation probe
============== ==================================================================== =====================

A vision-language view also carries a visual ``budget``: the ``<IMG_CONTEXT>`` tokens each tile becomes (None:
the model's first budget, told to the data in the handshake). Two views of one kind at two budgets are two
views of the same record (the same conversation seen through 16 and through 4 tokens a tile).

A datamodule is a source of records; in the handshake the stage asks it for its views
(``datamodule.use_views(views, stage)``, each view's budget set) and a source that cannot give one fails there, naming
both; a records file fails at its first record of a kind that cannot (a conversation asked for ``rejected``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

ViewKind = Literal["conversation", "chosen", "rejected", "prompt", "pair", "negative", "image", "mask"]
VIEW_KINDS: tuple[ViewKind, ...] = get_args(ViewKind)
#: Views whose samples hold images spliced into a token sequence (they take a budget).
VISION_LANGUAGE: frozenset[str] = frozenset({"conversation", "chosen", "rejected", "prompt"})
#: What each kind of record can be seen as (:class:`~lit_internvl.data.records.Record`'s kinds).
RECORD_VIEWS: dict[str, frozenset[str]] = {
    "conversation": frozenset({"conversation", "prompt"}),
    "pair": frozenset({"conversation", "prompt", "pair", "negative"}),
    "preference": frozenset({"conversation", "chosen", "rejected", "prompt"}),
    "interleaved": frozenset({"conversation"}),
    "text": frozenset({"conversation"}),
    "steps": frozenset({"conversation"}),
}


@dataclass(frozen=True)
class View:
    """One way a stage sees a record: a :data:`ViewKind` and, for vision-language views, a visual budget.

    Attributes:
        kind: what the sample is (module docstring).
        budget: ``<IMG_CONTEXT>`` tokens per tile; None: the model's first (default) budget.
        name: the key of this view's batch in :class:`~lit_internvl.batch.Views` (default ``kind``; two views of
            one kind need names of their own).
    """

    kind: ViewKind
    budget: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"Unknown view {self.kind!r}; available: {', '.join(VIEW_KINDS)}")
        if self.budget is not None and self.kind not in VISION_LANGUAGE:
            raise ValueError(f"the {self.kind!r} view has no visual budget (got {self.budget})")
        if not self.name:
            object.__setattr__(self, "name", self.kind)


class ViewError(ValueError):
    """A stage asked its data for a view that the data cannot give, or at a budget the model cannot give."""


def describe(views) -> str:
    return ", ".join(view.name for view in views)


def resolve(views: tuple[View, ...], budgets: tuple[int, ...] | None, stage: str, connector: str) -> tuple[View, ...]:
    """``views`` with every vision-language view's budget set: None becomes the first of the model's ``budgets``;
    a budget the model's connector cannot give is a :class:`ViewError` naming ``stage`` and ``connector``."""
    out = []
    for view in views:
        if view.kind in VISION_LANGUAGE and budgets:
            if view.budget is not None and view.budget not in budgets:
                raise ViewError(
                    f"{stage} asks for the {view.kind!r} view at {view.budget} tokens a tile, but {connector} gives "
                    f"{', '.join(map(str, budgets))} at this tile size"
                )
            view = replace(view, budget=budgets[0] if view.budget is None else view.budget, name=view.name)
        out.append(view)
    names = [view.name for view in out]
    if len(set(names)) != len(names):
        raise ViewError(f"{stage} asks for views with the same name: {', '.join(names)}")
    return tuple(out)


def check_offered(views: tuple[View, ...], offered: frozenset[str], stage: str, source: str) -> None:
    """A :class:`ViewError` naming ``stage`` and ``source`` when ``source`` cannot give one of ``views``."""
    missing = [view.kind for view in views if view.kind not in offered]
    if missing:
        raise ViewError(
            f"{stage} trains on the view(s) {describe(views)}, but {source} cannot give {', '.join(missing)} "
            f"(it gives: {', '.join(sorted(offered))})"
        )
