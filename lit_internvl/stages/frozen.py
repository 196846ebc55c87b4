"""A frozen model beside the trained one: MPO's and RL's reference, the critic that scores answers, and what comes
next (ViCO's 256-token reference). One way to hold it, three ways to make it:

- :meth:`Frozen.copy` — a frozen deep copy of the policy as it stands (after ``init_from``, before training);
- :meth:`Frozen.adapters_off` — the policy itself with its LoRA adapters disabled (no second copy in memory);
- :meth:`Frozen.loaded` — a model built and loaded on first use (a critic checkpoint).

It is kept out of the stage's module tree (not in ``state_dict``, ``parameters()`` or ``.train()``): it is not
trained and not checkpointed (a copy is rebuilt from ``init_from`` on resume). :meth:`Frozen.use` yields it in eval
mode (no dropout or drop-path), on the stage's device, without gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from lit_internvl.lora import lora_disabled


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode inside the block, each one's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class Frozen:
    """A frozen model held beside a stage's trained one (module docstring)."""

    def __init__(self, make: Callable[[], nn.Module], shared: bool = False) -> None:
        self._make, self._shared = make, shared
        self._held: list[nn.Module] = []  # a list: kept out of the module tree

    @classmethod
    def copy(cls, model: nn.Module, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> Frozen:
        """A frozen deep copy of ``model`` now, passed through ``wrap`` (the stage's sharding)."""
        frozen = cls(lambda: None)
        frozen._held = [wrap(copy.deepcopy(model).requires_grad_(False).eval())]
        return frozen

    @classmethod
    def adapters_off(cls, policy: Callable[[], nn.Module]) -> Frozen:
        """The model ``policy()`` returns, its LoRA adapters disabled while in use."""
        return cls(policy, shared=True)

    @classmethod
    def loaded(cls, make: Callable[[], nn.Module]) -> Frozen:
        """The model ``make()`` builds (and loads), made once, on first use."""
        return cls(make)

    def model(self, device: torch.device | None = None) -> nn.Module:
        """The frozen model (on ``device`` unless it is sharded), made on first use."""
        if self._shared:
            return self._make()
        if not self._held:
            self._held = [self._make().requires_grad_(False).eval()]
        model = self._held[0]
        first = next(model.parameters(), None)
        sharded = first is not None and type(first).__name__ == "DTensor"
        if device is not None and first is not None and first.device != device and not sharded:
            model.to(device)
        return model

    @contextmanager
    def use(self, device: torch.device | None = None) -> Iterator[nn.Module]:
        """The frozen model in eval mode without gradients (the policy with its adapters off, when shared)."""
        model = self.model(device)
        with torch.no_grad(), eval_mode(model):
            if self._shared:
                with lora_disabled(model):
                    yield model
            else:
                yield model
