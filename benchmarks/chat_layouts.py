"""LlamaIndex chat engines on SQuAD dev: the layout a conversation reaches the model in.

    python benchmarks/llamaindex_chat.py --n 200     # rows -> benchmarks/results/llamaindex_chat.jsonl

Each question of the seeded subset (the same nested subsets as ``python -m sac_rag.eval``) opens a
fresh ``ContextChatEngine`` whose retriever returns the question's own paragraph as a node, compressed
on the fly by ``SACNodePostprocessor``, and is answered four ways:

* ``chat-generic-layout``: ``SACLLM`` with LlamaIndex's generic ``messages_to_prompt`` (``system: ...``
  then ``user: ...`` and ``assistant: ``), how SACLLM laid chats out before ``conversation_prompt``;
* ``chat-sac-layout``: SACLLM's default, the conversation in the compressor's layout
  (``PromptTemplate.conversation``), with LlamaIndex's default context template (its instruction is
  read as context too);
* ``chat-sac-layout+context-template``: the same with ``context_template=llm.chat_context_template``;
* ``query-engine``: a ``RetrieverQueryEngine`` with ``text_qa_template=llm.qa_prompt``, the reference.

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
from sac_rag.metrics import summarize  # noqa: E402
from sac_rag.pipeline import DEFAULT_COMPRESSOR  # noqa: E402

EMPTY = ("", "Empty Response")  # what LlamaIndex shows for an answer the model ended at once


class OwnParagraph(BaseRetriever):
    """Returns the paragraph of the question being asked (set before each question)."""

    def __init__(self):
        super().__init__()
        self.paragraph = ""

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [NodeWithScore(node=TextNode(text=self.paragraph), score=1.0)]


def ways(engine: SACEngine, retriever: OwnParagraph) -> dict[str, Callable[[str], str]]:
    """Each way of answering a question, by its row's method name."""
    postprocessors = [SACNodePostprocessor(engine=engine)]
    generic = SACLLM(engine=engine, messages_to_prompt=generic_messages_to_prompt)
    llm = SACLLM(engine=engine)

    def chat(llm: SACLLM, **options) -> Callable[[str], str]:
        return lambda question: str(ContextChatEngine.from_defaults(
            retriever=retriever, llm=llm, node_postprocessors=postprocessors, **options).chat(question))

    query_engine = RetrieverQueryEngine.from_args(retriever, llm=llm, node_postprocessors=postprocessors,
                                                  text_qa_template=llm.qa_prompt)
    return {
        "chat-generic-layout": chat(generic),
        "chat-sac-layout": chat(llm),
        "chat-sac-layout+context-template": chat(llm, context_template=llm.chat_context_template),
        "query-engine": lambda question: str(query_engine.query(question)),
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
    parser.add_argument("--results", default="benchmarks/results/llamaindex_chat.jsonl")
    args = parser.parse_args(argv)
    check_results_file(args.results)
    questions = subset_questions(args)  # before the model loads: a bad --data-root fails at once
    torch.set_num_threads(args.threads)
    engine = SACEngine.shared(args.compressor, None, dtype=args.dtype)
    retriever = OwnParagraph()
    command = shlex.join(["python", "benchmarks/llamaindex_chat.py", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    for name, answer in ways(engine, retriever).items():
        start = time.time()
        predictions = answer_all(answer, retriever, questions, name)
        scores = summarize(predictions, [q.answers for q in questions])
        rows.append({"method": name, "ratio": engine.compressor.config.ratio, "dataset": args.dataset,
                     "n": len(questions), "seed": args.seed, "f1": scores["f1"], "em": scores["em"],  # in percent
                     "f1_ci": scores["f1_ci"], "empty_answers": sum(p in EMPTY for p in predictions),
                     "compressor": args.compressor, "seconds": round(time.time() - start, 1), "command": command})
        print(f"{name}: F1 {rows[-1]['f1']:.1f} ({rows[-1]['f1_ci'][0]:.1f}-{rows[-1]['f1_ci'][1]:.1f}), "
              f"EM {rows[-1]['em']:.1f}, "
              f"{rows[-1]['empty_answers']} empty", flush=True)
    append_jsonl(args.results, rows)


if __name__ == "__main__":
    main()
