"""Precompress a corpus offline, then answer questions from the store alone (no framework).

    python examples/precompress_and_serve.py [--docs examples/demo_corpus] [--questions FILE] [--store DIR] [-k 3]

Offline, once: every chunk of the corpus is compressed into an anchor store, r times smaller than
the chunks' full K/V. The same job from the command line (resumable, shardable, see --help; it
stores every .txt/.md file of the folder unless told otherwise, so leave questions.txt out as this
example does; serve that store with --store runs/examples/demo_corpus.store):

    python -m sac_rag.precompress --corpus examples/demo_corpus --exclude questions.txt \\
        --store runs/examples/demo_corpus.store

Online, per question: the store holds the data. A retrieval index is built from its entries'
texts (MiniLM embeddings), the K/V of the top-k entries are loaded from the store, and the
decoder answers from them; then once more from the entries' full text, for comparison. The
corpus is read (not compressed) only to know which entries are its chunks now: entries are keyed
by their chunk's text, so after a document is edited the store also holds the entries of its old
text, and those are not served.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from _common import (
    corpus_chunks,
    embedding_path,
    load_compressor,
    parse_args,
    precompress_corpus,
    print_expectations,
    run,
    timed_stream,
)
from sentence_transformers import SentenceTransformer

from sac_rag import SAC, GenerationConfig, SACCompressor
from sac_rag.precompress import Summary
from sac_rag.store import AnchorStore


def offline(args: argparse.Namespace, compressor: SACCompressor) -> Summary:
    """The batch job: corpus -> chunks -> anchor K/V -> store. Stored chunks are skipped."""
    return precompress_corpus(args, compressor)


def serve(args: argparse.Namespace, compressor: SACCompressor) -> list[dict]:
    """Answer the questions from the store: retrieve entries by their text, load their K/V."""
    store = AnchorStore.open(args.store, compressor.fingerprint, readonly=True, cache_bytes=0)  # no cache: real loads
    current = {c.key for c in corpus_chunks(args, compressor)}
    keys = [k for k in store.keys() if k in current]
    texts = [store.metadata(k)["text"] for k in keys]
    embedder = SentenceTransformer(embedding_path(), device="cpu")
    vectors = embedder.encode(texts, normalize_embeddings=True)
    config = GenerationConfig(max_new_tokens=args.max_tokens, stop=("\n",), extractive=args.extractive)
    sac = SAC(compressor)
    # Warm-up, decoding as the questions will (with --extractive that builds the vocabulary's byte trie
    # once): no cold start in the timings.
    sac.generator.generate(sac.prompt("Hello", []), replace(config, max_new_tokens=1),
                           ["Hello"] if args.extractive else None)
    print(f"serving {len(keys)} entries from {store.path}"
          + (f" ({len(store) - len(keys)} others, not chunks of {args.docs} now, are not served)"
             if len(store) > len(keys) else "") + "\n")
    print_expectations(args)

    results = []
    for question in args.question_list:
        top = np.argsort(-(vectors @ embedder.encode(question, normalize_embeddings=True)))[:args.k]
        start = time.perf_counter()
        kvs = store.get_many([keys[i] for i in top])  # AnchorKV per entry, chunk-local (offset 0)
        load = time.perf_counter() - start
        sources = [texts[i] for i in top]  # what an extractive answer may quote
        answer, ttft = timed_stream(sac.generator.stream(sac.prompt(question, kvs), config,
                                                         sources if args.extractive else None))
        full_answer, full_ttft = timed_stream(sac.stream(question, sources, full_text=True, config=config))
        tokens, anchors = sum(kv.n_tokens for kv in kvs), sum(kv.n_anchors for kv in kvs)
        print(f"Q: {question}\nA: {answer.strip()}   [full text: {full_answer.strip()}]")
        print(f"   loaded {len(kvs)} entries ({sum(kv.nbytes for kv in kvs) / 1e6:.2f} MB: {anchors} K/V entries "
              f"for {tokens} tokens) in {load * 1000:.1f} ms")
        print(f"   time to first token: {ttft * 1000:.0f} ms from the caches vs {full_ttft * 1000:.0f} ms "
              f"from the full text\n")
        results.append({"question": question, "answer": answer, "full_text_answer": full_answer,
                        "keys": [keys[i] for i in top], "load": load, "ttft": ttft, "full_text_ttft": full_ttft})
    store.close()
    return results


def main(argv: list[str] | None = None) -> tuple[Summary, list[dict]]:
    args = parse_args(__doc__, argv)
    compressor = load_compressor()  # the packaged SAC compressor on SmolLM2-135M
    return offline(args, compressor), serve(args, compressor)


if __name__ == "__main__":
    run(main)
