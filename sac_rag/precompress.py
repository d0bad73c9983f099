"""Offline precompression: corpus -> chunks -> anchor K/V -> store, resumable and shardable.

SAC pays off in RAG when every chunk is compressed once, ahead of time, and a query loads
r-times smaller K/V instead of re-reading text. This module is that batch job:

    read_corpus (corpus)  ->  iter_chunks (chunking)  ->  SACCompressor.compress_chunks
        ->  AnchorStore.put_many (store)

Each chunk is stored under ``AnchorStore.key_for(chunk text)`` at offset 0, with metadata: its
chunk id, document id and document metadata, its text (so a retriever can show and cite it),
its token count and character span. When the same text occurs twice, the first occurrence's
metadata is kept. A rerun brings the metadata of chunks stored before up to date, so a renamed
file's chunks cite its new name: an entry holds the metadata of its chunk's first occurrence in
the latest run that met it (the summary's ``metadata_updated`` counts the entries changed).

Resuming: a chunk already in the store is not compressed again, so rerunning the same command
after a crash (even ``kill -9``: see the store's write protocol) finishes the job.

Rerunning after the corpus changed: new and edited documents' new chunks are compressed; by
default nothing is deleted, so the entries of removed documents and of the old text of edited ones
stay in the store (the summary counts them: ``stale_entries``). Serve only the current
chunks' keys (``examples/precompress_and_serve.py``), precompress into a new store, or prune:
``prune=True`` (``--prune``) deletes, once the run has stored every chunk, the store's entries
that are not chunks of this run (with several shards: of this shard), excluded documents' too,
then reclaims their bytes (``AnchorStore.gc``). So the corpus must be everything the store serves.
Prune is refused when the chunk settings differ from those the store was filled with (it would
delete every chunk stored before), and skipped when an input could not be read (its chunks would go).

Scale-out: ``num_shards``/``shard_index`` give each worker the chunks whose key hashes to its
index (the same text always lands in the same shard). Under ``torchrun`` they come from
``WORLD_SIZE``/``RANK``, in a SLURM array from ``SLURM_ARRAY_TASK_COUNT``/``_ID``. Each shard
writes its own store (``<store>.shard-<iii>-of-<nnn>``, zero-padded, or the store path with ``{shard}``
formatted); ``python -m sac_rag.store merge <store> <store>.shard-*`` joins them.

Query time: ``load_compressed(store, chunk_texts)`` returns the ``AnchorKV`` objects the
generator takes as contexts (``compressor.template.build(kvs, question)``).

Command line: ``python -m sac_rag.precompress --corpus PATH --store PATH ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .chunking import Chunk, iter_chunks
from .compressor import SACCompressor, checkpoint_meta
from .config import SACConfig
from .corpus import DECODE_ERRORS, CorpusStats, Document, check_corpus, count_documents, read_corpus
from .errors import CheckpointError, FingerprintMismatchError, InvalidInputError, SACError
from .files import user_path
from .fingerprint import same_model
from .kv import AnchorKV
from .store import CHUNK_KEY, STORAGES, AnchorStore, EntryNotFoundError, StoreWriteError

logger = logging.getLogger(__name__)

DEFAULT_KV_DROPPING_BASE = "smollm2-135m"  # --kv-dropping without --base-model
WINDOW_BATCHES = 8  # chunks are gathered in windows of this many batches and sorted by length


@dataclass
class Summary:
    """What a precompression run did, and what the store holds afterwards.

    ``documents`` were read; ``duplicate_documents`` (the same text as an earlier one) and
    ``excluded_documents`` (``exclude``) left out; ``skipped_inputs`` counts unusable inputs by
    reason; ``other_files`` the files of a folder corpus that are not of a corpus type, by suffix.
    ``chunks`` counts this shard's chunks in the corpus (repeats included): ``compressed`` by
    this run, ``already_stored`` (by an earlier run, or the same text earlier in the corpus:
    ``repeated_chunks`` of them), ``metadata_updated`` of which were given this run's metadata (their
    document was renamed or changed); ``other_shards`` were left to other workers. ``tokens`` are
    those of the compressed chunks. ``entries``, ``bytes_on_disk``, ``kv_bytes`` (stored K/V)
    and ``full_kv_bytes`` (the full K/V of the same chunks in the same dtype) describe the whole
    store after the run; ``stale_entries`` of its entries are not chunks of this run (of this
    shard): of documents removed, edited or excluded since, or of other chunk settings (kept unless
    ``prune``). ``pruned`` says whether ``prune`` ran, ``pruned_entries`` how many entries it deleted
    (entries under keys ``AnchorStore.key_for`` does not make, stored through the API, and those of
    other shards, stay); ``not_pruned`` says why a run asked to prune did not.
    """

    store: str
    num_shards: int
    shard_index: int
    documents: int = 0
    duplicate_documents: int = 0
    excluded_documents: int = 0
    skipped_inputs: dict[str, int] = field(default_factory=dict)
    decoded_with_replacement: int = 0
    other_files: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    compressed: int = 0
    already_stored: int = 0
    repeated_chunks: int = 0
    metadata_updated: int = 0
    other_shards: int = 0
    tokens: int = 0
    seconds: float = 0.0
    entries: int = 0
    stale_entries: int = 0
    pruned_entries: int = 0
    pruned: bool = False
    not_pruned: str = ""
    bytes_on_disk: int = 0
    kv_bytes: int = 0
    full_kv_bytes: int = 0

    @property
    def chunks_per_second(self) -> float:
        return self.compressed / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def kv_reduction(self) -> float:
        """Full K/V bytes over stored K/V bytes (the ratio r for native storage)."""
        return self.full_kv_bytes / self.kv_bytes if self.kv_bytes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "chunks_per_second": self.chunks_per_second,
                "tokens_per_second": self.tokens_per_second, "kv_reduction": self.kv_reduction}

    def _stale_kind(self) -> str:
        """What the entries that are not chunks of this run are, and what becomes of them."""
        if self.pruned:
            return ("stored under keys of their own through the API, or of other shards; --prune leaves those: "
                    "python -m sac_rag.store prune STORE --keep KEYS_FILE keeps only the keys listed")
        return ("of documents removed, edited or excluded since, or of other chunk settings; kept: --prune deletes "
                "them, not entries stored under keys of their own through the API")

    def __str__(self) -> str:
        shard = f" (shard {self.shard_index + 1} of {self.num_shards})" if self.num_shards > 1 else ""
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_inputs.items()))
        other = ", ".join(f"{n} {suffix}" for suffix, n in sorted(self.other_files.items(), key=lambda i: -i[1]))
        return "\n".join([
            f"precompressed into {self.store}{shard}",
            f"  documents: {self.documents} read, {self.duplicate_documents} duplicates dropped"
            + (f", {self.excluded_documents} excluded" if self.excluded_documents else "")
            + (f", skipped: {skipped}" if skipped else "")
            + (f", {self.decoded_with_replacement} not valid UTF-8 or Unicode (decoded with U+FFFD)"
               if self.decoded_with_replacement else "")
            + (f"; files of other types not read: {other}" if other else ""),
            f"  chunks:    {self.chunks} in this shard: {self.compressed} compressed now, "
            f"{self.already_stored} already stored"
            + (f" ({self.repeated_chunks} of them repeat a chunk earlier in the corpus)" if self.repeated_chunks
               else "")
            + (f"; {self.metadata_updated} stored chunks given this run's metadata (a document renamed or changed)"
               if self.metadata_updated else "")
            + (f"; {self.other_shards} left to other shards" if self.num_shards > 1 else ""),
            f"  speed:     {self.tokens} tokens in {self.seconds:.1f} s: "
            f"{self.chunks_per_second:.2f} chunks/s, {self.tokens_per_second:.0f} tokens/s",
            f"  store:     {self.entries} entries"
            + (f" after pruning {self.pruned_entries} that were not chunks of this run" if self.pruned_entries
               else "")
            + (f" ({self.stale_entries} not chunks of this run: {self._stale_kind()})" if self.stale_entries else "")
            + f", {_size(self.bytes_on_disk)} on disk; K/V "
            f"{_size(self.kv_bytes)} vs {_size(self.full_kv_bytes)} as full K/V "
            f"({self.kv_reduction:.2f}x smaller)",
            *([f"  prune:     {self.not_pruned}"] if self.not_pruned else []),
        ])


def precompress(
    corpus_path: str | os.PathLike,
    store_path: str | os.PathLike,
    compressor: SACCompressor,
    chunk_tokens: int | None = None,
    overlap: int = 0,
    batch_size: int = 8,
    num_shards: int | None = None,
    shard_index: int | None = None,
    storage: str | None = None,
    dtype: str | torch.dtype | None = None,
    decode_errors: str = "replace",
    show_progress: bool = True,
    exclude: Collection[str] = (),
    prune: bool = False,
) -> Summary:
    """Compress every chunk of the corpus at ``corpus_path`` into the store at ``store_path``
    (created if missing; an existing store must be from this compressor).

    ``chunk_tokens`` defaults to the compressor's ``chunk_len`` (its maximum); ``overlap`` is
    in tokens. ``num_shards``/``shard_index`` default to the launcher's environment (see
    ``shard_from_env``); with more than one shard the store path is made per shard
    (``shard_store_path``). ``dtype`` is the store's (default: an existing store keeps its own,
    a new one takes the compressor's); ``storage`` is "native", "fp8" or "int8" (default: an
    existing store keeps its own, a new one is "native"). ``exclude``:
    document ids to leave out (a folder's file paths relative to it). ``prune``: once every chunk
    is stored, delete the store's entries (of this shard) that are not chunks of this run, then
    gc (see the module docstring: refused for other chunk settings than the store's, skipped when
    an input could not be read). Returns the ``Summary`` it also logs.
    """
    started = time.perf_counter()
    chunk_len = compressor.config.chunk_len
    chunk_tokens = _checked_chunking(chunk_tokens, overlap, chunk_len)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if storage is not None and storage not in STORAGES:
        raise InvalidInputError(f"storage={storage!r}; use one of {STORAGES}")
    if decode_errors not in DECODE_ERRORS:
        raise InvalidInputError(f"decode_errors={decode_errors!r}; use one of {DECODE_ERRORS}")
    num_shards, shard_index = resolve_shard(num_shards, shard_index)
    path = shard_store_path(store_path, shard_index, num_shards)
    stats = CorpusStats()
    documents = _usable_documents(read_corpus(corpus_path, stats, decode_errors, exclude))

    settings = {"created_by": "sac_rag.precompress", "base_model": compressor.config.base_model,
                "chunk_len": chunk_len, "chunk_tokens": chunk_tokens, "overlap": overlap}
    store = _open_store(path, compressor, dtype, storage, settings)
    summary = Summary(store=str(path), num_shards=num_shards, shard_index=shard_index)
    with store:
        earlier = store.manifest.get("extra", {})
        if any(earlier.get(k, v) != v for k, v in settings.items() if k in ("chunk_tokens", "overlap")):
            if prune:
                raise InvalidInputError(
                    f"refusing to prune {path}: it was filled with chunk_tokens={earlier.get('chunk_tokens')}, "
                    f"overlap={earlier.get('overlap')} and this run chunks with chunk_tokens={chunk_tokens}, "
                    f"overlap={overlap}, so pruning would delete every chunk stored before; prune with the "
                    "store's settings, or precompress with the new ones into a new store")
            logger.warning("%s was filled with chunk_tokens=%s, overlap=%s; this run chunks with %s, %s: "
                           "its chunks get new keys and are stored next to the old ones", path,
                           earlier.get("chunk_tokens"), earlier.get("overlap"), chunk_tokens, overlap)
        total = count_documents(corpus_path, decode_errors, exclude) if show_progress else None
        run = _Run(compressor, store, summary, batch_size, show_progress, total)
        run.run(documents, chunk_tokens, overlap)
        if prune:
            summary.pruned_entries, summary.not_pruned = _prune(store, run, stats)
            summary.pruned = not summary.not_pruned
        totals = store.stats()
    summary.documents, summary.duplicate_documents = stats.documents, stats.duplicates
    summary.excluded_documents, summary.other_files = stats.excluded, dict(stats.other_files)
    summary.skipped_inputs = dict(stats.skipped)
    summary.decoded_with_replacement = stats.replaced_encoding
    distinct = run.distinct_chunks()
    summary.repeated_chunks = summary.chunks - distinct
    summary.entries, summary.stale_entries = totals["entries"], max(0, totals["entries"] - distinct)
    summary.bytes_on_disk = _bytes_on_disk(path)  # now the store is closed: without its SQLite write-ahead log
    summary.kv_bytes, summary.full_kv_bytes = totals["kv_bytes_stored"], totals["full_kv_bytes"]
    summary.seconds = time.perf_counter() - started
    logger.info("%s", summary)
    return summary


def _checked_chunking(chunk_tokens: int | None, overlap: int, chunk_len: int) -> int:
    """``chunk_tokens`` (default: ``chunk_len``, the compressor's maximum), refused with ``overlap`` unless
    both fit a compressor of ``chunk_len``."""
    chunk_tokens = chunk_len if chunk_tokens is None else chunk_tokens
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not 4 <= chunk_tokens <= chunk_len:
        raise InvalidInputError(
            f"chunk_tokens={chunk_tokens!r}: one chunk is one stored entry, so it must be between "
            f"4 and the compressor's chunk_len={chunk_len}"
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < chunk_tokens:
        raise InvalidInputError(f"overlap must be an integer in [0, chunk_tokens={chunk_tokens}), got {overlap!r}")
    return chunk_tokens


def _open_store(path: Path, compressor: SACCompressor, dtype: str | torch.dtype | None, storage: str | None,
                settings: dict) -> AnchorStore:
    """The store at ``path``, created if missing. A folder that cannot be written is named as such:
    the bare OSError would name the temporary directory a creation starts with, which the user never
    asked for."""
    try:
        return AnchorStore.create(path, compressor.fingerprint, compressor.config.ratio,
                                  dtype or compressor.dtype, storage, settings, exist_ok=True,
                                  keep_dtype=dtype is None)
    except SACError:
        raise
    except OSError as err:
        raise StoreWriteError(
            err.errno or errno.EIO,
            f"cannot create the store at {path} ({err.strerror or err}: {err.filename}); choose a store path "
            "in a folder this user can write, or make its folder writable") from err


def _prune(store: AnchorStore, run: _Run, stats: CorpusStats) -> tuple[int, str]:
    """Delete the entries of ``store`` that ``run`` does not need (``_Run.stale``), then gc:
    ``(deleted, "")``, or ``(0, why not)`` when an input could not be read this time (an
    unreadable file, a broken symlink, a damaged .jsonl.gz): its documents may well still exist,
    and their chunks would be deleted only to be compressed again."""
    if stats.unread:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.unread.items()))
        why = (f"not pruned, because inputs could not be read ({counts}) and the chunks of their documents "
               "would be deleted; make them readable, or remove them, then prune again")
        logger.warning("%s", why)
        return 0, why
    deleted = store.delete(run.stale(store.keys()))
    store.gc()
    return deleted, ""


def _bytes_on_disk(path: Path) -> int:
    """What the store directory at ``path`` takes on disk (its files' sizes)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:  # a temporary file gone meanwhile
                pass
    return total


def _usable_documents(documents: Iterator[Document]) -> Iterator[Document]:
    """``documents``, once the first one has been read: a corpus that does not exist, cannot be
    read or holds no usable document raises ``CorpusError`` here, before a store is created for
    nothing (an empty store would pass for a finished run)."""
    first = next(documents)  # read_corpus raises rather than end without a document
    return itertools.chain([first], documents)


class _Run:
    """The loop: gather this shard's chunks in windows, skip stored ones, compress the rest a
    batch at a time (sorted by length, so batches pad little) and store each batch durably.

    The progress bar counts the documents whose chunks are all done with, compressed or found
    stored, out of the corpus's (``total``), so it shows how far the run is and how long it has to go;
    a resumed run moves through what it already stored instead of sitting at 0. Chunks, compressed
    and already stored ones are counted beside it."""

    def __init__(self, compressor: SACCompressor, store: AnchorStore, summary: Summary,
                 batch_size: int, show_progress: bool, total: int | None = None):
        self.compressor, self.store, self.summary = compressor, store, summary
        self.batch_size = batch_size
        self.window: dict[str, tuple[Chunk, Document]] = {}
        self.documents = 0
        self.met: set[int] = set()  # 64 bits of the key of each chunk of earlier windows
        self.show_progress = show_progress
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit=" documents", desc="precompressing", disable=not show_progress,
                        dynamic_ncols=True)
        self.started = time.perf_counter()

    def run(self, documents, chunk_tokens: int, overlap: int) -> None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:  # warnings (a skipped file) print above the bar, not through it
            with logging_redirect_tqdm() if self.show_progress else contextlib.nullcontext():
                self._run(documents, chunk_tokens, overlap)
        finally:
            self.bar.close()

    def _run(self, documents, chunk_tokens: int, overlap: int) -> None:
        s = self.summary
        for doc in documents:
            self.documents += 1
            for chunk in iter_chunks(doc.text, self.compressor.tokenizer, chunk_tokens, overlap, doc.id):
                if shard_of(chunk.key, s.num_shards) != s.shard_index:
                    s.other_shards += 1
                    continue
                s.chunks += 1
                if chunk.key in self.window:
                    s.already_stored += 1
                    continue
                self.window[chunk.key] = (chunk, doc)
                if len(self.window) >= self.batch_size * WINDOW_BATCHES:
                    self.flush(self.documents - 1)  # this document's later chunks are still to come
        self.flush(self.documents)

    def flush(self, documents_done: int) -> None:
        """Store the window's chunks; then the first ``documents_done`` documents are done."""
        self._store_window()
        self.bar.update(max(0, documents_done - self.bar.n))

    def _store_window(self) -> None:
        s = self.summary
        missing = set(self.store.missing(self.window))
        stored = [k for k in self.window if k not in missing]
        s.already_stored += len(stored)
        # Chunks stored before this run get its metadata where theirs differs (the store compares);
        # a chunk met in an earlier window of this run got it there, from its first occurrence.
        s.metadata_updated += self.store.update_metadata(
            {k: _metadata(*self.window[k]) for k in stored if _key_bits(k) not in self.met})
        self.met.update(_key_bits(k) for k in self.window)
        todo = sorted((item for k, item in self.window.items() if k in missing), key=lambda item: item[0].n_tokens)
        self.window = {}
        self.progress()
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            kvs = self.compressor.compress_chunks([c.token_ids for c, _ in batch], batch_size=self.batch_size)
            written = self.store.put_many([(c.key, kv, _metadata(c, doc)) for (c, doc), kv in zip(batch, kvs)])
            s.compressed += written
            s.already_stored += len(batch) - written  # written meanwhile by another writer
            s.tokens += sum(c.n_tokens for c, _ in batch)
            self.progress()

    def progress(self) -> None:
        s = self.summary
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix(chunks=s.chunks, compressed=s.compressed, already_stored=s.already_stored,
                             tokens_per_s=f"{s.tokens / elapsed:.0f}")

    def stale(self, keys: Sequence[str]) -> list[str]:
        """Those of a store's ``keys`` that this run's shard owns but whose chunks it did not meet.
        Keys of other shards, and keys ``AnchorStore.key_for`` does not make, are not this run's to
        judge. Chunks are compared by 64 bits of their keys: a stale entry that shares them with a
        current chunk (odds 2**-64 per pair) is kept, never the other way round."""
        s = self.summary
        keys = [k for k in keys if CHUNK_KEY.fullmatch(k)]
        if not keys:
            return []
        prefixes = np.fromiter((_key_bits(k) for k in keys), dtype=np.uint64, count=len(keys))
        ours = prefixes % np.uint64(s.num_shards) == np.uint64(s.shard_index)
        met = np.isin(prefixes, np.fromiter(self.met, dtype=np.uint64, count=len(self.met)))
        return [k for k, drop in zip(keys, ours & ~met) if drop]

    def distinct_chunks(self) -> int:
        """How many different chunk texts this run met (in this shard)."""
        return len(self.met)


def _key_bits(key: str) -> int:
    """The first 64 bits of a chunk's key, what a run remembers of each chunk it met."""
    return int(key[:16], 16)


def _metadata(chunk: Chunk, doc: Document) -> dict:
    return {"chunk_id": chunk.id, "doc_id": doc.id, "chunk_index": chunk.index, "text": chunk.text,
            "n_tokens": chunk.n_tokens, "start_char": chunk.start_char, "end_char": chunk.end_char,
            "doc": doc.metadata}


# -- sharding ---------------------------------------------------------------------------------


def shard_of(key: str, num_shards: int) -> int:
    """The shard a chunk belongs to: its key (a sha256 hex digest) modulo ``num_shards``."""
    return int(key[:16], 16) % num_shards


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(num_shards, shard_index)`` from the launcher: torchrun's ``WORLD_SIZE``/``RANK``, a
    SLURM array's ``SLURM_ARRAY_TASK_COUNT``/``SLURM_ARRAY_TASK_ID`` (less ``_MIN``, divided by
    ``_STEP``), else ``(1, 0)``."""
    env = os.environ if env is None else env
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            return _checked_shard(int(env["WORLD_SIZE"]), int(env["RANK"]), "WORLD_SIZE/RANK")
        if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
            index = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step
            return _checked_shard(int(env["SLURM_ARRAY_TASK_COUNT"]), index, "SLURM_ARRAY_TASK_*")
    except ValueError as err:
        raise InvalidInputError(f"cannot read the shard from the environment: {err}") from err
    return 1, 0


def resolve_shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """Explicit values win; both or neither must be given; else ``shard_from_env()``."""
    if num_shards is None and shard_index is None:
        return shard_from_env()
    if num_shards is None or shard_index is None:
        raise InvalidInputError("give both num_shards and shard_index, or neither (then the "
                                "environment of torchrun or a SLURM array decides)")
    return _checked_shard(num_shards, shard_index, "arguments")


def _checked_shard(num_shards: int, shard_index: int, source: str) -> tuple[int, int]:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise InvalidInputError(f"num_shards must be a positive integer, got {num_shards!r} ({source})")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise InvalidInputError(f"shard_index must be in [0, {num_shards}), got {shard_index!r} ({source})")
    return num_shards, shard_index


def shard_store_path(store_path: str | os.PathLike, shard_index: int, num_shards: int) -> Path:
    """Where shard ``shard_index`` writes: the store path itself for one shard; with several,
    the path with ``{shard}`` (and ``{num_shards}``) formatted if it has them, else
    ``<store>.shard-<iii>-of-<nnn>`` (zero-padded) beside it (merge them with ``sac_rag.store merge``)."""
    path = str(store_path)
    if num_shards == 1 and "{shard" not in path:
        return Path(path)
    if "{shard" in path:
        return Path(path.format(shard=shard_index, num_shards=num_shards))
    return Path(f"{path.rstrip('/')}.shard-{shard_index:03d}-of-{num_shards:03d}")


# -- query time -------------------------------------------------------------------------------


def load_compressed(store: AnchorStore | str | os.PathLike, chunks: Sequence[str | Chunk],
                    fingerprint: str | None = None) -> list[AnchorKV]:
    """The stored ``AnchorKV`` of each chunk (given by its text or as a ``Chunk``), in order,
    at offset 0: pass them as contexts to the prompt (``template.build(kvs, question)``); the
    generator places each chunk after the text before it. ``store`` may be a path (opened
    read-only, checked against ``fingerprint`` if given). Keys instead of texts: ``store.get_many``.
    """
    if isinstance(chunks, (str, Chunk)):
        raise InvalidInputError("load_compressed takes a list of chunk texts")
    keys = [c.key if isinstance(c, Chunk) else AnchorStore.key_for(c) for c in chunks]
    if isinstance(store, AnchorStore):
        if fingerprint is not None and not same_model(store.fingerprint, fingerprint):
            raise FingerprintMismatchError(f"the anchor store at {store.path}", fingerprint, store.fingerprint,
                                           "Load chunks with the compressor the store was built with.")
        return _get(store, keys)
    with AnchorStore.open(store, fingerprint, readonly=True) as opened:
        return _get(opened, keys)


def _get(store: AnchorStore, keys: list[str]) -> list[AnchorKV]:
    try:
        return store.get_many(keys)
    except EntryNotFoundError as err:
        raise EntryNotFoundError(f"{err}. Precompress the corpus these chunks come from "
                                 "(python -m sac_rag.precompress) with the same chunking.") from err


# -- command line -----------------------------------------------------------------------------


def build_compressor(args: argparse.Namespace) -> SACCompressor:
    """The compressor the command line names: a directory or built-in name (on ``--base-model``
    if given, else on the base model its checkpoint names), or (``--kv-dropping``) the untrained
    uniform KV-dropping baseline on ``--base-model`` (default: the built-in SmolLM2)."""
    from .pipeline import load_compressor

    base_model = getattr(args, "base_model", None)
    if args.kv_dropping:
        ratio = 5 if args.ratio is None else args.ratio
        config = SACConfig(base_model=base_model or DEFAULT_KV_DROPPING_BASE, ratio=ratio, lora_rank=0,
                           bidirectional=False, anchor_embedding="none")
        return SACCompressor(config, device=args.device, dtype=args.dtype)
    try:
        compressor = load_compressor(args.compressor, args.device, args.dtype, base_model)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Pass --compressor DIR (a trained compressor), or --kv-dropping "
                              f"--base-model NAME for the untrained baseline.") from err
    compressor.config.set_refinement(getattr(args, "refine_steps", None))
    return compressor


def _chunk_len(args: argparse.Namespace) -> int | None:
    """The chunk_len of the compressor the command line names, read without loading it; None for a
    checkpoint that cannot be read (loading it says why)."""
    if args.kv_dropping:
        return SACConfig().chunk_len
    try:
        return int(checkpoint_meta(args.compressor)["config"]["chunk_len"])
    except (SACError, OSError, KeyError, TypeError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    from .pipeline import DEFAULT_COMPRESSOR

    parser = argparse.ArgumentParser(
        prog="python -m sac_rag.precompress",
        description="Compress every chunk of a corpus into an anchor store (resumable: a rerun "
        "skips stored chunks). Corpus: a folder of .txt/.md files, a .jsonl file with a 'text' "
        "field per line, or SQuAD .json.",
        epilog="Sharded runs: --num-shards N --shard-index I (or torchrun / a SLURM array, read from "
        "the environment) each write STORE.shard-III-of-NNN (zero-padded, e.g. STORE.shard-000-of-002); join them with "
        "`python -m sac_rag.store merge STORE STORE.shard-*`.",
    )
    parser.add_argument("--corpus", required=True, type=user_path,
                        help="a folder (its .txt/.md/.markdown files, recursively, hidden ones skipped), a .jsonl "
                             "file (a 'text' field per line, 'id' and other fields kept), SQuAD .json (.jsonl and "
                             ".json may be .gz/.xz), or any other file, read as one text document")
    parser.add_argument("--store", required=True,
                        help="store directory (created if missing; an existing one must be from the same compressor "
                             "and --storage). Nothing is deleted from it unless --prune: entries of removed or edited "
                             "documents stay, and the summary counts them")
    parser.add_argument("--prune", action="store_true",
                        help="after the run, delete the store's entries that are not chunks of this corpus (of "
                             "documents removed or edited since, and of documents left out by --exclude or "
                             "--decode-errors skip), then reclaim their space (gc); so --corpus must be everything "
                             "the store serves. With --num-shards, only this shard's entries. Refused when "
                             "--chunk-tokens/--overlap differ from the store's (every stored chunk would go); "
                             "skipped, with a warning, when an input could not be read")
    parser.add_argument("--exclude", action="append", default=[], metavar="DOC_ID",
                        help="leave out documents: an id (a folder corpus's file path relative to it, e.g. "
                             "questions.txt, or a JSONL 'id'), a glob pattern over ids ('drafts/*.md'; * also matches "
                             "across /, so '*.md' leaves out every .md file) or a folder ('drafts/'); a path to a "
                             "file in the corpus works too; one that leaves out nothing is warned about; repeatable")
    model = parser.add_argument_group("compressor")
    model.add_argument("--compressor", default=DEFAULT_COMPRESSOR,
                       help=f"trained compressor directory or built-in name (default {DEFAULT_COMPRESSOR})")
    model.add_argument("--kv-dropping", action="store_true",
                       help="use the untrained uniform KV-dropping baseline instead of --compressor")
    model.add_argument("--base-model", default=None,
                       help="base model (local directory, hub id or built-in name) to load --compressor on, "
                            "instead of the one its checkpoint names (e.g. after that directory moved; the weights "
                            "are checked against the checkpoint); with --kv-dropping the model whose K/V are "
                            f"dropped (default {DEFAULT_KV_DROPPING_BASE})")
    model.add_argument("--ratio", type=int, default=None,
                       help="compression ratio for --kv-dropping (default 5); a trained compressor compresses at "
                            "the ratio it was trained for")
    model.add_argument("--refine-steps", type=int, default=None,
                       help="refine each compressed chunk by this many steps (sac_rag.refine: better answers; 5 "
                            "steps compressed SQuAD paragraphs 11x slower on a CPU, benchmarks/refine_cost.py; "
                            "default: the compressor's setting, 0 = none); a store holds chunks of one setting only")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    model.add_argument("--dtype", default=None,
                       help="model and new store dtype: auto (default: bfloat16 where the device computes it "
                            "natively, else float32), bfloat16, float16, float32; an existing store keeps its own")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="tokens per chunk (default and maximum: the compressor's chunk_len)")
    parser.add_argument("--overlap", type=int, default=0, help="tokens shared by consecutive chunks (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass (default 8)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="split the corpus into this many shards, one run each, all given the same --store "
                             "(default: from torchrun / SLURM array variables, else 1)")
    parser.add_argument("--shard-index", type=int, default=None,
                        help="which shard this run compresses, 0 .. --num-shards - 1")
    parser.add_argument("--storage", choices=STORAGES, default=None,
                        help="native (the dtype), or fp8/int8 with per-layer/head scales (default: an existing "
                             "store keeps its own, a new one is native)")
    parser.add_argument("--decode-errors", choices=DECODE_ERRORS, default="replace",
                        help="text that is not UTF-8 (or JSON text with lone surrogates): decode "
                             "with U+FFFD (replace, the default) or skip it")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it counts chunks done, compressed or found stored)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary (documents read and skipped by reason, chunks compressed and "
                             "already stored, the store's size) as JSON instead of text")
    args = parser.parse_args(argv)
    if args.refine_steps is not None and args.kv_dropping:
        parser.error("--refine-steps refines the chunks of a trained --compressor, not those of --kv-dropping")
    if args.refine_steps is not None and args.refine_steps < 0:
        parser.error(f"--refine-steps must be >= 0 (0 = none), got {args.refine_steps}")
    if args.ratio is not None and not args.kv_dropping:
        parser.error(f"--ratio {args.ratio} sets the ratio of --kv-dropping only: a trained compressor compresses at "
                     "the ratio it was trained for (choose one trained for the ratio you want); leave --ratio out, "
                     "or add --kv-dropping for the untrained baseline")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        num_shards, shard_index = resolve_shard(args.num_shards, args.shard_index)
        # what can be refused without the model is refused before loading it
        check_corpus(args.corpus)
        AnchorStore.check_path(shard_store_path(args.store, shard_index, num_shards), exist_ok=True)
        chunk_len = _chunk_len(args)
        if chunk_len is not None:
            _checked_chunking(args.chunk_tokens, args.overlap, chunk_len)
        compressor = build_compressor(args)
        summary = precompress(
            args.corpus, args.store, compressor, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
            batch_size=args.batch_size, num_shards=num_shards, shard_index=shard_index,
            storage=args.storage, decode_errors=args.decode_errors, show_progress=not args.no_progress,
            exclude=args.exclude, prune=args.prune,
        )
    except (SACError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a message, not a traceback from wherever the loop was
        print("\ninterrupted: the chunks stored so far are kept (each write is whole or "
              "absent); rerun the same command to resume, stored chunks are skipped", file=sys.stderr)
        return 130
    print(json.dumps(summary.to_dict()) if args.json else summary)
    if summary.num_shards > 1 and "{shard" not in args.store:
        print(f"when every shard is done: python -m sac_rag.store merge {args.store} "
              f"{args.store.rstrip('/')}.shard-*-of-{num_shards:03d}", file=sys.stderr)
    if summary.not_pruned:  # asked for and not done: a script running this must be able to tell
        print(f"error: {summary.not_pruned}", file=sys.stderr)
        return 1
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
