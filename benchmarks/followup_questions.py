"""Follow-up questions on SQuAD dev: LlamaIndex's condensing chat engine and LangChain's history-aware retriever.

    python benchmarks/followup_questions.py --n 150    # rows -> benchmarks/results/followup_questions.jsonl

``index.as_chat_engine()`` defaults to ``chat_mode="condense_plus_context"``: from the second turn
on, the LLM first rewrites the latest message into a standalone question, and the retriever
searches with that rewrite; LangChain's ``create_history_aware_retriever`` does the same with chat
messages. The rewrite prompt names no compressed context, so the base model
answers it (the decoder adapter reads caches only). This measures whether the rewrite helps, and
whether it helps more in the base model's chat template than as written.

Each conversation is built from SQuAD dev: two questions of one article that both name the
article's title as written (case-sensitive, so common nouns such as "teacher" do not qualify).
The first is the history, answered with its gold answer; the second is asked with the title
replaced by a pronoun ("When was the Rhine ..." -> "When was it ..."), so that it can only be
retrieved through the history (some read awkwardly where the name is part of a longer one: "Sky
Television" -> "it Television"; every way gets the same ones). The retriever searches all 2,067
dev paragraphs (MiniLM embeddings, faiss, top ``--k``); ``SACNodePostprocessor`` compresses what it
returns, and ``SACLLM`` answers the follow-up from those caches in the compressor's layout. Ways (rows):

* ``followup-as-asked``: no rewrite (``skip_condense=True``), the retriever reads the follow-up;
* ``condensed-as-written``: the rewrite prompt read as written (``SACLLM``'s default);
* ``condensed-chat-template``: the rewrite prompt as a user message of the base model's chat template
  (``SACLLM(completion_to_prompt=...)``, LlamaIndex's hook for it; the chats with caches stay in the
  compressor's layout);
* ``original-question`` (reference): no rewrite, the second question as SQuAD has it (title named);
* ``langchain-rewrite-sac-layout`` / ``langchain-rewrite-chat-template``: LangChain's conversational
  retrieval (``create_history_aware_retriever`` over ``SACContextCompressor`` and the same search, then
  ``create_retrieval_chain`` answering in the compressor's layout): ``ChatSAC`` rewrites the follow-up,
  its messages in the compressor's layout (``chat_template="sac"``, its default for them until
  2026-12-06) or in the base model's chat template (``chat_template=True``; its default now picks
  that for messages without compressed contexts).

Rows: recall@k of the second question's own paragraph and SQuAD EM/F1 of the answers (bootstrap CIs),
each against every other way, conversation by conversation (``paired``: mean difference and its
bootstrap CI), and a few rewrites for the eye.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from langchain_classic.chains import create_history_aware_retriever, create_retrieval_chain  # noqa: E402
from langchain_classic.chains.combine_documents import create_stuff_documents_chain  # noqa: E402
from langchain_classic.retrievers import ContextualCompressionRetriever  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder  # noqa: E402
from langchain_core.retrievers import BaseRetriever as LangChainRetriever  # noqa: E402
from langchain_sac import SAC_DOCUMENT_PROMPT, ChatSAC, SACContextCompressor  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage  # noqa: E402
from llama_index.core.chat_engine import CondensePlusContextChatEngine  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402
from llama_index.llms.sac import SACLLM  # noqa: E402
from llama_index.postprocessor.sac import SACNodePostprocessor  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sac_rag.data import Paragraph, read_qa  # noqa: E402
from sac_rag.eval import at_least, check_results_file, dataset_path  # noqa: E402
from sac_rag.files import append_jsonl  # noqa: E402
from sac_rag.handles import SACEngine  # noqa: E402
from sac_rag.metrics import bootstrap_ci, headline_scores, headline_text, paired_difference, score  # noqa: E402
from sac_rag.models import embedding_model_path  # noqa: E402
from sac_rag.pipeline import DEFAULT_COMPRESSOR  # noqa: E402

WAYS = ("followup-as-asked", "condensed-as-written", "condensed-chat-template", "original-question",
        "langchain-rewrite-sac-layout", "langchain-rewrite-chat-template")
# LangChain's conversational retrieval: the rewrite prompt (our words), and the answer's prompt with history
REWRITE = ChatPromptTemplate.from_messages([
    ("system", "Rewrite the user's last question so that it can be understood without the conversation. "
               "Do not answer it: write only the question."),
    MessagesPlaceholder("chat_history"), ("human", "{input}")])
WITH_HISTORY = [("system", "{context}"), MessagesPlaceholder("chat_history"), ("human", "{input}")]


@dataclass(frozen=True)
class Conversation:
    first: str  # the first question, the history
    first_answer: str  # its gold answer, as the assistant's turn
    followup: str  # the second question with the title replaced by a pronoun
    question: str  # the second question as SQuAD has it
    answers: tuple[str, ...]
    paragraph: int  # index of the second question's paragraph in the corpus


def title_name(title: str) -> str:
    """"Victoria_(Australia)" -> "Victoria": the article's name as questions write it."""
    return re.sub(r"\s*\(.*\)$", "", title.replace("_", " ")).strip()


def with_pronoun(question: str, name: str) -> str | None:
    """``question`` with ``name`` (and a "the" before it) replaced by "it" ("its" for "'s"); None if the
    name is not in it as written, or only opens it (a capital that may be a common noun's)."""
    pattern = re.compile(r"\b(?:[Tt]he )?" + re.escape(name) + r"\b('s|')?")
    match = pattern.search(question)
    if match is None or match.start() == 0:
        return None
    return pattern.sub(lambda m: "its" if m.group(1) else "it", question, count=1)


def conversations(paragraphs: list[Paragraph], n: int, seed: int) -> list[Conversation]:
    """``n`` seeded conversations (all when n is 0): pairs of questions of one article that both name
    its title, the second one asked with a pronoun."""
    by_title: dict[str, list[tuple[int, object]]] = {}
    for index, paragraph in enumerate(paragraphs):
        for qa in paragraph.questions:
            by_title.setdefault(paragraph.title, []).append((index, qa))
    rng = random.Random(seed)
    found = []
    for title, items in by_title.items():
        name = title_name(title)
        naming = [(i, qa) for i, qa in items if with_pronoun(qa.question, name) is not None]
        for position, (index, qa) in enumerate(naming[1:], start=1):
            _, first = naming[rng.randrange(position)]  # an earlier question of the article
            found.append(Conversation(first.question.strip(), first.answers[0], with_pronoun(qa.question, name).strip(),
                                      qa.question.strip(), tuple(qa.answers), index))
    rng.shuffle(found)
    return found[:n] if n else found


def in_chat_template(tokenizer) -> Callable[[str], str]:
    """A ``completion_to_prompt`` that puts the prompt in ``tokenizer``'s chat template, as a user message."""
    return lambda prompt: tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)


def paired(values: list[float], other: list[float]) -> list[float]:
    """[mean, low, high] of ``values`` minus ``other`` with its paired bootstrap 95% CI, rounded for a row."""
    return [round(x, 2) for x in paired_difference(values, other)]


class LangChainSearch(LangChainRetriever):
    """``EmbeddingRetriever`` for LangChain: the same search, its paragraphs as documents."""

    search: Any

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        return [Document(page_content=found.node.text) for found in self.search.retrieve(query)]


class EmbeddingRetriever(BaseRetriever):
    """The top ``k`` paragraphs by MiniLM cosine similarity (exact inner-product faiss index)."""

    def __init__(self, texts: list[str], k: int, batch_size: int = 64):
        super().__init__()
        self.texts, self.k = texts, k
        self.model = SentenceTransformer(embedding_model_path("all-minilm-l6-v2"), device="cpu")
        vectors = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.asarray(vectors, dtype=np.float32))
        self.last: list[int] = []  # what the last search found, and with what
        self.last_query = ""

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        self.last_query = query_bundle.query_str
        query = self.model.encode([query_bundle.query_str], normalize_embeddings=True)
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32), self.k)
        self.last = [int(i) for i in ids[0]]
        return [NodeWithScore(node=TextNode(id_=f"p{i}", text=self.texts[i]), score=float(s))
                for s, i in zip(scores[0], ids[0])]


def ways_of_asking(engine: SACEngine, retriever: EmbeddingRetriever,
                   max_tokens: int) -> dict[str, Callable[[Conversation], str]]:
    """Each way of asking a conversation's follow-up, by its row's method name: the answer. The retriever
    keeps what it last searched with and found."""
    tokenizer = engine.compressor.tokenizer
    as_written = SACLLM(engine=engine, max_tokens=max_tokens)
    templated = SACLLM(engine=engine, max_tokens=max_tokens, completion_to_prompt=in_chat_template(tokenizer))

    def llamaindex(llm: SACLLM, condense: bool, original: bool = False) -> Callable[[Conversation], str]:
        def answer(conversation: Conversation) -> str:
            chat = CondensePlusContextChatEngine.from_defaults(
                retriever, llm=llm, memory=llm.chat_memory(), context_prompt=llm.chat_context_template,
                node_postprocessors=[SACNodePostprocessor(engine=engine)], skip_condense=not condense)
            history = [ChatMessage(role="user", content=conversation.first),
                       ChatMessage(role="assistant", content=conversation.first_answer)]
            message = conversation.question if original else conversation.followup
            return str(chat.chat(message, chat_history=history)).strip()
        return answer

    def langchain(rewriter: ChatSAC) -> Callable[[Conversation], str]:
        documents = ContextualCompressionRetriever(base_compressor=SACContextCompressor(engine=engine),
                                                   base_retriever=LangChainSearch(search=retriever))
        answering = create_stuff_documents_chain(ChatSAC(engine=engine, max_tokens=max_tokens),
                                                 ChatPromptTemplate.from_messages(WITH_HISTORY),
                                                 document_prompt=SAC_DOCUMENT_PROMPT, document_separator="")
        chain = create_retrieval_chain(create_history_aware_retriever(rewriter, documents, REWRITE), answering)
        return lambda conversation: chain.invoke({
            "input": conversation.followup,
            "chat_history": [("human", conversation.first), ("ai", conversation.first_answer)]})["answer"].strip()

    return {
        "followup-as-asked": llamaindex(as_written, condense=False),
        "condensed-as-written": llamaindex(as_written, condense=True),
        "condensed-chat-template": llamaindex(templated, condense=True),
        "original-question": llamaindex(as_written, condense=False, original=True),
        "langchain-rewrite-sac-layout": langchain(ChatSAC(engine=engine, max_tokens=max_tokens, chat_template="sac")),
        "langchain-rewrite-chat-template": langchain(ChatSAC(engine=engine, max_tokens=max_tokens, chat_template=True)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=at_least(0), default=150, help="conversations (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=at_least(1), default=3, help="paragraphs retrieved per message")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--compressor", default=DEFAULT_COMPRESSOR, help="short name or directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=at_least(1), default=48)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--results", default="benchmarks/results/followup_questions.jsonl")
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    if set(ways) - set(WAYS):
        parser.error(f"unknown ways {sorted(set(ways) - set(WAYS))}: choose from {', '.join(WAYS)}")
    check_results_file(args.results)
    paragraphs = read_qa(dataset_path(args.data_root, "squad-dev"))
    chats = conversations(paragraphs, args.n, args.seed)
    torch.set_num_threads(args.threads)
    engine = SACEngine.shared(args.compressor, None, dtype=args.dtype)
    engine.compressor.recommended_decoding = {}  # every way answers greedily, as its recorded rows did
    tokenizer = engine.compressor.tokenizer
    templated = [way for way in ways if way.endswith("chat-template")]
    if templated and not getattr(tokenizer, "chat_template", None):
        parser.error(f"{args.compressor}'s tokenizer has no chat template: leave {', '.join(templated)} out of --ways")
    if not chats:
        parser.error(f"no conversation in {args.data_root}'s squad-dev: no two questions of one article there both "
                     "name its title, which a follow-up needs (a pronoun in place of the title in the second)")
    retriever = EmbeddingRetriever([p.context for p in paragraphs], args.k)
    answerers = ways_of_asking(engine, retriever, args.max_tokens)
    command = shlex.join(["python", "benchmarks/followup_questions.py", *(sys.argv[1:] if argv is None else argv)])
    golds = [list(c.answers) for c in chats]
    rows, per_way = [], {}
    for way in ways:
        start = time.time()
        answers, queries, hits = [], [], []
        for conversation in tqdm(chats, desc=way, unit="conversation"):
            answers.append(answerers[way](conversation))
            queries.append(retriever.last_query)
            hits.append(100.0 * (conversation.paragraph in retriever.last))
        per_way[way] = {"recall": hits, "f1": score(answers, golds)["f1"]}
        rows.append({"method": way, "ratio": engine.compressor.config.ratio, "dataset": "squad-dev-followups",
                     "n": len(chats), "seed": args.seed, "k": args.k, **headline_scores(answers, golds),
                     "recall_at_k": sum(hits) / len(hits), "recall_ci": list(bootstrap_ci(hits)),
                     "examples": [{"followup": c.followup, "query": q, "answer": a}
                                  for c, q, a in list(zip(chats, queries, answers))[:5]],
                     "compressor": args.compressor, "compressor_fingerprint": engine.compressor.fingerprint,
                     "dtype": args.dtype, "seconds": round(time.time() - start, 1),
                     "command": command})
        print(f"{way}: recall@{args.k} {rows[-1]['recall_at_k']:.1f}, {headline_text(rows[-1])}", flush=True)
    for row in rows:  # each way against each other, conversation by conversation
        row["paired"] = {other: {name: paired(per_way[row["method"]][name], values[name]) for name in values}
                         for other, values in per_way.items() if other != row["method"]}
        print(f"{row['method']} minus the others (recall@{args.k}, F1: mean and paired 95% CI): {row['paired']}")
    append_jsonl(args.results, rows)


if __name__ == "__main__":
    main()
