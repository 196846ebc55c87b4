"""Real InternVL checkpoints in and out: read a Hugging Face folder into a :class:`VisionLanguageModel`
and export one back to transformers' layout.

Reading (``load_vlm``, ``read_vlm_state_dict``, ``read_config``) accepts both published layouts:

- transformers-native (``InternVLForConditionalGeneration``, ``model_type: internvl``), with either
  the in-memory names (``model.vision_tower.*``, ``model.language_model.*``, ``lm_head``) or the
  names ``save_pretrained`` writes (``vision_tower.*``, ``language_model.model.*``,
  ``language_model.lm_head``); text model Qwen2, LLaMA, Qwen3, Qwen3-MoE (its experts stored one matrix per
  expert, stacked when read and split when written) or GPT-OSS (its experts stacked and transposed, or MXFP4).
- original OpenGVLab (``InternVLChatModel``, ``model_type: internvl_chat``): ``vision_model.*`` with
  fused ``attn.qkv``, projector ``mlp1.{0,1,3}``, text model Qwen2, LLaMA, Qwen3, Qwen3-MoE, GPT-OSS or InternLM2 (its
  grouped ``wqkv`` is split into q/k/v, ``w1/w3/w2`` become gate/up/down).

Nothing from the checkpoint runs: ``config.json`` is read as JSON (``auto_map`` entries are ignored)
and mapped field by field, weights come from safetensors, and a pickle (``.bin``/``.pt``) is read
only if ``torch.load(weights_only=True)`` accepts it. A feature the components do not implement
(rope scaling other than dynamic NTK and YaRN, biases the blocks lack, sliding windows outside GPT-OSS, ...) is refused with
a message rather than loaded silently wrong. A folder's tokenizer is
:class:`lit_internvl.data.tokenizer.HFTokenizer`.

Writing (``export_vlm``; the command is ``python -m lit_internvl export``, :mod:`lit_internvl.tools.export`)
produces what ``InternVLForConditionalGeneration.from_pretrained`` loads: ``config.json``, ``model.safetensors``
(sharded with an index past ``max_shard_bytes``) and the tokenizer files of a tokenizer folder, at the tile
size the model reads.

Modules: ``names`` (weight names, both ways), ``config`` (config.json ↔ configs, one table both ways),
``files`` (tensors, JSON, tokenizer files), ``load`` (folder or weights → model), ``export`` (model → folder).
"""

from lit_internvl.hf.config import CheckpointSpec, UnsupportedCheckpointError, read_config, transformers_config
from lit_internvl.hf.export import export_vlm, refuse_lora
from lit_internvl.hf.files import copy_tokenizer_files
from lit_internvl.hf.load import build_vlm, load_state_exactly, load_vlm, model_from_weights, read_vlm_state_dict
from lit_internvl.hf.names import split_wqkv, to_transformers_state_dict

__all__ = [
    "CheckpointSpec", "UnsupportedCheckpointError", "build_vlm", "copy_tokenizer_files", "export_vlm",
    "load_state_exactly", "load_vlm", "model_from_weights", "read_config", "read_vlm_state_dict", "refuse_lora",
    "split_wqkv", "to_transformers_state_dict", "transformers_config",
]  # fmt: skip
