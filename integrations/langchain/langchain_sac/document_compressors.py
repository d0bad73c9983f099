"""``SACContextCompressor``: retrieved documents -> the same documents carrying a SAC handle.

Each document keeps its ``page_content`` (citations stay intact), ``id`` and metadata, and
gains three metadata entries (JSON-safe, so they survive any serialization):

- ``sac_key``: ``AnchorStore.key_for(page_content)``, the document's identity;
- ``sac_keys``: the store keys of its chunks (``[sac_key]`` when the text is one chunk; a text
  longer than one chunk is split as ``sac_rag.precompress`` splits documents);
- ``sac_marker``: what the LLM should read for it: the chunks' markers back to back
  (``<sac:K1><sac:K2>...``, read as consecutive chunks), or - when ``on_miss="text"`` passed it
  through uncompressed - the text itself.

Format documents with ``SAC_DOCUMENT_PROMPT`` (``"{sac_marker}"``) and answer with ``ChatSAC``
or ``SACLLM``, which replace the markers by the cached K/V.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.load import Serializable

from sac_rag import InvalidInputError
from sac_rag.handles import markers_for, plain_text
from sac_rag.store import AnchorStore

from ._base import LangChainSerializable, SACEngineSettings

logger = logging.getLogger(__name__)


class SACContextCompressor(LangChainSerializable, BaseDocumentCompressor, Serializable, SACEngineSettings):
    """Attach SAC handles to retrieved documents (for ``ContextualCompressionRetriever``).

    Each document's chunk is looked up in ``store`` by ``key_for(page_content)``. On a miss:
    ``on_miss="compress"`` (default) compresses it now - written to the store if
    ``write_back``, else kept in this process's memory, where the LLM finds it;
    ``"text"`` passes the document through uncompressed (its ``sac_marker`` is its text; a
    warning is logged); ``"error"`` raises ``EntryNotFoundError``.

    Compression is query-agnostic (the query only chooses documents), but an empty query is
    refused: there is nothing to answer. Nothing loads at construction; the first call loads
    the compressor and opens the store (refusing a store built for another model with
    ``FingerprintMismatchError``).

    ``langchain_core.load.dumpd`` gives a constructor record of its settings, which ``load`` with
    ``valid_namespaces=["langchain_sac"]`` rebuilds (see ``LangChainSerializable``).
    """

    write_back: bool = False
    on_miss: Literal["compress", "text", "error"] = "compress"

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """The public module, kept in serialized records whatever module defines the class."""
        return ["langchain_sac", "document_compressors"]

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        documents = self._check(documents, query)
        if not documents:
            return []
        handles = self.get_engine().handles_for(
            [d.page_content for d in documents], write_back=self.write_back, on_miss=self.on_miss,
            metadata=[d.metadata for d in documents])
        return [_with_handle(d, keys) for d, keys in zip(documents, handles)]

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Store lookups in a worker thread (they do not wait for a decode in progress), then
        compression of any misses in a worker thread under the model lock: the event loop is
        never blocked."""
        documents = self._check(documents, query)
        if not documents:
            return []
        handles = await self.get_engine().ahandles_for(
            [d.page_content for d in documents], write_back=self.write_back, on_miss=self.on_miss,
            metadata=[d.metadata for d in documents])
        return [_with_handle(d, keys) for d, keys in zip(documents, handles)]

    @staticmethod
    def _check(documents: Sequence[Document], query: str) -> list[Document]:
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("the question is empty: there is nothing to answer")
        documents = list(documents)
        if not documents:
            logger.warning("no documents retrieved: the LLM answers without context")
        for doc in documents:
            if not isinstance(doc, Document):
                raise InvalidInputError(f"expected langchain Documents, got {type(doc).__name__}")
        return documents


def _with_handle(doc: Document, keys: list[str] | None) -> Document:
    metadata = dict(doc.metadata)
    metadata["sac_key"] = AnchorStore.key_for(doc.page_content)
    metadata["sac_keys"] = list(keys or [])
    metadata["sac_marker"] = plain_text(doc.page_content) if keys is None else markers_for(keys)
    return doc.model_copy(update={"metadata": metadata})
