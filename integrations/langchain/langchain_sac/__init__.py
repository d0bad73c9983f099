"""LangChain integration of sac_rag (Semantic-Anchor Compression for RAG).

- ``SACContextCompressor``: gives retrieved documents a handle to their compressed K/V (for
  ``ContextualCompressionRetriever``), keeping their text, id and metadata.
- ``ChatSAC`` / ``SACLLM``: answer from those caches; markers in the prompt become K/V.
- ``SAC_DOCUMENT_PROMPT``, ``sac_qa_prompt``, ``create_sac_stuff_chain``: the prompts that carry
  handles through ``create_stuff_documents_chain``.
"""

from sac_rag.handles import SACEngine, marker_for, markers_for

from .chat_models import ChatSAC
from .document_compressors import SACContextCompressor
from .llms import SACLLM
from .prompts import SAC_DOCUMENT_PROMPT, create_sac_stuff_chain, sac_qa_prompt

__version__ = "0.1.0"

__all__ = [
    "SAC_DOCUMENT_PROMPT",
    "SACLLM",
    "ChatSAC",
    "SACContextCompressor",
    "SACEngine",
    "create_sac_stuff_chain",
    "marker_for",
    "markers_for",
    "sac_qa_prompt",
]
