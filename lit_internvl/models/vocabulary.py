"""Growing a decoder's vocabulary for tokens the data adds: the one place embeddings and head are resized.

InternVL's training scripts add tokens to the tokenizer and then resize the language model, setting every new
row of the output embeddings to the mean of the old rows (OpenGVLab/InternVL
internvl_chat/internvl/train/internvl_chat_finetune.py L874 ``num_new_tokens = tokenizer.add_tokens(...)``,
L966-970 ``resize_token_embeddings(len(tokenizer))`` … ``output_embeddings[-num_new_tokens:] =
output_embeddings_avg``; the same lines in internvl_chat_pretrain.py L1010-1014 and internvl_chat_mpo.py
L943-947). The input rows there come from transformers' ``resize_token_embeddings``; here they are the old mean
too, so the result does not depend on a transformers version's initialisation. A row appended to the head
adds a logit column and leaves every other logit as it was; a tied head is the embedding matrix, grown once.

Growth is never silent: the ids past the model's vocabulary must be tokens the tokenizer *added* (a
datamodule's ``add_tokens``, InternVL's tokens added to a Hugging Face tokenizer that lacked them, or the added
tokens of a tokenizer folder); any other id means a tokenizer made for another model, and is an error.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn


def rows_to_add(tokenizer, vocab_size: int, model_key: str, growable: bool = True) -> int:
    """How many rows a vocabulary of ``vocab_size`` must grow by to hold every id of ``tokenizer`` (0: none).

    Raises when the tokenizer has ids past ``vocab_size`` that it did not add (``tokenizer.added_ids``), or
    any id past it when the model cannot grow (``growable=False``: text towers).
    """
    extra = range(vocab_size, tokenizer.vocab_size)
    if not extra:
        return 0
    added = set(getattr(tokenizer, "added_ids", ()))
    not_added = [i for i in extra if i not in added]
    if not growable or not_added:
        why = (
            f"ids {not_added[:3]}{'...' if len(not_added) > 3 else ''} are not tokens it added"
            if growable
            else "this model's vocabulary cannot grow"
        )
        raise ValueError(
            f"data.init_args.tokenizer has {tokenizer.vocab_size} ids but the vocabulary of {model_key} holds "
            f"{vocab_size} ({why}): choose a {model_key} config for this tokenizer"
        )
    return len(extra)


@torch.no_grad()
def _grown(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """``weight`` ``(V, D)`` with ``rows`` rows appended, each the mean of the ``V`` old rows (float32 sum)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return nn.Parameter(torch.cat([weight, mean.expand(rows, -1)]), requires_grad=weight.requires_grad)


def grow_vocabulary(decoder: nn.Module, rows: int) -> str:
    """Append ``rows`` rows to ``decoder.embed_tokens`` and (untied) ``decoder.lm_head``, each the mean of the old
    rows, and set ``decoder.config.vocab_size`` (what export writes). Works on the meta device. Returns what it
    did, in words, for the caller to log ("" when ``rows`` is 0)."""
    if rows <= 0:
        return ""
    old = decoder.embed_tokens.num_embeddings
    decoder.embed_tokens.weight = _grown(decoder.embed_tokens.weight, rows)
    decoder.embed_tokens.num_embeddings = old + rows
    if decoder.lm_head is not None:
        decoder.lm_head.weight = _grown(decoder.lm_head.weight, rows)
        decoder.lm_head.out_features = old + rows
    # A copy: a preset's config object is shared by every decoder built from it.
    decoder.config = replace(decoder.config, vocab_size=old + rows)
    rows_of = "embedding (tied head)" if decoder.lm_head is None else "embedding and head"
    return f"vocabulary grown from {old} to {old + rows} ids: the new {rows_of} rows are the mean of the old ones"


def train_new_rows(decoder: nn.Module, first_new_id: int) -> list[nn.Parameter]:
    """Make the rows from ``first_new_id`` on of the embeddings and head trainable, and only those: the old rows'
    gradient is zeroed (so Adam's moments and update stay 0 there). Returns the parameters, which must be kept out
    of weight decay (decoupled decay would still shrink the old rows); they are marked ``no_weight_decay``."""
    params = [decoder.embed_tokens.weight]
    if decoder.lm_head is not None:
        params.append(decoder.lm_head.weight)
    for param in params:
        if param.requires_grad:  # the whole matrix trains already (the decoder is not frozen)
            continue
        param.requires_grad_(True)
        param.no_weight_decay = True

        def keep_old_rows(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:first_new_id] = 0
            return grad

        param.register_hook(keep_old_rows)
    return params
