"""The byte-level tokenizer of the embedded default: 256 byte ids, then InternVL's special tokens.

Real recipes use a Hugging Face tokenizer from a checkpoint folder; both expose the same small
interface: ``encode(text) → ids`` (special-token strings in the text become their ids),
``decode(ids)``, ``token_to_id(token)``, ``vocab_size``, ``pad_id``, ``eos_id``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    IMG_START, IMG_END, IMG_CONTEXT,
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)  # fmt: skip


class ByteTokenizer:
    """UTF-8 bytes as ids 0–255; special tokens from 256 on (``<|endoftext|>`` pads, ``<|im_end|>`` ends)."""

    def __init__(self) -> None:
        self.special_ids = {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_tokens = {i: token for token, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.pad_id = self.special_ids["<|endoftext|>"]
        self.eos_id = self.special_ids["<|im_end|>"]

    def token_to_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of the byte tokenizer; known: {SPECIAL_TOKENS}")
        return self.special_ids[token]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(self.special_tokens.get(i, f"<unk:{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)
