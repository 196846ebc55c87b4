"""The tokenizers of the embedded default: 256 byte ids, then InternVL's special tokens, then
(optionally) whole words of a fixed vocabulary, as the "shapes" tokenizer has the shapes world's words.

Real recipes use a Hugging Face tokenizer from a checkpoint folder (:class:`HFTokenizer`);
:func:`load_tokenizer` picks one by name. Both expose the same small interface
(:class:`~lit_internvl.data.contract.Tokenizer`): ``encode(text) → ids`` (special-token strings in the
text become their ids), ``decode(ids)``, ``token_to_id(token)``, ``vocab_size``, ``pad_id``, ``eos_id``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# ChatML's tokens: the byte tokenizer pads with the first and ends a turn (and a sample) with the last.
END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# InternVL's training scripts add these to the language model's tokenizer (``add_tokens(...,
# special_tokens=True)``) when it lacks them; checkpoints of InternVL itself already have them.
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
# The byte tokenizer's special tokens, ids 256 on in this order.
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, *INTERNVL_TOKENS)


class ByteTokenizer:
    """UTF-8 bytes as ids 0–255; special tokens from 256 on (``<|endoftext|>`` pads, ``<|im_end|>`` ends);
    then one id per word of ``words`` and one per word with a leading space (``" red"``), as GPT-2-style
    vocabularies have. Text splits into runs of ASCII letters and digits (each with the space before it)
    and single other characters; a run that is a word is one token, anything else falls back to bytes.
    """

    def __init__(self, words: Sequence[str] = ()) -> None:
        self.special_ids = {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_tokens = {i: token for token, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.added_ids: list[int] = []  # ids of add_tokens, past the fixed vocabulary
        not_words = [w for w in words if not re.fullmatch("[A-Za-z0-9]+", w)]
        if not_words:
            raise ValueError(f"Tokenizer words must be runs of ASCII letters and digits; got {not_words[:5]}")
        pieces = list(dict.fromkeys([*words, *(" " + w for w in words)]))
        self.word_ids = {piece: 256 + len(SPECIAL_TOKENS) + i for i, piece in enumerate(pieces)}
        self.words = {i: piece for piece, i in self.word_ids.items()}
        self._runs = re.compile(" ?[A-Za-z0-9]+|[^A-Za-z0-9]")
        self.vocab_size = 256 + len(SPECIAL_TOKENS) + len(pieces)
        self.pad_id = self.special_ids[END_OF_TEXT]
        self.eos_id = self.special_ids[IM_END]

    @property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for (a special token, a word with its space)."""
        return max(len(t.encode()) for t in [*self.special_ids, *self.word_ids, "x"])

    def token_to_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of the byte tokenizer; known: {tuple(self.special_ids)}")
        return self.special_ids[token]

    def add_tokens(self, tokens: Sequence[str]) -> int:
        """Add ``tokens`` as special tokens (each one id, never split) after the current vocabulary; tokens it
        already has are skipped. Returns the number added; their ids are in ``added_ids``."""
        new = [t for t in dict.fromkeys(tokens) if t not in self.special_ids and t not in self.word_ids]
        for token in new:
            self.special_ids[token] = self.vocab_size
            self.special_tokens[self.vocab_size] = token
            self.added_ids.append(self.vocab_size)
            self.vocab_size += 1
        # Longest first, so that a token holding another (``<a>``, ``<a>x``) is matched whole.
        ordered = sorted(self.special_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")
        return len(new)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
                continue
            for run in self._runs.findall(piece):
                if run in self.word_ids:
                    ids.append(self.word_ids[run])
                else:
                    ids.extend(run.encode("utf-8"))
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
            if i in self.words:
                out.append(self.words[i])
            elif not skip_special_tokens:
                out.append(self.special_tokens.get(i, f"<unk:{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def _culprit(folder: Path) -> str:
    """The file of a tokenizer folder that does not parse as JSON, else the folder and its tokenizer files."""
    import json

    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{file} (not valid JSON)"
    files = [f.name for f in sorted(folder.glob("tokenizer*")) if f.is_file()]
    return f"the tokenizer at {folder} ({', '.join(files) or 'no tokenizer files'})"


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder, behind the same interface as :class:`ByteTokenizer`.

    ``encode`` adds no BOS/EOS; special-token strings in the text become their ids. ``bos_id`` is the
    BOS the tokenizer would add on its own (``None`` if it adds none): templates that InternVL trains
    with a BOS put it in front of the sequence. InternVL tokens missing from the vocabulary are added
    (listed in ``added_tokens``, so the model can resize its embeddings) unless
    ``add_missing_tokens=False``, which raises instead.
    """

    def __init__(self, path: str | os.PathLike, add_missing_tokens: bool = True, **kwargs) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False, **kwargs)
        except Exception as error:  # noqa: BLE001 - transformers and tokenizers raise many kinds; none names the file
            raise ValueError(f"{_culprit(Path(self.path))} cannot be read: {type(error).__name__}: {error}") from error
        vocab = self.tokenizer.get_vocab()
        missing = [token for token in INTERNVL_TOKENS if token not in vocab]
        if missing and not add_missing_tokens:
            raise ValueError(f"Tokenizer at {self.path} lacks InternVL tokens {missing}; pass add_missing_tokens=True")
        self.added_tokens = missing
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=True)
        self.vocab_size = len(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = self._find(IM_END)
        if self.eos_id is None:
            raise ValueError(f"Tokenizer at {self.path} has no eos_token and no {IM_END}; set one when saving it")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self._find(END_OF_TEXT)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        bos = self.tokenizer.bos_token_id
        with_specials = self.tokenizer("x")["input_ids"]
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        self.bos_id = bos if bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos] else None

    @property
    def added_ids(self) -> list[int]:
        """Ids of the tokens added on top of the base vocabulary: the folder's added tokens, the InternVL tokens
        added here and those of :meth:`add_tokens` (transformers' ``added_tokens_decoder``)."""
        return sorted(self.tokenizer.added_tokens_decoder)

    def add_tokens(self, tokens: Sequence[str]) -> int:
        """Add ``tokens`` as special tokens (as InternVL's scripts add theirs); returns the number added."""
        added = self.tokenizer.add_tokens(list(tokens), special_tokens=True)
        self.vocab_size = len(self.tokenizer)
        return added

    @property
    def longest_token_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes of text one token stands for: its vocabulary's longest entry (byte-level
        and SentencePiece entries spell a byte or a space with a character of up to 3 bytes: an over-estimate)."""
        if getattr(self, "_longest", None) is None:
            self._longest = max(len(t.encode()) for t in self.tokenizer.get_vocab())
        return self._longest

    def _find(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def token_to_id(self, token: str) -> int:
        token_id = self._find(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary of the tokenizer at {self.path}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )


def load_tokenizer(name: str, add_tokens: Sequence[str] = ()) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` → :class:`ByteTokenizer`; ``"shapes"`` → bytes and the shapes world's words
    (:func:`~lit_internvl.data.shapes.world.vocabulary`); a folder → its :class:`HFTokenizer` (no remote code).
    ``add_tokens``: special tokens to add (the model grows its vocabulary for them, models.vocabulary)."""
    if name == "byte":
        tokenizer = ByteTokenizer()
    elif name == "shapes":
        # Imported here: the shapes package builds samples with this module's tokenizers.
        from lit_internvl.data.shapes.world import vocabulary

        tokenizer = ByteTokenizer(vocabulary())
    else:
        tokenizer = HFTokenizer(name)
    if add_tokens:
        tokenizer.add_tokens(add_tokens)
    return tokenizer
