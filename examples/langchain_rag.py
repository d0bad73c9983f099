"""A LangChain RAG chain that answers from compressed K/V caches instead of the retrieved text.

    python examples/langchain_rag.py [--docs examples/demo_corpus] [--questions FILE] [--store DIR] [-k 3]

1. The corpus is compressed once into an anchor store (``sac_rag.precompress``; a rerun skips the
   chunks already stored).
2. FAISS over MiniLM embeddings of the chunk texts retrieves k chunks per question.
3. ``SACContextCompressor`` gives each retrieved Document a handle to its cached K/V, and the
   chain (``create_sac_stuff_chain(ChatSAC(...))``) answers from those caches: the LLM reads r
   times fewer K/V entries than the chunks have tokens, and none of their text.
4. For comparison, the same LLM answers once more from the full text of the same Documents (text-only
   prompts are read by the frozen base model: the decoder adapter reads caches only).
"""

from __future__ import annotations

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
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_community.vectorstores import FAISS
from langchain_core.callbacks import get_usage_metadata_callback
from langchain_core.documents import Document
from langchain_core.prompts import PromptTemplate
from langchain_huggingface import HuggingFaceEmbeddings
from langchain_sac import ChatSAC, SACContextCompressor, create_sac_stuff_chain

from sac_rag.precompress import Summary


def stream_answer(chain, docs: list[Document], question: str) -> tuple[str, float, dict]:
    """Stream the chain's answer: (answer, time to first token, the LLM's usage metadata)."""
    with get_usage_metadata_callback() as usage:
        answer, ttft = timed_stream(chain.stream({"context": docs, "question": question}))
    return answer, ttft, next(iter(usage.usage_metadata.values()))


def main(argv: list[str] | None = None, doc: str = __doc__) -> tuple[Summary, list[dict]]:
    args = parse_args(doc, argv)
    compressor = load_compressor()  # the packaged SAC compressor on SmolLM2-135M
    summary = precompress_corpus(args, compressor)

    chunks = corpus_chunks(args, compressor)
    documents = [Document(page_content=c.text, id=c.id, metadata={"source": c.doc_id, "n_tokens": c.n_tokens})
                 for c in chunks]
    embeddings = HuggingFaceEmbeddings(model_name=embedding_path(), model_kwargs={"device": "cpu"},
                                       encode_kwargs={"normalize_embeddings": True})
    vector_store = FAISS.from_documents(documents, embeddings)

    # Compressor, LLM and chains. Both SAC objects get the same compressor and store, so they
    # share one engine: the weights are loaded once, and the LLM finds the handles' K/V.
    retriever = ContextualCompressionRetriever(
        base_compressor=SACContextCompressor(compressor=compressor, store=args.store),
        base_retriever=vector_store.as_retriever(search_kwargs={"k": args.k}),
    )
    llm = ChatSAC(compressor=compressor, store=args.store, max_tokens=args.max_tokens, stop=["\n"],
                  extractive=args.extractive)
    chain = create_sac_stuff_chain(llm)  # documents -> their <sac:KEY> handles -> cached K/V
    full_text_chain = create_sac_stuff_chain(llm, document_prompt=PromptTemplate.from_template("{page_content}"))
    llm.invoke("Hello", max_tokens=1)  # warm-up, so that the first question's timing is not a cold start

    print_expectations(args)
    results = []
    for question in args.question_list:
        docs = retriever.invoke(question)
        answer, ttft, usage = stream_answer(chain, docs, question)
        full_answer, full_ttft, full_usage = stream_answer(full_text_chain, docs, question)
        cached = usage["input_token_details"]["cache_read"]
        results.append(report(
            question, answer, full_answer, [d.metadata["source"] for d in docs],
            chunk_tokens=sum(d.metadata["n_tokens"] for d in docs), cached=cached,
            text_tokens=usage["input_tokens"] - cached, full_text_tokens=full_usage["input_tokens"],
            ttft=ttft, full_text_ttft=full_ttft, beams=llm.generation_config().num_beams))
    return summary, results


if __name__ == "__main__":
    run(main)
