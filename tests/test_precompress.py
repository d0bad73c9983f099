"""Specification of offline precompression: corpus readers (incl. bad input), the token-aware
chunker, the precompression job (resume, sharding, crash safety, full disk) and loading stored
chunks back as decoder contexts. Runs on a tiny random Llama saved to disk, so child processes
can load the same compressor with ``--compressor DIR``.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _CORPUS, make_tiny_llama

from sac_rag import precompress as precompress_module
from sac_rag import store as store_module
from sac_rag.chunking import split_document
from sac_rag.compressor import SACCompressor
from sac_rag.config import SACConfig
from sac_rag.corpus import CorpusError, CorpusStats, read_corpus
from sac_rag.errors import FingerprintMismatchError, InvalidInputError
from sac_rag.generation import GenerationConfig, Generator
from sac_rag.models import load_base_model
from sac_rag.precompress import (
    load_compressed,
    main,
    precompress,
    resolve_shard,
    shard_from_env,
    shard_of,
    shard_store_path,
)
from sac_rag.store import AnchorStore, EntryNotFoundError, StoreWriteError, merge

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CHUNK = 32  # tokens per chunk (= the tiny compressor's chunk_len)
BATCH = 4
WORDS = " ".join(_CORPUS).split() + ["café", "naïve", "東京", "—", "\n\n"]
SHARD_ENV = ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID",
             "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tiny_sac(tmp_path_factory):
    """A tiny compressor saved as a directory (base model included): ``(directory, compressor)``."""
    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = make_tiny_llama()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model, tokenizer = load_base_model(str(root / "base"), dtype="float32")
    torch.manual_seed(1)
    config = SACConfig(base_model=str(root / "base"), ratio=4, chunk_len=CHUNK, lora_rank=0)
    SACCompressor(config, model=model, tokenizer=tokenizer).save_pretrained(root / "sac")
    return root / "sac", SACCompressor.from_pretrained(root / "sac", dtype="float32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Eight documents of about 30-110 tokens each, in a folder."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"doc{i}.txt").write_text(words(i, 20 + 8 * i), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sac, corpus):
    """An uninterrupted, unsharded run: ``(store path, summary)``."""
    path = tmp_path_factory.mktemp("reference") / "store"
    return path, precompress(corpus, path, tiny_sac[1], chunk_tokens=CHUNK, batch_size=BATCH,
                             show_progress=False)


def all_chunks(corpus: Path, tokenizer) -> dict[str, str]:
    """key -> text of every chunk of the corpus, computed independently of the job."""
    return {c.key: c.text for d in read_corpus(corpus)
            for c in split_document(d.text, tokenizer, CHUNK, 0, d.id)}


def stored(path: Path) -> dict:
    with AnchorStore.open(path, readonly=True, cache_bytes=0) as s:
        return {k: s.get(k) for k in s.keys()}


def answers(path: Path, compressor: SACCompressor, texts: list[str]) -> list[list[int]]:
    """Greedy answers from the stored chunks: each chunk alone, then all together."""
    generator = Generator.from_compressor(compressor)
    config = GenerationConfig(max_new_tokens=6)
    kvs = load_compressed(path, texts, compressor.fingerprint)
    prompts = [compressor.template.build([kv], "Which city?") for kv in kvs]
    prompts.append(compressor.template.build(kvs, "Which city?"))
    return [generator.generate(p, config).token_ids for p in prompts]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SHARD_ENV}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def cli_args(corpus: Path, store: Path, sac_dir: Path, *extra: str) -> list[str]:
    return ["--corpus", str(corpus), "--store", str(store), "--compressor", str(sac_dir),
            "--dtype", "float32", "--chunk-tokens", str(CHUNK), "--batch-size", str(BATCH),
            "--no-progress", *extra]


# -- corpus readers ---------------------------------------------------------------------------


def test_folder_corpus_reads_txt_and_md_recursively_in_path_order(tmp_path, caplog):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "two.md").write_text("# Two\nsecond")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.rst").write_text("not a corpus file type")
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    docs = list(read_corpus(tmp_path))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "first"), ("b/two.md", "# Two\nsecond")]
    assert docs[1].metadata == {"source": "b/two.md"}
    with caplog.at_level(logging.WARNING):
        kept = read_corpus(tmp_path, exclude={"b/two.md", "not/there.txt"})
        assert [d.id for d in kept] == ["a.txt"]
    assert "excluded but not in the corpus" in caplog.text and "not/there.txt" in caplog.text
    assert "b/two.md" not in caplog.text  # it was left out as asked


def test_empty_and_binary_files_are_skipped_with_a_logged_reason(tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text(" \n\t\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "utf16.txt").write_text("wide text", encoding="utf-16")
    (tmp_path / "ok.txt").write_text("kept")
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        docs = list(read_corpus(tmp_path, stats))
    assert [d.id for d in docs] == ["ok.txt"]
    assert stats.skipped == {"empty": 2, "binary (NUL bytes)": 2}
    assert "image.txt: binary" in caplog.text and "empty.txt: empty" in caplog.text


def test_non_utf8_text_is_decoded_with_replacement_by_default_or_skipped_on_request(tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        (doc,) = read_corpus(tmp_path, stats)
    assert doc.text == "caf\ufffd au lait" and stats.replaced_encoding == 1
    assert "latin1.txt is not valid UTF-8" in caplog.text
    (tmp_path / "ok.txt").write_text("kept")
    stats = CorpusStats()
    assert [d.id for d in read_corpus(tmp_path, stats, decode_errors="skip")] == ["ok.txt"]
    assert stats.skipped == {"not UTF-8": 1}


def test_lone_surrogates_in_a_records_id_or_metadata_are_replaced_too(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a\udc80", "text": "fine text", "tags": ["x\ud800"]}) + "\n")
    stats = CorpusStats()
    (doc,) = read_corpus(corpus, stats)
    assert (doc.id, doc.text, doc.metadata) == ("a\ufffd", "fine text", {"tags": ["x\ufffd"]})
    assert stats.replaced_encoding == 1
    stats = CorpusStats()
    with pytest.raises(CorpusError, match="no usable document"):
        list(read_corpus(corpus, stats, decode_errors="skip"))
    assert stats.skipped == {"not valid Unicode (lone surrogates)": 1}


def test_duplicate_documents_are_read_once_and_counted(tmp_path):
    for name in ("a.txt", "b.txt", "c/a-copy.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("the same words")
    (tmp_path / "d.txt").write_text("other words")
    stats = CorpusStats()
    assert [d.id for d in read_corpus(tmp_path, stats)] == ["a.txt", "d.txt"]
    assert (stats.documents, stats.duplicates) == (2, 2)


def test_jsonl_keeps_ids_and_metadata_and_skips_bad_lines(tmp_path):
    lines = [
        json.dumps({"id": "x1", "text": "alpha", "url": "http://a", "year": 2020}),
        json.dumps({"text": "beta"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": "  "}),
        json.dumps({"id": "x2", "text": "alpha"}),
        "",
    ]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    stats = CorpusStats()
    docs = list(read_corpus(path, stats))
    assert [(d.id, d.text, d.metadata) for d in docs] == [
        ("x1", "alpha", {"url": "http://a", "year": 2020}), ("corpus.jsonl.gz:2", "beta", {})]
    assert stats.skipped == {"not JSON": 1, "no string 'text' field": 1, "empty": 1}
    assert stats.duplicates == 1


def test_squad_json_yields_each_distinct_paragraph_with_title_and_index(tmp_path):
    squad = {"data": [
        {"title": "Paris", "paragraphs": [{"context": "Paris is in France.", "qas": []},
                                          {"context": "", "qas": []}]},
        {"title": "Rome", "paragraphs": [{"context": "Rome is in Italy."},
                                         {"context": "Paris is in France."}]},
    ]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad))
    stats = CorpusStats()
    docs = list(read_corpus(path, stats))
    assert [(d.id, d.text, d.metadata) for d in docs] == [
        ("Paris/0", "Paris is in France.", {"title": "Paris", "paragraph": 0}),
        ("Rome/0", "Rome is in Italy.", {"title": "Rome", "paragraph": 0})]
    assert stats.duplicates == 1 and stats.skipped == {"empty": 1}
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(CorpusError, match="not SQuAD JSON"):
        list(read_corpus(tmp_path / "other.json"))


def test_missing_or_unusable_corpus_raises_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_corpus(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="no usable document"):
        list(read_corpus(tmp_path))


def test_ten_megabyte_single_line_file_is_read_and_chunked_by_tokens(tmp_path, tiny_sac):
    tokenizer = tiny_sac[1].tokenizer
    line = (words(7, 2000).replace("\n", " ") + " ") * 1000
    line = line[:10_000_000]
    (tmp_path / "big.txt").write_text(line)
    (doc,) = read_corpus(tmp_path)
    chunks = split_document(doc.text, tokenizer, 1024, 0, doc.id)
    assert "".join(c.text for c in chunks) == line
    assert max(c.n_tokens for c in chunks) <= 1024
    assert len(chunks) > 1000


# -- chunking ---------------------------------------------------------------------------------


def test_chunks_are_exact_substrings_that_fit_when_tokenized_on_their_own(tiny_sac):
    tokenizer = tiny_sac[1].tokenizer
    text = words(3, 400) + " 東京東京東京 naïve…  \n\n end"
    chunks = split_document(text, tokenizer, CHUNK, 0, "d")
    assert "".join(c.text for c in chunks) == text
    for c in chunks:
        assert text[c.start_char:c.end_char] == c.text
        assert list(c.token_ids) == tokenizer(c.text, add_special_tokens=False)["input_ids"]
        assert 1 <= c.n_tokens <= CHUNK
    assert [c.id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]
    assert [c.key for c in chunks] == [AnchorStore.key_for(c.text) for c in chunks]


def test_overlapping_chunks_share_text_and_cover_the_document(tiny_sac):
    tokenizer = tiny_sac[1].tokenizer
    text = words(4, 300)
    chunks = split_document(text, tokenizer, CHUNK, 8, "d")
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_char < a.end_char  # overlap
        assert b.start_token - a.start_token >= CHUNK - 8 - 2
    with pytest.raises(InvalidInputError, match="overlap_tokens"):
        split_document(text, tokenizer, CHUNK, CHUNK, "d")


def test_chunk_ids_and_keys_are_stable_across_runs(tiny_sac, corpus):
    tokenizer = tiny_sac[1].tokenizer

    def run():
        return [(c.id, c.key, c.text) for d in read_corpus(corpus)
                for c in split_document(d.text, tokenizer, CHUNK, 4, d.id)]

    assert run() == run()
    assert split_document(" \n\t ", tokenizer, CHUNK, 0, "blank") == []


# -- precompression ---------------------------------------------------------------------------


def test_precompress_stores_every_chunk_with_its_metadata_and_a_rerun_skips_everything(
        tmp_path, tiny_sac, corpus, reference):
    compressor = tiny_sac[1]
    path, summary = reference
    expected = all_chunks(corpus, compressor.tokenizer)
    with AnchorStore.open(path, readonly=True) as s:
        assert set(s.keys()) == set(expected)
        assert s.fingerprint == compressor.fingerprint and s.ratio == 4
        meta = s.metadata(s.keys()[0])
        assert meta["text"] == expected[s.keys()[0]]
        assert meta["chunk_id"].startswith(meta["doc_id"] + "#")
        assert meta["doc"] == {"source": meta["doc_id"]}
        assert all(kv.offset == 0 for kv in s.get_many(s.keys()))
    assert summary.compressed == summary.entries == len(expected)
    assert summary.chunks == summary.compressed + summary.already_stored
    assert summary.kv_reduction > 3.5 and summary.bytes_on_disk > summary.kv_bytes
    assert "chunks/s" in str(summary) and "tokens/s" in str(summary)

    again = precompress(corpus, path, compressor, chunk_tokens=CHUNK, batch_size=BATCH,
                        show_progress=False)
    assert (again.compressed, again.already_stored, again.chunks) == (0, summary.chunks, summary.chunks)


def test_the_progress_bar_counts_documents_done_out_of_the_corpus_s(tmp_path, tiny_sac, corpus, capsys, caplog):
    """A total, so the bar shows how far the run is and how long it has to go; the documents an
    exclusion leaves out are not in it, and the skipped documents are logged once, not twice."""
    import logging

    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        precompress(corpus, tmp_path / "store", tiny_sac[1], chunk_tokens=CHUNK, batch_size=1,
                    show_progress=True, exclude={"doc7.txt", "no-such-doc.txt"})
    bar = capsys.readouterr().err
    assert "7/7 [" in bar and " documents" in bar and "chunks=" in bar
    assert "0/7 [" in bar or "1/7 [" in bar  # drawn as it went, not only at the end
    assert sum("no-such-doc.txt" in r.getMessage() for r in caplog.records) == 1


def test_a_rerun_without_storage_continues_an_8bit_store_in_its_own_storage(tmp_path, tiny_sac, corpus):
    path = tmp_path / "store"
    first = precompress(corpus, path, tiny_sac[1], chunk_tokens=CHUNK, batch_size=BATCH, storage="fp8",
                        show_progress=False, exclude={"doc7.txt"})
    again = precompress(corpus, path, tiny_sac[1], chunk_tokens=CHUNK, batch_size=BATCH, show_progress=False)
    assert again.already_stored == first.chunks and again.compressed > 0
    with AnchorStore.open(path, readonly=True) as s:
        report = s.verify()
        assert s.storage == "fp8" and report.ok and report.entries == again.entries


def test_stored_chunks_generate_exactly_like_freshly_compressed_ones(tiny_sac, reference):
    compressor = tiny_sac[1]
    path = reference[0]
    with AnchorStore.open(path, readonly=True) as s:
        texts = [s.metadata(k)["text"] for k in s.keys()[:3]]
    fresh = compressor.compress_chunks(
        [compressor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    loaded = load_compressed(path, texts)
    generator = Generator.from_compressor(compressor)
    config = GenerationConfig(max_new_tokens=6)
    for kvs in ([fresh[0]], [loaded[0]]), (fresh, loaded):
        a, b = (generator.generate(compressor.template.build(k, "Which city?"), config) for k in kvs)
        assert a.token_ids == b.token_ids and a.context_tokens == b.context_tokens
    with pytest.raises(EntryNotFoundError, match="Precompress the corpus"):
        load_compressed(path, ["a chunk that was never stored"])


def test_an_empty_or_unreadable_corpus_fails_before_a_store_is_created(tmp_path, tiny_sac):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")  # unreadable
    for corpus in (tmp_path / "empty", tmp_path / "broken"):
        with pytest.raises(CorpusError, match="no usable document"):
            precompress(corpus, tmp_path / "store", tiny_sac[1], show_progress=False)
        assert not (tmp_path / "store").exists()  # no empty store left to trip a later run


def test_text_that_is_not_valid_unicode_is_replaced_or_skipped_not_a_crash(tmp_path, tiny_sac):
    compressor = tiny_sac[1]
    corpus = tmp_path / "c.jsonl"  # JSON may escape half of a surrogate pair: not encodable text
    corpus.write_text(json.dumps({"id": "bad", "text": "Paris \ud800 is the capital of France."}) + "\n"
                      + json.dumps({"id": "good", "text": "The quick brown fox."}) + "\n")
    summary = precompress(corpus, tmp_path / "s", compressor, chunk_tokens=CHUNK, show_progress=False)
    assert summary.decoded_with_replacement == 1 and summary.compressed == summary.entries == 2
    with AnchorStore.open(tmp_path / "s", readonly=True) as s:
        texts = sorted(s.metadata(k)["text"] for k in s.keys())
    assert texts == ["Paris \ufffd is the capital of France.", "The quick brown fox."]
    load_compressed(tmp_path / "s", texts)

    skipped = precompress(corpus, tmp_path / "skip", compressor, chunk_tokens=CHUNK, decode_errors="skip",
                          show_progress=False)
    assert skipped.entries == 1 and skipped.documents == 1
    assert skipped.skipped_inputs == {"not valid Unicode (lone surrogates)": 1}


def test_nan_or_infinite_numbers_in_jsonl_metadata_are_kept_as_null_not_a_crash(tmp_path, tiny_sac, caplog):
    # Python's json writes NaN and Infinity (and reads 1e999 as infinity); the store keeps strict
    # JSON metadata, and one such record used to stop the whole run naming only a chunk's hash.
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "nan", "text": "The quick brown fox.", "score": float("nan"),
                                  "tags": ["a", float("-inf")], "year": 2020}) + "\n"
                      + '{"id": "big", "text": "Paris is the capital of France.", "rank": 1e999}\n')
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        summary = precompress(corpus, tmp_path / "s", tiny_sac[1], chunk_tokens=CHUNK, show_progress=False)
    assert summary.compressed == summary.entries == 2
    with AnchorStore.open(tmp_path / "s", readonly=True) as s:
        docs = {s.metadata(k)["doc_id"]: s.metadata(k)["doc"] for k in s.keys()}
    assert docs == {"nan": {"score": None, "tags": ["a", None], "year": 2020}, "big": {"rank": None}}
    assert "c.jsonl:1: field(s) 'score', 'tags' hold NaN or infinite numbers" in caplog.text
    assert "c.jsonl:2: field(s) 'rank'" in caplog.text


def test_a_store_from_another_compressor_or_a_foreign_directory_is_refused(tmp_path, tiny_sac, corpus):
    with AnchorStore.create(tmp_path / "other", "other-model@123/sac-456", ratio=4, dtype="float32"):
        pass
    with pytest.raises(FingerprintMismatchError, match="other-model@123"):
        precompress(corpus, tmp_path / "other", tiny_sac[1], show_progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not a store"):
        precompress(corpus, tmp_path / "notes", tiny_sac[1], show_progress=False)
    with pytest.raises(InvalidInputError, match="chunk_len=32"):
        precompress(corpus, tmp_path / "s", tiny_sac[1], chunk_tokens=64, show_progress=False)


def test_a_store_begun_in_bfloat16_is_continued_in_its_own_dtype_by_a_float32_compressor(tmp_path, tiny_sac, corpus):
    # as when a precompression begun where "auto" meant bfloat16 resumes on a CPU without it
    compressor = tiny_sac[1]
    AnchorStore.create(tmp_path / "s", compressor.fingerprint, 4, "bfloat16").close()
    summary = precompress(corpus, tmp_path / "s", compressor, chunk_tokens=CHUNK, show_progress=False)
    with AnchorStore.open(tmp_path / "s", readonly=True) as s:
        assert s.dtype == torch.bfloat16 and len(s.keys()) == summary.entries > 0
    with pytest.raises(InvalidInputError, match="dtype"):  # a dtype asked for is checked, not overridden
        precompress(corpus, tmp_path / "s", compressor, chunk_tokens=CHUNK, dtype="float32", show_progress=False)


def test_shards_cover_every_chunk_exactly_once_and_merge_to_the_unsharded_store(
        tmp_path, tiny_sac, corpus, reference):
    shards = [precompress(corpus, tmp_path / "s", tiny_sac[1], chunk_tokens=CHUNK, batch_size=BATCH,
                          num_shards=3, shard_index=i, show_progress=False) for i in range(3)]
    assert [s.store for s in shards] == [str(tmp_path / f"s.shard-00{i}-of-003") for i in range(3)]
    keys = [set(stored(Path(s.store))) for s in shards]
    assert all(keys) and sum(map(len, keys)) == len(set().union(*keys))
    assert all(shard_of(k, 3) == i for i, ks in enumerate(keys) for k in ks)
    assert sum(s.chunks for s in shards) == reference[1].chunks
    assert all(s.chunks + s.other_shards == reference[1].chunks for s in shards)
    merge(tmp_path / "merged", [s.store for s in shards])
    assert set(stored(tmp_path / "merged")) == set(stored(reference[0]))


def test_shard_settings_come_from_arguments_torchrun_or_a_slurm_array(monkeypatch):
    assert shard_from_env({}) == (1, 0)
    assert shard_from_env({"WORLD_SIZE": "4", "RANK": "3"}) == (4, 3)
    assert shard_from_env({"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "5",
                           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 2)
    with pytest.raises(InvalidInputError, match="shard_index"):
        shard_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    for name in SHARD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert resolve_shard(None, None) == (2, 1)
    assert resolve_shard(5, 0) == (5, 0)
    with pytest.raises(InvalidInputError, match="both"):
        resolve_shard(2, None)
    assert shard_store_path("out/store", 0, 1) == Path("out/store")
    assert shard_store_path("out/store-{shard}", 1, 2) == Path("out/store-1")


# -- crashes and failures -----------------------------------------------------------------------


def _spawn(function: str, *args) -> subprocess.Popen:
    """Run ``function(*args)`` of this module in a fresh Python process."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_precompress; "
            f"sys.exit(test_precompress.{function}(*sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=child_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _precompress_hanging_in_third_write(corpus, store, sac_dir, marker) -> int:
    """Child process: the CLI run, made to stop for good inside its third write, after that
    batch's bytes are durable and before its index rows commit (the worst place to die);
    it touches ``marker`` when it gets there."""
    real = AnchorStore._index_rows
    calls = []

    def index_rows(self, rows, next_shard):
        # Die in the first write that starts once at least two batches are indexed (how many
        # batches one write commits may vary with the writer's pace).
        if rows and sum(calls) >= 2 * BATCH:
            Path(marker).touch()
            time.sleep(600)
        calls.append(len(rows))
        return real(self, rows, next_shard)

    AnchorStore._index_rows = index_rows
    return main(cli_args(Path(corpus), Path(store), Path(sac_dir)))


def test_kill_9_mid_run_then_rerun_gives_a_clean_store_with_every_chunk_once_and_same_answers(
        tmp_path, tiny_sac, corpus, reference):
    sac_dir, compressor = tiny_sac
    path = tmp_path / "store"
    marker = tmp_path / "in-third-write"
    child = _spawn("_precompress_hanging_in_third_write", corpus, path, sac_dir, marker)
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never reached its third write"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    expected = stored(reference[0])
    before = len(stored(path))
    assert 2 * BATCH <= before < len(expected)
    with AnchorStore.open(path, readonly=True) as s:
        assert s.stats()["orphan_bytes"] > 0  # the interrupted write's bytes, never indexed

    summary = precompress(corpus, path, compressor, chunk_tokens=CHUNK, batch_size=BATCH, show_progress=False)
    assert (summary.compressed, summary.entries) == (len(expected) - before, len(expected))
    with AnchorStore.open(path, readonly=True) as s:
        report = s.verify()
        assert report.ok and report.entries == len(expected), report.summary()
        keys = s.keys()
        texts = [s.metadata(k)["text"] for k in keys[:4]]
    assert len(keys) == len(set(keys)) and set(keys) == set(expected)
    resumed = stored(path)
    for key, kv in expected.items():
        torch.testing.assert_close(resumed[key].keys, kv.keys)
        torch.testing.assert_close(resumed[key].values, kv.values)
    assert answers(path, compressor, texts) == answers(reference[0], compressor, texts)


def test_two_processes_with_two_shards_then_merge_equal_one_unsharded_run(tmp_path, tiny_sac, corpus, reference):
    sac_dir = tiny_sac[0]
    store = tmp_path / "store"
    by_flags = subprocess.Popen(
        [sys.executable, "-m", "sac_rag.precompress",
         *cli_args(corpus, store, sac_dir, "--num-shards", "2", "--shard-index", "0")],
        env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    by_env = subprocess.Popen(  # as torchrun would start rank 1
        [sys.executable, "-m", "sac_rag.precompress", *cli_args(corpus, store, sac_dir)],
        env=child_env(WORLD_SIZE="2", RANK="1"), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for child in (by_flags, by_env):
        out, err = child.communicate(timeout=1200)  # a hang guard
        assert child.returncode == 0, err
        assert "shard" in out and "tokens/s" in out
    shards = [tmp_path / f"store.shard-00{i}-of-002" for i in range(2)]
    first, second = (set(stored(s)) for s in shards)
    assert first and second and not first & second
    assert store_module.main(["merge", str(store), *map(str, shards)]) == 0
    merged, expected = stored(store), stored(reference[0])
    assert set(merged) == set(expected)
    for key, kv in expected.items():
        torch.testing.assert_close(merged[key].keys, kv.keys)


def test_full_disk_fails_with_a_clear_error_and_a_rerun_completes(tmp_path, monkeypatch, tiny_sac, corpus,
                                                                  reference):
    compressor = tiny_sac[1]
    path = tmp_path / "store"
    real_write = store_module._write_all
    blobs = []

    def fill_up(fd, data):
        blobs.append(len(data))
        if len(blobs) > BATCH + 1:  # the second batch runs out of space midway
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(store_module, "_write_all", fill_up)
    with pytest.raises(StoreWriteError, match="disk is full") as info:
        precompress(corpus, path, compressor, chunk_tokens=CHUNK, batch_size=BATCH, show_progress=False)
    assert "rerun" in str(info.value)
    monkeypatch.setattr(store_module, "_write_all", real_write)
    with AnchorStore.open(path, readonly=True) as s:
        assert s.verify().ok and len(s) == BATCH  # the failed batch left no entry behind
    summary = precompress(corpus, path, compressor, chunk_tokens=CHUNK, batch_size=BATCH, show_progress=False)
    assert summary.entries == reference[1].entries and summary.already_stored >= BATCH
    assert set(stored(path)) == set(stored(reference[0]))


# -- command line -----------------------------------------------------------------------------


def test_cli_kv_dropping_baseline_runs_before_a_trained_compressor_exists(tmp_path, capsys, tiny_sac, corpus):
    base = tiny_sac[0].parent / "base"
    assert main(["--corpus", str(corpus), "--store", str(tmp_path / "s"), "--kv-dropping",
                 "--base-model", str(base), "--ratio", "4", "--dtype", "float32",
                 "--chunk-tokens", str(CHUNK), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["compressed"] == summary["entries"] > 0
    with AnchorStore.open(tmp_path / "s", readonly=True) as s:
        assert s.ratio == 4 and s.manifest["extra"]["base_model"] == str(base)
        assert s.fingerprint != tiny_sac[1].fingerprint  # another compressor: another store
    first = sorted(p.name for p in Path(corpus).rglob("*.txt"))[0]
    assert main(["--corpus", str(corpus), "--store", str(tmp_path / "fewer"), "--kv-dropping", "--exclude", first,
                 "--base-model", str(base), "--ratio", "4", "--dtype", "float32",
                 "--chunk-tokens", str(CHUNK), "--no-progress", "--json"]) == 0
    fewer = json.loads(capsys.readouterr().out)
    assert fewer["documents"] == summary["documents"] - 1 and fewer["entries"] < summary["entries"]


def test_cli_help_and_errors(tmp_path, capsys, corpus):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--num-shards" in out and "--kv-dropping" in out and "merge" in out
    for documented in ("glob pattern", ".gz/.xz", "(default 8)", "(default 0)", "the default", "summary counts"):
        assert documented in " ".join(out.split()), documented
    assert main(["--corpus", str(corpus), "--store", str(tmp_path / "s"),
                 "--compressor", str(tmp_path / "no-such-compressor")]) == 2
    assert "--kv-dropping" in capsys.readouterr().err
    # --ratio sets the baseline's ratio: with a trained compressor it would be silently ignored
    with pytest.raises(SystemExit) as info:
        main(["--corpus", str(corpus), "--store", str(tmp_path / "r"), "--ratio", "15"])
    assert info.value.code == 2 and not (tmp_path / "r").exists()
    assert "--ratio 15 sets the ratio of --kv-dropping only" in capsys.readouterr().err


def test_refine_steps_precompresses_refined_chunks_into_a_store_of_their_own_fingerprint(tmp_path, capsys):
    """--refine-steps stores each chunk refined (sac_rag.refine): the store is the refined compressor's,
    which a store of the plain compressor's chunks refuses, naming both fingerprints."""
    from conftest import save_tiny_compressor

    compressor = save_tiny_compressor(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(words(7, 40))
    common = ["--corpus", str(corpus), "--compressor", str(compressor), "--base-model", str(tmp_path / "tiny-model"),
              "--dtype", "float32", "--no-progress"]
    assert main([*common, "--store", str(tmp_path / "plain")]) == 0
    assert main([*common, "--store", str(tmp_path / "refined"), "--refine-steps", "2"]) == 0
    plain, refined = (AnchorStore.open(tmp_path / name, readonly=True) for name in ("plain", "refined"))
    with plain, refined:
        assert plain.fingerprint != refined.fingerprint and plain.keys() == refined.keys()
        key = next(iter(plain.keys()))
        assert not torch.equal(plain.get(key).keys, refined.get(key).keys)
    assert main([*common, "--store", str(tmp_path / "plain"), "--refine-steps", "2"]) == 2
    assert refined.fingerprint in capsys.readouterr().err
    for bad in (["--kv-dropping", "--refine-steps", "2"], ["--refine-steps", "-1"]):
        with pytest.raises(SystemExit):
            main([*common, "--store", str(tmp_path / "bad"), *bad])


# -- what a run reports ---------------------------------------------------------------------------


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_the_summary_tells_repeated_chunks_excluded_documents_and_stale_entries_apart(tmp_path, tiny_sac):
    compressor = tiny_sac[1]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(words(100 + i, 60))
    (corpus / "chorus.txt").write_text("la la la la la la la la la la. " * 40)  # one chunk's text, many times
    (corpus / "questions.txt").write_text("Which city?")

    def distinct_keys(exclude=()):
        return {c.key for d in read_corpus(corpus, exclude=exclude)
                for c in split_document(d.text, compressor.tokenizer, CHUNK, 0, d.id)}

    store = tmp_path / "store"
    first = precompress(corpus, store, compressor, chunk_tokens=CHUNK, show_progress=False)
    assert first.repeated_chunks == first.chunks - len(distinct_keys()) > 5
    assert (first.compressed, first.already_stored) == (len(distinct_keys()), first.repeated_chunks)
    assert f"{first.repeated_chunks} of them repeat a chunk earlier" in str(first)
    assert first.stale_entries == 0 and "not chunks of this run" not in str(first)
    assert first.bytes_on_disk == _disk_bytes(store)  # the closed store, without SQLite's write-ahead log

    (corpus / "doc0.txt").unlink()
    (corpus / "doc1.txt").write_text(words(200, 60))
    (corpus / "new.md").write_text(words(300, 30))
    again = precompress(corpus, store, compressor, chunk_tokens=CHUNK, show_progress=False,
                        exclude=["questions.txt"])
    current = distinct_keys(exclude=["questions.txt"])
    assert again.excluded_documents == 1 and ", 1 excluded" in str(again)
    with AnchorStore.open(store, readonly=True) as s:
        assert len(s) == again.entries and again.stale_entries == len(set(s.keys()) - current) > 0
    assert f"({again.stale_entries} not chunks of this run" in str(again)
    assert json.loads(json.dumps(again.to_dict()))["stale_entries"] == again.stale_entries


def test_a_rerun_gives_a_renamed_documents_chunks_its_new_name_and_keeps_first_occurrences(tmp_path, tiny_sac):
    compressor = tiny_sac[1]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(words(400, 60))
    (corpus / "b.txt").write_text(words(401, 60))
    (corpus / "chorus.txt").write_text("la la la la la la la la la la. " * 120)  # repeats across windows

    def chunk_metadata(store):
        with AnchorStore.open(store, readonly=True) as s:
            return {k: s.metadata(k) for k in s.keys()}

    def keys_of(name):
        return {c.key for c in split_document((corpus / name).read_text(), compressor.tokenizer, CHUNK, 0, name)}

    store = tmp_path / "store"
    first = precompress(corpus, store, compressor, chunk_tokens=CHUNK, batch_size=1, show_progress=False)
    assert first.metadata_updated == 0 and first.repeated_chunks > 8  # more than one window of repeats
    before = chunk_metadata(store)
    (corpus / "a.txt").rename(corpus / "renamed.txt")

    again = precompress(corpus, store, compressor, chunk_tokens=CHUNK, batch_size=1, show_progress=False)
    after = chunk_metadata(store)
    renamed = keys_of("renamed.txt")
    assert again.compressed == 0 and again.metadata_updated == len(renamed) > 0
    assert f"{len(renamed)} stored chunks given this run's metadata" in str(again)
    for k, meta in after.items():
        if k in renamed:
            assert (meta["doc_id"], meta["doc"]) == ("renamed.txt", {"source": "renamed.txt"})
            assert meta["chunk_id"].startswith("renamed.txt#")
            moved = {"doc_id": "a.txt", "doc": {"source": "a.txt"}, "chunk_id": before[k]["chunk_id"]}
            assert {**meta, **moved} == before[k]  # the rest (text, index, span) as before
        else:  # b's chunks, and each chorus chunk still cites its first occurrence
            assert meta == before[k]
    assert min(m["chunk_index"] for k, m in after.items() if m["doc_id"] == "chorus.txt") == 0

    third = precompress(corpus, store, compressor, chunk_tokens=CHUNK, batch_size=1, show_progress=False)
    assert third.metadata_updated == 0 and "metadata" not in str(third)
    assert chunk_metadata(store) == after


def test_the_progress_bar_counts_documents_found_stored_so_a_resumed_run_moves(tmp_path, tiny_sac, corpus, reference,
                                                                              capsys):
    shutil.copytree(reference[0], tmp_path / "store")
    summary = precompress(corpus, tmp_path / "store", tiny_sac[1], chunk_tokens=CHUNK, batch_size=BATCH)
    assert summary.compressed == 0
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "precompressing: 100%" in last and "8/8 [" in last and f"already_stored={summary.chunks}" in last


def test_a_store_that_cannot_be_created_is_reported_by_its_path_with_what_to_do(tmp_path, monkeypatch, tiny_sac,
                                                                               corpus):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StoreWriteError, match="cannot create the store at .*a-file/store.*writable"):
        precompress(corpus, tmp_path / "a-file" / "store", tiny_sac[1], show_progress=False)

    def refused(*args, **kwargs):  # what a folder this user cannot write gives (root writes anywhere)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / ".store.creating-x1y2"))

    monkeypatch.setattr(store_module.tempfile, "mkdtemp", refused)
    with pytest.raises(StoreWriteError) as info:
        precompress(corpus, tmp_path / "ro" / "store", tiny_sac[1], show_progress=False)
    assert str(tmp_path / "ro" / "store") in str(info.value) and "Permission denied" in str(info.value)


def test_ctrl_c_stops_with_a_message_and_a_rerun_finishes_the_store(tmp_path, monkeypatch, capsys, tiny_sac,
                                                                    corpus, reference):
    real, calls = SACCompressor.compress_chunks, []

    def interrupted_in_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SACCompressor, "compress_chunks", interrupted_in_third_batch)
    store = tmp_path / "store"
    try:
        assert main(cli_args(corpus, store, tiny_sac[0])) == 130
    except KeyboardInterrupt:  # not re-raised: it would stop the whole test session
        pytest.fail("Ctrl-C left main as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command" in err and "Traceback" not in err
    with AnchorStore.open(store, readonly=True) as s:
        assert s.verify().ok and len(s) == 2 * BATCH
    monkeypatch.setattr(SACCompressor, "compress_chunks", real)
    assert main(cli_args(corpus, store, tiny_sac[0])) == 0
    assert set(stored(store)) == set(stored(reference[0]))


# -- pruning --------------------------------------------------------------------------------------


def _shard_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "shards").glob("*.shard"))


def test_prune_after_removing_and_editing_documents_drops_exactly_their_old_chunks(tmp_path, tiny_sac, corpus):
    compressor = tiny_sac[1]
    shutil.copytree(corpus, tmp_path / "corpus")
    corpus, store = tmp_path / "corpus", tmp_path / "store"

    def run(**options):
        return precompress(corpus, store, compressor, chunk_tokens=CHUNK, batch_size=BATCH, show_progress=False,
                           **options)

    assert run(prune=True).pruned_entries == 0  # nothing to prune in a new store
    old = all_chunks(corpus, compressor.tokenizer)
    before = stored(store)
    (corpus / "doc3.txt").unlink()
    (corpus / "doc5.txt").write_text(words(505, 40))
    new = all_chunks(corpus, compressor.tokenizer)
    assert set(old) - set(new) and set(new) - set(old)

    pruned = run(prune=True)
    assert pruned.compressed == len(set(new) - set(old))
    assert (pruned.pruned_entries, pruned.stale_entries) == (len(set(old) - set(new)), 0)
    assert f"after pruning {pruned.pruned_entries} that were not chunks of this run" in str(pruned)
    assert "not chunks of this run:" not in str(pruned) and json.loads(json.dumps(pruned.to_dict()))["pruned_entries"]
    after = stored(store)
    assert set(after) == set(new)
    for k in set(old) & set(new):  # the chunks kept are the very entries stored before
        assert torch.equal(after[k].keys, before[k].keys) and torch.equal(after[k].values, before[k].values)
    with AnchorStore.open(store, readonly=True) as s:
        report = s.verify()
        assert report.ok and report.entries == len(new) and report.orphan_bytes == 0, report.summary()
        assert _shard_bytes(store) == s.stats()["entry_bytes"]  # gc reclaimed the pruned entries' bytes

    again = run(prune=True)
    assert (again.compressed, again.pruned_entries, again.stale_entries, again.entries) == (0, 0, 0, len(new))

    with AnchorStore.open(store) as s:  # an entry under a key of the user's own: not a chunk, not pruned
        s.put("my-own-entry", s.get(s.keys()[0]))
    kept = run(prune=True)
    assert (kept.pruned, kept.pruned_entries, kept.stale_entries) == (True, 0, 1)
    assert "--prune leaves those" in str(kept) and "kept: --prune deletes them" not in str(kept)
    assert "kept: --prune deletes them, not entries stored under keys of their own" in str(run())


def test_cli_prune_drops_excluded_documents_and_says_so_in_its_help(tmp_path, capsys, tiny_sac, corpus, reference):
    shutil.copytree(reference[0], tmp_path / "store")
    excluded = {c.key for d in read_corpus(corpus) if d.id == "doc2.txt"
                for c in split_document(d.text, tiny_sac[1].tokenizer, CHUNK, 0, d.id)}
    kept = {k for d in read_corpus(corpus, exclude=["doc2.txt"])
            for k in (c.key for c in split_document(d.text, tiny_sac[1].tokenizer, CHUNK, 0, d.id))}
    assert excluded - kept
    assert main(cli_args(corpus, tmp_path / "store", tiny_sac[0], "--prune", "--exclude", "doc2.txt", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pruned_entries"], summary["stale_entries"]) == (len(excluded - kept), 0)
    assert set(stored(tmp_path / "store")) == kept

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--prune" in help_text and "left out by --exclude" in help_text and "unless --prune" in help_text


def test_prune_in_a_sharded_run_deletes_only_entries_of_its_own_shard(tmp_path, tiny_sac, corpus):
    compressor = tiny_sac[1]
    shutil.copytree(corpus, tmp_path / "corpus")
    corpus = tmp_path / "corpus"
    store = tmp_path / "store-0"  # filled unsharded, so it holds the chunks of both shards
    precompress(corpus, store, compressor, chunk_tokens=CHUNK, batch_size=BATCH, show_progress=False)
    old = all_chunks(corpus, compressor.tokenizer)
    (corpus / "doc7.txt").unlink()
    new = all_chunks(corpus, compressor.tokenizer)
    gone = set(old) - set(new)
    assert {shard_of(k, 2) for k in gone} == {0, 1}  # the removed document has chunks in both shards

    summary = precompress(corpus, tmp_path / "store-{shard}", compressor, chunk_tokens=CHUNK, batch_size=BATCH,
                          num_shards=2, shard_index=0, show_progress=False, prune=True)
    assert summary.store == str(store)
    left = set(stored(store))
    assert left == set(old) - {k for k in gone if shard_of(k, 2) == 0}  # shard 1's are not this run's to judge
    assert summary.pruned_entries == sum(shard_of(k, 2) == 0 for k in gone)
    assert summary.stale_entries == len(left) - len({k for k in new if shard_of(k, 2) == 0})


def test_prune_is_refused_for_other_chunk_settings_and_skipped_when_an_input_cannot_be_read(
        tmp_path, capsys, tiny_sac, corpus, reference):
    shutil.copytree(corpus, tmp_path / "corpus")
    shutil.copytree(reference[0], tmp_path / "store")
    corpus, store = tmp_path / "corpus", tmp_path / "store"
    everything = set(stored(store))
    with pytest.raises(InvalidInputError, match="refusing to prune .*chunk_tokens=32, overlap=0 .*chunk_tokens=16"):
        precompress(corpus, store, tiny_sac[1], chunk_tokens=16, prune=True, show_progress=False)
    assert main(cli_args(corpus, store, tiny_sac[0], "--overlap", "4", "--prune")) == 2
    assert "refusing to prune" in capsys.readouterr().err
    assert set(stored(store)) == everything  # refused before compressing or deleting anything

    (corpus / "doc4.txt").unlink()
    (corpus / "elsewhere.txt").symlink_to(tmp_path / "unmounted" / "doc.txt")  # e.g. on a drive not mounted now
    summary = precompress(corpus, store, tiny_sac[1], chunk_tokens=CHUNK, batch_size=BATCH, prune=True,
                          show_progress=False)
    assert summary.pruned_entries == 0 and summary.stale_entries > 0 and set(stored(store)) == everything
    assert "not pruned" in summary.not_pruned and "1 a broken symlink" in summary.not_pruned
    assert f"  prune:     {summary.not_pruned}" in str(summary)
    capsys.readouterr()
    # asked for on the command line and not done: the exit status says so (a cron job would not see a warning)
    assert main(cli_args(corpus, store, tiny_sac[0], "--prune")) == 1
    assert "error: not pruned" in capsys.readouterr().err and set(stored(store)) == everything


def test_the_cli_refuses_a_corpus_or_store_path_that_cannot_work_before_it_loads_the_model(tmp_path, monkeypatch,
                                                                                           capsys, corpus):
    def load(args):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr(precompress_module, "build_compressor", load)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a store")
    for corpus_path, store, says in [
        (tmp_path / "no-corpus", tmp_path / "s", "the corpus .*no-corpus does not exist"),
        (corpus, tmp_path / "a-file", "a-file is a file, not a directory"),
        (corpus, tmp_path / "a-file" / "store", "cannot create the store at .*a-file/store: .*a-file is a file"),
        (corpus, tmp_path / "notes", "non-empty directory that is not a store"),
    ]:
        assert main(["--corpus", str(corpus_path), "--store", str(store)]) == 2, store
        assert re.search(says, capsys.readouterr().err), says
    for chunking, says in [(["--chunk-tokens", "9999"], "chunk_tokens=9999: .* chunk_len=510"),
                           (["--chunk-tokens", "64", "--overlap", "64"], r"overlap must be an integer in \[0, .*64\)")]:
        # the shipped compressor's chunk_len is read from its checkpoint, without loading it
        assert main(["--corpus", str(corpus), "--store", str(tmp_path / "s"), *chunking]) == 2
        assert re.search(says, capsys.readouterr().err), says
    monkeypatch.setattr(store_module.os, "access", lambda path, mode: False)  # as a folder this user cannot write
    assert main(["--corpus", str(corpus), "--store", str(tmp_path / "new" / "store")]) == 2
    err = capsys.readouterr().err
    assert f"cannot create the store at {tmp_path / 'new' / 'store'}: {tmp_path} is not writable" in err


def test_command_line_paths_with_a_tilde_are_the_home_folders(tmp_path, monkeypatch, capsys, corpus, tiny_sac):
    """The shell leaves "--corpus=~/docs" as written: it names the home folder's corpus."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copytree(corpus, tmp_path / "home" / "docs")
    base = tiny_sac[0].parent / "base"
    assert main(["--corpus=~/docs", "--store=~/docs.store", "--kv-dropping", "--base-model", str(base),
                 "--dtype", "float32", "--chunk-tokens", str(CHUNK), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] > 0
    assert (tmp_path / "home" / "docs.store" / "manifest.json").exists()


def test_every_entry_cites_the_first_occurrence_of_its_chunk_and_its_index(tmp_path, tiny_sac):
    """Repeats inside one window keep the first occurrence's metadata (module docstring), and
    ``chunk_index``/``start_char`` are that chunk's."""
    compressor = tiny_sac[1]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(words(500, 50))
    (corpus / "b.txt").write_text("la la la la la la la la la la. " * 30 + words(501, 40))
    (corpus / "c.txt").write_text("la la la la la la la la la la. " * 30)
    first = {}
    for doc in read_corpus(corpus):
        for c in split_document(doc.text, compressor.tokenizer, CHUNK, 0, doc.id):
            first.setdefault(c.key, (doc.id, c.index, c.start_char, c.end_char))
    summary = precompress(corpus, tmp_path / "store", compressor, chunk_tokens=CHUNK, show_progress=False)
    assert summary.repeated_chunks > 0 and max(i for _, i, _, _ in first.values()) > 0
    with AnchorStore.open(tmp_path / "store", readonly=True) as s:
        got = {k: s.metadata(k) for k in s.keys()}
    assert {k: (m["doc_id"], m["chunk_index"], m["start_char"], m["end_char"]) for k, m in got.items()} == first


def test_cli_decode_errors_skip_leaves_out_text_that_is_not_utf8(tmp_path, capsys, tiny_sac):
    """``--decode-errors skip`` reaches precompress."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text(words(600, 30))
    (corpus / "latin1.txt").write_bytes("café au lait, the city".encode("latin-1"))
    args = ["--corpus", str(corpus), "--compressor", str(tiny_sac[0]), "--dtype", "float32",
            "--chunk-tokens", str(CHUNK), "--no-progress", "--json"]
    assert main([*args, "--store", str(tmp_path / "skip"), "--decode-errors", "skip"]) == 0
    skipped = json.loads(capsys.readouterr().out)
    assert skipped["documents"] == 1 and skipped["skipped_inputs"] == {"not UTF-8": 1}
    assert main([*args, "--store", str(tmp_path / "replace")]) == 0
    replaced = json.loads(capsys.readouterr().out)
    assert replaced["documents"] == 2 and replaced["decoded_with_replacement"] == 1
