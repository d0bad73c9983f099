"""A LlamaIndex query engine that answers from compressed K/V caches instead of the retrieved text.

    python examples/llama_index_rag.py [--docs examples/demo_corpus] [--questions FILE] [--store DIR] [-k 3]

1. The corpus is compressed once into an anchor store (``sac_rag.precompress``; a rerun skips the
   chunks already stored).
2. A ``VectorStoreIndex`` over FAISS with MiniLM embeddings retrieves k nodes per question.
3. ``SACNodePostprocessor`` makes each node's LLM view a handle to its cached K/V, and
   ``SACLLM`` answers from those caches: it reads r times fewer K/V entries than the nodes have
   tokens, and none of their text.
4. For comparison, the same LLM answers once more from the full text of the same nodes (text-only
   prompts are read by the frozen base model: the decoder adapter reads caches only).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import faiss
from _common import (
    corpus_chunks,
    embedding_path,
    load_compressor,
    parse_args,
    precompress_corpus,
    print_expectations,
    report,
    run,
    timed_stream,
)
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import QueryBundle, TextNode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.llms.sac import SACLLM
from llama_index.postprocessor.sac import SACNodePostprocessor
from llama_index.vector_stores.faiss import FaissVectorStore

from sac_rag.precompress import Summary

MINILM_DIMENSIONS = 384


class LastUsage(BaseEventHandler):
    """Keeps the usage figures of the last completion (``SACLLM`` puts them in ``response.raw``)."""

    usage: dict = {}

    @classmethod
    def class_name(cls) -> str:
        return "LastUsage"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionEndEvent):
            self.usage = event.response.raw["usage"]


def build_index(args, compressor) -> VectorStoreIndex:
    """A FAISS index with MiniLM embeddings over the corpus cut into the chunks the store holds (so
    every retrieved node is served from the store)."""
    nodes = [TextNode(id_=c.id, text=c.text, metadata={"source": c.doc_id, "n_tokens": c.n_tokens},
                      excluded_embed_metadata_keys=["n_tokens"], excluded_llm_metadata_keys=["source", "n_tokens"])
             for c in corpus_chunks(args, compressor)]
    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(MINILM_DIMENSIONS))
    return VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                            embed_model=HuggingFaceEmbedding(model_name=embedding_path(), device="cpu", normalize=True))


@dataclass
class Setup:
    """What the LlamaIndex examples build before the first question."""

    args: argparse.Namespace
    summary: Summary
    retriever: BaseRetriever
    llm: SACLLM
    postprocessor: SACNodePostprocessor
    usage: LastUsage  # the usage figures of the last completion


def set_up(argv: list[str] | None, doc: str) -> Setup:
    """Parse the options, precompress the corpus, index it, and build the LLM and the postprocessor
    (given the same compressor and store, they share one engine)."""
    args = parse_args(doc, argv)
    compressor = load_compressor()  # the packaged SAC compressor on SmolLM2-135M
    summary = precompress_corpus(args, compressor)
    retriever = build_index(args, compressor).as_retriever(similarity_top_k=args.k)
    llm = SACLLM(compressor=compressor, store=args.store, max_tokens=args.max_tokens, stop=["\n"],
                 extractive=args.extractive)
    usage = LastUsage()
    get_dispatcher().add_event_handler(usage)
    return Setup(args, summary, retriever, llm, SACNodePostprocessor(compressor=compressor, store=args.store), usage)


def main(argv: list[str] | None = None, doc: str = __doc__) -> tuple[Summary, list[dict]]:
    setup = set_up(argv, doc)
    args, retriever, llm, usage = setup.args, setup.retriever, setup.llm, setup.usage
    engine = RetrieverQueryEngine.from_args(
        retriever, llm=llm, response_mode="compact", text_qa_template=llm.qa_prompt, streaming=True,
        node_postprocessors=[setup.postprocessor],
    )
    # warm-up, so that the first question's timing is not a cold start (a prompt in the trained layout and a
    # question the model answers, not one it ends at once: SACLLM warns about empty answers)
    llm.complete(llm.qa_prompt.format(context_str="", query_str="What is the capital of France?"), formatted=True,
                 max_tokens=1, extractive=False)  # no context to quote

    print_expectations(args)
    results = []
    for question in args.question_list:
        # engine.query(question) is retrieve + synthesize; done in two steps to time the LLM alone
        bundle = QueryBundle(question)
        handles = engine.retrieve(bundle)  # retrieved nodes whose LLM view is <sac:KEY>
        answer, ttft = timed_stream(engine.synthesize(bundle, handles).response_gen)
        sac_usage = usage.usage
        plain = retriever.retrieve(bundle)  # the same nodes, read as text
        full_answer, full_ttft = timed_stream(engine.synthesize(bundle, plain).response_gen)
        results.append(report(
            question, answer, full_answer, [n.metadata["source"] for n in handles],
            chunk_tokens=sum(n.metadata["n_tokens"] for n in handles), cached=sac_usage["cached_tokens"],
            text_tokens=sac_usage["text_tokens"], full_text_tokens=usage.usage["text_tokens"],
            ttft=ttft, full_text_ttft=full_ttft, beams=llm.generation_config().num_beams))
    return setup.summary, results


if __name__ == "__main__":
    run(main)
