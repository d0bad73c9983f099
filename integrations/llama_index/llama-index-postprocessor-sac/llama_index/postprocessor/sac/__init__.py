"""LlamaIndex node postprocessor for sac_rag: retrieved nodes carry handles to compressed K/V."""

from llama_index.postprocessor.sac.base import HANDLE_KEYS, SACNodePostprocessor

__all__ = ["HANDLE_KEYS", "SACNodePostprocessor"]
