"""End-to-end RAG on SQuAD dev through the LangChain chain: SAC caches vs full text.

    python benchmarks/rag_squad.py --n 500            # rows -> benchmarks/results/rag.jsonl

The corpus is every paragraph of SQuAD v1.1 dev (2,067 distinct), precompressed once into an
anchor store (reused on reruns). For each question of a fixed seeded subset (the same nested
subsets as ``python -m sac_rag.eval``), the top-k paragraphs by MiniLM embeddings in a faiss
index (LangChain's ``FAISS`` + ``HuggingFaceEmbeddings``) are answered through
``create_stuff_documents_chain`` four ways:

* ``rag-sac``: ``ContextualCompressionRetriever(SACContextCompressor)`` + ``SACLLM``: the
  decoder reads the stored caches (``on_miss="error"``: every chunk must come from the store);
* ``rag-full-text``: the same documents' text read by the frozen LLM (``SACLLM`` reads
  text-only prompts with the plain model);
* ``rag-full-ft``: the same text read by the QA-trained decoder LoRA (the upper bound);
* ``rag-text-truncate-5x+fullft-decoder``: each document cut to its first 1/r tokens (the same
  budget as SAC's anchors), read by that decoder: the strongest peer on SQuAD dev;
* ``rag-kv-dropping-5x`` / ``rag-kv-dropping-5x+fullft-decoder``: untrained uniform KV dropping
  of each retrieved document (the frozen model's K/V of every r-th token), read by the frozen
  or the QA-trained decoder. These go through ``sac_rag.eval``'s methods on the same retrieved
  documents, in the same prompt layout, rather than through a LangChain chain.

``--export-retrieval`` writes each question's retrieved paragraphs as JSON lines, which
``benchmarks/kvpress/run_kvpress.py --dataset squad-dev-rag`` reads to run the kvpress presses
in the same setting (its venv has no faiss).

Scores are standard SQuAD EM/F1 (and the paper's ROUGE-1 / raw EM) with bootstrap CIs; the
per-question predictions are cached under ``benchmarks/results/predictions`` so a run resumes.
Costs, measured in the same run: time to first token from the question (retrieval, and the
store lookups for SAC, included) at batch size 1 on the first ``--timing-samples`` questions;
what the LLM read for every question (text tokens vs cached entries, from LangChain usage
metadata, counted with one-token answers); and recall@k of the retriever.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_classic.chains.combine_documents import create_stuff_documents_chain  # noqa: E402
from langchain_classic.retrievers import ContextualCompressionRetriever  # noqa: E402
from langchain_community.vectorstores import FAISS  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models import BaseLLM  # noqa: E402
from langchain_core.outputs import Generation as LCGeneration  # noqa: E402
from langchain_core.outputs import GenerationChunk, LLMResult  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnablePassthrough  # noqa: E402
from langchain_huggingface import HuggingFaceEmbeddings  # noqa: E402
from langchain_sac import SACLLM, SACContextCompressor, create_sac_stuff_chain, sac_qa_prompt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from sac_rag import DEFAULT_COMPRESSOR, GenerationConfig, Generator, SACCompressor  # noqa: E402
from sac_rag.errors import InvalidInputError, exit_with_message  # noqa: E402
from sac_rag.eval import (  # noqa: E402
    TextShortener,
    adapter_fingerprint,
    answer_config,
    at_least,
    build_method,
    check_results_file,
    claim_predictions,
    dataset_path,
    decoder_adapter_problem,
    decoding_suffix,
    kv_entry_bytes,
    load_decoder_adapter,
    load_questions,
    prediction_cache,
    prediction_settings,
    read_predictions,
    run,
)
from sac_rag.files import append_jsonl, atomic_write, open_for_appending  # noqa: E402
from sac_rag.handles import contexts_part  # noqa: E402
from sac_rag.metrics import summarize  # noqa: E402
from sac_rag.models import embedding_model_path, load_base_model  # noqa: E402
from sac_rag.precompress import precompress  # noqa: E402
from sac_rag.store import AnchorStore  # noqa: E402

logger = logging.getLogger("rag_squad")
RAG_METHODS = ("sac", "full_text", "full_ft", "truncate_ft", "kv_dropping", "kv_dropping_ft")


class UsageTotals(BaseCallbackHandler):
    """Sums what the LLM read over every call: text tokens and cached K/V entries."""

    def __init__(self) -> None:
        self.input_tokens = self.cache_read = self.calls = 0

    def on_llm_end(self, response, **kwargs) -> None:
        usage = (response.llm_output or {}).get("token_usage", {})
        self.input_tokens += usage.get("input_tokens", 0)
        self.cache_read += usage.get("input_token_details", {}).get("cache_read", 0)
        self.calls += len(response.generations)


class FullFTLLM(BaseLLM):
    """The Full-FT upper bound as a LangChain LLM: the QA-trained decoder LoRA reading full text,
    through sac_rag's ``Generator`` (the decoding code path every other row uses)."""

    generator: Any
    template: Any  # the prompt layout, whose contexts section extractive answers quote
    max_tokens: int = 32
    extractive: bool = False  # answers quote the documents it reads as text, not the question
    num_beams: int = 1
    mbr: bool = False

    @property
    def _llm_type(self) -> str:
        return "sac-full-ft"

    def _config(self, stop):
        return GenerationConfig(max_new_tokens=self.max_tokens, stop=tuple(stop or ("\n",)),
                                extractive=self.extractive, num_beams=self.num_beams, mbr=self.mbr)

    def _sources(self, prompt: str) -> list[str] | None:
        """What an extractive answer may quote: the prompt's contexts section, as SACLLM allows."""
        return [contexts_part(prompt, self.template)] if self.extractive else None

    def _generate(self, prompts, stop=None, run_manager=None, **kwargs) -> LLMResult:
        sources = [self._sources(p) for p in prompts] if self.extractive else None
        results = self.generator.generate_batch(prompts, self._config(stop), sources)
        read = sum(r.text_tokens for r in results)
        return LLMResult(generations=[[LCGeneration(text=r.text)] for r in results],
                         llm_output={"token_usage": {"input_tokens": read, "input_token_details": {"cache_read": 0}}})

    def _stream(self, prompt, stop=None, run_manager=None, **kwargs) -> Iterator[GenerationChunk]:
        for piece in self.generator.stream(prompt, self._config(stop), self._sources(prompt)):
            yield GenerationChunk(text=piece)


def full_ft_llm(adapter: str, template, max_tokens: int, extractive: bool = False, dtype: str = "bfloat16",
                base_model: str = "smollm2-135m", num_beams: int = 1, mbr: bool = False) -> FullFTLLM:
    """The Full-FT decoder on ``base_model`` (the compressor's: every row of a run reads the same
    model). An adapter trained on another base model is refused naming both (``load_decoder_adapter``)."""
    model, tokenizer = load_base_model(base_model, dtype=dtype)
    generator = Generator(model, tokenizer)  # the plain model's fingerprint, before the adapter wraps it
    decoder = load_decoder_adapter(model, adapter, base_model, generator.base_fingerprint)
    return FullFTLLM(generator=Generator(decoder, tokenizer, base_fingerprint=generator.base_fingerprint),
                     template=template, max_tokens=max_tokens, extractive=extractive, num_beams=num_beams, mbr=mbr)


def store_documents(store_path: Path) -> list[Document]:
    """Every chunk of the store as a LangChain document (its text and provenance)."""
    with AnchorStore.open(store_path, readonly=True) as store:
        docs = []
        for key in store.keys():
            meta = store.metadata(key)
            docs.append(Document(page_content=meta["text"], id=meta["chunk_id"],
                                 metadata={"doc_id": meta["doc_id"], "title": meta["doc"].get("title")}))
    return sorted(docs, key=lambda d: d.id)


def answer_all(name, chain, inputs, questions, cache_path: Path, batch_size: int) -> dict:
    done = read_predictions(cache_path)
    todo = [i for i, q in enumerate(questions) if q.id not in done]
    with open_for_appending(cache_path) as cache, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                              desc=name, unit="q") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            answers = chain.batch([inputs[i] for i in batch])
            for i, answer in zip(batch, answers):
                done[questions[i].id] = answer.strip()
                cache.write(json.dumps({"id": questions[i].id, "prediction": done[questions[i].id]}) + "\n")
            cache.flush()
            bar.update(len(batch))
    return summarize([done[q.id] for q in questions], [q.answers for q in questions])


def recall_at_k(questions, retrieved: list[list[Document]]) -> float:
    """Share of questions whose gold paragraph is among their retrieved documents: one of them is
    (a chunk of) it. A document of blank text is no hit (it is a substring of every paragraph)."""
    if not questions:
        return 0.0
    hits = sum(any(d.page_content.strip() and d.page_content.strip() in q.context for d in found)
               for q, found in zip(questions, retrieved, strict=True))
    return hits / len(questions)


def export_retrieval(path: str, questions, retrieved: list[list[Document]]) -> None:
    """``{"id", "passages"}`` JSON lines, one per question, written whole or not at all: a run killed
    while writing leaves no file that run_kvpress.py would read as fewer questions."""
    lines = [json.dumps({"id": q.id, "passages": [d.page_content for d in found]}) + "\n"
             for q, found in zip(questions, retrieved, strict=True)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(lines).encode())


def check_inputs(args: argparse.Namespace) -> Path:
    """Refuse, before any model loads, what would fail only after minutes of work: the SQuAD file
    (returned), the results file, the Full-FT adapter of the methods that read it, the retrieval file."""
    squad = dataset_path(args.data_root, "squad-dev")
    check_results_file(args.results)
    readers = [m for m in args.methods.split(",") if m in ("full_ft", "truncate_ft", "kv_dropping_ft")]
    if readers and not Path(args.full_ft_adapter).is_dir():
        raise InvalidInputError(f"--full-ft-adapter {args.full_ft_adapter} is not a folder, and {', '.join(readers)} "
                                "read it: name the Full-FT decoder LoRA, or leave those out of --methods")
    problem = decoder_adapter_problem(args.full_ft_adapter) if readers else None
    if problem:
        raise InvalidInputError(f"--full-ft-adapter {args.full_ft_adapter} {problem}, and {', '.join(readers)} read "
                                "it: name the Full-FT decoder LoRA, or leave those out of --methods")
    if args.export_retrieval and Path(args.export_retrieval).is_dir():
        raise InvalidInputError(f"--export-retrieval {args.export_retrieval} is a folder: name a .jsonl file "
                                "(the retrieved paragraphs are written to it)")
    return squad


def one_token_reader(reader: BaseLLM | None) -> BaseLLM | None:
    """``reader`` answering one greedy token: the prompt it reads, and so its usage counts, are
    the same as when it answers in full, at the cost of a prefill."""
    if reader is None:
        return None
    return reader.model_copy(update={"max_tokens": 1, "num_beams": 1, "mbr": False})


def time_to_first_token(chain, inputs) -> list[float]:
    seconds = []
    for item in inputs:
        t0 = time.perf_counter()
        for _ in chain.stream(item):
            seconds.append(time.perf_counter() - t0)
            break
    return seconds


def time_to_answer(chain, inputs) -> list[float]:
    """Seconds from the question to the whole answer, one question at a time (what a decoding
    with beams costs beyond its first token)."""
    seconds = []
    for item in inputs:
        t0 = time.perf_counter()
        chain.invoke(item)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=at_least(0), default=500, help="seeded question subset size (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=at_least(1), default=3, help="paragraphs retrieved per question")
    parser.add_argument("--compressor", default=DEFAULT_COMPRESSOR)
    parser.add_argument("--label", help="row name of the sac method (default rag-sac-<ratio>x); name a "
                        "candidate compressor's row so that it does not replace the shipped one's")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--store", default="runs/squad-dev.store", help="anchor store (created if missing)")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--max-new-tokens", type=at_least(1), default=32)
    parser.add_argument("--extractive", action="store_true", help="every method answers with a verbatim span of "
                        "what it reads (sac_rag.extractive); rows and predictions get an -extractive suffix")
    parser.add_argument("--num-beams", type=at_least(1), default=1,
                        help="beam search for every LLM-chain method (SAC, full text, Full-FT, truncation); rows "
                        "and predictions get a -beamN suffix")
    parser.add_argument("--mbr", action="store_true", help="of the finished beams, the answer with the highest "
                        "expected F1 against the others (minimum Bayes risk; needs --num-beams > 1); suffix -mbr")
    parser.add_argument("--timing-samples", type=at_least(1), default=10,
                        help="questions timed at batch size 1 (the tokens read are counted over every question)")
    parser.add_argument("--methods", default=",".join(RAG_METHODS),
                        help="comma-separated: sac, full_text, full_ft, truncate_ft (each document cut to its first "
                             "1/ratio tokens, read by the Full-FT decoder: the strongest peer at the same budget), "
                             "kv_dropping, kv_dropping_ft (untrained uniform KV dropping, frozen / Full-FT decoder)")
    parser.add_argument("--export-retrieval", help="write {id, passages} JSON lines of the retrieved paragraphs here "
                        "(input of run_kvpress.py --dataset squad-dev-rag)")
    parser.add_argument("--full-ft-adapter", default="benchmarks/checkpoints/full-ft-smollm2-135m-squad",
                        help="decoder LoRA trained on full-text QA (the full_ft upper bound)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="models' dtype: bfloat16 (the committed rows'), or float32, much faster on CPUs "
                             "without native bf16; predictions in another dtype are cached apart")
    parser.add_argument("--results", default="benchmarks/results/rag.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # settings that do not combine (--mbr without beams, --extractive with them): refused before any work
        answer_config(args.max_new_tokens, extractive=args.extractive, num_beams=args.num_beams, mbr=args.mbr)
    except InvalidInputError as err:
        parser.error(str(err))
    unknown = set(args.methods.split(",")) - set(RAG_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: choose from {', '.join(RAG_METHODS)}")
    command = "python benchmarks/rag_squad.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    squad = check_inputs(args)
    compressor = SACCompressor.from_pretrained(args.compressor, dtype=args.dtype)
    summary = precompress(squad, args.store, compressor)  # skips what the store already holds
    docs = store_documents(Path(args.store))
    logger.info("%d chunks of %d paragraphs in %s", len(docs), summary.documents, args.store)

    t0 = time.perf_counter()
    embeddings = HuggingFaceEmbeddings(model_name=embedding_model_path("all-minilm-l6-v2"),
                                       model_kwargs={"device": "cpu"}, encode_kwargs={"normalize_embeddings": True})
    retriever = FAISS.from_documents(docs, embeddings).as_retriever(search_kwargs={"k": args.k})
    index_s = time.perf_counter() - t0

    questions = load_questions(squad, args.n, args.seed)
    t0 = time.perf_counter()
    retrieved = retriever.batch([q.question for q in questions])
    retrieval_s = (time.perf_counter() - t0) / len(questions)
    recall = recall_at_k(questions, retrieved)
    if args.export_retrieval:
        export_retrieval(args.export_retrieval, questions, retrieved)

    llm = SACLLM(compressor=compressor, store=args.store, max_tokens=args.max_new_tokens, stop=["\n"],
                 extractive=args.extractive, num_beams=args.num_beams, mbr=args.mbr)
    sac_retriever = ContextualCompressionRetriever(
        base_compressor=SACContextCompressor(compressor=compressor, store=args.store, on_miss="error"),
        base_retriever=retriever)
    template = llm.prompt_template
    ratio = compressor.config.ratio

    def text_chain(reader):  # documents read as text, in the same prompt layout
        return create_stuff_documents_chain(reader, sac_qa_prompt(template),
                                            document_prompt=PromptTemplate.from_template("{page_content}"),
                                            document_separator=template.context_separator)

    def method_chains(sac_reader, full_ft_reader) -> dict:  # method -> (retriever, documents chain)
        chains = {"sac": (sac_retriever, create_sac_stuff_chain(sac_reader)),
                  "full_text": (retriever, text_chain(sac_reader))}
        if full_ft_reader is not None:  # one Full-FT decoder for both
            shorten = TextShortener(compressor.tokenizer, ratio, "text_truncate")
            truncated = RunnableLambda(lambda docs: [d.model_copy(update={"page_content": shorten(d.page_content)})
                                                     for d in docs])
            chains["full_ft"] = (retriever, text_chain(full_ft_reader))
            chains["truncate_ft"] = (retriever | truncated, text_chain(full_ft_reader))
        return chains

    full_ft = None
    if {"full_ft", "truncate_ft"} & set(args.methods.split(",")):
        full_ft = full_ft_llm(args.full_ft_adapter, template, args.max_new_tokens, args.extractive, args.dtype,
                              compressor.config.base_model, args.num_beams, args.mbr)
    chains = method_chains(llm, full_ft)
    counting_chains = method_chains(*(one_token_reader(reader) for reader in (llm, full_ft)))
    entry_bytes = kv_entry_bytes(compressor.base_model, compressor.dtype)  # K/V held per prompt position
    common = {"seed": args.seed, "k": args.k, "recall_at_k": recall, "retrieval_s": retrieval_s,
              "corpus_chunks": len(docs), "decoding": "extractive" if args.extractive else "free",
              "num_beams": args.num_beams, "mbr": args.mbr, "dtype": args.dtype, "command": command}
    suffix = decoding_suffix(extractive=args.extractive, num_beams=args.num_beams, mbr=args.mbr)
    for name in args.methods.split(","):
        if name in ("kv_dropping", "kv_dropping_ft"):
            reading = [replace(q, passages=tuple(d.page_content for d in found))
                       for q, found in zip(questions, retrieved)]
            write_row(args.results, eval_method_row(name, reading, compressor.config.base_model, ratio, args, common))
            continue
        method_retriever, chain = chains[name]
        label = {"sac": args.label or f"rag-sac-{ratio}x",
                 "truncate_ft": f"rag-text-truncate-{ratio}x+fullft-decoder"}.get(name, f"rag-{name.replace('_', '-')}")
        label += suffix
        found = method_retriever.batch([q.question for q in questions])
        inputs = [{"context": docs, "question": q.question} for q, docs in zip(questions, found)]
        cache = prediction_cache(args.results, label, compressor if name == "sac" else None, args.dtype,
                                 f"squad-dev-top{args.k}", len(questions), args.seed)
        reads_adapter = name in ("full_ft", "truncate_ft")
        claim_predictions(cache, {"method": name, "ratio": ratio, "base_model": compressor.base_fingerprint,
                                  "adapter": adapter_fingerprint(args.full_ft_adapter) if reads_adapter else None,
                                  "max_new_tokens": args.max_new_tokens, "extractive": args.extractive,
                                  **({"num_beams": args.num_beams, "mbr": args.mbr} if args.num_beams > 1 else {})},
                          other_file="give this run another --label" if name == "sac" else
                          f"--label names only the sac row: leave {name} out of --methods (the row of the run that "
                          "made that file stands), or pass --results in another folder")
        scores = answer_all(label, chain, inputs, questions, cache, args.batch_size)

        # Costs at batch size 1, from the question: retrieval (+ store lookups for SAC) + prefill.
        end_to_end = {"context": method_retriever, "question": RunnablePassthrough()} | chain
        ttft = time_to_first_token(end_to_end, [q.question for q in questions[:args.timing_samples]])
        answer_s = time_to_answer(end_to_end, [q.question for q in questions[:args.timing_samples]])
        read_usage = UsageTotals()  # what the LLM read for every question: the prompts of one-token answers
        counting_chains[name][1].batch(inputs, config={"callbacks": [read_usage]})
        row = {
            "method": label, "ratio": ratio if name in ("sac", "truncate_ft") else 1,
            "dataset": f"squad-dev-rag-top{args.k}",
            "n": scores.pop("n"), **scores,
            "ttft_s": statistics.median(ttft), "answer_s": statistics.median(answer_s),
            "text_tokens_per_query": (read_usage.input_tokens - read_usage.cache_read) / max(1, read_usage.calls),
            "cached_entries_per_query": read_usage.cache_read / max(1, read_usage.calls),
            "kv_bytes_per_query": entry_bytes * read_usage.input_tokens / max(1, read_usage.calls),
            "timing_samples": len(ttft), "reads_counted": read_usage.calls, "index_build_s": index_s,
            "compressor": args.compressor,
            "compressor_fingerprint": compressor.fingerprint if name == "sac" else None, **common,
        }
        write_row(args.results, row)
    return 0


def eval_method_row(name: str, questions, base_model: str, ratio: int, args, common: dict) -> dict:
    """A ``sac_rag.eval`` method on the retrieved passages: scores, and TTFT from the question
    (retrieval, compressing the passages, prefill) at batch size 1."""
    adapter = args.full_ft_adapter if name.endswith("_ft") else None
    method = build_method("kv_dropping", base_model, ratio, None, None, args.dtype, adapter)
    label = (f"rag-kv-dropping-{ratio}x" + ("+fullft-decoder" if adapter else "")
             + decoding_suffix(extractive=args.extractive, num_beams=args.num_beams, mbr=args.mbr))
    cache = prediction_cache(args.results, label, method.compressor, args.dtype, f"squad-dev-top{args.k}",
                             len(questions), args.seed)
    config = answer_config(args.max_new_tokens, extractive=args.extractive, num_beams=args.num_beams, mbr=args.mbr)
    claim_predictions(cache, prediction_settings(method, config, adapter))
    scores = run(method, questions, f"squad-dev-rag-top{args.k}", args.batch_size, cache, config)
    ttft, read = [], []  # TTFT over the first --timing-samples questions; what was read over every one
    for index, q in enumerate(tqdm(questions, desc=f"{label}: reads", unit="question")):
        t0 = time.perf_counter()
        result = method.generator.generate(method.prompts([q])[0], GenerationConfig(max_new_tokens=1))
        if index < args.timing_samples:
            ttft.append(time.perf_counter() - t0 + common["retrieval_s"])
        read.append((result.text_tokens, result.cached_tokens))
    entries = statistics.mean(t + c for t, c in read)
    return {
        "method": label, "ratio": ratio, "dataset": f"squad-dev-rag-top{args.k}", "n": scores.pop("n"), **scores,
        "ttft_s": statistics.median(ttft), "text_tokens_per_query": statistics.mean(t for t, _ in read),
        "cached_entries_per_query": statistics.mean(c for _, c in read), "timing_samples": len(ttft),
        "reads_counted": len(read),
        "kv_bytes_per_query": kv_entry_bytes(method.generator.model, method.generator.dtype) * entries,
        "decoder_adapter": adapter, "compressor_fingerprint": method.compressor.fingerprint, **common,
    }


def write_row(results: str, row: dict) -> None:
    """Append the row (after dropping a line a killed write cut short: ``append_jsonl``) and print it."""
    append_jsonl(results, [row])
    print(json.dumps({k: row[k] for k in ("method", "n", "f1", "em", "ttft_s", "text_tokens_per_query",
                                          "cached_entries_per_query", "recall_at_k")}))


if __name__ == "__main__":
    exit_with_message(main)
