"""Export at the end of a run: the trained vision-language model in transformers' InternVL layout."""

from __future__ import annotations

import copy
import os

import lightning as L
from torch.distributed.fsdp import FSDPModule

from lit_internvl.hf.export import export_vlm
from lit_internvl.lora import lora_layers, merge_lora


class ExportAtFitEnd(L.Callback):
    """At the end of ``fit``, rank 0 writes the model with :func:`~lit_internvl.hf.export.export_vlm` to
    ``output`` (default ``<log_dir>/hf``): ``config.json``, safetensors and, for a Hugging Face tokenizer, its
    files (the tokens the run added included), so that ``InternVLForConditionalGeneration.from_pretrained``
    (and vLLM) load it, at the tile size the run trained at. LoRA adapters are merged into a copy first. The
    embedded tokenizers (``byte``, ``shapes``) have no transformers form: the folder then holds the model only.

    A model sharded by FSDP2 is refused (gathering it on one rank is the export command's job: ``python -m
    lit_internvl export --checkpoint <last.ckpt> --arch ...``).
    """

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self.path: str | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        model = pl_module.model
        if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
            raise ValueError(
                "ExportAtFitEnd cannot export a model sharded by FSDP2: export the checkpoint instead "
                "(python -m lit_internvl export --checkpoint <run>/checkpoints/last.ckpt --arch ...)"
            )
        if not trainer.is_global_zero:
            return
        self.path = self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf")
        if lora_layers(model):
            model = merge_lora(copy.deepcopy(model))
        tokenizer = getattr(pl_module.data, "tokenizer", None)
        export_vlm(model, self.path)
        hf_tokenizer = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps transformers' own
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(self.path)
        count = sum(p.numel() for p in model.parameters())
        tokens = "with its tokenizer" if hf_tokenizer is not None else "without a tokenizer (an embedded one)"
        print(f"Exported {count:,} parameters to {self.path} (transformers' InternVL layout, {tokens})", flush=True)
