"""``SACNodePostprocessor``: retrieved nodes -> copies whose LLM-visible content is a SAC handle.

In a ``RetrieverQueryEngine`` the synthesizer formats each node with
``node.get_content(MetadataMode.LLM)`` and the LLM sees only the resulting prompt string. So
the postprocessor returns copies of the nodes whose LLM view is the marker: metadata
``sac_marker`` (``<sac:KEY>``, several back to back for a text longer than one chunk), text
template ``"{metadata_str}"``, metadata template ``"{value}"``, every other metadata key
excluded from the LLM view. Ids, scores, ``node.text`` and the metadata itself are kept (plus
``sac_key`` and ``sac_keys``); the input nodes are not modified. The embed view (what a reranker
after this postprocessor reads) is the node's text. ``SACLLM``
(``llama_index.llms.sac``) turns the markers back into cached K/V.

In ``compact`` / ``tree_summarize`` modes one LLM call sees every marker; in ``refine`` mode one
call per node.
"""

from __future__ import annotations

import logging
from typing import Any, List, Literal, Optional

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, field_serializer
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from sac_rag import DEFAULT_COMPRESSOR, InvalidInputError
from sac_rag.handles import SACEngine, markers_for, plain_text, spec_name
from sac_rag.store import AnchorStore

logger = logging.getLogger(__name__)

HANDLE_KEYS = ("sac_key", "sac_keys", "sac_marker")


class SACNodePostprocessor(BaseNodePostprocessor):
    """Attach SAC handles to retrieved nodes.

    Each node's text is looked up in ``store`` by ``AnchorStore.key_for(node.text)``. On a miss:
    ``on_miss="compress"`` (default) compresses it now (written to the store if ``write_back``,
    else kept in memory, where ``SACLLM`` finds it); ``"text"`` keeps the node's text as its LLM
    view (with a warning); ``"error"`` raises ``EntryNotFoundError``. An empty query is refused.
    Nothing loads at construction.

    Pass ``engine=`` to share one explicitly with an ``SACLLM``; otherwise a postprocessor and
    an LLM built with the same ``compressor``/``store``/``device``/``dtype`` share one.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelled option is refused, not ignored

    compressor: Any = Field(default=DEFAULT_COMPRESSOR,
                            description="Built-in compressor name, compressor directory or SACCompressor.")
    store: Any = Field(default=None, description="Anchor store directory or AnchorStore.")
    device: Optional[str] = None
    dtype: Optional[str] = None
    write_back: bool = False
    on_miss: Literal["compress", "text", "error"] = "compress"
    _engine: Optional[SACEngine] = PrivateAttr(default=None)

    def __init__(self, engine: Optional[SACEngine] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._engine = engine

    @field_serializer("compressor", "store")
    def _serialize_spec(self, value: Any) -> Any:
        return spec_name(value)

    @classmethod
    def class_name(cls) -> str:
        return "SACNodePostprocessor"

    @property
    def engine(self) -> SACEngine:
        if self._engine is None:
            self._engine = SACEngine.shared(self.compressor, self.store, device=self.device, dtype=self.dtype)
        return self._engine

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        nodes, texts = self._check(nodes, query_bundle)
        if not texts:
            return list(nodes)
        handles = self.engine.handles_for(texts, write_back=self.write_back, on_miss=self.on_miss,
                                          metadata=[n.node.metadata for n in nodes])
        return [_with_handle(n, keys) for n, keys in zip(nodes, handles)]

    async def _apostprocess_nodes(self, nodes: List[NodeWithScore],
                                  query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        """Store lookups in a worker thread without the model lock, then any compression in a
        worker thread under it: the event loop is never blocked."""
        nodes, texts = self._check(nodes, query_bundle)
        if not texts:
            return list(nodes)
        handles = await self.engine.ahandles_for(texts, write_back=self.write_back, on_miss=self.on_miss,
                                                 metadata=[n.node.metadata for n in nodes])
        return [_with_handle(n, keys) for n, keys in zip(nodes, handles)]

    @staticmethod
    def _check(nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle]) -> tuple[list, list[str]]:
        if query_bundle is not None and not query_bundle.query_str.strip():
            raise InvalidInputError("the question is empty: there is nothing to answer")
        nodes = list(nodes)
        if not nodes:
            logger.warning("no nodes retrieved: nothing to compress")
        for n in nodes:
            # TextNode, and in llama-index-core 0.14 Document (a Node, not a TextNode): anything
            # with a text and the text/metadata templates the handle view is made of.
            if not _has_text(n.node):
                raise InvalidInputError(
                    f"SAC compresses nodes with text content; got a {type(n.node).__name__} without text")
        return nodes, [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]


def _has_text(node: Any) -> bool:
    if not all(hasattr(node, name) for name in ("text_template", "metadata_template", "excluded_llm_metadata_keys")):
        return False
    try:
        content = node.get_content(metadata_mode=MetadataMode.NONE)
    except (AttributeError, TypeError, ValueError):
        return False
    if not isinstance(content, str):
        return False
    # An image node's text is its caption: compressed if it has one (the LLM reads text only).
    is_image = any(getattr(node, name, None) for name in ("image", "image_path", "image_url"))
    return bool(content) or not is_image


def _with_handle(node: NodeWithScore, keys: Optional[list[str]]) -> NodeWithScore:
    text = node.node.get_content(metadata_mode=MetadataMode.NONE)
    metadata = {**node.node.metadata, "sac_key": AnchorStore.key_for(text), "sac_keys": list(keys or []),
                "sac_marker": plain_text(text) if keys is None else markers_for(keys)}
    copy = node.node.model_copy(update={
        "metadata": metadata,
        "text_template": "{metadata_str}",
        "metadata_template": "{value}",
        "excluded_llm_metadata_keys": [k for k in metadata if k != "sac_marker"],
        # no metadata in the embed view, which is then the text: what a reranker placed after this
        # postprocessor reads (SentenceTransformerRerank), rather than the metadata values and the hex keys
        "excluded_embed_metadata_keys": list(metadata),
    })
    return NodeWithScore(node=copy, score=node.score)
