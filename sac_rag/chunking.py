"""Token-aware splitting of documents into chunks: one chunk becomes one stored ``AnchorKV``.

A corpus is compressed offline, chunk by chunk, and a retriever later finds chunks by their
text. So a chunk must be (1) an exact substring of its document, which a retriever can show
and cite, (2) at most ``chunk_tokens`` tokens *when its own text is tokenized*, because that is
what the compressor encodes (one chunk = one entry at offset 0, never cut further), and (3)
named the same way on every run, so a resumed or sharded run finds what is already stored.

How: the document is tokenized with offset mapping (in pieces, so a 10 MB single-line file
costs linear time and bounded memory), chunk boundaries are placed between tokens every
``chunk_tokens - overlap_tokens`` tokens (a boundary sits at the end of the token before it,
so leading spaces stay with the word that follows, as byte-level BPE tokenizers attach them),
and each chunk's text is tokenized again; at a boundary that tokenizes differently (say, in
the middle of a multi-byte character) the chunk is shortened until it fits. Tokens and
characters do not line up one to one (a CJK character or an emoji is often several byte-level
tokens, all ending where the character ends), so moving on by a token does not always move on
in the text, and a shortened chunk can end where the one before it ended: such a chunk is the
one before it or lies inside it, and is left out (``_advances``), so that every chunk ends
further into the document than the one before and none is emitted twice.

A chunk's ``id`` is ``"<doc id>#<index>"`` and its ``key`` is the store key of its text
(sha256, ``AnchorStore.key_for``): the same text is the same entry wherever it occurs.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .config import text_ids
from .errors import InvalidInputError
from .store import AnchorStore

logger = logging.getLogger(__name__)

# Characters tokenized per call. Tokenizing a huge string in one call keeps a per-token
# Python/Rust structure for all of it (hundreds of MB for 10 MB of text) and BPE on one giant
# whitespace-free "word" can be slow; pieces of this size keep both bounded.
PIECE_CHARS = 1 << 16
_PIECE_SEARCH = 2048  # how far back a piece boundary looks for whitespace
_SPACE = re.compile(r"\s")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds a surrogate only when it is lone
_warned_slow: set[str] = set()  # tokenizer classes already warned about (once per process)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document.

    ``text`` is ``document[start_char:end_char]``; ``token_ids`` its own tokenization
    (``n_tokens`` of them, what the compressor encodes); ``start_token`` where it starts in
    the document's tokenization; ``key`` the store key of ``text``.
    """

    id: str
    doc_id: str
    index: int
    text: str
    start_char: int
    end_char: int
    start_token: int
    token_ids: tuple[int, ...]
    key: str

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def split_document(
    text: str,
    tokenizer,
    chunk_tokens: int,
    overlap_tokens: int = 0,
    doc_id: str = "doc",
) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``chunk_tokens`` tokens that overlap by about
    ``overlap_tokens`` tokens. Whitespace-only stretches yield no chunk."""
    return list(iter_chunks(text, tokenizer, chunk_tokens, overlap_tokens, doc_id))


def iter_chunks(
    text: str,
    tokenizer,
    chunk_tokens: int,
    overlap_tokens: int = 0,
    doc_id: str = "doc",
) -> Iterator[Chunk]:
    """``split_document``, one chunk at a time."""
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
    given = chunk_tokens, overlap_tokens
    chunk_tokens, overlap_tokens = _integer(chunk_tokens), _integer(overlap_tokens)
    if chunk_tokens is None or chunk_tokens < 4:
        raise InvalidInputError(f"chunk_tokens must be an integer >= 4, got {given[0]!r}")
    if overlap_tokens is None or not 0 <= overlap_tokens < chunk_tokens:
        raise InvalidInputError(
            f"overlap_tokens must be an integer in [0, chunk_tokens={chunk_tokens}), "
            f"got {given[1]!r}"
        )
    surrogate = _LONE_SURROGATE.search(text)
    if surrogate:
        raise InvalidInputError(
            f"{doc_id}: the text holds a lone surrogate ({surrogate.group()!r} at character "
            f"{surrogate.start()}), which is not valid Unicode and no tokenizer takes; decode the "
            "file with errors='replace' (sac_rag.corpus.read_corpus does) or remove it")
    if not getattr(tokenizer, "is_fast", False):
        yield from _iter_chunks_by_decoding(text, tokenizer, chunk_tokens, overlap_tokens, doc_id)
        return

    ends = _token_ends(text, tokenizer)
    n = len(ends)

    def boundary(token: int) -> int:
        """Character position between token ``token - 1`` and token ``token``."""
        if token <= 0:
            return 0
        return len(text) if token >= n else int(ends[token - 1])

    index, start, emitted_end = 0, 0, 0
    while start < n:
        end = min(start + chunk_tokens, n)
        while True:
            first, last = boundary(start), boundary(end)
            piece = text[first:last]
            ids = _encode(tokenizer, piece)
            if len(ids) <= chunk_tokens:
                break
            if end - start <= 1:  # one token of the document tokenizes into too many
                raise InvalidInputError(
                    f"{doc_id}: the text {piece[:40]!r} at character {first} tokenizes into "
                    f"{len(ids)} tokens on its own; chunk_tokens={chunk_tokens} is too small"
                )
            end = max(start + 1, end - max(1, len(ids) - chunk_tokens))
        if piece.strip() and _advances(last, emitted_end):
            yield Chunk(
                id=f"{doc_id}#{index}", doc_id=doc_id, index=index, text=piece,
                start_char=first, end_char=last, start_token=start, token_ids=tuple(ids),
                key=AnchorStore.key_for(piece),
            )
            index, emitted_end = index + 1, last
        if end >= n:
            break
        start = max(end - overlap_tokens, start + 1)


def _advances(end: int, emitted_end: int) -> bool:
    """Whether a chunk ending at ``end`` reaches further than the last chunk emitted (which
    ended at ``emitted_end``; 0 before the first).

    Chunks start in order, so one that does not reach further is the last one again or lies
    inside it: it would add nothing but a repeated or redundant store entry. Leaving it out
    (and going on from it as before) keeps the document covered, since the next chunk starts
    no later than this one ends, and leaves the chunks of any document where this never
    happens exactly as they were, so stored entries keep their keys."""
    return end > emitted_end


def _integer(value) -> int | None:
    """``value`` as an int when it is an integer (Python's or numpy's, not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _encode(tokenizer, text: str) -> list[int]:
    return text_ids(tokenizer, text) if text else []


def _pieces(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` spans of at most ``PIECE_CHARS`` characters covering ``text``, cut
    before a whitespace character where one is near (so a word is not split), else anywhere."""
    start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end >= len(text):
            yield start, len(text)
            return
        window = text[max(start + 1, end - _PIECE_SEARCH):end]
        spaces = [m.start() for m in _SPACE.finditer(window)]
        if spaces:
            end = end - len(window) + spaces[-1]
        yield start, end
        start = end


def _token_ends(text: str, tokenizer) -> np.ndarray:
    """End character of every token of ``text`` (tokenized piece by piece), non-decreasing."""
    parts = []
    for start, end in _pieces(text):
        offsets = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)["offset_mapping"]  # as ``text_ids`` reads it
        if offsets:
            parts.append(np.asarray([o[1] for o in offsets], dtype=np.int64) + start)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.maximum.accumulate(np.concatenate(parts))


def _iter_chunks_by_decoding(text: str, tokenizer, chunk_tokens: int, overlap_tokens: int,
                             doc_id: str) -> Iterator[Chunk]:
    """Fallback for tokenizers without offset mapping (slow, pure-Python ones): chunk texts
    are decoded token spans, so they may differ from the document in whitespace."""
    kind = type(tokenizer).__name__
    if kind not in _warned_slow:
        _warned_slow.add(kind)
        logger.warning("the tokenizer (%s) has no offset mapping (not a fast tokenizer): chunk texts "
                       "are decoded token spans, not exact substrings of the document", kind)
    ids = [i for start, end in _pieces(text) for i in _encode(tokenizer, text[start:end])]
    index, start, stride, emitted_end = 0, 0, chunk_tokens - overlap_tokens, 0
    while start < len(ids):
        span = min(chunk_tokens, len(ids) - start)
        while True:
            piece = tokenizer.decode(ids[start:start + span])
            own = _encode(tokenizer, piece)
            if len(own) <= chunk_tokens:
                break
            if span <= 1:
                raise InvalidInputError(f"{doc_id}: token {ids[start]} decodes to {piece!r}, which "
                                        f"tokenizes into {len(own)} tokens; chunk_tokens is too small")
            span -= 1
        if piece.strip() and own and _advances(start + span, emitted_end):  # in document tokens here
            yield Chunk(id=f"{doc_id}#{index}", doc_id=doc_id, index=index, text=piece,
                        start_char=-1, end_char=-1, start_token=start, token_ids=tuple(own),
                        key=AnchorStore.key_for(piece))
            index, emitted_end = index + 1, start + span
        if start + span >= len(ids):
            break
        start += max(1, min(stride, span - overlap_tokens))
