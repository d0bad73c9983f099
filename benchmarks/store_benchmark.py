"""What the anchor store and offline precompression cost, on the real SmolLM2-135M (bf16).

Measures, on the first N SQuAD v1.1 dev paragraphs (one chunk each):

1. bytes per chunk: stored anchor K/V vs the full K/V of the same chunk in the same dtype
   (the full K/V measured from a plain prefill's cache), and bytes on disk per entry;
2. precompression throughput (``sac_rag.precompress``, end to end: read, chunk, compress,
   write durably) vs plain prefill throughput of the same model on the same chunks with the
   same batch size and batching; runs alternate and the ratio is taken within each pair,
   because the machine is shared;
3. time to load k=5 entries (a new store object: open + index + read + checksum + decode;
   and again from the in-process LRU) vs time to first token from those 5 chunks read as
   text, and from the 5 loaded caches;
4. fp8 / int8 storage: bytes, max / mean abs error of K and V vs native, and greedy answers
   (agreement with native, SQuAD F1/EM) on single-paragraph questions.

    nice -n 19 .venv/bin/python benchmarks/store_benchmark.py

Default compressor: untrained uniform KV dropping at ratio 5 (SACConfig lora_rank=0, causal,
no anchor embedding); ``--compressor DIR`` measures a trained one instead. Rows go to
``benchmarks/results/store.jsonl``, rewritten after each measurement (a run stopped midway
keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sac_rag import SACCompressor, SACConfig, load_base_model  # noqa: E402
from sac_rag.chunking import iter_chunks  # noqa: E402
from sac_rag.corpus import read_corpus  # noqa: E402
from sac_rag.data import read_qa  # noqa: E402
from sac_rag.errors import InvalidInputError, exit_with_message  # noqa: E402
from sac_rag.eval import at_least, check_results_file  # noqa: E402
from sac_rag.files import atomic_write  # noqa: E402
from sac_rag.generation import GenerationConfig, Generator  # noqa: E402
from sac_rag.metrics import squad_em, squad_f1  # noqa: E402
from sac_rag.precompress import WINDOW_BATCHES, load_compressed, precompress  # noqa: E402
from sac_rag.store import AnchorStore, merge  # noqa: E402

SQUAD_DEV = REPO.parent / "shared" / "data" / "squad-v1.1" / "dev-v1.1.json.xz"  # ../shared/data
DATASET = "squad-dev"  # SQuAD v1.1 dev, as in the other benchmark rows
K = 5


def read_paragraphs(path: Path, count: int) -> list:
    """The first ``count`` paragraphs of the SQuAD file at ``path`` (read before any model loads, so
    that a wrong path is refused at once); a file without any is refused."""
    paragraphs = read_qa(path)[:count]  # each with at least one question
    if not paragraphs:
        raise InvalidInputError(f"{path} holds no paragraph with a question: nothing to measure")
    return paragraphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SQUAD_DEV)
    parser.add_argument("--paragraphs", type=at_least(1), default=200)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--repeats", type=at_least(1), default=3, help="prefill/precompress pairs")
    parser.add_argument("--queries", type=at_least(1), default=10, help="k=5 load / TTFT measurements")
    parser.add_argument("--quality-questions", type=at_least(1), default=20, help="questions for fp8/int8 answers")
    parser.add_argument("--compressor", default=None, help="trained compressor directory (default: KV dropping)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "store.jsonl",
                        help="JSON-lines file of this run's rows (rewritten after each measurement)")
    args = parser.parse_args(argv)
    command = "python benchmarks/store_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    check_results_file(args.out)  # a folder or another kind of file: refused now, not after minutes
    paragraphs = read_paragraphs(args.data, args.paragraphs)
    torch.manual_seed(0)

    model, tokenizer = load_base_model("smollm2-135m", device="cpu", dtype="bfloat16")
    if args.compressor:
        compressor = SACCompressor.from_pretrained(args.compressor, model=model, tokenizer=tokenizer)
        method = f"sac:{Path(args.compressor).name}"
    else:
        config = SACConfig(base_model="smollm2-135m", ratio=5, lora_rank=0, bidirectional=False,
                           anchor_embedding="none")
        compressor = SACCompressor(config, model=model, tokenizer=tokenizer)
        method = "kv-dropping-untrained"  # uniform anchors, no adapter, causal
    ratio = compressor.config.ratio
    dataset = DATASET if args.data.resolve() == SQUAD_DEV.resolve() else str(args.data)  # what rows measured
    common = {"benchmark": "store", "method": method, "ratio": ratio, "dataset": dataset,
              "model": "smollm2-135m", "dtype": "bfloat16", "batch_size": args.batch_size,
              "fingerprint": compressor.fingerprint, "torch_threads": torch.get_num_threads(),
              "loadavg_1min_at_start": round(os.getloadavg()[0], 2),  # other work on the machine
              "note": "compare the ratios: each is measured within one run",
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command}
    rows = []

    def emit(row: dict) -> None:
        """Keep the row and rewrite the results file, so a run stopped midway keeps its rows."""
        rows.append(_rounded(row))
        print(json.dumps(rows[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, "".join(json.dumps(r) + "\n" for r in rows).encode())

    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(
            json.dumps({"id": f"{p.title}/{i}", "text": p.context, "title": p.title}) + "\n"
            for i, p in enumerate(paragraphs)))
        chunks = [c for d in read_corpus(corpus)
                  for c in iter_chunks(d.text, tokenizer, compressor.config.chunk_len, 0, d.id)]
        n_tokens = sum(c.n_tokens for c in chunks)
        print(f"{len(paragraphs)} paragraphs -> {len(chunks)} chunks, {n_tokens} tokens", flush=True)

        # -- 2. throughput: prefill and precompression, alternating ------------------------------
        prefill_full_kv_bytes = 0
        pairs = []
        store = None
        prefill(model, tokenizer, chunks[: args.batch_size], args.batch_size)  # warm-up
        for r in range(args.repeats):  # alternate which goes first
            store = tmp / f"store-{r}"
            if r % 2:
                summary = precompress(corpus, store, compressor, batch_size=args.batch_size, show_progress=False)
            prefill_s, prefill_full_kv_bytes = prefill(model, tokenizer, chunks, args.batch_size)
            if not r % 2:
                summary = precompress(corpus, store, compressor, batch_size=args.batch_size, show_progress=False)
            assert summary.compressed == len({c.key for c in chunks}), summary
            pairs.append((prefill_s, summary.seconds))
            print(f"repeat {r}: prefill {prefill_s:.1f} s, precompress {summary.seconds:.1f} s "
                  f"(ratio {prefill_s / summary.seconds:.2f})", flush=True)
        ratios = [p / c for p, c in pairs]
        emit({**common, "measure": "throughput", "n": len(chunks), "tokens": n_tokens,
                     "repeats": args.repeats,
                     "prefill_seconds": [round(p, 2) for p, _ in pairs],
                     "precompress_seconds": [round(c, 2) for _, c in pairs],
                     "prefill_tokens_per_s": round(n_tokens / statistics.median(p for p, _ in pairs), 1),
                     "precompress_tokens_per_s": round(n_tokens / statistics.median(c for _, c in pairs), 1),
                     "precompress_chunks_per_s": round(len(chunks) / statistics.median(c for _, c in pairs), 2),
                     "throughput_ratio_per_pair": [round(x, 3) for x in ratios],
                     "throughput_ratio_median": round(statistics.median(ratios), 3),
                     "precompress_includes": "corpus read, tokenization, chunking, compression, "
                                             "durable store writes (fsync)"})

        # -- 1. bytes ---------------------------------------------------------------------------
        with AnchorStore.open(store, compressor.fingerprint, readonly=True) as s:
            stats = s.stats()
        anchors = stats["anchors"]
        emit({**common, "measure": "bytes", "n": stats["entries"], "tokens": stats["tokens_represented"],
                     "anchors": anchors,
                     "kv_bytes_per_chunk": stats["kv_bytes_stored"] / stats["entries"],
                     "full_kv_bytes_per_chunk": prefill_full_kv_bytes / stats["entries"],
                     "full_kv_bytes_per_chunk_store_estimate": stats["full_kv_bytes"] / stats["entries"],
                     "kv_reduction": prefill_full_kv_bytes / stats["kv_bytes_stored"],
                     "expected_reduction_tokens_per_anchor": stats["tokens_represented"] / anchors,
                     "disk_bytes_per_entry": stats["entry_bytes"] / stats["entries"],
                     "disk_reduction_vs_full_kv": prefill_full_kv_bytes / stats["entry_bytes"],
                     "store_bytes_on_disk": stats["bytes_on_disk"]})

        # -- 3. loading k=5 entries vs time to first token ----------------------------------------
        emit({**common, **load_vs_ttft(compressor, store, paragraphs, chunks, args.queries)})

        # -- 4. fp8 / int8 storage: bytes and K/V error, then answers ----------------------------
        native = load_all(store)
        codec_stores = {"native": store}
        for codec in ("fp8", "int8"):
            path = codec_stores[codec] = tmp / f"store-{codec}"
            AnchorStore.create(path, compressor.fingerprint, ratio, "bfloat16", codec).close()
            merge(path, [store])  # re-encodes every entry
            with AnchorStore.open(path, readonly=True) as s:
                codec_stats = s.stats()
            emit({**common, "measure": f"storage_{codec}", "storage": codec, "n": codec_stats["entries"],
                  "kv_bytes_per_chunk": codec_stats["kv_bytes_stored"] / codec_stats["entries"],
                  "kv_bytes_per_chunk_native": stats["kv_bytes_stored"] / stats["entries"],
                  "disk_bytes_per_entry": codec_stats["entry_bytes"] / codec_stats["entries"],
                  "disk_bytes_per_entry_native": stats["entry_bytes"] / stats["entries"],
                  **kv_errors(native, load_all(path))})
        first_chunk = {}
        for c in chunks:
            first_chunk.setdefault(c.doc_id, c)
        questions = [(p.questions[0], first_chunk[f"{p.title}/{i}"]) for i, p in enumerate(paragraphs)
                     if f"{p.title}/{i}" in first_chunk][: args.quality_questions]
        native_answers = answer(compressor, store, questions)
        for codec, path in codec_stores.items():
            found = native_answers if codec == "native" else answer(compressor, path, questions)
            emit({**common, **quality_row(codec, found, native_answers, questions)})

    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


@torch.no_grad()
def prefill(model, tokenizer, chunks, batch_size: int) -> tuple[float, int]:
    """Plain prefill of the same chunks, batched like ``precompress`` (windows of
    ``WINDOW_BATCHES`` batches, sorted by length, right padding). Returns seconds and the
    bytes of the real K/V those chunks occupy (padding excluded)."""
    started = time.perf_counter()
    full_kv = 0
    window = batch_size * WINDOW_BATCHES
    for w in range(0, len(chunks), window):
        todo = sorted(chunks[w:w + window], key=lambda c: c.n_tokens)
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            width = max(c.n_tokens for c in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, c in enumerate(batch):
                ids[row, :c.n_tokens] = torch.as_tensor(c.token_ids)
                mask[row, :c.n_tokens] = 1
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            layer = out.cache.layers[0]
            per_token = len(out.cache.layers) * 2 * layer.keys.shape[1] * layer.keys.shape[3] \
                * layer.keys.element_size()
            full_kv += per_token * sum(c.n_tokens for c in batch)
    return time.perf_counter() - started, full_kv


def load_vs_ttft(compressor, store: Path, paragraphs, chunks, queries: int) -> dict:
    """Per query: 5 chunks (the question's paragraph and the next 4). Cold-ish load = a new
    store object (open, index query, mmap read, sha256, decode; the OS page cache is warm);
    warm = the same keys again (in-process LRU). TTFT = prefill + first greedy token, through
    the same ``Generator`` path for text and for cached contexts."""
    generator = Generator.from_compressor(compressor)
    first = GenerationConfig(max_new_tokens=1)
    template = compressor.template
    cold, warm, ttft_text, ttft_cached, text_tokens = [], [], [], [], []
    for q in range(queries + 1):  # query 0 warms up code paths and is dropped
        picked = [chunks[(q + j) % len(chunks)] for j in range(K)]
        question = paragraphs[q % len(paragraphs)].questions[0].question
        t0 = time.perf_counter()
        with AnchorStore.open(store, compressor.fingerprint, readonly=True) as s:
            kvs = load_compressed(s, picked)
            t1 = time.perf_counter()
            load_compressed(s, picked)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        as_text = generator.generate(template.build([c.text for c in picked], question), first)
        t4 = time.perf_counter()
        from_cache = generator.generate(template.build(kvs, question), first)
        t5 = time.perf_counter()
        if q == 0:
            continue
        cold.append(t1 - t0)
        warm.append(t2 - t1)
        ttft_text.append(t4 - t3)
        ttft_cached.append(t5 - t4)
        text_tokens.append(as_text.text_tokens)
        assert from_cache.context_tokens == sum(c.n_tokens for c in picked)
    med = statistics.median
    return {"measure": "load_k5_vs_ttft", "n": queries, "k": K,
            "context_tokens_median": med(text_tokens),
            "load_cold_ms": 1000 * med(cold), "load_warm_lru_ms": 1000 * med(warm),
            "ttft_text_ms": 1000 * med(ttft_text), "ttft_cached_ms": 1000 * med(ttft_cached),
            "ttft_saved_ms": 1000 * (med(ttft_text) - med(ttft_cached)),
            "load_cold_plus_ttft_cached_ms": 1000 * med(c + t for c, t in zip(cold, ttft_cached)),
            "speedup_text_vs_cold_load_plus_cached": med(ttft_text) / med(c + t for c, t in zip(cold, ttft_cached)),
            "load_cold_fraction_of_ttft_saved": med(cold) / (med(ttft_text) - med(ttft_cached))}


def load_all(path: Path) -> dict:
    with AnchorStore.open(path, readonly=True, cache_bytes=0) as s:
        return {k: s.get(k) for k in s.keys()}


def kv_errors(native: dict, decoded: dict) -> dict:
    out = {}
    for name in ("keys", "values"):
        diffs = [(getattr(decoded[k], name).float() - getattr(native[k], name).float()).abs() for k in native]
        ref = [getattr(native[k], name).float().abs() for k in native]
        out[f"{name}_max_abs_error"] = max(d.max().item() for d in diffs)
        out[f"{name}_mean_abs_error"] = sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs)
        out[f"{name}_mean_abs_value"] = sum(r.sum().item() for r in ref) / sum(r.numel() for r in ref)
    return out


def answer(compressor, store: Path, questions) -> list[str]:
    generator = Generator.from_compressor(compressor)
    config = GenerationConfig(max_new_tokens=12, stop=("\n",))
    kvs = load_compressed(store, [c for _, c in questions])
    return [generator.generate(compressor.template.build([kv], qa.question), config).text.strip()
            for kv, (qa, _) in zip(kvs, questions)]


def quality_row(storage: str, answers: list[str], native: list[str], questions) -> dict:
    golds = [qa.answers for qa, _ in questions]
    n = len(answers)
    return {"measure": f"answers_{storage}", "storage": storage, "n": n,
            "answers_identical_to_native": sum(a == b for a, b in zip(answers, native)) / n,
            "squad_f1": 100 * sum(squad_f1(a, g) for a, g in zip(answers, golds)) / n,
            "squad_em": 100 * sum(squad_em(a, g) for a, g in zip(answers, golds)) / n}


def _rounded(row: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


if __name__ == "__main__":
    exit_with_message(main)
