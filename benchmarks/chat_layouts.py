"""Conversations on SQuAD dev: the layout a chat reaches the model in, in LlamaIndex and LangChain.

    python benchmarks/chat_layouts.py --n 200     # rows -> benchmarks/results/chat_layouts.jsonl

Each question of the seeded subset (the same nested subsets as ``python -m sac_rag.eval``) is asked as
the first message of a chat whose retriever returns the question's own paragraph, compressed on the
fly (``SACNodePostprocessor`` / ``SACContextCompressor``). The chat puts the retrieved markers in a
system message before the turns, as both frameworks' chats with context do:

* ``llamaindex-chat-generic-layout``: a ``ContextChatEngine`` with LlamaIndex's generic
  ``messages_to_prompt`` (``system: ...`` then ``user: ...`` and ``assistant: ``), how SACLLM laid
  chats out before ``conversation_prompt``;
* ``llamaindex-chat-sac-layout``: SACLLM's default, the conversation in the compressor's layout
  (``PromptTemplate.conversation``), with LlamaIndex's default context template (its instruction is
  read as context too);
* ``llamaindex-chat-sac-layout+context-template``: the same with ``llm.chat_context_template``;
* ``llamaindex-query-engine``: a ``RetrieverQueryEngine`` with ``text_qa_template=llm.qa_prompt``;
* ``langchain-history-as-written`` / ``langchain-history-sac-layout``: a retrieval chain whose prompt
  is ``[("system", "{context}"), MessagesPlaceholder("chat_history"), ("human", "{input}")]``, read by
  ``ChatSAC(chat_template=False)`` (the messages' texts one after the other, ChatSAC's default before
  it laid out conversations) or ``ChatSAC(chat_template="sac")`` (its default for several messages);
* ``langchain-stuff-chain``: ``create_sac_stuff_chain``, the single-question chain.

Rows: standard SQuAD EM/F1 with bootstrap CIs, and how many answers were empty.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from langchain_classic.chains import create_retrieval_chain  # noqa: E402
from langchain_classic.chains.combine_documents import create_stuff_documents_chain  # noqa: E402
from langchain_classic.retrievers import ContextualCompressionRetriever  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder  # noqa: E402
from langchain_core.retrievers import BaseRetriever as LangChainRetriever  # noqa: E402
from langchain_sac import SAC_DOCUMENT_PROMPT, ChatSAC, SACContextCompressor, create_sac_stuff_chain  # noqa: E402
from langchain_sac import sac_qa_prompt as langchain_qa_prompt  # noqa: E402
from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt  # noqa: E402
from llama_index.core.chat_engine import ContextChatEngine  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402
from llama_index.llms.sac import SACLLM  # noqa: E402
from llama_index.postprocessor.sac import SACNodePostprocessor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sac_rag.eval import Question, add_subset_arguments, check_results_file, subset_questions  # noqa: E402
from sac_rag.files import append_jsonl  # noqa: E402
from sac_rag.handles import SACEngine  # noqa: E402
from sac_rag.metrics import headline_scores, headline_text  # noqa: E402
from sac_rag.pipeline import DEFAULT_COMPRESSOR  # noqa: E402

EMPTY = ("", "Empty Response")  # what LlamaIndex shows for an answer the model ended at once
WITH_HISTORY = [("system", "{context}"), MessagesPlaceholder("chat_history"), ("human", "{input}")]


class OwnParagraph(BaseRetriever):
    """Returns the paragraph of the question being asked (set before each question)."""

    def __init__(self):
        super().__init__()
        self.paragraph = ""

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [NodeWithScore(node=TextNode(text=self.paragraph), score=1.0)]


class OwnDocument(LangChainRetriever):
    """``OwnParagraph`` for LangChain: the paragraph of the question being asked, as a document."""

    paragraph: OwnParagraph

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        return [Document(page_content=self.paragraph.paragraph)]


def ways(engine: SACEngine, retriever: OwnParagraph) -> dict[str, Callable[[str], str]]:
    """Each way of answering a question, by its row's method name."""
    return {**llamaindex_ways(engine, retriever), **langchain_ways(engine, retriever)}


def llamaindex_ways(engine: SACEngine, retriever: OwnParagraph) -> dict[str, Callable[[str], str]]:
    postprocessors = [SACNodePostprocessor(engine=engine)]
    generic = SACLLM(engine=engine, messages_to_prompt=generic_messages_to_prompt)
    llm = SACLLM(engine=engine)

    def chat(llm: SACLLM, **options) -> Callable[[str], str]:
        return lambda question: str(ContextChatEngine.from_defaults(
            retriever=retriever, llm=llm, node_postprocessors=postprocessors, **options).chat(question))

    query_engine = RetrieverQueryEngine.from_args(retriever, llm=llm, node_postprocessors=postprocessors,
                                                  text_qa_template=llm.qa_prompt)
    return {
        "llamaindex-chat-generic-layout": chat(generic),
        "llamaindex-chat-sac-layout": chat(llm),
        "llamaindex-chat-sac-layout+context-template": chat(llm, context_template=llm.chat_context_template),
        "llamaindex-query-engine": lambda question: str(query_engine.query(question)),
    }


def langchain_ways(engine: SACEngine, paragraph: OwnParagraph) -> dict[str, Callable[[str], str]]:
    retriever = ContextualCompressionRetriever(base_compressor=SACContextCompressor(engine=engine),
                                               base_retriever=OwnDocument(paragraph=paragraph))

    def chain(llm: ChatSAC, prompt) -> Callable[[str], str]:
        answer = create_stuff_documents_chain(llm, prompt, document_prompt=SAC_DOCUMENT_PROMPT, document_separator="")
        retrieval = create_retrieval_chain(retriever, answer)
        return lambda question: retrieval.invoke({"input": question, "chat_history": []})["answer"]

    with_history = ChatPromptTemplate.from_messages(WITH_HISTORY)
    stuff = create_retrieval_chain(retriever, create_sac_stuff_chain(ChatSAC(engine=engine),
                                                                     langchain_qa_prompt(question_key="input")))
    return {
        "langchain-history-as-written": chain(ChatSAC(engine=engine, chat_template=False), with_history),
        "langchain-history-sac-layout": chain(ChatSAC(engine=engine, chat_template="sac"), with_history),
        "langchain-stuff-chain": lambda question: stuff.invoke({"input": question})["answer"],
    }


def answer_all(answer: Callable[[str], str], retriever: OwnParagraph, questions: list[Question],
               name: str) -> list[str]:
    answers = []
    for question in tqdm(questions, desc=name, unit="question"):
        retriever.paragraph = question.context
        answers.append(answer(question.question).strip())
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_subset_arguments(parser, n_default=200)
    parser.add_argument("--compressor", default=DEFAULT_COMPRESSOR, help="short name or directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="benchmarks/results/chat_layouts.jsonl")
    args = parser.parse_args(argv)
    check_results_file(args.results)
    questions = subset_questions(args)  # before the model loads: a bad --data-root fails at once
    torch.set_num_threads(args.threads)
    engine = SACEngine.shared(args.compressor, None, dtype=args.dtype)
    engine.compressor.recommended_decoding = {}  # every way answers greedily, as its recorded rows did
    retriever = OwnParagraph()
    command = shlex.join(["python", "benchmarks/chat_layouts.py", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    for name, answer in ways(engine, retriever).items():
        start = time.time()
        predictions = answer_all(answer, retriever, questions, name)
        rows.append({"method": name, "ratio": engine.compressor.config.ratio, "dataset": args.dataset,
                     "n": len(questions), "seed": args.seed,
                     **headline_scores(predictions, [q.answers for q in questions]),  # in percent
                     "empty_answers": sum(p in EMPTY for p in predictions),
                     "compressor": args.compressor, "compressor_fingerprint": engine.compressor.fingerprint,
                     "dtype": args.dtype, "seconds": round(time.time() - start, 1),
                     "command": command})
        print(f"{name}: {headline_text(rows[-1])}, {rows[-1]['empty_answers']} empty", flush=True)
    append_jsonl(args.results, rows)


if __name__ == "__main__":
    main()
