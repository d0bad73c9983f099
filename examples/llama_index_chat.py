"""A LlamaIndex chat engine that answers a conversation from compressed K/V caches.

    python examples/llama_index_chat.py [--docs examples/demo_corpus] [--questions FILE] [--store DIR] [-k 3]

The questions are asked one after the other in one conversation. For each message the chat engine
retrieves k nodes, ``SACNodePostprocessor`` turns them into handles to their cached K/V, and
``SACLLM`` reads the conversation in the layout its compressor was trained with: the nodes as the
context, then each earlier question with its answer, then the new question. The retrieved nodes are
read only as caches; the conversation so far is read as text, and ``llm.chat_memory()`` drops its
oldest turns before the model runs out of positions.
"""

from __future__ import annotations

from _common import print_expectations, run
from llama_index.core.chat_engine import ContextChatEngine
from llama_index_rag import set_up

from sac_rag.precompress import Summary


def main(argv: list[str] | None = None, doc: str = __doc__) -> tuple[Summary, list[dict]]:
    setup = set_up(argv, doc)
    args, llm, usage = setup.args, setup.llm, setup.usage
    chat = ContextChatEngine.from_defaults(
        retriever=setup.retriever, llm=llm, memory=llm.chat_memory(), context_template=llm.chat_context_template,
        node_postprocessors=[setup.postprocessor])

    print_expectations(args)
    results = []
    for question in args.question_list:
        response = chat.chat(question)
        sources = [n.node.metadata["source"] for n in response.source_nodes]
        results.append({"question": question, "answer": response.response, "sources": sources,
                        "cached_tokens": usage.usage["cached_tokens"], "text_tokens": usage.usage["text_tokens"],
                        "chunk_tokens": sum(n.node.metadata["n_tokens"] for n in response.source_nodes)})
        print(f"Q: {question}\nA: {response.response.strip()}\n   from {', '.join(sources)}: "
              f"{usage.usage['cached_tokens']} cached K/V entries for {results[-1]['chunk_tokens']} chunk tokens, "
              f"{usage.usage['text_tokens']} tokens of text (the layout, the earlier turns and this question)\n")
    return setup.summary, results


if __name__ == "__main__":
    run(main)
