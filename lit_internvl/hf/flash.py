"""InternVL3.5-Flash checkpoints in OpenGVLab's layout: what marks one, its connector's names, and the export back.

A Flash checkpoint is an ``InternVLChatModel`` folder (``model_type: internvl_chat``) whose weights hold, beside
``mlp1``, the second projector ``mlp2`` and the router (``pooling_before_gating``, ``gating``); its ``config.json``
adds ``flash_relative_threshold``, ``flash_absolute_threshold`` and ``flash_mode`` (the remote code routes in
``generate`` when ``flash_mode`` is set). They map to a :class:`~lit_internvl.components.FlashConnector`::

    mlp1.{0,1,3}                 connector.mlp1.{norm,fc1,fc2}
    mlp2.{0,1,4,7}               connector.mlp2.{norm,fc1,fc2,fc3}
    pooling_before_gating.*      connector.router.pooling.*      (query_token, attn1…attn4, norm1…norm4: all four
    gating.*                     connector.router.gating.*        attention layers, the two the released forward never
                                                                  calls included)

transformers has no Flash model, so :func:`lit_internvl.hf.flash_export.export_flash` writes OpenGVLab's layout back:
the same names, a ``config.json`` that the loader here (and, field for field, the remote code's
``InternVLChatConfig``) reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lit_internvl.hf.files import UnsupportedCheckpointError

#: Checkpoint key prefix → the part of the Flash connector it fills (:data:`lit_internvl.hf.names.PARTS` holds them).
FLASH_PARTS = (("mlp2.", "flash_mlp2"), ("pooling_before_gating.", "flash_pooling"), ("gating.", "flash_gating"))
MLP2_OPENGVLAB = {"norm": "0", "fc1": "1", "fc2": "4", "fc3": "7"}  # mlp2.2/.5 are GELUs, .3/.6 dropouts
MLP1_OPENGVLAB = {"norm": "0", "fc1": "1", "fc2": "3"}
_MLP2_OURS = {index: ours for ours, index in MLP2_OPENGVLAB.items()}


def flash_options(raw: Mapping, names: list[str], source: str) -> dict | None:
    """:class:`~lit_internvl.components.FlashConnector`'s options of an OpenGVLab config whose weights (``names``)
    hold ``mlp2``; None for any other checkpoint. Its thresholds must be in the config (the remote code reads both)."""
    if not any(name.startswith("mlp2.") for name in names):
        return None
    missing = [key for key in ("flash_relative_threshold", "flash_absolute_threshold") if key not in raw]
    if missing:
        raise UnsupportedCheckpointError(
            f"{source}: the weights hold InternVL3.5-Flash's mlp2 and router, but config.json lacks {', '.join(missing)}"
        )
    return {
        "relative_threshold": float(raw["flash_relative_threshold"]),
        "absolute_threshold": float(raw["flash_absolute_threshold"]),
        "route": bool(raw.get("flash_mode")),
    }


def flash_name(part: str, rest: str) -> str | None:
    """lit_internvl's name of a Flash tensor of ``part`` (a :data:`FLASH_PARTS` part) called ``rest`` there."""
    if part == "flash_mlp2":
        index, _, leaf = rest.partition(".")
        return f"connector.mlp2.{_MLP2_OURS[index]}.{leaf}" if index in _MLP2_OURS else None
    if part == "flash_pooling":
        return f"connector.router.pooling.{rest}"
    if part == "flash_gating":
        return f"connector.router.gating.{rest}"
    return None


def nest_mlp1(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flash checkpoint's ``mlp1`` (read as a plain connector's ``connector.{norm,fc1,fc2}``) moved under
    ``connector.mlp1``."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("connector.") and not name.startswith(("connector.mlp2.", "connector.router.")):
            name = "connector.mlp1." + name[len("connector.") :]
        out[name] = tensor
    return out
