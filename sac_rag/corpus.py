"""Reading a corpus to precompress: a folder of text files, JSONL records, or SQuAD JSON.

``read_corpus(path)`` yields ``Document(id, text, metadata)`` in a stable order (so chunk ids
are the same on every run):

- a directory: every ``.txt``/``.md``/``.markdown`` file below it (recursively, sorted by path,
  hidden files and folders skipped); the id is the path relative to the directory;
- ``.jsonl``: one JSON object per line with a ``text`` field; an ``id`` field becomes the
  document id (else ``<file name>:<line>``) and every other field its metadata;
- ``.json``: SQuAD (``data[].paragraphs[].context``): one document per paragraph, id
  ``<title>/<paragraph index>``, metadata ``title`` and ``paragraph``;
- any other single file: read as one text document.

JSON files may be compressed (``.gz``, ``.xz``).

Bad input never stops a run and is never silent: it is skipped, logged (``logging``, logger
``sac_rag.corpus``) and counted in ``CorpusStats``:

- empty or whitespace-only files and records: skipped;
- binary files (a NUL byte in the first 8 KB, as git decides; UTF-16 text looks like this
  too): skipped;
- text that is not valid UTF-8: decoded with U+FFFD replacement characters by default
  (``decode_errors="replace"``: a Latin-1 file keeps all its ASCII text), or skipped with
  ``decode_errors="skip"``; counted either way;
- text that is not valid Unicode (JSON may escape half of a surrogate pair, ``"\\ud800"``:
  a lone surrogate, which no tokenizer or UTF-8 encoder takes), in the text, id or metadata:
  the same, each lone surrogate becomes U+FFFD or the document is skipped;
- JSONL lines that are not JSON objects with a string ``text``: skipped;
- duplicate documents (the same text again, whatever its id): read once, counted.

What cannot be read at all (a missing path, a ``.json`` that is not SQuAD) raises
``CorpusError``. So does a corpus in which nothing usable was found, naming what was skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError, SACError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
DECODE_ERRORS = ("replace", "skip")
_SNIFF_BYTES = 8192
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds a surrogate only when it is lone


class CorpusError(SACError):
    """The corpus path cannot be read as a corpus at all."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id, its text and JSON metadata."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass
class CorpusStats:
    """What ``read_corpus`` found: documents yielded, duplicates dropped, inputs skipped (by
    reason) and documents decoded with replacement characters."""

    documents: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    replaced_encoding: int = 0  # not UTF-8, or lone surrogates: decoded with U+FFFD

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        logger.warning("skipping %s: %s", where, reason)


def read_corpus(
    path: str | os.PathLike,
    stats: CorpusStats | None = None,
    decode_errors: str = "replace",
    exclude: Collection[str] = (),
) -> Iterator[Document]:
    """The documents of the corpus at ``path`` (see the module docstring), each text once, but
    those whose id is in ``exclude`` (e.g. a questions file kept in a corpus folder)."""
    if decode_errors not in DECODE_ERRORS:
        raise InvalidInputError(f"decode_errors={decode_errors!r}; use one of {DECODE_ERRORS}")
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    if not path.exists():
        raise CorpusError(f"the corpus {path} does not exist")
    seen: set[bytes] = set()
    left_out: set[str] = set()
    for doc in _documents(path, stats, decode_errors):
        if doc.id in exclude:
            left_out.add(doc.id)
            continue
        doc = _valid_unicode(doc, stats, decode_errors)
        if doc is None:
            continue
        digest = hashlib.sha256(doc.text.encode("utf-8")).digest()
        if digest in seen:
            stats.duplicates += 1
            logger.info("skipping %s: the same text as an earlier document", doc.id)
            continue
        seen.add(digest)
        stats.documents += 1
        yield doc
    unmatched = sorted(set(exclude) - left_out)
    if unmatched:  # a mistyped id would otherwise leave the document in, silently
        logger.warning("excluded but not in the corpus %s: %s (a document's id is its path relative to a corpus "
                       "folder, or its JSONL 'id')", path, ", ".join(unmatched))
    if stats.documents == 0:
        raise CorpusError(
            f"no usable document in {path} (skipped: {stats.skipped or 'nothing'}, duplicates: "
            f"{stats.duplicates}); a corpus is a folder of {'/'.join(TEXT_SUFFIXES)} files, a "
            ".jsonl file with a 'text' field per line, or SQuAD .json"
        )


def _documents(path: Path, stats: CorpusStats, decode_errors: str) -> Iterator[Document]:
    if path.is_dir():
        for file in _text_files(path):
            doc_id = file.relative_to(path).as_posix()
            text = _read_text_file(file, doc_id, stats, decode_errors)
            if text is not None:
                yield Document(doc_id, text, {"source": doc_id})
        return
    kind = _base_suffix(path)
    if kind == ".jsonl":
        yield from _jsonl_documents(path, stats, decode_errors)
    elif kind == ".json":
        yield from _squad_documents(path, stats)
    else:
        text = _read_text_file(path, path.name, stats, decode_errors)
        if text is not None:
            yield Document(path.name, text, {"source": path.name})


def _text_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files
                  if not f.startswith(".") and f.lower().endswith(TEXT_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text_file(file: Path, where: str, stats: CorpusStats, decode_errors: str) -> str | None:
    try:
        data = file.read_bytes()
    except OSError as err:
        stats.skip(f"unreadable ({err.strerror or err})", where)
        return None
    return _decode(data, where, stats, decode_errors)


def _decode(data: bytes, where: str, stats: CorpusStats, decode_errors: str) -> str | None:
    """Bytes -> text, or None (skipped and counted) for empty, binary or (with "skip")
    non-UTF-8 input."""
    if b"\x00" in data[:_SNIFF_BYTES]:
        stats.skip("binary (NUL bytes)", where)
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if decode_errors == "skip":
            stats.skip("not UTF-8", where)
            return None
        text = data.decode("utf-8-sig", errors="replace")
        stats.replaced_encoding += 1
        logger.warning("%s is not valid UTF-8 (%s); undecodable bytes became U+FFFD", where, err.reason)
    if not text.strip():
        stats.skip("empty", where)
        return None
    return text


def _valid_unicode(doc: Document, stats: CorpusStats, decode_errors: str) -> Document | None:
    """``doc`` if its id, text and metadata are valid Unicode; else (lone surrogates, which JSON
    escapes can make) the document with each of them replaced by U+FFFD, or None (skipped, with
    ``decode_errors="skip"``); counted either way."""
    fixed = Document(*_without_surrogates([doc.id, doc.text, doc.metadata]))
    if fixed == doc:
        return doc
    if decode_errors == "skip":
        stats.skip("not valid Unicode (lone surrogates)", fixed.id)
        return None
    stats.replaced_encoding += 1
    logger.warning("%s is not valid Unicode (lone surrogates); they became U+FFFD", fixed.id)
    return fixed


def _without_surrogates(value):
    """``value`` (JSON data) with every lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value


def _base_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in (".gz", ".xz") else suffix


def _open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _jsonl_documents(path: Path, stats: CorpusStats, decode_errors: str) -> Iterator[Document]:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path.name}:{line_no}"
            if not raw.strip():
                continue
            if b"\x00" in raw:
                stats.skip("binary (NUL bytes)", where)
                continue
            line = _decode(raw, where, stats, decode_errors)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                stats.skip("not JSON", where)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                stats.skip("no string 'text' field", where)
                continue
            text = record.pop("text")
            if not text.strip():
                stats.skip("empty", where)
                continue
            doc_id = record.pop("id", None)
            doc_id = where if doc_id is None or doc_id == "" else str(doc_id)
            yield Document(doc_id, text, record)


def _squad_documents(path: Path, stats: CorpusStats) -> Iterator[Document]:
    try:
        with _open_binary(path) as f:
            articles = json.load(f)["data"]
        if not isinstance(articles, list):
            raise TypeError("'data' is not a list")
    except (OSError, EOFError, lzma.LZMAError, ValueError, KeyError, TypeError) as err:
        raise CorpusError(
            f"{path} is not SQuAD JSON (expected a top-level 'data' list of articles with "
            f"'paragraphs'): {err}. Use .jsonl for one record per line."
        ) from err
    for a, article in enumerate(articles):
        article = article if isinstance(article, dict) else {}
        title = str(article.get("title") or f"article-{a}")
        paragraphs = article.get("paragraphs")
        paragraphs = paragraphs if isinstance(paragraphs, list) else []
        for p, paragraph in enumerate(paragraphs):
            where = f"{path.name}: {title}/{p}"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                stats.skip("empty", where)
                continue
            yield Document(f"{title}/{p}", context, {"title": title, "paragraph": p})
