"""Generation (greedy, temperature, top-p; KV cache) and answering questions about images."""

from lit_internvl.inference.chat import answer, load_hf_chat_model
from lit_internvl.inference.generate import generate, sample_next

__all__ = ["answer", "generate", "load_hf_chat_model", "sample_next"]
