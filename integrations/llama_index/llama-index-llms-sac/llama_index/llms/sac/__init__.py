"""LlamaIndex LLM for sac_rag: answers from the compressed K/V caches that prompt markers name."""

from llama_index.llms.sac.base import SACLLM, UNSPLIT_CONTEXT_WINDOW, PromptRefusedError, sac_qa_prompt

__all__ = ["SACLLM", "UNSPLIT_CONTEXT_WINDOW", "PromptRefusedError", "sac_qa_prompt"]
