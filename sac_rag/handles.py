"""Handles: how a compressed chunk travels through a framework as text, and becomes K/V again in
front of the decoder.

LangChain and LlamaIndex move retrieved chunks to the LLM as *text*: documents are formatted
into one prompt string, and the LLM wrapper sees only that string. So a compressed chunk
travels as a marker ``<sac:KEY>``, where KEY is its store key (``AnchorStore.key_for(chunk
text)``, 64 hex digits). A document prompt emits the marker in place of the chunk's text; the
LLM wrapper finds the markers in the prompt (``split_prompt``), splices each chunk's cached K/V
in at that place, and tokenizes the text around them normally.

A text longer than one chunk is split the way ``sac_rag.precompress`` splits documents (so its
chunks have the keys a precompressed store uses) and its handle is the markers of its chunks
back to back, ``<sac:K1><sac:K2>...``: the decoder then reads the chunks at consecutive
positions, the layout ``SACCompressor.compress(text)`` gives the whole text.

A marker is honoured only when its key *resolves*: the entry exists (in the store, or among the
chunks this process compressed) and was made by the compressor in use. Anything else that
looks like a marker - say a user typing ``<sac:...>`` into a question - stays plain text and
loads nothing; text put in a prompt as text (a document passed through uncompressed) goes
through ``plain_text``, so that marker-looking text in it stays text even when it names a
stored chunk. A prompt holding a *piece* of a marker this engine handed out is an error
(``MarkerCutError``), not text: something cut the text the marker travelled in, its chunk would be
lost and its hex digits read as text.

Chunks compressed without ``write_back`` live in memory, which drops the least recently used to stay
under ``memory_bytes``. A marker of a chunk it has dropped still resolves: the engine keeps the texts
of dropped chunks (``TEXT_MEMORY_BYTES`` of them, least recently handed out forgotten first) and
compresses the chunk again from its text, back into memory, when a prompt names it. Only once that
text is forgotten too is such a marker an error (``EntryNotFoundError``), not text. Chunks a call
has been handed are pinned until a generation has read a prompt with their markers (or for
``PIN_SECONDS``), so a concurrent call making room does not drop them in between
(``BoundedMemory``). A marker carries no call, so pins are released once per prompt generated, and a
prompt generated twice (a retry, a refine step, a chat history repeating old markers) can release
another call's pin early: that costs compressing its chunk again, never the chunk.

``SACEngine`` is what the framework adapters share: the compressor and its decoder, loaded on
first use; the store; the resolver; and one lock per model, since compressing and decoding
switch adapters on the same weights. Concurrent ``generate`` calls are decoded as one batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compressor import RECOMMENDED_DECODING, SACCompressor, checkpoint_meta
from .config import PromptTemplate, SACConfig, text_ids
from .devices import load_settings, resolve_dtype, resolved_here
from .errors import FingerprintMismatchError, InvalidInputError, SACError
from .fingerprint import same_model
from .generation import Generation, GenerationConfig, Generator, bos_ids, checked_config, grouped
from .kv import AnchorKV
from .pipeline import DEFAULT_COMPRESSOR, LAYOUT_STOP
from .store import CHUNK_KEY, AnchorStore, EntryNotFoundError, other_compressor_advice

logger = logging.getLogger(__name__)

MARKER_PREFIX = "<sac:"
MARKER_PATTERN = re.compile(r"<sac:([0-9a-f]{64})>")
# A marker put in a prompt as text (``plain_text``): its digits are text.
_ESCAPED_MARKER = re.compile("<\u200bsac:[0-9a-f]{64}>")
# The two pieces of a marker cut in two: ``<sac:`` and the start of a key, cut off after it; the
# end of a key and ``>``, cut off before it. Fewer hex digits than this are no piece (too likely
# to match some key by chance).
MIN_CUT_PIECE = 6
_MARKER_START = re.compile(r"<sac:([0-9a-f]{%d,64})(?![0-9a-f>])" % MIN_CUT_PIECE)
_MARKER_END = re.compile(r"(?<![0-9a-f])(?<!<sac:)([0-9a-f]{%d,64})>" % MIN_CUT_PIECE)
ON_MISS = ("compress", "text", "error")
DEFAULT_MEMORY_BYTES = 256 << 20
PIN_SECONDS = 600.0  # how long chunks handed out stay pinned if no generation reads them
# The texts of chunks memory has dropped that are kept to compress them again, at most (bytes the
# str objects take, least recently handed out forgotten first): a few KB a chunk, against the MB
# of K/V it compresses to, so thousands of dropped chunks stay recoverable for little memory.
TEXT_MEMORY_BYTES = 16 << 20
MAX_BATCH = 16  # prompts decoded together at most
STORE_MISS_HINT = (
    "A store serves only texts identical to the chunks sac_rag.precompress stored (the same files, "
    "cut by its chunking): retrieve those chunks (e.g. the entries' 'text' metadata), precompress the "
    "texts your retriever returns, or set write_back=True to store them as they come")

Segment = str | AnchorKV


class MarkerCutError(SACError):
    """A prompt holds a piece of a ``<sac:...>`` marker, not the whole marker: the text it travelled
    in was split inside it (e.g. by LlamaIndex's prompt helper). Read as text, its chunk would be
    lost and its hex digits would reach the model, so the prompt is refused.

    Not a ``ValueError`` (unlike ``PromptError``): LlamaIndex's refine and compact synthesizers catch
    those from the LLM, log them and carry on, which would turn the refusal into "Empty Response"."""


# -- markers ----------------------------------------------------------------------------------


def marker_for(key: str) -> str:
    """``<sac:KEY>`` for a store key (``AnchorStore.key_for(chunk text)``)."""
    if not isinstance(key, str) or not CHUNK_KEY.fullmatch(key):
        raise InvalidInputError(f"a handle key is a sha256 hex digest (AnchorStore.key_for(text)), got {key!r}")
    return f"{MARKER_PREFIX}{key}>"


def markers_for(keys: Iterable[str]) -> str:
    """The handle of a text made of several chunks: their markers back to back, in order."""
    return "".join(marker_for(k) for k in keys)


def keys_in(text: str) -> list[str]:
    """Keys of the well-formed markers in ``text``, in order of first appearance, without
    repeats (whether they resolve or not)."""
    return list(dict.fromkeys(m.group(1) for m in MARKER_PATTERN.finditer(text)))


def reads_caches(prompts: Sequence[str | Sequence[Segment]]) -> bool:
    """Whether every prompt reads compressed contexts (a marker, or a chunk among its segments, on its
    own or in the list of one text's chunks, as ``Generator`` reads them): the calls a compressor's
    ``recommended_decoding`` is for (it was measured answering from caches)."""
    def chunks_in(segment) -> bool:
        return isinstance(segment, AnchorKV) or (isinstance(segment, Sequence) and not isinstance(segment, str)
                                                 and any(isinstance(c, AnchorKV) for c in segment))

    return all(keys_in(p) if isinstance(p, str) else isinstance(p, Sequence) and any(chunks_in(s) for s in p)
               for p in prompts)  # anything else: refused where it is read as segments


def plain_text(text: str) -> str:
    """``text`` to put in a prompt as text (a document passed through uncompressed, say): each
    ``<sac:`` in it gets a zero-width space after its ``<`` (U+200B, invisible when shown), so
    marker-looking text in it stays text even when it names a stored chunk."""
    if not isinstance(text, str):
        raise InvalidInputError(f"the text must be a str, got {type(text).__name__}")
    return text.replace(MARKER_PREFIX, "<\u200bsac:")


def split_prompt(prompt: str, resolve: Callable[[str], AnchorKV | None]) -> list[Segment]:
    """Prompt segments for ``Generator``: each marker whose key ``resolve`` maps to an entry
    becomes that ``AnchorKV``; every other character, including markers that do not resolve,
    stays text. ``resolve`` is asked once per distinct key."""
    if not isinstance(prompt, str):
        raise InvalidInputError(f"the prompt must be a str, got {type(prompt).__name__}")
    resolved: dict[str, AnchorKV | None] = {}
    segments: list[Segment] = []
    last = 0
    for match in MARKER_PATTERN.finditer(prompt):
        key = match.group(1)
        if key not in resolved:
            resolved[key] = resolve(key)
        kv = resolved[key]
        if kv is None:
            continue
        if match.start() > last:
            segments.append(prompt[last:match.start()])
        segments.append(kv)
        last = match.end()
    if last < len(prompt):
        segments.append(prompt[last:])
    return segments


# -- resolving ----------------------------------------------------------------------------------


class BoundedMemory(MutableMapping):
    """Chunks compressed in this process and not written to a store: key -> ``AnchorKV``, least
    recently used dropped first once their tensors pass ``max_bytes``.

    Never dropped to make room: the entries of the call in progress (``put_many(..., keep=...)``),
    and pinned entries (``pin``, ``put_many(..., pin=True)``): the chunks calls have been handed and
    not yet read, each pinned until its call has generated (``unpin``), so that a concurrent call
    cannot drop them in between. A pin lapses after ``pin_seconds`` (a call that failed, or whose
    documents were never sent to the LLM), so pins cannot hold memory for ever. The memory then
    holds more than ``max_bytes`` until a later call (with a warning), rather than have chunks whose
    markers are out compressed again. The keys of dropped entries are remembered (``was_evicted``),
    so a marker of one can be told from a marker that names nothing.
    """

    MAX_EVICTED_KEYS = 1 << 16

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, pin_seconds: float = PIN_SECONDS):
        self.max_bytes = max_bytes
        self.pin_seconds = pin_seconds
        self._items: OrderedDict[str, AnchorKV] = OrderedDict()
        self._bytes = 0
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._pins: dict[str, list[float]] = {}  # key -> when each of its pins lapses (time.monotonic)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __getitem__(self, key: str) -> AnchorKV:
        with self._lock:
            kv = self._items[key]
            self._items.move_to_end(key)
            return kv

    def __setitem__(self, key: str, kv: AnchorKV) -> None:
        self.put_many([(key, kv)])

    def put_many(self, items: Iterable[tuple[str, AnchorKV]], keep: Iterable[str] = (), pin: bool = False) -> None:
        """Add ``items`` (most recently used; each pinned once if ``pin``), then drop the least
        recently used entries other than ``items``, ``keep`` and pinned ones while the memory holds
        more than ``max_bytes``."""
        with self._lock:
            now = time.monotonic()
            added: dict[str, AnchorKV] = dict(items)
            keep = list(keep)
            for key, kv in added.items():
                if key in self._items:
                    self._bytes -= self._items.pop(key).nbytes
                self._items[key] = kv
                self._bytes += kv.nbytes
                self._evicted.pop(key, None)
                if pin:
                    self._pins.setdefault(key, []).append(now + self.pin_seconds)
            protected = set(keep) | set(added)
            for key in [*keep, *added]:  # ``items`` the most recent, in their order
                if key in self._items:
                    self._items.move_to_end(key)
            self._lapse(now)
            for key in list(self._items):
                if self._bytes <= self.max_bytes:
                    break
                if key in protected or key in self._pins:
                    continue
                self._bytes -= self._items.pop(key).nbytes
                self._evicted[key] = None
            while len(self._evicted) > self.MAX_EVICTED_KEYS:
                self._evicted.popitem(last=False)
            if self._bytes > self.max_bytes:
                logger.warning(
                    "the chunks compressed in memory take %d bytes, over the %d-byte limit: the %d chunk(s) that "
                    "calls in progress have been handed and not yet read are kept anyway, and dropped on later calls "
                    "once read (raise memory_bytes, or give the engine a store with write_back=True)",
                    self._bytes, self.max_bytes, len((protected | set(self._pins)) & set(self._items)))

    def pin(self, keys: Iterable[str]) -> set[str]:
        """Pin those of ``keys`` held here (once each) and mark them as just used: they are not
        dropped to make room until ``unpin`` (or ``pin_seconds`` from now). Returns the keys pinned."""
        with self._lock:
            now = time.monotonic()
            self._lapse(now)  # lapsed pins go here too, not only when chunks are added
            lapses = now + self.pin_seconds
            pinned = {key for key in keys if key in self._items}
            for key in pinned:
                self._pins.setdefault(key, []).append(lapses)
                self._items.move_to_end(key)
            return pinned

    def unpin(self, keys: Iterable[str]) -> None:
        """Release one pin of each of ``keys`` (the one that lapses first); keys without pins are
        skipped. The entries are dropped by a later ``put_many`` if the memory is over its limit."""
        with self._lock:
            for key in set(keys):
                pins = self._pins.get(key)
                if pins:
                    pins.remove(min(pins))
                    if not pins:
                        del self._pins[key]

    @property
    def pinned(self) -> set[str]:
        """The keys pinned now."""
        with self._lock:
            self._lapse(time.monotonic())
            return set(self._pins)

    def _lapse(self, now: float) -> None:
        """Forget the pins that have lapsed, and those of entries no longer held (lock held)."""
        for key in list(self._pins):
            live = [t for t in self._pins[key] if t > now] if key in self._items else []
            if live:
                self._pins[key] = live
            else:
                del self._pins[key]

    def touch(self, keys: Iterable[str]) -> None:
        """Mark ``keys`` (those present) as just used."""
        with self._lock:
            for key in keys:
                if key in self._items:
                    self._items.move_to_end(key)

    def was_evicted(self, key: str) -> bool:
        """Whether ``key`` was held here and dropped to make room (and not added again since)."""
        with self._lock:
            return key in self._evicted and key not in self._items

    def __delitem__(self, key: str) -> None:
        with self._lock:
            self._bytes -= self._items.pop(key).nbytes
            self._pins.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


class CacheResolver:
    """Looks handle keys up: among chunks compressed in this process (``memory``), then in the
    store. Only entries made by the compressor with ``fingerprint`` resolve; a store built by
    another model or compressor is refused outright (``FingerprintMismatchError``).

    It also remembers the keys it has handed out lately (``issue``), to tell a piece of one of
    their markers in a prompt (``cut_pieces``), and the texts of the chunks compressed in memory:
    those of chunks memory holds (extractive answers quote them), and, up to ``text_bytes``, those
    of chunks it has dropped, least recently handed out forgotten first (``remembered_texts``): a
    marker of a dropped chunk can still be served by compressing its text again."""

    MAX_ISSUED_KEYS = 1 << 16
    _live: weakref.WeakSet = weakref.WeakSet()  # every resolver of this process, for ``adopt``
    _live_lock = threading.Lock()

    def __init__(self, fingerprint: str, store: AnchorStore | None = None,
                 memory: MutableMapping[str, AnchorKV] | None = None, text_bytes: int = TEXT_MEMORY_BYTES):
        self.fingerprint = fingerprint
        self.memory = BoundedMemory() if memory is None else memory
        self.text_bytes = text_bytes
        self._texts: OrderedDict[str, str] = OrderedDict()  # least recently handed out first
        self._texts_size = 0  # sys.getsizeof of the texts in ``_texts``
        self._texts_lock = threading.Lock()  # calls remember chunks concurrently (outside the model lock)
        self._issued: OrderedDict[str, None] = OrderedDict()
        self._issued_lock = threading.Lock()
        self.store: AnchorStore | None = None
        if store is not None:
            self.attach_store(store)
        with CacheResolver._live_lock:
            CacheResolver._live.add(self)

    def attach_store(self, store: AnchorStore) -> None:
        if not same_model(store.fingerprint, self.fingerprint):
            raise FingerprintMismatchError(
                f"the anchor store at {store.path}", self.fingerprint, store.fingerprint,
                other_compressor_advice(self.fingerprint, store.fingerprint, store.manifest["dtype"],
                                        "Rebuild the store with this compressor (python -m sac_rag.precompress)"),
            )
        self.store = store

    def __call__(self, key: str) -> AnchorKV | None:
        return self.lookup([key]).get(key)

    def present(self, keys: Iterable[str], pin: bool = False) -> set[str]:
        """Those of ``keys`` that resolve, without decoding any entry. With ``pin``, those held in
        memory are pinned as they are found, until ``release``: a concurrent call making room then
        cannot drop them before the call they are handed to has read them."""
        keys = [k for k in dict.fromkeys(keys) if isinstance(k, str) and CHUNK_KEY.fullmatch(k)]
        if pin and isinstance(self.memory, BoundedMemory):
            found = self.memory.pin(keys)
        else:
            found = {k for k in keys if k in self.memory}
        rest = [k for k in keys if k not in found]
        if rest and self.store is not None:
            found.update(set(rest) - set(self.store.missing(rest)))
        return found

    def release(self, keys: Iterable[str]) -> None:
        """Unpin the chunks of ``keys`` once (their call has generated): memory may drop them again."""
        if isinstance(self.memory, BoundedMemory):
            self.memory.unpin(keys)

    def issue(self, keys: Iterable[str]) -> None:
        """Remember ``keys`` as handed out (the latest ``MAX_ISSUED_KEYS``), for ``cut_pieces``; their
        texts are the last to be forgotten."""
        keys = list(keys)
        with self._issued_lock:
            for key in keys:
                self._issued[key] = None
                self._issued.move_to_end(key)
            while len(self._issued) > self.MAX_ISSUED_KEYS:
                self._issued.popitem(last=False)
        with self._texts_lock:
            for key in keys:
                if key in self._texts:
                    self._texts.move_to_end(key)

    def cut_pieces(self, prompt: str) -> list[str]:
        """Pieces of cut markers of handed-out keys in ``prompt``: ``<sac:`` and the start of such a
        key not followed by the rest of the marker, or the end of such a key and ``>`` not preceded
        by the start (``MIN_CUT_PIECE`` hex digits at least). Hex text not next to ``<sac:`` or ``>``
        (a hash, a number, a key quoted as a citation) is never a piece, nor is a whole marker or
        one put in as text (``plain_text``)."""
        rest = _ESCAPED_MARKER.sub("\x00", MARKER_PATTERN.sub("\x00", prompt))
        starts = {m.group(0) for m in _MARKER_START.finditer(rest)}
        ends = {m.group(0) for m in _MARKER_END.finditer(rest)}
        if not starts and not ends:
            return []
        with self._issued_lock:
            issued = list(self._issued)
        return sorted({piece for piece in starts if any(key.startswith(piece[len(MARKER_PREFIX):]) for key in issued)}
                      | {piece for piece in ends if any(key.endswith(piece[:-1]) for key in issued)})

    def lookup(self, keys: Iterable[str]) -> dict[str, AnchorKV]:
        """``{key: entry}`` for those of ``keys`` that resolve (one store query for the rest)."""
        found: dict[str, AnchorKV] = {}
        wanted = []
        for key in dict.fromkeys(keys):
            if not isinstance(key, str) or not CHUNK_KEY.fullmatch(key):
                continue
            kv = self.memory.get(key)
            if kv is not None and same_model(kv.fingerprint, self.fingerprint):
                found[key] = kv
            else:
                wanted.append(key)
        if wanted and self.store is not None:
            absent = set(self.store.missing(wanted))
            stored = [k for k in wanted if k not in absent]
            for key, kv in zip(stored, self.store.get_many(stored)):
                if same_model(kv.fingerprint, self.fingerprint):  # the store checks this too
                    found[key] = kv
        return found

    def adopt(self, keys: Iterable[str], keep: Iterable[str] = ()) -> dict[str, AnchorKV]:
        """Those of ``keys`` that another resolver of this compressor in this process holds, in its memory
        or its store, copied into this one's memory with their texts: ``{key: entry}``. A marker handed out
        by another engine (a document compressor and an LLM built with settings that differ: a store given
        as a directory and as an open ``AnchorStore``, or to one of them only) then resolves here, rather
        than being read as text. Making room drops none of ``keep``."""
        wanted = [k for k in dict.fromkeys(keys) if isinstance(k, str) and CHUNK_KEY.fullmatch(k)]
        with CacheResolver._live_lock:
            others = [r for r in CacheResolver._live if r is not self and same_model(r.fingerprint, self.fingerprint)]
        items: dict[str, tuple[str, AnchorKV, str | None]] = {}
        for other in others:
            rest = [k for k in wanted if k not in items]
            if not rest:
                break
            texts = other.remembered_texts(rest)
            for key in rest:
                kv = other.memory.get(key)
                if kv is not None and same_model(kv.fingerprint, self.fingerprint):
                    items[key] = (key, kv, texts.get(key))
            rest = [k for k in rest if k not in items]
            if rest and other.store is not None:
                items.update(_stored_items(other.store, rest, self.fingerprint))
        if items:
            self.remember_many(list(items.values()), keep)
        return {key: kv for key, kv, _ in items.values()}

    def remember(self, key: str, kv: AnchorKV, text: str | None = None) -> None:
        """Keep a freshly compressed chunk (chunk-local, offset 0) so that its marker resolves,
        and its ``text`` so that extractive answers can quote it."""
        self.remember_many([(key, kv, text)])

    def remember_many(self, items: Sequence[tuple[str, AnchorKV, str | None]], keep: Iterable[str] = (),
                      pin: bool = False) -> None:
        """``remember`` each ``(key, entry, text)``; making room drops none of them, nor the
        chunks of ``keep`` (the other chunks of the call in progress). With ``pin`` they stay
        pinned until ``release`` (handed to a call that has not generated yet)."""
        for key, kv, _ in items:
            if not same_model(kv.fingerprint, self.fingerprint):
                raise FingerprintMismatchError(
                    f"the chunk {key}", self.fingerprint, kv.fingerprint,
                    "Compress it with the compressor this resolver serves.",
                )
            if kv.offset != 0:
                raise InvalidInputError(f"chunk {key} is at offset {kv.offset}; handles hold chunk-local entries")
        if isinstance(self.memory, BoundedMemory):
            self.memory.put_many([(key, kv) for key, kv, _ in items], keep, pin=pin)
        else:
            for key, kv, _ in items:
                self.memory[key] = kv
        with self._texts_lock:
            for key, _, text in items:
                if text is None:
                    continue
                if key not in self._texts:
                    self._texts_size += sys.getsizeof(text)
                self._texts[key] = text
                self._texts.move_to_end(key)
            self._forget_texts()

    def _forget_texts(self) -> None:
        """Forget the texts of dropped chunks, least recently handed out first, while the texts take
        more than ``text_bytes``; those of chunks memory holds are kept (texts lock held)."""
        if self._texts_size <= self.text_bytes:
            return
        for key in list(self._texts):
            if self._texts_size <= self.text_bytes:
                break
            if key not in self.memory:
                self._texts_size -= sys.getsizeof(self._texts.pop(key))

    def remembered_texts(self, keys: Iterable[str]) -> dict[str, str]:
        """``{key: text}`` for those of ``keys`` compressed in memory whose text is still remembered,
        whether memory holds the chunk or has dropped it."""
        with self._texts_lock:
            return {k: self._texts[k] for k in dict.fromkeys(keys) if k in self._texts}

    def keep(self, keys: Iterable[str]) -> None:
        """Mark the chunks of ``keys`` held in memory as just used (the last to be dropped)."""
        if isinstance(self.memory, BoundedMemory):
            self.memory.touch(keys)

    def was_evicted(self, key: str) -> bool:
        """Whether ``key`` named a chunk compressed in memory that was dropped to make room."""
        return isinstance(self.memory, BoundedMemory) and self.memory.was_evicted(key)

    def texts_of(self, keys: Iterable[str]) -> dict[str, str]:
        """``{key: text}`` for those of ``keys`` whose text is known: remembered with the chunk, or
        the ``text`` metadata of its store entry (``precompress`` and write-back keep it)."""
        keys = list(dict.fromkeys(keys))
        with self._texts_lock:
            texts = {k: self._texts[k] for k in keys if k in self._texts}
        found = {k: t for k, t in texts.items() if k in self.memory}
        if self.store is not None:
            rest = [k for k in keys if k not in found]
            for key in set(rest) - set(self.store.missing(rest)):
                text = self.store.metadata(key).get("text")
                if isinstance(text, str):
                    found[key] = text
        return found


# -- the engine both framework adapters share -------------------------------------------------


@dataclass
class _Chunk:
    key: str
    text: str
    token_ids: tuple[int, ...]
    index: int
    start_char: int
    end_char: int


@dataclass(eq=False)  # told apart by identity: two calls may queue equal prompts
class _Request:
    prompt: list
    config: GenerationConfig
    sources: list[str] | None = None  # what an extractive answer may quote
    result: Generation | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Call:
    """The requests one ``generate`` call queued, and whether its caller has withdrawn them (a
    cancelled ``agenerate``); both read and written under the engine's pending lock."""
    requests: list[_Request] = field(default_factory=list)
    withdrawn: bool = False


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
_SHARED: dict[tuple, SACEngine] = {}  # the shared engines of names and paths, for the process's life
_SHARED_GUARD = threading.Lock()
_ENGINES_ATTRIBUTE = "_sac_shared_engines"


def model_lock(compressor: SACCompressor) -> threading.Lock:
    """The lock every user of ``compressor``'s weights holds while running them: compressing
    (adapter on) and decoding (adapter off) must not interleave."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(compressor)
        if lock is None:
            lock = _MODEL_LOCKS[compressor] = threading.Lock()
        return lock


@dataclass
class _Loaded:
    compressor: SACCompressor
    generator: Generator
    resolver: CacheResolver
    lock: threading.Lock
    store_path: Path | None
    pending: list[_Request] = field(default_factory=list)


class SACEngine:
    """A compressor, its decoder and a store, loaded on first use.

    ``compressor``: a built-in name, a compressor directory, or a loaded ``SACCompressor``.
    ``store``: a store directory (opened on first use and checked against the compressor's
    fingerprint; created on the first write-back if it does not exist yet), an open
    ``AnchorStore``, or None (chunks are then compressed when first seen and kept in memory).

    ``merge_decoder``: answer from a copy of the model with the decoder adapter merged into its
    weights (``Generator.from_compressor``), faster for one more copy of the adapted weights.

    Construction does no work; ``load()`` (or any use) loads the weights and opens the store.
    ``SACEngine.shared(...)`` returns one engine per distinct set of arguments (a device and dtype
    named as they resolve: None and "cpu" on a machine without a GPU are one), so a document
    compressor and an LLM built with the same arguments share weights, store and the chunks
    compressed in memory. Engines that differ all the same (a store given as a directory and as an
    open ``AnchorStore``) still read each other's markers: a chunk another engine of the compressor
    holds in memory is copied over (``CacheResolver.adopt``).

    Chunks in memory that ``handles_for`` hands out are pinned until a ``generate`` (or stream)
    whose prompt carries their markers has finished, or for ``PIN_SECONDS`` at most: concurrent
    calls cannot drop each other's chunks between handing them out and reading them. A chunk dropped
    all the same (its pin lapsed, or another prompt with its markers released it) is compressed again
    from its text when a prompt names it; its marker is refused only once that text is forgotten too.
    """

    def __init__(self, compressor: str | os.PathLike | SACCompressor = DEFAULT_COMPRESSOR,
                 store: str | os.PathLike | AnchorStore | None = None, *, device: str | None = None,
                 dtype: str | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES, merge_decoder: bool = False):
        if not isinstance(compressor, (str, os.PathLike, SACCompressor)):
            raise InvalidInputError(
                f"compressor must be a built-in name, a directory or an SACCompressor, got {type(compressor).__name__}")
        if store is not None and not isinstance(store, (str, os.PathLike, AnchorStore)):
            raise InvalidInputError(f"store must be a directory or an AnchorStore, got {type(store).__name__}")
        if isinstance(compressor, SACCompressor):
            _check_loaded_settings(compressor, device, dtype)
        self.compressor_spec = compressor
        self.store_spec = store
        self.device, self.dtype = device, dtype
        self._load_device = resolved_here(device)  # the model may load in a worker thread, whose GPU is GPU 0
        self.memory_bytes = memory_bytes
        self.merge_decoder = merge_decoder
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._claims: dict[str, threading.Event] = {}  # chunk key -> set once the call compressing it is done
        self._claims_lock = threading.Lock()

    @classmethod
    def shared(cls, compressor: str | os.PathLike | SACCompressor = DEFAULT_COMPRESSOR,
               store: str | os.PathLike | AnchorStore | None = None, *, device: str | None = None,
               dtype: str | None = None, merge_decoder: bool = False) -> SACEngine:
        """The process-wide engine for these arguments (made on first request, not loaded).

        A loaded ``SACCompressor`` has its device and dtype already: the engine is the one of that
        object whatever ``device``/``dtype`` say (so a document compressor and an LLM given the same
        object share the chunks compressed in memory), with a warning if they differ from the object's.
        The engine of a name or a path lives as long as the process, or until the compressor directory
        holds other weights (``_compressor_key``); that of a loaded compressor or an open store, as long
        as that object (``_shared_registry``)."""
        if isinstance(compressor, SACCompressor):
            _check_loaded_settings(compressor, device, dtype)
            device = dtype = None
        key = (_compressor_key(compressor), _spec_key(store, path=True), *load_settings(device, dtype), merge_decoder)
        with _SHARED_GUARD:
            registry = _shared_registry(compressor, store)
            engine = registry.get(key)
            if engine is None:
                for replaced in [k for k in registry if k[0][:2] == key[0][:2] and k[1:] == key[1:]]:
                    del registry[replaced]  # the same directory's earlier weights: retrained or copied over
                engine = registry[key] = cls(compressor, store, device=device, dtype=dtype, merge_decoder=merge_decoder)
            return engine

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"SACEngine({describe(self.compressor_spec)!r}, store={_describe_store(self.store_spec)!r}, {state})"

    # -- loading ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def load(self) -> SACEngine:
        self._state()
        return self

    def _state(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        with self._load_lock:
            if self._loaded is None:
                spec, store = self.compressor_spec, self.store_spec
                store_path = None if store is None or isinstance(store, AnchorStore) else Path(store)
                # a file or a folder of other things is refused before the model loads; an empty folder, like a
                # new path, is a store yet to be made
                store_exists = store_path is not None and os.path.lexists(store_path) and AnchorStore.check_path(
                    store_path, exist_ok=True)
                compressor = spec if isinstance(spec, SACCompressor) else SACCompressor.from_pretrained(
                    spec, device=self._load_device, dtype=self.dtype)
                resolver = CacheResolver(compressor.fingerprint, memory=BoundedMemory(self.memory_bytes))
                if isinstance(store, AnchorStore):
                    resolver.attach_store(store)
                elif store_exists:
                    resolver.attach_store(AnchorStore.open(store_path, compressor.fingerprint))
                elif store_path is not None:
                    logger.warning("no anchor store at %s yet: chunks are compressed as they come, and "
                                   "the store is created when the first one is written back", store_path)
                self._loaded = _Loaded(compressor, Generator.from_compressor(compressor, self.merge_decoder), resolver,
                                       model_lock(compressor), store_path)
        return self._loaded

    @property
    def compressor(self) -> SACCompressor:
        return self._state().compressor

    @property
    def generator(self) -> Generator:
        return self._state().generator

    @property
    def resolver(self) -> CacheResolver:
        return self._state().resolver

    @property
    def store(self) -> AnchorStore | None:
        return self._state().resolver.store

    @property
    def template(self) -> PromptTemplate:
        """The prompt layout the compressor was trained with (read without loading weights)."""
        compressor = self._compressor_at_hand()
        if compressor is not None:
            return compressor.config.prompt
        try:
            return SACConfig.from_dict(checkpoint_meta(self.compressor_spec)["config"]).prompt
        except (SACError, OSError, ValueError, KeyError, TypeError):
            return PromptTemplate()  # loading will report what is wrong with the compressor

    @property
    def recommended_decoding(self) -> dict:
        """The compressor's ``recommended_decoding`` (read without loading weights; empty if its
        checkpoint cannot be read: loading will report why)."""
        compressor = self._compressor_at_hand()
        if compressor is not None:
            return compressor.recommended_decoding
        try:
            return dict(checkpoint_meta(self.compressor_spec).get(RECOMMENDED_DECODING, {}))
        except (SACError, OSError, ValueError, TypeError):
            return {}

    def _compressor_at_hand(self) -> SACCompressor | None:
        """The compressor object if there is one without loading: the loaded one, or the one passed."""
        if self._loaded is not None:
            return self._loaded.compressor
        return self.compressor_spec if isinstance(self.compressor_spec, SACCompressor) else None

    def _recommended_for(self, prompts: Sequence[str | Sequence[Segment]]) -> list[dict]:
        """Each prompt's ``recommended_decoding`` if it reads compressed contexts, else none (the
        recommendation was measured answering from caches). Read once: before the compressor loads,
        from its checkpoint on disk."""
        recommended = self.recommended_decoding
        return [recommended if reads_caches([p]) else {} for p in prompts]

    @property
    def chunk_tokens(self) -> int:
        """Tokens per stored chunk: the store's setting (``precompress --chunk-tokens``) if it has
        one, else the compressor's maximum."""
        state = self._state()
        store = state.resolver.store
        extra = store.manifest.get("extra", {}) if store is not None else {}
        value = extra.get("chunk_tokens")
        return value if isinstance(value, int) and 4 <= value <= state.compressor.config.chunk_len \
            else state.compressor.config.chunk_len

    # -- text -> handles ---------------------------------------------------------------------------

    def handles_for(self, texts: Sequence[str], *, write_back: bool = False, on_miss: str = "compress",
                    metadata: Sequence[Mapping | None] | None = None) -> list[list[str] | None]:
        """The chunk keys of each text (``markers_for`` makes its handle): looked up by key, and
        on a miss compressed (``on_miss="compress"``: written to the store if ``write_back``, else
        kept in memory), passed through as text (``"text"``: None for that text, with a warning)
        or refused (``"error"``: ``EntryNotFoundError``). Whitespace-only texts get no keys.
        ``write_back`` stores every chunk handed out that the store lacks, also those found in memory
        (compressed by an earlier call without ``write_back``), from memory: not compressed again.

        With a store and misses compressed but not written back, one warning per call says how many
        texts missed the store: a store serves only texts identical to its chunks, so texts cut
        another way (say by a LangChain text splitter) are all compressed again on every run. Texts
        compressed earlier in this process are found in memory and do not count as misses."""
        metadata = _checked_handle_arguments(texts, on_miss, metadata)  # before lookup_handles pins anything
        found = self.lookup_handles(texts)
        return self.complete_handles(texts, found, write_back=write_back, on_miss=on_miss, metadata=metadata)

    async def ahandles_for(self, texts: Sequence[str], *, write_back: bool = False, on_miss: str = "compress",
                           metadata: Sequence[Mapping | None] | None = None) -> list[list[str] | None]:
        """``handles_for`` off the event loop: the store lookup runs in a thread without the
        model lock (it does not wait for a decode in progress); only misses take the model.
        Cancelled, the call releases the chunks its threads pin, as no generation will read them."""
        metadata = _checked_handle_arguments(texts, on_miss, metadata)  # before lookup_handles pins anything
        release = self._release_handles
        found = await _in_thread_releasing(release, [], self.lookup_handles, texts)
        if all(f is not None for f in found) and not write_back:  # with write_back, found chunks may be in memory only
            return found
        # complete_handles hands out (or on failure releases) the chunks ``found`` pinned
        return await _in_thread_releasing(release, found, self.complete_handles, texts, found,
                                          write_back=write_back, on_miss=on_miss, metadata=metadata)

    def _release_handles(self, handles: Sequence[list[str] | None]) -> None:
        """Unpin the chunks of ``handles`` (what a call handed out) once: no generation will read them."""
        self.resolver.release(k for keys in handles if keys for k in keys)

    def lookup_handles(self, texts: Sequence[str]) -> list[list[str] | None]:
        """``[key]`` for each text stored (or remembered) as one chunk, None for the others. The
        chunks found in memory are pinned until a generation reads them. Store I/O only: no
        tokenizing, no model."""
        texts = _check_texts(texts)
        resolver = self.resolver
        keys = [AnchorStore.key_for(t) for t in texts]
        present = resolver.present((k for t, k in zip(texts, keys) if t.strip()), pin=True)
        found = [[] if not t.strip() else [k] if k in present else None for t, k in zip(texts, keys)]
        resolver.issue(k for keys in found if keys for k in keys)
        return found

    def complete_handles(self, texts: Sequence[str], found: Sequence[list[str] | None], *,
                         write_back: bool = False, on_miss: str = "compress",
                         metadata: Sequence[Mapping | None] | None = None) -> list[list[str] | None]:
        """Finish ``lookup_handles``: split the texts it did not find into chunks, look those
        up (pinning those in memory, as ``lookup_handles`` pinned its own) and deal with the
        misses as ``on_miss`` says; with ``write_back``, store the chunks handed out that were
        found in memory only (``_store_held``). Refused, it releases the chunks ``found`` pinned."""
        try:
            texts = _check_texts(texts)
            metadata = _checked_handle_arguments(texts, on_miss, metadata) or [None] * len(texts)
            if len(found) != len(texts):
                raise InvalidInputError(f"got {len(texts)} texts and {len(found)} lookups (lookup_handles): "
                                        "give one each")
        except InvalidInputError:
            self._release_handles(found)
            raise
        todo = [i for i, f in enumerate(found) if f is None]
        if not todo and not write_back:
            self.resolver.keep(k for keys in found for k in keys)
            return list(found)
        state = self._state()
        present = {k for keys in found if keys for k in keys}  # pinned by lookup_handles
        result = list(found)
        try:
            chunks: dict[int, list[_Chunk]] = {}
            if todo:  # only misses take the model (a write_back call may have none)
                with state.lock:  # the tokenizer is not safe to share between threads either
                    chunks = {i: self._chunks(texts[i]) for i in todo}
            present |= state.resolver.present((c.key for i in todo for c in chunks[i] if c.key not in present),
                                              pin=True)
            missing = {c.key: (c, i) for i in todo for c in chunks[i] if c.key not in present}
            for i in todo:
                result[i] = [c.key for c in chunks[i]]
            needed = [k for keys in result for k in keys]
            state.resolver.keep(needed)
            missed = sorted({i for _, i in missing.values()})
            if missing and on_miss == "error":
                raise EntryNotFoundError(
                    f"{len(missing)} chunk(s) of {len(missed)} text(s) are not in {self._store_name()} and "
                    "on_miss='error': precompress the corpus these texts come from (python -m sac_rag.precompress), "
                    "or let misses be compressed (on_miss='compress')")
            if missing and on_miss == "text":
                logger.warning("%d of %d retrieved texts are not (fully) in %s: passing them to the LLM as text, "
                               "uncompressed. %s", len(missed), len(texts), self._store_name(), STORE_MISS_HINT)
                for i in missed:
                    result[i] = None
            elif missing:
                self._compress_and_keep(list(missing.values()), metadata, write_back, needed)
                if self.store_spec is not None and not write_back:
                    logger.warning("%d of %d retrieved texts were not in %s and were compressed on the fly. %s",
                                   len(missed), len(texts), self._store_name(), STORE_MISS_HINT)
            if write_back:
                self._store_held(texts, result, chunks, metadata)
        except BaseException:
            state.resolver.release(present)  # nothing is handed out
            raise
        handed = [k for keys in result if keys for k in keys]
        state.resolver.release(present - set(handed))  # the chunks of texts passed through as text
        state.resolver.issue(handed)
        return result

    def _store_held(self, texts: Sequence[str], result: Sequence[list[str] | None], chunks: Mapping[int, list[_Chunk]],
                    metadata: list) -> None:
        """Store the chunks of ``result`` (what a ``write_back`` call hands out) that memory holds and
        the store lacks: chunks an earlier call without ``write_back`` compressed, which this call found
        in memory instead of compressing them. Their entries are taken from memory, as they are (no
        compressing again), with the metadata ``_keep`` writes. ``chunks`` are the texts that were split
        (by index); the others are one chunk each, the text itself."""
        memory = self._state().resolver.memory
        held: dict[str, tuple[_Chunk, int]] = {}
        for i, keys in enumerate(result):
            if not keys:
                continue
            for chunk in chunks.get(i) or [_Chunk(keys[0], texts[i], (), 0, 0, len(texts[i]))]:
                if chunk.key not in held and chunk.key in memory:
                    held[chunk.key] = (chunk, i)
        if not held:
            return
        store = self._state().resolver.store
        absent = list(held) if store is None else store.missing(held)
        items = [(key, kv, _entry_metadata(held[key][0], kv, metadata[held[key][1]]))
                 for key in absent if (kv := memory.get(key)) is not None]  # pinned: still held
        if items:
            self._writable_store().put_many(items)

    def _chunks(self, text: str) -> list[_Chunk]:
        """The chunks of ``text`` as ``precompress`` cuts them (without overlap, so that the
        chunks read back to back are the text): one chunk if it fits."""
        if not text.strip():
            return []
        compressor = self._state().compressor
        limit = self.chunk_tokens
        ids = text_ids(compressor.tokenizer, text)
        if len(ids) <= limit:
            return [_Chunk(AnchorStore.key_for(text), text, tuple(ids), 0, 0, len(text))]
        from .chunking import split_document

        return [_Chunk(c.key, c.text, c.token_ids, c.index, c.start_char, c.end_char)
                for c in split_document(text, compressor.tokenizer, limit)]

    def _compress_and_keep(self, missing: list[tuple[_Chunk, int]], metadata: list, write_back: bool,
                           needed: Iterable[str] = ()) -> None:
        """Compress the chunks of ``missing`` and keep them (in the store if ``write_back``, else in
        memory, pinned). A chunk that a concurrent call is compressing already is waited for and
        then found (pinned if in memory), not compressed again: calls retrieving the same texts at
        once compress each chunk once. The chunks are claimed for the whole compress-and-keep, so
        that no call finds a chunk missing between its compression and its write."""
        state = self._state()
        found: set[str] = set()
        try:
            while missing:
                claimed, waiting = self._claim([c.key for c, _ in missing])
                try:
                    found |= state.resolver.present(claimed, pin=True)  # kept before the claim
                    mine = [(c, i) for c, i in missing if c.key in claimed and c.key not in found]
                    if mine:
                        with state.lock:
                            kvs = state.compressor.compress_chunks([c.token_ids for c, _ in mine])
                        self._keep(mine, kvs, metadata, write_back, needed)
                finally:
                    self._unclaim(claimed)
                for event in waiting.values():
                    event.wait()
                found |= state.resolver.present(waiting, pin=True)
                # the call compressing these failed: compress them here
                missing = [(c, i) for c, i in missing if c.key in waiting and c.key not in found]
        except BaseException:
            state.resolver.release(found)  # nothing is handed out
            raise

    def _claim(self, keys: Iterable[str]) -> tuple[set[str], dict[str, threading.Event]]:
        """Claim those of ``keys`` no call is compressing (returned first); the others are returned
        with the events set once their compression is over (kept, or failed)."""
        claimed, waiting = set(), {}
        with self._claims_lock:
            for key in keys:
                if key in self._claims:
                    waiting[key] = self._claims[key]
                elif key not in claimed:
                    self._claims[key] = threading.Event()
                    claimed.add(key)
        return claimed, waiting

    def _unclaim(self, keys: Iterable[str]) -> None:
        with self._claims_lock:
            for key in keys:
                self._claims.pop(key).set()

    def _keep(self, missing: list[tuple[_Chunk, int]], kvs: list[AnchorKV], metadata: list, write_back: bool,
              needed: Iterable[str]) -> None:
        state = self._state()
        if write_back:
            store = self._writable_store()
            items = [(c.key, kv, _entry_metadata(c, kv, metadata[i])) for (c, i), kv in zip(missing, kvs)]
            store.put_many(items)
        else:  # pinned: no call drops the chunks this call hands out before it has read them
            state.resolver.remember_many([(c.key, kv, c.text) for (c, _), kv in zip(missing, kvs)], needed,
                                         pin=True)

    def _writable_store(self) -> AnchorStore:
        state = self._state()
        with self._load_lock:
            store = state.resolver.store
            if store is None:
                if state.store_path is None:
                    raise InvalidInputError("write_back needs a store: give the engine a store directory")
                compressor = state.compressor
                settings = {"created_by": "sac_rag.handles", "base_model": compressor.config.base_model,
                            "chunk_len": compressor.config.chunk_len,
                            "chunk_tokens": compressor.config.chunk_len, "overlap": 0}
                store = AnchorStore.create(state.store_path, compressor.fingerprint, compressor.config.ratio,
                                           compressor.dtype, extra_manifest=settings, exist_ok=True,
                                           keep_dtype=True)
                state.resolver.attach_store(store)
            elif store.readonly:
                raise InvalidInputError(f"the store at {store.path} is open read-only; write_back needs it writable")
            return store

    def _store_name(self) -> str:
        store = self.resolver.store
        if store is not None:
            return f"the store at {store.path}"
        if self.store_spec is None:
            return "the store (none given)"
        return f"the store at {self.store_spec} (not created yet)"

    # -- prompt -> answer --------------------------------------------------------------------------

    def count_positions(self, prompt: str) -> int:
        """The positions ``prompt`` takes as the model reads it: its text's tokens (and the BOS token a
        model starts prompts with) and, for each marker naming a chunk, the tokens that chunk stands
        for (a compressed chunk keeps its tokens' positions; a marker naming none is text). What a
        conversation is trimmed by to fit the model's position limit."""
        if not isinstance(prompt, str):
            raise InvalidInputError(f"the prompt must be a str, got {type(prompt).__name__}")
        tokenizer = self.compressor.tokenizer
        bos = bos_ids(tokenizer)
        count = len(bos) if prompt else 0
        found, _ = self._entries(keys_in(prompt))  # a dropped chunk is read as its tokens too, once compressed again
        for i, segment in enumerate(split_prompt(prompt, found.get)):
            if isinstance(segment, AnchorKV):
                count += segment.n_tokens
                continue
            ids = tokenizer(segment, add_special_tokens=False)["input_ids"]
            count += len(ids) - (i == 0 and bool(bos) and ids[:1] == bos)  # a prompt writing BOS reads one
        return count

    def segments(self, prompt: str) -> list[Segment]:
        """``split_prompt`` against this engine's resolver (one store query for all markers),
        warning about markers that do not resolve (they stay text). A marker of a chunk this engine
        compressed in memory and has since dropped gets the chunk compressed again from its text
        (``_compress_again``), or, once that text is forgotten too, is refused (``EntryNotFoundError``).
        A prompt holding a piece of a marker this engine handed out is refused (``MarkerCutError``)."""
        if not isinstance(prompt, str):
            raise InvalidInputError(f"the prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidInputError("the prompt is empty: pass a question")
        resolver = self.resolver
        cut = resolver.cut_pieces(prompt)
        if cut:
            raise MarkerCutError(
                f"the prompt holds {len(cut)} piece(s) of <sac:...> markers (e.g. {cut[0]!r}) but not the whole "
                "markers: the text they travelled in was split inside a marker, so its chunk would be lost and its "
                "hex digits read as text. In LlamaIndex the response synthesizer's prompt helper does this when its "
                "context window is too small for one node's markers: leave SACLLM's context_window unset (LlamaIndex "
                "then never splits the context, and the model's own position limit is checked exactly), and do not "
                "set a smaller one through Settings.context_window, Settings.prompt_helper or a prompt_helper "
                "argument. Elsewhere, do not run a text splitter over prompts that carry markers")
        keys = keys_in(prompt)
        found, lost = self._entries(keys)
        if lost:
            raise EntryNotFoundError(
                f"{len(lost)} marker(s) in the prompt (e.g. {marker_for(lost[0])}) name chunks this engine "
                f"compressed in memory and has since dropped to stay under memory_bytes={self.memory_bytes}, and "
                f"whose texts it has forgotten too (it keeps {resolver.text_bytes} bytes of the texts of dropped "
                "chunks, to compress them again): call handles_for on the documents again for markers that resolve, "
                "raise memory_bytes, or give the engine a store with write_back=True so chunks are kept on disk")
        if len(found) < len(keys):
            logger.warning("%d of %d marker(s) in the prompt name no entry of this compressor (a "
                           "typed or stale handle?): kept as plain text", len(keys) - len(found), len(keys))
        return split_prompt(prompt, found.get)

    def _entries(self, keys: Sequence[str]) -> tuple[dict[str, AnchorKV], list[str]]:
        """``{key: entry}`` for those of ``keys`` that resolve, those another engine of this compressor
        holds in memory copied here (``CacheResolver.adopt``), chunks memory has dropped compressed again
        (``_compress_again``); and the keys of dropped chunks whose text is forgotten too."""
        resolver = self.resolver
        found = resolver.lookup(keys) if keys else {}
        absent = [k for k in keys if k not in found]
        if absent:
            found.update(resolver.adopt(absent, keep=keys))
            absent = [k for k in absent if k not in found]
        if absent:
            found.update(self._compress_again(absent, keys))
        return found, [k for k in absent if k not in found and resolver.was_evicted(k)]

    def _compress_again(self, keys: Sequence[str], needed: Sequence[str]) -> dict[str, AnchorKV]:
        """The chunks of ``keys`` this engine compressed in memory and has since dropped, compressed again
        from their remembered text and put back in memory, where they were (they were not written back):
        ``{key: entry}``. This is what makes a marker handed out good for as long as its text is
        remembered, whatever dropped its chunk meanwhile: pins lapse, and are released once per prompt
        generated, so a prompt generated twice (a retry, a refine step, a chat repeating old markers)
        releases the pin of another call handed the same chunk. Compressed as ``handles_for`` compresses a
        miss: under the model lock, once even if several calls need the chunk at once. ``needed`` (the
        prompt's other chunks) are not dropped to make room."""
        state = self._state()
        texts = state.resolver.remembered_texts(keys)
        if not texts:
            return {}
        with state.lock:  # the tokenizer is not safe to share between threads either
            # a chunk fits one chunk: cut again, it is itself, with its token ids (those of its text)
            chunks = [chunk for text in texts.values() for chunk in self._chunks(text)]
        self._compress_and_keep([(c, 0) for c in chunks], [None], write_back=False, needed=needed)
        try:
            found = state.resolver.lookup(texts)
        finally:
            state.resolver.release(texts)  # pinned only until looked up: the prompt holds their K/V now
        logger.warning("%d chunk(s) named in the prompt had been dropped from memory (memory_bytes=%d) and were "
                       "compressed again from their text: raise memory_bytes, or give the engine a store with "
                       "write_back=True, to keep the chunks whose markers are still in use", len(found),
                       self.memory_bytes)
        return found

    def generate(self, prompts: Sequence[str | Sequence[Segment]],
                 config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> list[Generation]:
        """Answer each prompt (a string with markers, or ready segments) with ``config`` (one for all, or
        one per prompt); without it, a prompt that reads compressed contexts decodes as the
        compressor's ``recommended_decoding`` says and one that does not decodes greedily, in the same
        call. Calls made while the model is busy are queued and decoded together when it is free (one
        batch per decoding)."""
        return self._generate(prompts, config, _Call())

    async def agenerate(self, prompts: Sequence[str | Sequence[Segment]],
                        config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> list[Generation]:
        """``generate`` in a worker thread: the event loop stays free meanwhile. Cancelled (say by
        ``asyncio.wait_for``'s timeout) while its prompts wait for the model, the call withdraws them:
        the model does not decode answers no one is waiting for."""
        call = _Call()

        def unread(held: Any) -> None:
            """Cancelled before its thread started (the executor's workers all busy), the call never
            decodes: it releases the prompts' chunks itself (once started, ``_generate`` does)."""
            if held is prompts:
                self._release(prompts)

        try:
            return await _in_thread_releasing(unread, prompts, self._generate, prompts, config, call)
        except asyncio.CancelledError:
            self._withdraw(call)
            raise

    def _generate(self, prompts: Sequence[str | Sequence[Segment]],
                  config: GenerationConfig | Sequence[GenerationConfig] | None, call: _Call) -> list[Generation]:
        """``generate``, its requests queued as ``call``'s (so that ``_withdraw`` can take them back)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not len(prompts):
            raise InvalidInputError(f"generate takes a non-empty list of prompts, got {prompts!r:.40}")
        try:
            configs = [_engine_config(c, recommended)  # refused: its chunks are released too
                       for c, recommended in zip(_per_prompt(config, len(prompts)), self._recommended_for(prompts))]
            requests = [_Request(self._as_segments(p), c, self._sources(p, c)) for p, c in zip(prompts, configs)]
            configs = [c for c, _ in grouped(configs)]  # each once
            state = self._state()
            with self._pending_lock:
                if not call.withdrawn:
                    call.requests = requests
                    state.pending.extend(requests)
            with state.lock:
                with self._pending_lock:
                    batch = [r for r in state.pending if r.config in configs]
                    state.pending = [r for r in state.pending if r.config not in configs]
                try:
                    for chosen in configs:  # one batch per decoding
                        same = [r for r in batch if r.config == chosen]
                        for start in range(0, len(same), MAX_BATCH):
                            self._serve(same[start:start + MAX_BATCH], chosen)
                finally:
                    self._requeue(state, batch, requests)
        finally:
            self._release(prompts)
        for request in requests:
            if request.error is not None:
                raise request.error
            if request.result is None:  # withdrawn before the model was free
                raise SACError("the call was cancelled before its prompts were decoded: call generate again")
        results = [r.result for r in requests]
        self._warn_if_empty(results)
        return results

    def _requeue(self, state: _Loaded, batch: Sequence[_Request], own: Sequence[_Request]) -> None:
        """Put back the requests of other calls that ``batch`` took from the queue and left unanswered
        (the decoding was interrupted, by a ``KeyboardInterrupt`` say): their callers, waiting for the
        model, then decode them themselves instead of finding no answer."""
        mine = {id(r) for r in own}
        left = [r for r in batch if id(r) not in mine and r.result is None and r.error is None]
        if left:
            with self._pending_lock:
                state.pending[:0] = left

    def _withdraw(self, call: _Call) -> None:
        """Take ``call``'s requests out of the queue (its caller is gone); those a concurrent call has
        already taken to decode are answered anyway."""
        with self._pending_lock:
            call.withdrawn = True
            if self._loaded is not None and call.requests:
                taken = {id(r) for r in call.requests}
                self._loaded.pending = [r for r in self._loaded.pending if id(r) not in taken]

    def stream(self, prompt: str | Sequence[Segment],
               config: GenerationConfig | None = None) -> Iterator[str | Generation]:
        """Yield the answer's text as it is decoded, then the finished ``Generation`` (its usage
        figures). It is decoded in the calling thread, each step holding the model only while it
        computes (``Generator.stream``): other calls (from this thread too, say a second query while
        the stream is half read) run between its pieces. With beam search, which settles on its
        answer only at the end, the answer comes in one piece. Nothing is decoded before the first
        piece is asked for: a stream closed or dropped (garbage-collected) before that releases the
        chunks its prompt's markers name at once, rather than holding them pinned for
        ``PIN_SECONDS`` (``_Unread``)."""
        return _Stream(self._decoded(prompt, config), lambda: self._release([prompt]))

    def astream(self, prompt: str | Sequence[Segment],
                config: GenerationConfig | None = None) -> AsyncIterator[str | Generation]:
        """``stream`` decoded in a worker thread, its pieces handed to the event loop as they
        come (``async for``). Leaving the loop early stops the decoding at the next token; like a
        ``stream``, one closed (``aclose``) or dropped before it is read releases its prompt's chunks."""
        return _AStream(self._astream(prompt, config), lambda: self._release([prompt]))

    async def _astream(self, prompt: str | Sequence[Segment],
                       config: GenerationConfig | None) -> AsyncIterator[str | Generation]:
        """``astream``'s pieces: ``_decoded`` run in the loop's executor, handed over through a queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        end = object()
        decoded = self._decoded(prompt, config, stop)

        def post(item) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                return True
            except RuntimeError:  # the event loop is gone
                return False

        def produce() -> None:
            try:
                for piece in decoded:
                    if not post(piece):
                        return
            except BaseException as err:  # handed to the consumer
                post(_Raised(err))
            finally:
                decoded.close()
                post(end)

        worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
        try:
            while (item := await queue.get()) is not end:
                yield _unwrapped(item)
        finally:
            stop.set()
            if worker.done():
                worker.result()

    def _decoded(self, prompt: str | Sequence[Segment], config: GenerationConfig | None,
                 stop: threading.Event | None = None) -> Iterator[str | Generation]:
        """The answer's text pieces, then its ``Generation``, each step holding the model (for
        ``stream``, in the caller's thread, and ``astream``, in a worker); it ends early once ``stop``
        is set. However it ends, it releases the chunks of the prompt."""
        try:
            config = _engine_config(config, self._recommended_for([prompt])[0])
            segments = self._as_segments(prompt)
            sources = self._sources(prompt, config)
            state = self._state()
            decoding = state.generator.stream_with_usage(segments, config, sources, lock=state.lock)
            try:
                for item in decoding:
                    if stop is not None and stop.is_set():  # closed or left early
                        return
                    if isinstance(item, Generation):
                        result = item
                    else:
                        yield item
            finally:
                decoding.close()
        finally:
            self._release([prompt])
        self._warn_if_empty([result])
        yield result

    def _release(self, prompts: Sequence[str | Sequence[Segment]]) -> None:
        """The calls of ``prompts`` have generated: unpin the chunks their markers name, once per
        prompt (ready-made segments name none)."""
        if self._loaded is not None:
            for prompt in prompts:
                if isinstance(prompt, str):
                    self._loaded.resolver.release(keys_in(prompt))

    def _warn_if_empty(self, generations: Sequence[Generation]) -> None:
        """Say so when the model ended answers before writing anything: its decoder is trained on one
        prompt layout, and on a prompt outside it (a bare question, say) it often stops at once."""
        empty = sum(g.finish_reason == "stop" and not g.text.strip() for g in generations)
        if empty:
            logger.warning(
                "%d of %d answers are empty: the model stopped before writing anything. SAC's decoder answers "
                "prompts in the layout it was trained with (contexts, then %r); build them with sac_qa_prompt or "
                "create_sac_stuff_chain (LangChain; ChatSAC lays out a chat of several messages so), "
                "text_qa_template=llm.qa_prompt in a LlamaIndex query engine (its chat engines get the layout from "
                "SACLLM), or PromptTemplate.build / PromptTemplate.conversation",
                empty, len(generations),
                self.template.question.format(question="QUESTION"))

    def _as_segments(self, prompt: str | Sequence[Segment]) -> list[Segment]:
        if isinstance(prompt, str):
            return self.segments(prompt)
        if not isinstance(prompt, Iterable) or isinstance(prompt, bytes):
            raise InvalidInputError(f"a prompt is a string (with <sac:...> markers) or a list of segments (text and "
                                    f"AnchorKV), got {type(prompt).__name__}")
        return list(prompt)

    def _sources(self, prompt: str | Sequence[Segment], config: GenerationConfig) -> list[str] | None:
        """What an extractive answer to ``prompt`` may quote: the text of every chunk its markers
        name, and the text of its contexts section (documents passed through as text, e.g. on a miss),
        not the question (``contexts_part``)."""
        if not config.extractive:
            return None
        if not isinstance(prompt, str):
            raise InvalidInputError("extractive answers need the prompt as text with markers: ready-made "
                                    "segments do not say which texts their compressed contexts stand for")
        keys = list(dict.fromkeys(keys_in(prompt)))
        present = self.resolver.present(keys)
        texts = self.resolver.texts_of(present)
        untexted = sorted(present - set(texts))
        if untexted:
            raise InvalidInputError(
                f"{len(untexted)} chunk(s) in the prompt have no text to quote (e.g. {untexted[0]}): their store "
                "entries lack the 'text' metadata that sac_rag.precompress and write-back keep; answer without "
                "extractive, or rebuild the store")
        cut = MARKER_PATTERN.sub(lambda m: "\x00" if m.group(1) in present else m.group(0), contexts_part(
            prompt, self.template))
        return [texts[k] for k in keys if k in texts] + [t for t in cut.split("\x00") if t.strip()]

    def _serve(self, batch: list[_Request], config: GenerationConfig) -> None:
        try:
            sources = [r.sources for r in batch] if config.extractive else None
            results = self.generator.generate_batch([r.prompt for r in batch], config, sources)
        except Exception as err:
            if len(batch) == 1:
                batch[0].error = err
                return
            for request in batch:  # find whose prompt failed; the others still get answers
                self._serve([request], config)
            return
        for request, result in zip(batch, results):
            request.result = result


def _stored_items(store: AnchorStore, keys: Sequence[str], fingerprint: str) -> dict[str, tuple]:
    """``{key: (key, entry, text)}`` for those of ``keys`` that ``store`` holds (by ``fingerprint``'s
    compressor); none if the store cannot be read now (closed, say): another engine's store is a
    fallback, never a reason for this engine's prompt to fail."""
    try:
        absent = set(store.missing(keys))
        stored = [k for k in keys if k not in absent]
        entries = store.get_many(stored)
        return {k: (k, kv, store.metadata(k).get("text")) for k, kv in zip(stored, entries)
                if same_model(kv.fingerprint, fingerprint)}
    except (SACError, OSError, sqlite3.Error):
        return {}


def contexts_part(prompt: str, template: PromptTemplate) -> str:
    """The contexts section of a prompt in ``template``'s layout: what comes after its opening
    (``prefix`` and ``context_prefix``) and before its first question; in a chat, also before the
    earlier turns. A prompt without the layout's question heading is returned whole (nothing tells
    its contexts from the rest)."""
    heading = template.question.partition("{question}")[0].strip()
    end = prompt.find(heading) if heading else -1
    if end < 0:
        return prompt
    contexts = prompt[:end]
    opening = template.prefix + template.context_prefix
    return contexts[len(opening):] if opening and contexts.startswith(opening) else contexts


def _per_prompt(config: GenerationConfig | Sequence[GenerationConfig] | None, n_prompts: int) -> list:
    """``generate``'s ``config`` as one entry per prompt (``None``: the default for that prompt)."""
    if config is None or isinstance(config, GenerationConfig):
        return [config] * n_prompts
    if isinstance(config, Sequence) and not isinstance(config, str) and len(config) == n_prompts \
            and all(isinstance(c, GenerationConfig) for c in config):
        return list(config)
    raise InvalidInputError(f"generate got {n_prompts} prompts and config={config!r}: give one GenerationConfig for "
                            "all prompts, or a list of one per prompt")


def _engine_config(config: GenerationConfig | None, recommended: dict) -> GenerationConfig:
    """A call's decoding settings (without ``config``, ``SAC``'s: the compressor's ``recommended``
    decoding, stopping where the layout's next section begins),
    refusing context-aware decoding: it reads each prompt beside the same prompt without its
    contexts, which a prompt string with markers does not give."""
    config = checked_config(config) or GenerationConfig(stop=LAYOUT_STOP).with_recommended(recommended)
    if config.context_contrast:
        raise InvalidInputError("context_contrast (context-aware decoding) needs each prompt without its contexts, "
                                "which SACEngine and the framework wrappers are not given: use SAC.answer, or "
                                "Generator.generate with contrast_prompt=")
    return config


class _Raised:
    """An exception ``astream``'s worker hands over, raised again in the event loop."""

    def __init__(self, error: BaseException):
        self.error = error


def _unwrapped(item):
    """An item the worker handed over, or, for a ``_Raised``, its exception raised here."""
    if isinstance(item, _Raised):
        raise item.error
    return item


async def _in_thread(fn, *args, **kwargs):
    """Run ``fn`` in the loop's default executor, with the caller's context variables."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return await loop.run_in_executor(None, lambda: context.run(fn, *args, **kwargs))


class _Unread:
    """A stream (``stream``, ``astream``) of a prompt whose chunks are pinned until a generation reads
    them: its decoding releases them, once it starts, however it ends. Closed or garbage-collected
    before its first piece is asked for, no decoding starts, so the stream releases them itself
    (``release``) instead of leaving them pinned until they lapse. Iterating hands the release over
    to the decoding."""

    def __init__(self, pieces: Any, release: Callable[[], None]):
        self._pieces = pieces
        self._unread = weakref.finalize(self, release)  # called once at most, by close() or collection
        self._unread.atexit = False  # nothing to release in a process that is ending

    def _reading(self) -> Any:
        self._unread.detach()  # the decoding releases the chunks from now on
        return self._pieces


class _Stream(_Unread):
    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> str | Generation:
        return next(self._reading())

    def close(self) -> None:
        """Stop the decoding (at the next token), or, if it never started, release the prompt's chunks."""
        self._unread()
        self._pieces.close()


class _AStream(_Unread):
    def __aiter__(self) -> _AStream:
        return self

    async def __anext__(self) -> str | Generation:
        return await self._reading().__anext__()

    async def aclose(self) -> None:
        """``_Stream.close`` for ``astream``."""
        self._unread()
        await self._pieces.aclose()


class _Handover:
    """What a call in a thread hands out (chunks it pinned), for a caller that may be cancelled
    meanwhile. Abandoned, it goes to ``release``: ``held`` (what the call was handed in) if the call
    never started (a cancelled job leaves the executor's queue), else the call's result, once the
    call has it (a running thread cannot be stopped)."""

    _NOTHING = object()

    def __init__(self, release: Callable[[Any], None], held: Any):
        self._release = release
        self._held = held
        self._lock = threading.Lock()
        self._result: Any = self._NOTHING
        self._started = self._abandoned = False

    def run(self, fn, *args, **kwargs) -> Any:
        with self._lock:
            if self._abandoned:
                return None  # no one waits for it, and abandon released what it was handed
            self._started = True
        result = fn(*args, **kwargs)
        with self._lock:
            abandoned = self._abandoned
            if not abandoned:
                self._result = result
        if abandoned:
            self._release(result)
        return result

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            unused = self._result if self._started else self._held
            self._result = self._NOTHING
        if unused is not self._NOTHING:
            self._release(unused)


async def _in_thread_releasing(release: Callable[[Any], None], held: Any, fn, *args, **kwargs):
    """``_in_thread`` for a call that hands out what ``release`` takes back, and is handed ``held``:
    if the caller is cancelled, what would have been handed to it is released (``_Handover``)."""
    handover = _Handover(release, held)
    try:
        return await _in_thread(handover.run, fn, *args, **kwargs)
    except asyncio.CancelledError:
        handover.abandon()
        raise


def _checked_handle_arguments(texts: Sequence[str], on_miss: str,
                              metadata: Sequence[Mapping | None] | None) -> list[Mapping | None] | None:
    """``metadata`` as a list, once ``on_miss`` and its length are checked: what ``handles_for``
    refuses before it looks anything up (a lookup pins the chunks it finds)."""
    if on_miss not in ON_MISS:
        raise InvalidInputError(f"on_miss={on_miss!r}; use one of {ON_MISS}")
    metadata = None if metadata is None else list(metadata)
    if metadata is not None and isinstance(texts, Sequence) and len(metadata) != len(texts):
        raise InvalidInputError(f"got {len(texts)} texts and {len(metadata)} metadata entries: give one each")
    return metadata


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError("pass a list of texts")
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise InvalidInputError(f"texts must be str, got {type(text).__name__}")
    return texts


def _entry_metadata(chunk: _Chunk, kv: AnchorKV, source: Mapping | None) -> dict:
    """What a written-back entry carries, like ``precompress`` entries: its text (to show and
    cite), its tokens and where it comes from; source metadata that is not JSON is kept as strings."""
    doc = {}
    for name, value in (source or {}).items():
        try:
            json.dumps(value, allow_nan=False)
            doc[str(name)] = value
        except (TypeError, ValueError):
            doc[str(name)] = str(value)
    return {"text": chunk.text, "chunk_index": chunk.index, "n_tokens": kv.n_tokens,
            "start_char": chunk.start_char, "end_char": chunk.end_char, "doc": doc,
            "created_by": "sac_rag.handles"}


def _shared_registry(compressor, store) -> dict[tuple, SACEngine]:
    """Where ``SACEngine.shared`` keeps the engine of these arguments. Names and paths: one dict for
    the process, so every object built with them shares one engine and its loaded weights. An open
    ``AnchorStore`` or a loaded ``SACCompressor`` (the store first when both are given): a dict on
    that object, so the engine, which holds the object, lives as long as the object is used and is
    freed with it; a reloaded compressor or a reopened store does not keep the old one's weights and
    chunks in memory for the process's life."""
    for spec in (store, compressor):
        if isinstance(spec, (AnchorStore, SACCompressor)):
            return spec.__dict__.setdefault(_ENGINES_ATTRIBUTE, {})  # beside nn.Module's own attributes
    return _SHARED


def _compressor_key(spec):
    """A compressor directory is named by its path and what its ``config.json`` holds now (settings,
    fingerprint, weights hash, recommended decoding): a checkpoint retrained, copied over or saved
    again with other settings in place gets an engine of its own, not the one loaded before."""
    key = _spec_key(spec)
    if key is not None and key[0] == "path":
        try:
            return (*key, json.dumps(checkpoint_meta(key[1]), sort_keys=True))
        except SACError:  # not a checkpoint (yet): loading the engine says why
            return (*key, None)
    return key


def _spec_key(spec, path: bool = False):
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        candidate = Path(spec)
        if path or isinstance(spec, os.PathLike) or candidate.exists():
            return ("path", str(candidate.expanduser().resolve()))
        return ("name", str(spec))
    return ("object", id(spec))  # the shared engine holds the object, so the id stays its own while it lives


def _check_loaded_settings(compressor: SACCompressor, device, dtype) -> None:
    """Warn when ``device``/``dtype`` given with a loaded compressor differ from its own: they
    do not apply to it (it is used as it is)."""
    import torch

    differ = []
    if dtype is not None:
        try:  # a name as everywhere ("bf16", "auto": what it would choose on the compressor's device)
            wanted = resolve_dtype(dtype, compressor.device)
        except InvalidInputError:
            wanted = None
        if wanted != compressor.dtype:
            differ.append(f"dtype={dtype!r} (it is {compressor.dtype})")
    if device is not None and device != "auto":
        try:
            wanted_device = torch.device(device)
        except (RuntimeError, TypeError):
            wanted_device = None
        have = compressor.device
        if wanted_device is None or wanted_device.type != have.type or (
                wanted_device.index is not None and wanted_device.index != have.index):
            differ.append(f"device={device!r} (it is on {have})")
    if differ:
        logger.warning("%s given with a loaded SACCompressor: ignored, the compressor is used as it is "
                       "(move or cast it before passing it, or pass its name or directory instead)",
                       " and ".join(differ))


def describe(compressor) -> str:
    """A short name for a compressor spec (for model names in traces)."""
    if isinstance(compressor, SACCompressor):
        return f"sac:{compressor.config.base_model}"
    return str(compressor)


def spec_name(value: Any) -> Any:
    """A compressor or store spec as a JSON value (the framework adapters' serialized settings and
    cache keys): None, numbers and strings as they are, an ``AnchorStore`` or a path as its
    directory, a loaded ``SACCompressor`` as ``describe`` names it (not loadable back)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, AnchorStore):
        return str(value.path)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return describe(value)


def _describe_store(store) -> str | None:
    if isinstance(store, AnchorStore):
        return str(store.path)
    return None if store is None else str(store)
