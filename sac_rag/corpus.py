"""Reading a corpus to precompress: a folder of text files, JSONL records, or SQuAD JSON.

``read_corpus(path)`` yields ``Document(id, text, metadata)`` in a stable order (so chunk ids
are the same on every run):

- a directory: every ``.txt``/``.md``/``.markdown`` file below it (recursively, sorted by path,
  hidden files and folders skipped, files of other types counted in ``CorpusStats.other_files``);
  symlinked folders are followed, each real folder read once (a link back up the tree is no
  loop; a link to a folder of the corpus is not followed, its files are read where they are);
  the id is the path relative to the directory;
- ``.jsonl``: one JSON object per line with a ``text`` field; an ``id`` field becomes the
  document id (else ``<file name>:<line>``) and every other field its metadata;
- ``.json``: SQuAD (``data[].paragraphs[].context``): one document per paragraph, id
  ``<title>/<paragraph index>``, metadata ``title`` and ``paragraph``;
- any other single file: read as one text document.

JSON files may be compressed (``.gz``, ``.xz``).

``exclude`` leaves documents out (counted in ``CorpusStats.excluded``): each value names a
document id, a glob pattern over ids (``drafts/*.md``; ``*`` also crosses ``/``) or a folder of
ids (``drafts`` or ``drafts/``: everything below it); for a folder corpus it may also be the path
of a file or folder inside the corpus (absolute, or relative to the working directory). A value
that leaves nothing out is logged as a warning, as it is most likely mistyped.

Bad input never stops a run and is never silent: it is skipped, logged (``logging``, logger
``sac_rag.corpus``) and counted in ``CorpusStats``:

- empty or whitespace-only files and records: skipped;
- files and folders that cannot be read (permissions, broken symlinks) and a symlink to a folder
  already read: skipped;
- a compressed JSONL file that is damaged or truncated: the records before the damage are read,
  the rest is skipped;
- binary files (a NUL byte in the first 8 KB, as git decides; UTF-16 text looks like this
  too): skipped;
- text that is not valid UTF-8: decoded with U+FFFD replacement characters by default
  (``decode_errors="replace"``: a Latin-1 file keeps all its ASCII text), or skipped with
  ``decode_errors="skip"``; counted either way;
- text that is not valid Unicode (JSON may escape half of a surrogate pair, ``"\\ud800"``:
  a lone surrogate, which no tokenizer or UTF-8 encoder takes), in the text, id or metadata:
  the same, each lone surrogate becomes U+FFFD or the document is skipped;
- JSONL lines that are not JSON objects with a string ``text``: skipped;
- NaN or infinite numbers in a JSONL record's other fields (``NaN``, ``Infinity``, ``1e999``: Python's
  ``json`` writes and reads them, JSON has no such numbers, so no store could keep the metadata):
  kept as null (``None``), logged;
- duplicate documents (the same text again, whatever its id): read once, counted;
- a document of other text under the id of an earlier one (a JSONL ``id`` or SQuAD title given
  twice): read, and logged, since the chunk ids of both are the same.

What cannot be read at all (a missing path, a ``.json`` that is not SQuAD) raises
``CorpusError``. So does a corpus in which nothing usable was found, naming what was skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import math
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
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
    """What ``read_corpus`` found: documents yielded, duplicates dropped, documents excluded,
    inputs skipped (by reason), documents decoded with replacement characters, and the files of
    a folder corpus that are not of a corpus type (by suffix: a folder of .pdf or .html files
    yields nothing, and should say why)."""

    documents: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    replaced_encoding: int = 0  # not UTF-8, or lone surrogates: decoded with U+FFFD
    excluded: int = 0
    other_files: dict[str, int] = field(default_factory=dict)
    unread: dict[str, int] = field(default_factory=dict)  # of ``skipped``: inputs that exist but could not be read

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        logger.warning("skipping %s: %s", where, reason)

    def skip_unread(self, reason: str, where: str) -> None:
        """``skip`` an input that exists but could not be read this time (an unreadable file or
        folder, a broken symlink, a damaged archive): its documents may well still exist."""
        self.unread[reason] = self.unread.get(reason, 0) + 1
        self.skip(reason, where)


def check_corpus(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; ``CorpusError`` if nothing is there (what a long job checks before it
    loads a model to compress the corpus)."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"the corpus {path} does not exist")
    return path


def read_corpus(
    path: str | os.PathLike,
    stats: CorpusStats | None = None,
    decode_errors: str = "replace",
    exclude: Collection[str] = (),
) -> Iterator[Document]:
    """The documents of the corpus at ``path`` (see the module docstring), each text once, but
    those that ``exclude`` names (e.g. a questions file kept in a corpus folder)."""
    if decode_errors not in DECODE_ERRORS:
        raise InvalidInputError(f"decode_errors={decode_errors!r}; use one of {DECODE_ERRORS}")
    path = check_corpus(path)
    stats = stats if stats is not None else CorpusStats()
    exclusions = _Exclusions([exclude] if isinstance(exclude, str) else exclude, path, stats)
    seen: set[bytes] = set()
    named: set[str] = set()  # the ids of the documents yielded
    folder = path.is_dir()
    for doc in _documents(path, stats, decode_errors, exclusions):
        if not folder and exclusions.leave_out(doc.id):  # a folder's are left out unread
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
        if doc.id in named:  # chunk ids are "<doc id>#<index>": both documents' would be the same
            logger.warning("%s: the id of an earlier document with other text in %s, so the chunks of both are "
                           "named %s#0, %s#1 ...; give each document an id of its own", doc.id, path, doc.id, doc.id)
        named.add(doc.id)
        stats.documents += 1
        yield doc
    unmatched = exclusions.unmatched()
    if unmatched:  # a mistyped id would otherwise leave the document in, silently
        logger.warning("excluded but not in the corpus %s: %s (a document's id is its path relative to a corpus "
                       "folder, or its JSONL 'id')", path, ", ".join(unmatched))
    if stats.documents == 0:
        other = (f", files of other types not read: {_by_suffix(stats.other_files)}"
                 if stats.other_files else "")
        raise CorpusError(
            f"no usable document in {path} (skipped: {stats.skipped or 'nothing'}, duplicates: "
            f"{stats.duplicates}, excluded: {stats.excluded}{other}); a corpus is a folder of "
            f"{'/'.join(TEXT_SUFFIXES)} files, a .jsonl file with a 'text' field per line, or SQuAD .json"
        )


def count_documents(path: str | os.PathLike, decode_errors: str = "replace", exclude: Collection[str] = ()) -> int:
    """How many documents ``read_corpus`` yields (a progress bar's total), found by reading the
    corpus through once without logging what it skips: the reading that follows says that."""
    stats, quiet = CorpusStats(), logger.disabled
    logger.disabled = True
    try:
        for _ in read_corpus(path, stats, decode_errors, exclude):
            pass
    finally:
        logger.disabled = quiet
    return stats.documents


def _by_suffix(counts: dict[str, int]) -> str:
    """``{".pdf": 3, ".html": 1}`` as "3 .pdf, 1 .html", the most frequent first."""
    return ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


class _Exclusions:
    """The ``exclude`` values of ``read_corpus`` (see the module docstring) as a test on document
    ids, remembering which values left something out (the others are probably mistyped)."""

    def __init__(self, exclude: Collection[str], corpus: Path, stats: CorpusStats):
        self.stats = stats
        self.ids = {value: _as_doc_id(str(value), corpus) for value in exclude}
        self.matched: set[str] = set()

    def leave_out(self, doc_id: str) -> bool:
        """Whether to leave out the document ``doc_id`` (counted in ``stats.excluded``)."""
        hits = {value for value, name in self.ids.items()
                if doc_id == name or (name and doc_id.startswith(name.rstrip("/") + "/"))
                or fnmatchcase(doc_id, name)}
        self.matched |= hits
        self.stats.excluded += bool(hits)
        return bool(hits)

    def unmatched(self) -> list[str]:
        return sorted(set(self.ids) - self.matched)


def _as_doc_id(value: str, corpus: Path) -> str:
    """The document id (or id pattern) an ``exclude`` value means: the value itself, without a
    leading ``./``; for a folder corpus, a path to something inside it that the value does not
    already name relative to the corpus (an absolute path, or one relative to the working
    directory, as a shell completes it) is made relative to the corpus."""
    if corpus.is_dir() and (Path(value).is_absolute() or not (corpus / value).exists()) and Path(value).exists():
        inside = Path(os.path.abspath(value))
        root = Path(os.path.abspath(corpus))
        if inside != root and inside.is_relative_to(root):
            return inside.relative_to(root).as_posix()
    while value.startswith("./"):
        value = value[2:]
    return value


def _documents(path: Path, stats: CorpusStats, decode_errors: str, exclusions: _Exclusions) -> Iterator[Document]:
    if path.is_dir():
        for file in _text_files(path, stats):
            doc_id = file.relative_to(path).as_posix()
            if exclusions.leave_out(doc_id):
                continue
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


def _text_files(root: Path, stats: CorpusStats) -> list[Path]:
    """The corpus files below ``root``, sorted by their path relative to it.

    Nothing is left out silently: a folder that cannot be listed is skipped and counted (os.walk
    would drop it without a word), as is a second link to a folder already read (or a link back
    up the tree, which would loop); files of other types are counted by suffix. Symlinked folders
    are followed, as corpora are often assembled from links, but not those that point inside the
    corpus: their files are read where they are, under their own path."""
    found, read_folders = [], {_identity(root)}
    real_root = Path(os.path.realpath(root))

    def unlisted(err: OSError) -> None:
        stats.skip_unread(f"unreadable folder ({err.strerror or err})", _relative(err.filename, root))

    def to_read(folder: str, name: str) -> bool:
        path = os.path.join(folder, name)
        if name.startswith("."):
            return False
        if os.path.islink(path) and _read_in_place(Path(os.path.realpath(path)), real_root):
            logger.info("not following %s: its files are read where the link points, in the corpus",
                        _relative(path, root))
            return False
        identity = _identity(path)
        if identity is not None and identity in read_folders:
            stats.skip("a link to a folder already read", _relative(path, root))
            return False
        read_folders.add(identity)
        return True

    for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=True):
        dirs[:] = [name for name in sorted(dirs) if to_read(folder, name)]
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(TEXT_SUFFIXES):
                found.append(Path(folder) / name)
            else:
                suffix = Path(name).suffix.lower() or "(no suffix)"
                stats.other_files[suffix] = stats.other_files.get(suffix, 0) + 1
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _identity(folder: str | os.PathLike) -> tuple[int, int] | None:
    """What tells a folder from every other, whatever the path it is reached by."""
    try:
        st = os.stat(folder)
    except OSError:
        return None  # os.walk's onerror reports it when it tries to list it
    return st.st_dev, st.st_ino


def _read_in_place(target: Path, real_root: Path) -> bool:
    """Whether the walk reads the real folder ``target`` at its own path: it lies in the corpus,
    and not in a hidden folder (which the walk skips)."""
    if not target.is_relative_to(real_root):
        return False
    return not any(part.startswith(".") for part in target.relative_to(real_root).parts)


def _relative(path: str | os.PathLike | None, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix() + "/"
    except (TypeError, ValueError):
        return str(path)


def _read_text_file(file: Path, where: str, stats: CorpusStats, decode_errors: str) -> str | None:
    try:
        data = file.read_bytes()
    except OSError as err:
        broken = file.is_symlink() and not file.exists()
        stats.skip_unread("a broken symlink" if broken else f"unreadable ({err.strerror or err})", where)
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


def _finite_numbers(value):
    """``value`` (parsed JSON data) with every NaN or infinite number replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_numbers(v) for k, v in value.items()}
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
    """The records of a JSONL file; of a damaged or truncated compressed one (a download cut
    short), those before the damage, the rest skipped and counted rather than a crash."""
    line_no = 0
    with _open_binary(path) as f:
        lines = enumerate(f, 1)
        while True:
            try:
                line_no, raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, lzma.LZMAError) as err:
                stats.skip_unread("damaged or truncated (the rest of the file)",
                                  f"{path.name} after line {line_no} ({err})")
                return
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
            metadata = _finite_numbers(record)
            not_json = [name for name in record if metadata[name] != record[name]]
            if not_json:
                logger.warning("%s: field(s) %s hold NaN or infinite numbers, which JSON has not; kept as null",
                               where, ", ".join(map(repr, not_json)))
            yield Document(doc_id, text, metadata)


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
