"""A persistent, embedded store of precompressed chunks (anchor K/V), keyed by chunk text.

SAC pays off in RAG when every chunk of a corpus is compressed once, offline, and a query then
loads r-times smaller K/V instead of re-reading text. The store that holds them must survive a
crash in the middle of a long precompression run, must notice corrupt bytes instead of feeding
wrong K/V to the decoder (which would answer fluently and wrongly), must let queries read while
a job writes, and must need no server. It is a directory:

    manifest.json          format version, compressor fingerprint, ratio, dtype, storage codec,
                           position convention, checksum algorithm (+ the caller's "extra").
                           Its presence is what makes a directory a store.
    index.sqlite           SQLite in WAL mode, table ``entries``: key -> shard, offset, length,
                           sha256 of the stored bytes, sizes, JSON metadata.
    writer.lock            ``flock``-ed by a writer for the length of one write.
    shards/000000.shard    append-only: one safetensors blob per entry, back to back.

Each blob is a whole safetensors file (``AnchorKV.to_bytes()`` for native storage, the
``quantize`` codes plus scales for fp8/int8), so an entry cut out of a shard at its
(offset, length) loads with ``safetensors`` alone. No pickle anywhere: a store received from
someone else cannot run code when opened. A read checks the bytes against their sha256, then the
decoded entry against its index row (anchors, tokens, K/V bytes) and the manifest (storage,
dtype, fingerprint, offset 0): bytes in the wrong place or from another tool are refused as
corrupt, never converted and returned.

Write protocol (why a kill -9 can never leave an indexed entry unreadable): under the writer
lock, blobs are appended to a shard and the shard is fsynced (and its directory, when the file
is new) *before* the index rows are committed, in one SQLite transaction with
``synchronous=FULL``. A crash in between leaves bytes that no row references ("orphans"):
harmless, counted by ``stats``/``verify``, reclaimed by ``gc``. Readers see the index through
WAL snapshots, so they only ever look up rows whose bytes are durable and complete: no torn
reads, and readers never wait for the writer. A reader unmaps shards that ``gc`` deleted, so
their space is freed on disk. A store on a path this process cannot write (a read-only mount)
opens only with ``readonly=True`` (else ``StoreReadOnlyError``); such a reader notices a writer
working through another, writable view of the same directory and reads its commits too.

Deleting (``delete``) removes index rows, in one transaction: the entries' bytes become orphans,
which ``gc`` reclaims. Nothing is overwritten, so a read that found an entry before the delete
still gets its valid bytes (and ``gc`` never reuses a shard id); a lookup after it raises
``EntryNotFoundError``, also for an entry a reader had cached (``get`` asks the index first).

Positions: entries are chunk-local, the chunk's first token at position 0 (``AnchorKV.offset ==
0``). ``put`` refuses other offsets rather than re-rotating them, because rotating needs the
model's ``KeyRotator``; the caller has it (``kv.at_offset(0, rotator)``), the store does not.

Keys are ``AnchorStore.key_for(text)`` (sha256 of the chunk text) by convention; one store holds
one compressor's entries (the manifest fingerprint), so the same text under another compressor
lives in another store.

Command line: ``python -m sac_rag.store {verify,stats,gc,merge,prune} ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import mmap
import numbers
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .devices import dtype_name, resolve_dtype
from .errors import FingerprintMismatchError, InvalidInputError, SACError
from .files import HAVE_FILE_LOCKS, FileLock, atomic_write, fsync_dir
from .fingerprint import same_base_model, same_model
from .kv import FORMAT as KV_FORMAT
from .kv import AnchorKV, read_metadata
from .quantize import CODECS, dequantize, quantize

if TYPE_CHECKING:
    from typing_extensions import Self

STORE_FORMAT = "sac-anchor-store/1"
POSITION_CONVENTION = "chunk-local: keys rotated to offset 0 of the chunk"
STORAGES = ("native", *CODECS)
QUANTIZED_KV_FORMAT = "sac-anchor-kv-8bit/1"

MANIFEST = "manifest.json"
INDEX = "index.sqlite"
LOCK = "writer.lock"
CHUNK_KEY = re.compile("[0-9a-f]{64}")  # the shape of key_for's keys (sha256, hex)
SHARDS = "shards"
SHARD_SUFFIX = ".shard"

STALE_CREATION_SECONDS = 3600.0  # a creation's temporary directory this old was left by a killed process
DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_SHARD_BYTES = 1 << 30
_SQL_BATCH = 500  # keys per "IN (...)" query, below SQLite's variable limit
_MOVE_RETRIES = 8  # re-lookups of an entry that gc moved while it was being read


# -- errors -----------------------------------------------------------------------------------


class NotAStoreError(SACError):
    """The path is not an anchor store (missing, a file, or a directory without a manifest)."""


class StoreCorruptionError(SACError):
    """Stored bytes fail their checksum or do not decode. Names the entry and its metadata."""

    def __init__(self, message: str, key: str | None = None, metadata: dict | None = None,
                 problem: str | None = None):
        self.key = key
        self.metadata = metadata or {}
        self.problem = problem or message
        super().__init__(message)


class StoreWriteError(SACError, OSError):
    """A write failed (e.g. disk full). Nothing of the failed write is indexed: fix the cause
    and rerun the same writes."""


class StoreRecoveryNeededError(SACError, PermissionError):
    """A read-only open found commits that only an open with write access can recover."""


class StoreReadOnlyError(SACError, PermissionError):
    """An open for writing (``put``, ``delete``, ``gc``, ``merge`` into it, ``precompress``) of a store on a
    path this process cannot write: a read-only mount or directory. The store is fine: open it
    with ``readonly=True`` to read it."""


class EntryNotFoundError(SACError, KeyError):
    """No entry under that key (a ``KeyError``, so ``except KeyError`` works)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


# -- reports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadEntry:
    key: str
    metadata: dict
    problem: str


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` when every indexed entry reads, checks and decodes and the
    SQLite index passes its own check. Orphan bytes are reported but are not an error."""

    entries: int = 0
    bad: list[BadEntry] = field(default_factory=list)
    index_problems: list[str] = field(default_factory=list)
    orphan_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.index_problems

    def summary(self) -> str:
        lines = [
            (f"{'OK' if self.ok else 'CORRUPT'}: {self.entries} entries checked, "
             f"{len(self.bad)} bad, {self.orphan_bytes} orphan bytes"
             + (" (reclaim with gc)" if self.orphan_bytes else ""))
        ]
        lines += [f"  index: {p}" for p in self.index_problems]
        lines += [f"  {b.key} {_describe(b.metadata)}: {b.problem}" for b in self.bad]
        return "\n".join(lines)


# -- the store --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """An entry's index row: where its bytes are, their checksum, and what they must decode to
    (``n_anchors``, ``n_tokens`` and ``kv_bytes``, the decoded K/V bytes in the store dtype)."""

    key: str
    shard: int
    offset: int
    length: int
    checksum: str
    metadata_json: str
    n_anchors: int
    n_tokens: int
    kv_bytes: int

    @property
    def metadata(self) -> dict:
        """The entry's metadata; text a hand edit left that is not a JSON object comes back
        wrapped, ``{"metadata": ...}``, rather than failing every read of it."""
        return _safe_metadata(self.metadata_json)


@dataclass(frozen=True)
class _Record:
    """One entry ready to be written: its blob and its index columns."""

    key: str
    blob: bytes
    checksum: str
    n_anchors: int
    n_tokens: int
    kv_bytes: int
    stored_kv_bytes: int
    full_kv_bytes: int
    metadata_json: str


_ROW_COLUMNS = "key, shard, offset, length, checksum, metadata, n_anchors, n_tokens, kv_bytes"
_PLACE_COLUMNS = _ROW_COLUMNS.replace("metadata", "'{}'")  # where each entry is, not its (large) metadata
_ROW_TYPES = (str, int, int, int, str, str, int, int, int)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    shard INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    n_anchors INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    kv_bytes INTEGER NOT NULL,
    stored_kv_bytes INTEGER NOT NULL,
    full_kv_bytes INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_place ON entries (shard, offset);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _check_key_list(keys: object, method: str) -> None:
    """A call that takes several keys given one: a str would be read character by character."""
    if isinstance(keys, (str, bytes)):
        raise InvalidInputError(f"{method} takes a list of keys, not one key: store.{method}([{keys!r}])")


def store_path(path: str | os.PathLike) -> Path:
    """A store's path as every later read and write uses it: ``~`` expanded, and absolute, so that a
    store opened by a relative path stays that store after the process changes directory."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InvalidInputError(f"a store path is a non-empty str or os.PathLike, got {path!r:.60}")
    return Path(os.path.expanduser(os.fspath(path))).absolute()


def _checked_cache_bytes(cache_bytes: object) -> int:
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise InvalidInputError(f"cache_bytes must be a whole number of bytes >= 0 (0: no cache), got {cache_bytes!r}")
    return cache_bytes


def other_compressor_advice(wanted: str, stored: str, dtype: str, rebuild: str) -> str:
    """What to do about a store built by another compressor than ``wanted``: rebuild it, or load the
    one it was built with; of the same base model, that may be the same checkpoint loaded in another
    dtype (float32 weights, as training saves them, rounded to bfloat16 are other weights)."""
    from .compressor import builtin_named

    advice = f"{rebuild}, or load the compressor it was built with."
    builtin = builtin_named(stored)
    if builtin is not None:
        advice += f" That is the built-in compressor {builtin!r}: load it by that name."
    elif same_base_model(wanted, stored):
        advice += (f" If that is this compressor's checkpoint: the store was built with it in {dtype}, and a "
                   "checkpoint saved in float32 (as python -m sac_rag.train saves one) is other weights once "
                   f"rounded to a narrower dtype: load it with dtype={dtype!r}. The same weights with other "
                   "settings (refine_steps, say) are another compressor too.")
    return advice


class AnchorStore:
    """A directory of precompressed chunks. Build with ``create``, reopen with ``open``.

    Thread-safe; open one instance per process (do not share across ``fork``). Entries
    returned by ``get`` may be shared with the in-process LRU cache: do not modify their
    tensors in place.
    """

    def __init__(self, path: Path, manifest: dict, readonly: bool, cache_bytes: int):
        """Private: use ``AnchorStore.create`` or ``AnchorStore.open``."""
        self._path = path
        self._manifest = manifest
        self._readonly = readonly
        self._dtype = resolve_dtype(manifest["dtype"], torch.device("cpu"))
        self._shard_bytes = int(manifest.get("shard_bytes", DEFAULT_SHARD_BYTES))
        self._db_lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._maps: dict[int, mmap.mmap] = {}
        self._maps_lock = threading.Lock()
        self._cache = _LRU(cache_bytes)
        self._conn: sqlite3.Connection | None = None
        # An index opened as immutable (a read-only view of the directory, see _connect) is
        # reopened when the index changes: SQLite would neither see new commits nor lock.
        self._frozen: tuple | None = None
        self._conn, self._frozen = _connect(path / INDEX, readonly)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        fingerprint: str,
        ratio: int,
        dtype: str | torch.dtype = "bfloat16",
        storage: str | None = "native",
        extra_manifest: dict | None = None,
        *,
        exist_ok: bool = False,
        keep_dtype: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> AnchorStore:
        """Create an empty store at ``path`` (which must not exist or be an empty directory).

        ``dtype`` is what entries decode to (and how "native" storage keeps them);
        ``storage`` is "native", "fp8" or "int8" (see ``quantize``). With ``exist_ok`` an
        existing store is opened instead, provided it was made with the same fingerprint,
        ratio, dtype and storage: that is how a resumed precompression run reopens its store
        (``storage=None``: whatever storage it has; a new store is then "native").
        With ``keep_dtype`` as well, an existing store keeps its own dtype whatever ``dtype``
        says (entries are cast to it on write), so a run that computes in another dtype (float32
        on a CPU without bf16) can continue a store begun in bfloat16.
        Writers stop appending to a shard file once it holds ``shard_bytes`` (kept in the
        manifest); smaller shards make ``gc`` cheaper, fewer shards need fewer open maps.
        """
        path = store_path(path)
        _checked_cache_bytes(cache_bytes)  # before anything is made
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InvalidInputError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Integral) or ratio < 1:
            raise InvalidInputError(f"ratio must be a positive integer, got {ratio!r}")
        ratio = int(ratio)  # numpy's too, written to the manifest as a JSON number
        checked = ("ratio",) + (("storage",) if storage is not None else ()) + (() if keep_dtype else ("dtype",))
        storage = "native" if storage is None else storage
        if storage not in STORAGES:
            raise InvalidInputError(f"storage={storage!r}; use one of {STORAGES}")
        dtype_str = dtype_name(resolve_dtype(dtype, torch.device("cpu")))
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise InvalidInputError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        if extra_manifest is not None and not isinstance(extra_manifest, dict):
            raise InvalidInputError("extra_manifest must be a dict of JSON values")
        manifest = {
            "format": STORE_FORMAT,
            "fingerprint": fingerprint,
            "ratio": ratio,
            "dtype": dtype_str,
            "storage": storage,
            "position_convention": POSITION_CONVENTION,
            "entry_format": KV_FORMAT if storage == "native" else QUANTIZED_KV_FORMAT,
            "checksum": "sha256",
            "shard_bytes": shard_bytes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "extra": extra_manifest or {},
        }
        try:
            manifest_text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"extra_manifest is not JSON-serializable: {err}") from err

        def reopen() -> AnchorStore:
            store = cls.open(path, fingerprint, cache_bytes=cache_bytes)
            for name in checked:
                if store.manifest[name] != manifest[name]:
                    store.close()
                    raise InvalidInputError(
                        f"the store at {path} has {name}={store.manifest[name]!r}, not "
                        f"{manifest[name]!r}; use another path or the store's settings"
                    )
            return store

        if cls.check_path(path, exist_ok):
            return reopen()
        if path.is_symlink():  # a link to an empty directory (check_path): the store is made there
            path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Built aside, then renamed into place: a crash never leaves a half-made store.
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-", dir=path.parent))
        try:
            os.chmod(tmp, 0o755)
            (tmp / SHARDS).mkdir()
            try:
                conn = sqlite3.connect(tmp / INDEX, isolation_level=None)
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(_SCHEMA)
                finally:
                    conn.close()
            except sqlite3.Error as err:  # e.g. "database or disk is full", "disk I/O error"
                raise StoreWriteError(errno.EIO, f"cannot create the store at {path}: its index could not be "
                                                 f"written ({err}); make room on the disk (or check that "
                                                 f"{path.parent} can be written), then run again") from err
            atomic_write(tmp / MANIFEST, manifest_text.encode())
            fsync_dir(tmp / SHARDS)
            fsync_dir(tmp)
            try:
                os.rename(tmp, path)  # also replaces an empty directory
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and (path / MANIFEST).exists():
                    if exist_ok:  # someone else created it meanwhile
                        return reopen()
                    raise InvalidInputError(f"a store already exists at {path}") from err
                raise
            fsync_dir(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _remove_stale_creations(path)
        return cls.open(path, fingerprint, cache_bytes=cache_bytes)

    @staticmethod
    def check_path(path: str | os.PathLike, exist_ok: bool = False) -> bool:
        """Whether a store exists at ``path`` (to reopen: only with ``exist_ok``); raises the error
        ``create`` would, without writing anything, when no store can be made there: a file, a
        directory that is neither empty nor a store, or a new path in a folder this user cannot
        write. What a long job checks before it loads a model to fill the store."""
        path = store_path(path)
        if path.is_symlink() and not path.exists():
            raise NotAStoreError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                                 "that directory, or remove the link")
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise NotAStoreError(f"{path} is a file, not a directory; choose another path")
            if (path / MANIFEST).exists():
                if exist_ok:
                    return True
                raise InvalidInputError(
                    f"a store already exists at {path}; open it with AnchorStore.open "
                    "(or pass exist_ok=True)"
                )
            if any(path.iterdir()):
                raise InvalidInputError(
                    f"{path} is a non-empty directory that is not a store; refusing to create a "
                    "store inside it: choose an empty or new path"
                )
        folder = next(p for p in path.absolute().parents if p.exists() or p == p.parent)  # where it is made
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            file = not folder.is_dir()
            what, code = ("a file", errno.ENOTDIR) if file else ("not writable by this user", errno.EACCES)
            raise StoreWriteError(code, f"cannot create the store at {path}: {folder} is {what}; choose a store "
                                        "path in a folder this user can write, or make its folder writable")
        return False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        fingerprint: str | None = None,
        readonly: bool = False,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> AnchorStore:
        """Open an existing store. With ``fingerprint``, refuse a store built by another model
        or compressor (``FingerprintMismatchError``, naming both). ``cache_bytes`` bounds the
        in-process LRU of decoded entries (0 disables it)."""
        path = store_path(path)
        _checked_cache_bytes(cache_bytes)
        if not isinstance(readonly, bool):
            raise InvalidInputError(f"readonly must be True or False, got {readonly!r}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise InvalidInputError(f"fingerprint must be a string (or None: any store), got {fingerprint!r:.60}")
        manifest = _read_manifest(path)
        if fingerprint is not None and not same_model(fingerprint, manifest["fingerprint"]):
            raise FingerprintMismatchError(
                f"the anchor store at {path}",
                expected=fingerprint,
                found=manifest["fingerprint"],
                advice=other_compressor_advice(fingerprint, manifest["fingerprint"], manifest["dtype"],
                                               "Rebuild the store with this compressor"),
            )
        if not (path / INDEX).is_file() or not (path / SHARDS).is_dir():
            raise StoreCorruptionError(
                f"the store at {path} has a manifest but no {INDEX} or {SHARDS}/ directory; "
                "it cannot be read: rebuild it"
            )
        if not readonly:
            _check_writable_path(path)
        try:
            return cls(path, manifest, readonly, cache_bytes)
        except sqlite3.DatabaseError as err:
            if not readonly:
                _check_writable_path(path)  # e.g. made read-only meanwhile: not corruption
            raise StoreCorruptionError(
                f"the index of the store at {path} is unreadable: {err}") from err

    def close(self) -> None:
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._maps_lock:
            self._maps.clear()  # mmaps close when the last reference goes
        self._cache.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AnchorStore({str(self._path)!r}, fingerprint={self.fingerprint!r}, "
                f"storage={self.storage!r}, readonly={self._readonly})")

    # -- properties ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))  # a copy

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def ratio(self) -> int:
        return self._manifest["ratio"]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def storage(self) -> str:
        return self._manifest["storage"]

    @property
    def readonly(self) -> bool:
        return self._readonly

    @staticmethod
    def key_for(text: str) -> str:
        """The key of a chunk: sha256 (hex) of its UTF-8 text."""
        if not isinstance(text, str):
            raise InvalidInputError(
                f"key_for takes the chunk text (str), got {type(text).__name__}")
        try:
            return hashlib.sha256(text.encode("utf-8")).hexdigest()
        except UnicodeEncodeError as err:
            raise InvalidInputError(
                f"the chunk text is not valid Unicode: it holds a lone surrogate "
                f"({text[err.start:err.end]!r} at character {err.start}), which has no UTF-8 "
                "form; replace it (e.g. with U+FFFD) before compressing or looking it up"
            ) from None

    # -- writing ------------------------------------------------------------------------------

    def put(self, key: str, kv: AnchorKV, metadata: dict | None = None) -> bool:
        """Store one chunk. Returns False (and writes nothing) if ``key`` is already stored."""
        return self.put_many([(key, kv, metadata)]) == 1

    def put_many(self, items: Iterable[tuple]) -> int:
        """Store ``(key, kv)`` or ``(key, kv, metadata)`` items in one durable transaction.

        Keys already stored (or repeated within ``items``) are skipped, so a rerun after a
        crash resumes. Returns how many entries were written. ``metadata`` is a JSON dict kept
        with the entry (e.g. a chunk id or source document) and named in corruption errors.
        """
        self._check_writable("put entries into")
        checked = []
        for item in items:
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise InvalidInputError("put_many takes (key, kv) or (key, kv, metadata) tuples")
            key, kv, metadata = (*item, None)[:3]
            self._check_entry(key, kv)
            checked.append((key, kv, metadata))
        # Encoding costs more than this query: skip what is stored already (the write
        # re-checks under the writer lock).
        skip = set(self._present([key for key, _, _ in checked]))
        records = []
        for key, kv, metadata in checked:
            if key not in skip:
                skip.add(key)
                records.append(self._encode(key, kv, metadata))
        return self._write(records)

    def delete(self, keys: Iterable[str]) -> int:
        """Remove the entries under ``keys``; returns how many were removed (keys not stored, or
        repeated, are ignored). One durable transaction: a crash leaves all of them or none.

        Only the index rows go: the bytes stay in their shards as orphans until ``gc`` reclaims
        them (``stats``/``verify`` count them meanwhile), because rewriting shards here would
        move every other entry of those shards under readers, which is gc's job. Readers that
        found an entry before the delete still read valid bytes; later lookups do not find it.
        """
        _check_key_list(keys, "delete")
        self._check_writable("delete entries from")
        keys = list(dict.fromkeys(keys))
        for key in keys:
            _check_key(key)
        if not keys:
            return 0
        with self._write_lock, _writer_lock(self._path / LOCK):
            try:
                deleted = self._commit_rows("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
            except (sqlite3.Error, OSError) as err:
                raise _write_error(err, self._path, "deleting entries", "nothing was deleted",
                                   "rerun the delete") from err
        self._cache.discard(keys)
        return deleted

    def _check_entry(self, key: str, kv: AnchorKV) -> None:
        _check_key(key)
        if not isinstance(kv, AnchorKV):
            raise InvalidInputError(
                f"the store holds AnchorKV objects, got {type(kv).__name__} for key {key}"
            )
        if not same_model(kv.fingerprint, self.fingerprint):
            raise FingerprintMismatchError(
                f"the chunk {key}",
                expected=self.fingerprint,
                found=kv.fingerprint,
                advice=f"Store it in a store of its own compressor, not in {self._path}.",
            )
        if kv.offset != 0:
            raise InvalidInputError(
                f"chunk {key} is at offset {kv.offset}; the store keeps chunks chunk-local "
                "(offset 0): pass kv.at_offset(0, rotator)"
            )

    def _encode(self, key: str, kv: AnchorKV, metadata: dict | None = None) -> _Record:
        self._check_entry(key, kv)
        metadata_json = _dumps_metadata(metadata, key)

        given = kv.detach()
        kv = given.to(device="cpu", dtype=self._dtype)
        # Checked after the cast: float32 values beyond float16's range become infinities.
        if not (torch.isfinite(kv.keys).all() and torch.isfinite(kv.values).all()):
            if not (torch.isfinite(given.keys).all() and torch.isfinite(given.values).all()):
                raise InvalidInputError(f"chunk {key} has NaN or infinite K/V; not storing it")
            raise InvalidInputError(
                f"chunk {key} has K/V values beyond the range of the store's dtype "
                f"{dtype_name(self._dtype)} (at most {torch.finfo(self._dtype).max:g}); not storing "
                "them as infinities: store them in a bfloat16 or float32 store"
            )
        if self.storage == "native":
            blob = kv.to_bytes()
            stored = kv.nbytes
        else:
            blob, stored = _encode_8bit(kv, self.storage)
        full_kv_bytes = kv.nbytes // kv.n_anchors * kv.n_tokens if kv.n_anchors else 0
        return _Record(
            key=key, blob=blob, checksum=hashlib.sha256(blob).hexdigest(),
            n_anchors=kv.n_anchors, n_tokens=int(kv.n_tokens), kv_bytes=kv.nbytes,
            stored_kv_bytes=stored, full_kv_bytes=full_kv_bytes, metadata_json=metadata_json,
        )

    def _write(self, records: list[_Record]) -> int:
        """Append blobs, fsync, then commit their index rows (the crash-safety order)."""
        self._check_writable()
        if not records:
            return 0
        with self._write_lock, _writer_lock(self._path / LOCK):
            present = set(self._present([r.key for r in records]))
            todo = []
            for record in records:
                if record.key not in present:
                    present.add(record.key)
                    todo.append(record)
            if not todo:
                return 0
            appender = _ShardAppender(self._path / SHARDS, self._shard_bytes, self._next_shard())
            try:
                places = [appender.add(r.blob) for r in todo]
                appender.sync()
            except OSError as err:
                appender.rollback()
                raise _write_error(err, self._path, "writing entry data") from err
            now = time.time()
            rows = [
                (r.key, shard, offset, len(r.blob), r.checksum, r.n_anchors, r.n_tokens,
                 r.kv_bytes, r.stored_kv_bytes, r.full_kv_bytes, r.metadata_json, now)
                for r, (shard, offset) in zip(todo, places)
            ]
            try:
                self._index_rows(rows, appender.next_shard)
            except (sqlite3.Error, OSError) as err:
                # The bytes are durable but unindexed: orphans, reclaimed by gc.
                raise _write_error(err, self._path, "committing the index") from err
            return len(todo)

    def _index_rows(self, rows: list[tuple], next_shard: int) -> None:
        self._commit_rows(
            "INSERT OR IGNORE INTO entries (key, shard, offset, length, checksum, "
            "n_anchors, n_tokens, kv_bytes, stored_kv_bytes, full_kv_bytes, metadata, "
            "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows, next_shard)

    def _commit_rows(self, sql: str, rows: list[tuple], next_shard: int | None = None) -> int:
        """Run ``sql`` for each of ``rows`` (and record ``next_shard``), in one transaction (all
        of it or none). Returns how many rows it changed."""
        with self._db_lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                changed = conn.executemany(sql, rows).rowcount
                if next_shard is not None:
                    _set_next_shard(conn, next_shard)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return changed

    def _next_shard(self) -> int:
        rows = self._query("SELECT value FROM meta WHERE name = 'next_shard'")
        return int(rows[0][0]) if rows else 0

    def _check_writable(self, doing: str = "write to") -> None:
        if self._readonly:
            raise InvalidInputError(
                f"the store at {self._path} was opened read-only (readonly=True); to {doing} it, "
                "open it with AnchorStore.open(path) in a process that may write it")

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> AnchorKV:
        """The entry under ``key``, checksum-verified, in the manifest dtype.
        Raises ``EntryNotFoundError`` (a ``KeyError``) or ``StoreCorruptionError``.

        The index is asked even when the entry is cached: another process may have deleted it, or
        deleted it and stored other bytes under its key (a cached copy serves only the same bytes)."""
        row = self._row(key)
        cached = self._cache.get(key, row.checksum)
        return cached if cached is not None else self._load(row)

    def get_many(self, keys: Sequence[str]) -> list[AnchorKV]:
        """The entries under ``keys``, in that order (one index query for all of them)."""
        _check_key_list(keys, "get_many")
        keys = list(keys)
        rows = self._rows(keys)  # cached entries too: another process may have deleted or replaced them
        missing = [k for k in dict.fromkeys(keys) if k not in rows]
        if missing:
            raise EntryNotFoundError(
                f"{len(missing)} of {len(keys)} keys are not in the store at {self._path}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        found: dict[str, AnchorKV] = {}
        for key, row in rows.items():
            cached = self._cache.get(key, row.checksum)
            found[key] = cached if cached is not None else self._load(row)
        return [found[key] for key in keys]

    def metadata(self, key: str) -> dict:
        """The JSON metadata stored with ``key``."""
        return self._row(key).metadata

    def update_metadata(self, metadata: Mapping[str, dict]) -> int:
        """Replace the metadata of stored entries, ``{key: metadata}``, in one durable transaction;
        the K/V bytes stay as they are. Keys not stored are ignored. Returns how many entries'
        metadata changed (one that already held it does not count)."""
        if not isinstance(metadata, Mapping):
            raise InvalidInputError(f"update_metadata takes a mapping {{key: metadata}}, got {type(metadata).__name__}")
        self._check_writable("update metadata in")
        rows = []
        for key, value in metadata.items():
            _check_key(key)
            text = _dumps_metadata(value, key)
            rows.append((text, key, text))
        if not rows:
            return 0
        with self._write_lock, _writer_lock(self._path / LOCK):
            try:
                return self._commit_rows("UPDATE entries SET metadata = ? WHERE key = ? AND metadata != ?", rows)
            except (sqlite3.Error, OSError) as err:
                raise _write_error(err, self._path, "updating metadata", "no metadata was changed",
                                   "rerun the update") from err

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return bool(self._present([key]))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` not stored yet (in order, without repeats): what a resumed run
        still has to compress."""
        _check_key_list(keys, "missing")
        keys = list(dict.fromkeys(keys))
        present = set(self._present(keys))
        return [k for k in keys if k not in present]

    def keys(self) -> list[str]:
        """All keys, in the order they were stored."""
        keys = [r[0] for r in self._query("SELECT key FROM entries ORDER BY rowid")]
        if not all(isinstance(k, str) for k in keys):
            raise self._index_corruption("a key that is not text")
        return keys

    def __iter__(self) -> Iterator[str]:
        """The keys (a snapshot taken when iteration starts)."""
        return iter(self.keys())

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM entries")[0][0]

    def _load(self, row: _Row) -> AnchorKV:
        kv = self._decode(row, self._read_verified(row))
        self._cache.put(row.key, row.checksum, kv, kv.nbytes)
        return kv

    def _read_verified(self, row: _Row) -> bytes:
        """The entry's stored bytes, checksum-verified. A failure is retried with a fresh index
        row and a fresh mapping, because ``gc`` may have moved the entry meanwhile (again while
        the entry keeps moving, up to ``_MOVE_RETRIES`` times)."""
        try:
            data = self._read_bytes(row)
            if hashlib.sha256(data).hexdigest() == row.checksum:
                return data
        except (OSError, ValueError):
            pass
        # Retried while the entry keeps moving (gc may run again between lookup and read);
        # a failure at a place the index still names is corruption.
        problem = ""
        for _ in range(_MOVE_RETRIES):
            self._forget_map(row.shard)
            fresh = self._row(row.key)
            moved, row = fresh != row, fresh
            try:
                data = self._read_bytes(row)
            except FileNotFoundError:
                problem = f"its shard file {self._shard_name(row.shard)} is missing"
            except (OSError, ValueError) as err:
                problem = f"its bytes cannot be read ({err})"
            else:
                if hashlib.sha256(data).hexdigest() == row.checksum:
                    return data
                problem = f"checksum mismatch in {self._shard_name(row.shard)} at byte {row.offset}"
            if not moved:
                break
        raise self._corruption(row, problem)

    def _decode(self, row: _Row, data: bytes) -> AnchorKV:
        """The entry of checksum-verified ``data``, refused (``StoreCorruptionError``) unless it
        is what the store's manifest and the entry's index row say it is: right bytes in the
        wrong place, or bytes another tool wrote, must not reach the decoder as if fine."""
        try:
            kv = _decode_blob(data, self.storage, self._dtype)
        except _EntryMismatch as err:
            raise self._corruption(row, str(err)) from None
        except Exception as err:  # whatever fails to decode is corrupt
            raise self._corruption(row, f"its bytes do not decode ({err})") from err
        problems = self._mismatches(row, kv)
        if problems:
            raise self._corruption(row, "; ".join(problems))
        return kv

    def _mismatches(self, row: _Row, kv: AnchorKV) -> list[str]:
        """How a decoded entry differs from what its index row and the store's manifest say."""
        problems = []
        if not same_model(kv.fingerprint, self.fingerprint):
            problems.append(f"it was made by another compressor ({kv.fingerprint!r})")
        if kv.offset != 0:
            problems.append(f"it is at offset {kv.offset}, but the store keeps chunks chunk-local "
                            "(offset 0)")
        for what, decoded, indexed in (("anchors", kv.n_anchors, row.n_anchors),
                                       ("tokens", int(kv.n_tokens), row.n_tokens),
                                       ("bytes of K/V", kv.nbytes, row.kv_bytes)):
            if decoded != indexed:
                problems.append(f"it decodes to {decoded} {what}, but its index row says {indexed}")
        return problems

    def _read_bytes(self, row: _Row) -> bytes:
        end = row.offset + row.length
        with self._maps_lock:
            mapped = self._maps.get(row.shard)
            if mapped is None and self._maps:
                self._drop_deleted_maps()
            if mapped is None or len(mapped) < end:
                with open(self._path / SHARDS / self._shard_name(row.shard), "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < end:
                        raise ValueError(f"shard has {size} bytes, entry ends at byte {end}")
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[row.shard] = mapped
        return mapped[row.offset:end]

    def _drop_deleted_maps(self) -> None:
        """Unmap shards that ``gc`` (of any process) deleted: a mapping keeps a deleted file's
        disk space allocated for as long as it lives. Called (under ``_maps_lock``) when a shard
        is mapped for the first time, as after every gc that moved entries to new shards."""
        on_disk = set(os.listdir(self._path / SHARDS))
        for shard in [s for s in self._maps if self._shard_name(s) not in on_disk]:
            del self._maps[shard]

    def _forget_map(self, shard: int) -> None:
        with self._maps_lock:
            self._maps.pop(shard, None)

    def _corruption(self, row: _Row, problem: str) -> StoreCorruptionError:
        metadata = row.metadata
        return StoreCorruptionError(
            f"entry {row.key} {_describe(metadata)} in the store at {self._path} is corrupt: "
            f"{problem}. Run `python -m sac_rag.store verify {self._path}` to list every bad "
            "entry; recompress the chunk into a fresh store (or restore the store from a copy).",
            key=row.key,
            metadata=metadata,
            problem=problem,
        )

    # -- index queries ------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InvalidInputError(f"the store at {self._path} is closed")
        if self._frozen is not None and _index_signature(self._path / INDEX) != self._frozen:
            self._reconnect()
        return self._conn

    def _reconnect(self) -> None:
        """Reopen an index read as immutable after a writer (through another, writable view of
        the directory) touched it: through the writer's WAL while it runs, else as the file is."""
        try:
            conn, frozen = _connect(self._path / INDEX, self._readonly)
        except sqlite3.DatabaseError as err:
            raise StoreCorruptionError(
                f"the index of the store at {self._path} is unreadable: {err}") from err
        self._conn.close()
        self._conn, self._frozen = conn, frozen

    def _row(self, key: str) -> _Row:
        _check_key(key)
        found = self._query(f"SELECT {_ROW_COLUMNS} FROM entries WHERE key = ?", (key,))
        if not found:
            raise EntryNotFoundError(f"no entry {key} in the store at {self._path}")
        return self._make_row(found[0])

    def _rows(self, keys: Sequence[str]) -> dict[str, _Row]:
        rows: dict[str, _Row] = {}
        keys = list(dict.fromkeys(keys))
        for key in keys:
            _check_key(key)
        for i in range(0, len(keys), _SQL_BATCH):
            batch = keys[i:i + _SQL_BATCH]
            query = (f"SELECT {_ROW_COLUMNS} FROM entries "
                     f"WHERE key IN ({','.join('?' * len(batch))})")
            for found in self._query(query, batch):
                rows[found[0]] = self._make_row(found)
        return rows

    def _sizes(self, key: str) -> tuple[int, int, int, int, int]:
        """n_anchors, n_tokens, kv_bytes, stored_kv_bytes, full_kv_bytes of an entry."""
        found = self._query("SELECT n_anchors, n_tokens, kv_bytes, stored_kv_bytes, full_kv_bytes "
                            "FROM entries WHERE key = ?", (key,))
        if not found:
            raise EntryNotFoundError(f"no entry {key} in the store at {self._path}")
        return found[0]

    def _present(self, keys: Sequence[str]) -> list[str]:
        present = []
        for i in range(0, len(keys), _SQL_BATCH):
            batch = list(keys[i:i + _SQL_BATCH])
            query = f"SELECT key FROM entries WHERE key IN ({','.join('?' * len(batch))})"
            present += [r[0] for r in self._query(query, batch)]
        return present

    def _all_places(self) -> list[_Row]:
        """Every entry's row in shard order without its metadata (which holds each chunk's text),
        for work that only moves bytes, so it need not hold every entry's text in memory at once."""
        return [self._make_row(r) for r in self._query(f"SELECT {_PLACE_COLUMNS} FROM entries ORDER BY shard, offset")]

    def _rows_in_place_order(self, page: int = 512) -> Iterator[_Row]:
        """Every entry's row with its metadata, in shard order, read ``page`` rows at a time: each
        holds its chunk's text, and a large store's would not fit in memory at once."""
        after: tuple = (-1, -1, "")
        while True:
            rows = [self._make_row(r) for r in self._query(
                f"SELECT {_ROW_COLUMNS} FROM entries WHERE (shard, offset, key) > (?, ?, ?) "
                "ORDER BY shard, offset, key LIMIT ?", (*after, page))]
            yield from rows
            if len(rows) < page:
                return
            after = (rows[-1].shard, rows[-1].offset, rows[-1].key)

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """All rows of one index query. A damaged index (malformed pages, text that is not
        UTF-8) raises ``StoreCorruptionError`` naming the index file, not a bare sqlite3 error
        that would leave the reader guessing what broke."""
        with self._db_lock:
            conn = self._db()
            try:
                return conn.execute(sql, params).fetchall()
            except (sqlite3.DatabaseError, UnicodeDecodeError) as err:
                if not _index_damaged(err):
                    raise
                raise self._index_corruption(str(err)) from err

    def _make_row(self, found: tuple) -> _Row:
        if len(found) != len(_ROW_TYPES) or not all(
                isinstance(v, t) for v, t in zip(found, _ROW_TYPES)):
            raise self._index_corruption(f"an entry row of the wrong types {found[:6]!r}")
        return _Row(*found)

    def _index_corruption(self, problem: str) -> StoreCorruptionError:
        return StoreCorruptionError(
            f"the index {self._path / INDEX} is damaged ({problem}). Run `python -m sac_rag.store "
            f"verify {self._path}` to see what it reports; restore the store from a copy or "
            "rebuild it (recompress the corpus into a fresh store).",
            problem=f"the index {INDEX} is damaged: {problem}",
        )

    @staticmethod
    def _shard_name(shard: int) -> str:
        return f"{shard:06d}{SHARD_SUFFIX}"

    def _shard_sizes(self) -> dict[int, int]:
        sizes = {}
        for entry in os.scandir(self._path / SHARDS):
            stem, suffix = os.path.splitext(entry.name)
            if suffix == SHARD_SUFFIX and stem.isdigit():
                try:
                    sizes[int(stem)] = entry.stat().st_size
                except FileNotFoundError:  # removed by a concurrent gc
                    pass
        return dict(sorted(sizes.items()))

    # -- maintenance --------------------------------------------------------------------------

    def verify(self, show_progress: bool = False) -> VerifyReport:
        """Read, checksum and decode every entry (bypassing the cache); name the bad ones.
        ``show_progress``: a progress bar (on stderr) counting the entries checked."""
        report = VerifyReport()
        try:  # integrity_check, unlike quick_check, finds a key index that hides entries
            checks = [str(r[0]) for r in self._query("PRAGMA integrity_check")]
        except StoreCorruptionError as err:
            checks = [err.problem]
        if checks != ["ok"]:
            report.index_problems += checks
        live = 0
        try:
            (total,) = self._query("SELECT COUNT(*) FROM entries")[0]
            rows = self._rows_in_place_order()
            with _progress_bar(total, "verifying", show_progress) as bar:
                for row in rows:
                    bar.update(1)
                    try:
                        self._decode(row, self._read_verified(row))
                    except EntryNotFoundError:  # deleted (and its bytes reclaimed) since it was listed
                        continue
                    except StoreCorruptionError as err:
                        report.bad.append(BadEntry(row.key, err.metadata, err.problem))
                    report.entries += 1
                    live += row.length
        except StoreCorruptionError as err:  # from listing the entries: the index itself
            unchecked = "its entries cannot be listed or checked" if not report.entries else \
                f"the entries after the first {report.entries} cannot be listed or checked"
            report.index_problems.append(f"{err.problem}; {unchecked}")
            return report
        report.orphan_bytes = max(0, sum(self._shard_sizes().values()) - live)
        return report

    def stats(self) -> dict:
        """Sizes and counts: entries, bytes on disk, bytes of K/V (stored and decoded), the
        full-context K/V the same chunks would take, anchors and tokens represented."""
        ((entries, stored, anchors, tokens, kv_bytes, stored_kv, full_kv),) = self._query(
            "SELECT COUNT(*), COALESCE(SUM(length), 0), COALESCE(SUM(n_anchors), 0), "
            "COALESCE(SUM(n_tokens), 0), COALESCE(SUM(kv_bytes), 0), "
            "COALESCE(SUM(stored_kv_bytes), 0), COALESCE(SUM(full_kv_bytes), 0) "
            "FROM entries"
        )
        shard_sizes = self._shard_sizes()
        on_disk = 0
        for root, _, files in os.walk(self._path):
            for name in files:
                try:
                    on_disk += os.path.getsize(os.path.join(root, name))
                except FileNotFoundError:
                    pass
        return {
            "path": str(self._path),
            "fingerprint": self.fingerprint,
            "ratio": self.ratio,
            "dtype": self._manifest["dtype"],
            "storage": self.storage,
            "entries": entries,
            "shards": len(shard_sizes),
            "bytes_on_disk": on_disk,
            "entry_bytes": stored,
            "orphan_bytes": max(0, sum(shard_sizes.values()) - stored),
            "kv_bytes_stored": stored_kv,
            "kv_bytes_decoded": kv_bytes,
            "full_kv_bytes": full_kv,
            "anchors": anchors,
            "tokens_represented": tokens,
            "avg_anchors_per_entry": anchors / entries if entries else 0.0,
            "avg_tokens_per_entry": tokens / entries if entries else 0.0,
            "tokens_per_anchor": tokens / anchors if anchors else 0.0,
            "bytes_per_entry": stored / entries if entries else 0.0,
        }

    def gc(self) -> dict:
        """Reclaim orphan bytes (written by a crashed or failed write, never indexed, or left by
        ``delete``): delete shards no entry uses, copy live entries out of shards that hold
        orphans, remove stale temporary files. Readers may keep reading meanwhile; writers wait."""
        self._check_writable("gc")
        report = {"removed_shards": 0, "compacted_shards": 0, "moved_entries": 0,
                  "reclaimed_bytes": 0, "removed_temp_files": 0}
        with self._write_lock, _writer_lock(self._path / LOCK):
            for folder in (self._path, self._path / SHARDS):
                for entry in os.scandir(folder):
                    if entry.is_file() and entry.name.endswith(".tmp"):
                        os.unlink(entry.path)
                        report["removed_temp_files"] += 1
            rows = self._all_places()
            by_shard: dict[int, list[_Row]] = {}
            for row in rows:
                by_shard.setdefault(row.shard, []).append(row)
            sizes = self._shard_sizes()
            empty = [s for s in sizes if s not in by_shard]
            holey = [s for s in sizes if s in by_shard
                     and sizes[s] > sum(r.length for r in by_shard[s])]
            if not empty and not holey:
                return report
            # Never reuse a shard id: a reader may still map a deleted shard by its id.
            next_shard = max(self._next_shard(), max(sizes) + 1)
            appender = _ShardAppender(self._path / SHARDS, self._shard_bytes, next_shard,
                                      fresh=True)
            moves = []
            try:
                for shard in holey:
                    with open(self._path / SHARDS / self._shard_name(shard), "rb") as f:
                        for row in by_shard[shard]:  # sorted by offset
                            f.seek(row.offset)
                            data = f.read(row.length)  # copied as is: corruption stays visible
                            new_shard, new_offset = appender.add(data)
                            moves.append((new_shard, new_offset, row.key, row.shard, row.offset))
                appender.sync()
            except OSError as err:
                appender.rollback()
                raise _write_error(err, self._path, "compacting shards (gc)",
                                   "no entry was moved", "rerun gc") from err
            try:
                self._move_rows(moves, max(next_shard, appender.next_shard))
            except (sqlite3.Error, OSError) as err:
                # The copies are durable but unindexed: orphans, reclaimed by the next gc.
                raise _write_error(err, self._path, "committing the moves of gc",
                                   "no entry was moved (the copies are orphan bytes)",
                                   "rerun gc") from err
            for shard in empty + holey:
                os.unlink(self._path / SHARDS / self._shard_name(shard))
                self._forget_map(shard)
            fsync_dir(self._path / SHARDS)
            moved_bytes = sum(r.length for s in holey for r in by_shard[s])
            report["removed_shards"] = len(empty)
            report["compacted_shards"] = len(holey)
            report["moved_entries"] = len(moves)
            report["reclaimed_bytes"] = sum(sizes[s] for s in empty + holey) - moved_bytes
        return report

    def _move_rows(self, moves: list[tuple], next_shard: int) -> None:
        """Point entries at their copies, in one transaction (all move or none)."""
        self._commit_rows("UPDATE entries SET shard = ?, offset = ? "
                          "WHERE key = ? AND shard = ? AND offset = ?", moves, next_shard)


# -- merging ----------------------------------------------------------------------------------


def merge(destination: str | os.PathLike, sources: Sequence[str | os.PathLike], *,
          show_progress: bool = False) -> int:
    """Merge per-shard stores (e.g. from ``--num-shards`` precompression workers) into
    ``destination``, created with the first source's settings if it does not exist yet.

    Every source must carry the same fingerprint and ratio (checked before anything is
    written). Entries already in the destination are skipped, their metadata too, and nothing is
    deleted from it: to mirror shards that a rerun changed (documents renamed or pruned), merge
    them into a new destination. Bytes are copied as stored
    when the storage codec and dtype agree, re-encoded otherwise; either way each entry is
    read as ``get`` reads it, so a corrupt one stops the merge (``StoreCorruptionError``
    naming it; what was merged before it stays). Returns how many entries were added.
    ``show_progress``: a progress bar (on stderr) counting the sources' entries as they are done.
    """
    if isinstance(sources, (str, os.PathLike)) or not sources:
        raise InvalidInputError("merge takes a destination and a non-empty list of source stores")
    destination = store_path(destination)
    opened = [AnchorStore.open(s, readonly=True, cache_bytes=0) for s in sources]
    try:
        first = opened[0]
        for other in opened[1:]:
            if not same_model(first.fingerprint, other.fingerprint):
                raise FingerprintMismatchError(
                    f"the store at {other.path}", expected=first.fingerprint,
                    found=other.fingerprint,
                    advice=f"Merge only stores built by the same compressor as {first.path}.",
                    against=f"the compressor of {first.path}",
                )
            if other.ratio != first.ratio:
                raise InvalidInputError(
                    f"{other.path} has ratio {other.ratio}, {first.path} has {first.ratio}; "
                    "stores of different ratios cannot be merged"
                )
        if (destination / MANIFEST).exists():
            dest = AnchorStore.open(destination, cache_bytes=0)
            if not same_model(dest.fingerprint, first.fingerprint):
                dest.close()
                raise FingerprintMismatchError(
                    f"the destination store at {destination}", expected=first.fingerprint, found=dest.fingerprint,
                    advice=f"Merge into a store built by the same compressor as {first.path}, or into a new path.",
                    against=f"the compressor of the sources ({first.path})")
        else:
            m = first.manifest
            dest = AnchorStore.create(
                destination, m["fingerprint"], m["ratio"], m["dtype"], m["storage"],
                m.get("extra") or None, cache_bytes=0,
                shard_bytes=int(m.get("shard_bytes", DEFAULT_SHARD_BYTES)))
        with dest:
            if dest.ratio != first.ratio:
                raise InvalidInputError(
                    f"{destination} has ratio {dest.ratio}, the sources have {first.ratio}"
                )
            added = 0
            sources = [source for source in opened if source.path.resolve() != dest.path.resolve()]
            with _progress_bar(sum(map(len, sources)), "merging", show_progress) as bar:
                for source in sources:  # each source's keys listed in turn, not all at once
                    added += _merge_source(source, dest, bar)
            return added
    finally:
        for store in opened:
            store.close()


def _copied_record(source: AnchorStore, row: _Row) -> _Record:
    """An entry of ``source`` as stored, with its index columns, for a store of the same storage
    and dtype: its bytes are checked as a read checks them (checksum, then decoded against its
    row and the manifest), so a bad entry is refused rather than copied."""
    data = source._read_verified(row)
    source._decode(row, data)
    return _Record(row.key, data, row.checksum, *source._sizes(row.key), row.metadata_json)


# -- blobs ------------------------------------------------------------------------------------


def _encode_8bit(kv: AnchorKV, codec: str) -> tuple[bytes, int]:
    keys, key_scale = quantize(kv.keys, codec)
    values, value_scale = quantize(kv.values, codec)
    tensors = {
        "keys": keys, "keys_scale": key_scale,
        "values": values, "values_scale": value_scale,
        "positions": kv.positions.to(torch.int64).contiguous(),
    }
    meta = {
        "format": QUANTIZED_KV_FORMAT, "codec": codec, "n_tokens": str(int(kv.n_tokens)),
        "offset": str(int(kv.offset)), "fingerprint": kv.fingerprint,
        "dtype": dtype_name(kv.keys.dtype),
    }
    stored = keys.nbytes + values.nbytes + key_scale.nbytes + value_scale.nbytes
    return st_save(tensors, metadata=meta), stored


class _EntryMismatch(ValueError):
    """An entry's blob decodes, but not as the store encodes its entries (see ``_decode_blob``)."""


_CODE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}  # the dtype of each codec's codes


def _decode_blob(data: bytes, storage: str, dtype: torch.dtype) -> AnchorKV:
    """An entry's blob as ``AnchorKV`` in ``dtype``. Raises ``_EntryMismatch`` for a blob not
    encoded as a store of ``storage`` and ``dtype`` encodes (never silently converted: such
    bytes were not written by this store), other errors for bytes that do not decode at all."""
    meta = read_metadata(data)
    stored_as = _stored_as(meta)
    if stored_as != storage:
        raise _EntryMismatch(f"it holds {stored_as} K/V, but the store keeps {storage} entries")
    tensors = st_load(data)
    if storage == "native":
        keys, values = _native_tensors(tensors, dtype)
    else:
        keys, values = _dequantized_tensors(tensors, storage, dtype)
    return AnchorKV(keys=keys, values=values, positions=_tensors(tensors, "positions")[0],
                    n_tokens=int(meta["n_tokens"]), offset=int(meta["offset"]),
                    fingerprint=meta["fingerprint"])


def _stored_as(meta: dict) -> str:
    """How a blob says it is encoded: "native", or its 8-bit codec."""
    if meta.get("format") == KV_FORMAT:
        return "native"
    if meta.get("format") == QUANTIZED_KV_FORMAT and meta.get("codec") in CODECS:
        return meta["codec"]
    raise ValueError(f"unknown entry format {meta.get('format')!r} (codec {meta.get('codec')!r})")


def _tensors(tensors: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    """The named tensors of a blob (a ``ValueError`` names those it lacks)."""
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)} tensor")
    return [tensors[name] for name in names]


def _native_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Keys and values of a native blob, which the store keeps in its own dtype."""
    found = _tensors(tensors, "keys", "values")
    for name, tensor in zip(("keys", "values"), found):
        if tensor.dtype != dtype:
            raise _EntryMismatch(f"its {name} are {dtype_name(tensor.dtype)}, but the store keeps "
                                 f"{dtype_name(dtype)} K/V")
    return found


def _dequantized_tensors(tensors: dict[str, torch.Tensor], codec: str,
                         dtype: torch.dtype) -> list[torch.Tensor]:
    """Keys and values of an 8-bit blob, decoded to ``dtype``: codes of the codec's dtype, and
    one positive float32 scale per (layer, head)."""
    decoded = []
    for name in ("keys", "values"):
        codes, scale = _tensors(tensors, name, f"{name}_scale")
        if codes.dtype != _CODE_DTYPES[codec]:
            raise _EntryMismatch(f"its {name} are {dtype_name(codes.dtype)} codes, but the store "
                                 f"keeps {codec} codes")
        if codes.dim() != 4 or scale.shape != codes.shape[:2] or scale.dtype != torch.float32:
            raise _EntryMismatch(
                f"its {name}_scale is {dtype_name(scale.dtype)} of shape {tuple(scale.shape)}, but "
                f"{name} of shape {tuple(codes.shape)} need float32 of shape {tuple(codes.shape[:2])} "
                "(one scale per layer and head)")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise _EntryMismatch(f"its {name}_scale holds scales that are not positive and finite")
        decoded.append(dequantize(codes, scale, dtype))
    return decoded


# -- files ------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (the one place entry bytes hit the disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _ShardAppender:
    """Appends blobs to shard files; ``sync`` makes them durable, ``rollback`` cuts them off.

    Appends to the newest shard while it is below ``shard_bytes`` (unless ``fresh``), else
    starts shard ``max(next_shard, newest + 1)``: ids only grow, so no id is ever reused.
    """

    def __init__(self, folder: Path, shard_bytes: int, next_shard: int, fresh: bool = False):
        self.folder = folder
        self.shard_bytes = shard_bytes
        existing = sorted(int(p.stem) for p in folder.glob(f"*{SHARD_SUFFIX}") if p.stem.isdigit())
        self.next_shard = max([next_shard] + [s + 1 for s in existing])
        self._candidate = None if fresh or not existing else existing[-1]
        self._shard = -1
        self._fd = -1
        self._size = 0
        self._touched: list[tuple[Path, int, bool]] = []  # (path, size before, created by us)
        self._fds: list[int] = []

    def add(self, blob: bytes) -> tuple[int, int]:
        if self._fd < 0 or self._size >= self.shard_bytes:
            self._open_next()
        offset = self._size
        _write_all(self._fd, blob)
        self._size += len(blob)
        return self._shard, offset

    def _open_next(self) -> None:
        shard, self._candidate = self._candidate, None
        path = None if shard is None else self.folder / AnchorStore._shard_name(shard)
        if path is None or not path.exists() or path.stat().st_size >= self.shard_bytes:
            shard = self.next_shard
            self.next_shard += 1
            path = self.folder / AnchorStore._shard_name(shard)
        created = not path.exists()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o644)
        self._fds.append(self._fd)
        self._shard = shard
        self._size = os.fstat(self._fd).st_size
        self._touched.append((path, self._size, created))

    def sync(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
        if any(created for *_, created in self._touched):
            fsync_dir(self.folder)
        self._close()

    def rollback(self) -> None:
        """Best effort: cut the files back to where they were, remove files we created."""
        self._close()
        for path, size, created in self._touched:
            try:
                if created:
                    path.unlink()
                else:
                    os.truncate(path, size)
            except OSError:
                pass  # left as orphan bytes; gc reclaims them

    def _close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._fd = -1


def _writer_lock(path: Path) -> FileLock:
    """``flock`` on ``writer.lock``: one writer (process or store instance) at a time."""
    if not HAVE_FILE_LOCKS:
        raise StoreWriteError(errno.ENOSYS, "writing an anchor store needs POSIX file locks "
                              "(fcntl.flock); this platform can only read stores")
    return FileLock(path, waiting_message=(
        f"waiting for another writer of the store at {path.parent}: a process that is writing to it holds "
        f"{path} (find it with `fuser -v {path}`); this write goes on when that process finishes, or once it "
        "is stopped (a stopped or hung writer keeps the lock until it is killed)"))


def _write_error(err: OSError | sqlite3.Error, path: Path, doing: str,
                 outcome: str = "nothing of this write was indexed",
                 rerun: str = "rerun (already stored entries are skipped)") -> StoreWriteError:
    """The ``StoreWriteError`` for a failed write: what failed, what it left (``outcome``) and
    what to do. Its errno is ENOSPC when the disk is full, also when SQLite is the one that
    says so (its errors carry no errno), so callers can tell a full disk from other failures."""
    code = getattr(err, "errno", None)
    full = (code == errno.ENOSPC or getattr(err, "sqlite_errorname", "") == "SQLITE_FULL"
            or "full" in str(err).lower())
    advice = (f"the disk is full: free space, then {rerun}" if full
              else f"fix the cause, then {rerun}")
    return StoreWriteError(errno.ENOSPC if full else code or errno.EIO,
                           f"{doing} in the store at {path} failed ({err}); {outcome}; {advice}")


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise NotAStoreError(f"there is no store at {path}; create one with python -m sac_rag.precompress "
                             "(or AnchorStore.create)")
    if not path.is_dir():
        raise NotAStoreError(f"{path} is a file, not a store directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise NotAStoreError(
            f"{path} is a directory but not an anchor store (it has no {MANIFEST}); "
            "create one with python -m sac_rag.precompress (or AnchorStore.create), or point at the store's directory"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise StoreCorruptionError(
            f"the manifest of the store at {path} is unreadable: {err}") from err
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(
        "sac-anchor-store/"
    ):
        raise NotAStoreError(f"{manifest_path} is not an anchor-store manifest")
    if manifest["format"] != STORE_FORMAT:
        raise NotAStoreError(
            f"the store at {path} has format {manifest['format']!r}; this version of sac_rag "
            f"reads {STORE_FORMAT!r}: upgrade sac_rag"
        )
    required = ("fingerprint", "ratio", "dtype", "storage")
    if any(name not in manifest for name in required) or manifest["storage"] not in STORAGES:
        raise StoreCorruptionError(f"the manifest of the store at {path} lacks {required} fields")
    problems = []
    if not isinstance(manifest["fingerprint"], str) or not manifest["fingerprint"]:
        problems.append(f"fingerprint {manifest['fingerprint']!r} is not a non-empty string")
    for name in ("ratio", "shard_bytes"):
        value = manifest.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} {value!r} is not a positive integer")
    try:
        if not isinstance(manifest["dtype"], str) or manifest["dtype"] == "auto":
            raise TypeError
        resolve_dtype(manifest["dtype"], torch.device("cpu"))
    except (SACError, TypeError, ValueError):
        problems.append(f"dtype {manifest['dtype']!r} is not a dtype")
    if problems:
        raise StoreCorruptionError(
            f"the manifest {manifest_path} is damaged or was not written by sac_rag: "
            f"{'; '.join(problems)}; restore the store from a copy or rebuild it")
    return manifest


def _connect(index: Path, readonly: bool) -> tuple[sqlite3.Connection, tuple | None]:
    """A connection to the index, and (for one opened as immutable) the index's signature then."""
    frozen = None
    if readonly:
        conn = sqlite3.connect(f"file:{quote(str(index))}?mode=ro", uri=True, timeout=30, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()
            return conn, None
        except sqlite3.OperationalError:
            conn.close()
        # A read-only directory: SQLite cannot create the WAL side files, and no writer has
        # the index open, so the file can be read as immutable, unless a writer that stopped
        # without closing left commits in the WAL, which an immutable read would not see. A
        # writer may still start through a writable view of the same directory (another mount):
        # the returned signature lets the store notice and reconnect (``AnchorStore._db``).
        wal = index.with_name(index.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise StoreRecoveryNeededError(
                f"{wal} holds commits not yet merged into {index.name} (a writer stopped without closing), and "
                f"this process cannot write to {index.parent}: open the store once with write access "
                "(AnchorStore.open(path)) to merge them, then read it read-only"
            )
        frozen = _index_signature(index)
        conn = sqlite3.connect(f"file:{quote(str(index))}?immutable=1", uri=True,
                               isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(index, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        if not readonly:
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("SELECT COUNT(*) FROM meta").fetchone()  # a missing table: sqlite3.DatabaseError
    except BaseException:
        conn.close()  # a failed open must not keep the index file open
        raise
    return conn, frozen


def _remove_stale_creations(path: Path) -> None:
    """Delete the temporary directories that creations of the store at ``path`` left when they were
    killed (``.NAME.creating-*``, never renamed into place). Only those untouched for
    ``STALE_CREATION_SECONDS``: a creation running now finishes within seconds."""
    now = time.time()
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.creating-*"):
        try:
            stale = now - leftover.lstat().st_mtime > STALE_CREATION_SECONDS
        except FileNotFoundError:  # another process removed it meanwhile
            continue
        if stale and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _check_writable_path(path: Path) -> None:
    """Raise ``StoreReadOnlyError`` unless this process can write the store's directory, its
    index and its shards folder (SQLite would otherwise fail with a message that reads like a
    damaged index)."""
    targets = (path, path / INDEX, path / SHARDS)
    blocked = [t for t in targets if t.exists() and not os.access(t, os.W_OK)]
    if blocked:
        raise StoreReadOnlyError(
            errno.EROFS if _on_read_only_fs(path) else errno.EACCES,
            f"the store at {path} cannot be written from here ({blocked[0]} is on a read-only "
            "file system or not writable by this user); the store itself is fine: read it with "
            "AnchorStore.open(path, readonly=True) (`python -m sac_rag.store verify|stats`), and "
            "write, gc or merge into it where it is writable",
        )


def _on_read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _index_signature(index: Path) -> tuple:
    """What changes when any process writes the index: the file itself, and its WAL side files
    (which a writer creates when it opens the index)."""
    signature = []
    for path in (index, index.with_name(index.name + "-wal"), index.with_name(index.name + "-shm")):
        try:
            st = path.stat()
            signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            signature.append(None)
    return tuple(signature)


def _index_damaged(err: Exception) -> bool:
    """Whether a failed index query means the index file itself is damaged (rather than busy,
    full or unreachable): SQLite found malformed pages, or stored text is not UTF-8."""
    if isinstance(err, UnicodeDecodeError):
        return True
    return (getattr(err, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
            or str(err).startswith("Could not decode to UTF-8"))


def _set_next_shard(conn: sqlite3.Connection, next_shard: int) -> None:
    conn.execute(
        "INSERT INTO meta (name, value) VALUES ('next_shard', ?) "
        "ON CONFLICT(name) DO UPDATE SET value = "
        "MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
        (str(next_shard),),
    )


def _merge_source(source: AnchorStore, dest: AnchorStore, bar) -> int:
    """``merge``'s work for one source: its entries that ``dest`` lacks, copied (re-encoded where the
    codecs differ) 64 at a time, each batch counted on ``bar``. Returns how many were added."""
    same_encoding = (source.storage, source.dtype) == (dest.storage, dest.dtype)
    keys = source.keys()
    added = 0
    for i in range(0, len(keys), 64):
        batch = keys[i:i + 64]
        records = []
        for row in source._rows(dest.missing(batch)).values():
            try:
                if same_encoding:
                    records.append(_copied_record(source, row))
                else:
                    records.append(dest._encode(row.key, source._load(row), row.metadata))
            except EntryNotFoundError:  # deleted from the source since it was listed
                continue
        added += dest._write(records)
        bar.update(len(batch))
    return added


# -- small helpers ----------------------------------------------------------------------------


def _progress_bar(work: int | Sequence, desc: str, show: bool):
    """A tqdm bar on stderr counting entries: over ``work`` if it is a sequence, else towards a total
    of ``work`` that the caller ``update``s; nothing shown unless ``show``."""
    from tqdm.auto import tqdm

    iterable = None if isinstance(work, int) else work
    return tqdm(iterable, total=work if iterable is None else None, desc=desc, unit=" entries", disable=not show,
                dynamic_ncols=True)


class _LRU:
    """Decoded entries with the checksum of the bytes they were decoded from, most recently used
    last, bounded by their tensor bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[AnchorKV, int, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, checksum: str) -> AnchorKV | None:
        """The entry cached under ``key`` if it was decoded from bytes with ``checksum`` (the index's
        now: other bytes may have been stored under the key since), else None."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item[2] != checksum:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, checksum: str, kv: AnchorKV, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (kv, nbytes, checksum)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size, _) = self._items.popitem(last=False)
                self._bytes -= size

    def discard(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                old = self._items.pop(key, None)
                if old is not None:
                    self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidInputError(f"store keys are non-empty strings (AnchorStore.key_for(text)), "
                                f"got {key!r}")


def _dumps_metadata(metadata: dict | None, key: str) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata of {key} must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"metadata of {key} is not JSON-serializable: {err}") from err


def _safe_metadata(text: str) -> dict:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {"metadata": value}
    except ValueError:
        return {"metadata": text}


def _describe(metadata: dict) -> str:
    if not metadata:
        return "(no metadata)"
    text = json.dumps(metadata, sort_keys=True)
    return f"(metadata {text[:200]}{'...' if len(text) > 200 else ''})"


# -- command line -----------------------------------------------------------------------------


def _read_keys(keys_file: str, store: AnchorStore) -> set[str]:
    """The keys listed in ``keys_file``, one per line (blank lines and surrounding spaces
    ignored). An empty list is refused: pruning to it would empty the store. So is a line that is
    neither a key of ``store`` nor shaped like ``key_for``'s keys (a chunk id, a key prefix): it would
    match nothing, and the entry it was meant to keep would be deleted."""
    try:
        text = Path(keys_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read the keys file {keys_file}: {err}") from err
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    stored = set(store.keys())
    not_keys = [(number, line) for number, line in lines if line not in stored and not CHUNK_KEY.fullmatch(line)]
    if not_keys:
        shown = "; ".join(f"line {number}: {line[:40]!r}" for number, line in not_keys[:3])
        raise InvalidInputError(
            f"the keys file {keys_file} has {len(not_keys)} line(s) that are not store keys ({shown}): a key is "
            "the 64 hex digits of AnchorStore.key_for(chunk text); `python -m sac_rag.store keys STORE` lists "
            "them with their chunk ids. Nothing was deleted")
    if not lines:
        raise InvalidInputError(f"the keys file {keys_file} lists no key; list the keys to keep "
                                "(AnchorStore.key_for(chunk text)), one per line")
    return {line for _, line in lines}


def _key_lines(store: AnchorStore) -> Iterator[str]:
    """``KEY<TAB>chunk id<TAB>document id`` for each entry (what ``keys`` prints): the metadata that
    ``precompress`` keeps, so a user can pick the keys of the chunks to keep."""
    for key in sorted(store.keys()):
        metadata = store.metadata(key)
        doc = metadata.get("doc") if isinstance(metadata.get("doc"), dict) else {}
        yield "\t".join([key, str(metadata.get("chunk_id", "")), str(metadata.get("doc_id", doc.get("source", "")))])


def _prune(store: AnchorStore, keep: set[str], keys_file: str) -> dict:
    """Delete the entries of ``store`` not in ``keep``, then gc. A ``keep`` that names none of
    the entries is refused: that is a wrong keys file far more often than a wish to empty the
    store (which deleting its directory does)."""
    keys = store.keys()
    stale = [k for k in keys if k not in keep]
    if stale and len(stale) == len(keys):
        raise InvalidInputError(
            f"{keys_file} lists none of the {len(keys)} keys of the store at {store.path}, so prune "
            "would delete every entry: check that it lists the keys to keep "
            "(AnchorStore.key_for(chunk text), one per line); to empty the store, delete its directory")
    deleted = store.delete(stale)
    return {"deleted": deleted, "entries": len(store), **store.gc()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sac_rag.store verify|stats|gc PATH``, ``merge DEST SRC...`` and
    ``prune PATH --keep KEYS_FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m sac_rag.store",
        description="Inspect and maintain an anchor store (precompressed SAC chunks).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="checksum and decode every entry; exit 1 if any is bad"
                        ).add_argument("path")
    commands.add_parser("stats", help="print sizes and counts as JSON").add_argument("path")
    commands.add_parser("keys", help="list every entry: key, chunk id and document id, tab-separated"
                        ).add_argument("path")
    commands.add_parser("gc", help="reclaim orphan bytes left by crashed writes and deletes"
                        ).add_argument("path")
    merge_parser = commands.add_parser(
        "merge", help="add the entries of stores of the same compressor to DESTINATION",
        description="Add to DESTINATION (created if missing) every entry of SOURCES it does not hold. "
        "It only adds: entries it holds keep their metadata, and none is deleted, so to mirror shards "
        "that a rerun changed (documents renamed or pruned), merge them into a new DESTINATION.")
    merge_parser.add_argument("destination")
    merge_parser.add_argument("sources", nargs="+")
    prune_parser = commands.add_parser(
        "prune", help="delete every entry whose key KEYS_FILE does not list, then gc",
        description="Delete every entry of the store whose key is not listed in KEYS_FILE, in one "
        "transaction, then reclaim their bytes (gc). Prints what it did as JSON. A KEYS_FILE that "
        "lists no key, or none of the store's, is refused. (precompress --prune does this for the "
        "chunks of a corpus.)")
    prune_parser.add_argument("path")
    prune_parser.add_argument("--keep", required=True, metavar="KEYS_FILE",
                              help="the keys to keep, one per line (AnchorStore.key_for(chunk text))")
    args = parser.parse_args(argv)
    try:
        if args.command == "prune":
            with AnchorStore.open(args.path, cache_bytes=0) as store:
                print(json.dumps(_prune(store, _read_keys(args.keep, store), args.keep), indent=2))
            return 0
        if args.command == "merge":
            added = merge(args.destination, args.sources, show_progress=True)
            print(json.dumps({"added": added, "destination": args.destination}))
            return 0
        with AnchorStore.open(args.path, readonly=args.command != "gc", cache_bytes=0) as store:
            if args.command == "verify":
                report = store.verify(show_progress=True)
                print(report.summary())
                return 0 if report.ok else 1
            if args.command == "stats":
                print(json.dumps(store.stats(), indent=2))
                return 0
            if args.command == "keys":
                for line in _key_lines(store):
                    print(line)
                return 0
            print(json.dumps(store.gc(), indent=2))
            return 0
    except (SACError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
