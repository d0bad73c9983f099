"""Reading training and evaluation data: QA (SQuAD JSON, JSONL) and plain text for LM.

Files may be compressed (``.xz``, ``.gz``). A file that cannot be read (a damaged archive, text
that is not UTF-8) and malformed records raise ``DataError`` naming the file and record; records
that are valid but unusable (empty context or answer) are skipped and counted, never silently
(``read_qa`` logs the counts when its caller does not take them). Question ids are unique within
a file: evaluation caches and scores predictions by id.
A context longer than the model can read beside its question is split (``split_long_contexts``).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import lzma
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import text_ids
from .errors import SACError

logger = logging.getLogger(__name__)


class DataError(SACError):
    """A data file is missing or malformed."""


@dataclass
class QAItem:
    question: str
    answers: list[str]
    id: str = ""
    answer_start: int = -1  # where the first answer starts in its context (SQuAD's answer_start), -1 = unknown


@dataclass
class Paragraph:
    """One context with all its questions (SQuAD has about five per paragraph)."""

    context: str
    questions: list[QAItem]
    title: str = ""


@dataclass
class LoadStats:
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def open_text(path: str | Path):
    """The file as UTF-8 text (a leading byte-order mark dropped), decompressed if it ends in .xz or .gz."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is a directory, not a data file: pass the file itself")
    with _read_errors(path):
        if path.suffix.lower() == ".xz":
            return lzma.open(path, "rt", encoding="utf-8-sig")
        if path.suffix.lower() == ".gz":
            return gzip.open(path, "rt", encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")


@contextlib.contextmanager
def _read_errors(path: Path):
    """Turn what reading a damaged or mis-encoded file raises into a DataError naming the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); {_not_utf8_advice(path)}") from err
    except (lzma.LZMAError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: the {path.suffix} archive is damaged or truncated ({type(err).__name__}: "
                        f"{err})") from err
    except OSError as err:
        raise DataError(f"{path} cannot be read: {err.strerror or err}") from err


# what a file that is not UTF-8 text starts with, when it is something else that a user would
# recognise: the advice its error gives instead of "save it as UTF-8"
_MAGIC_ADVICE = (
    (b"\xfd7zXZ\x00", "it is xz-compressed: name it *.xz (e.g. {name}.xz) to have it decompressed"),
    (b"\x1f\x8b", "it is gzip-compressed: name it *.gz (e.g. {name}.gz) to have it decompressed"),
    (b"BZh", "it is bzip2-compressed, which is not read: decompress it, or recompress it with xz or gzip"),
    (b"PK\x03\x04", "it is a zip archive, which is not read: unpack the data file from it"),
    (b"\x28\xb5\x2f\xfd", "it is zstd-compressed, which is not read: decompress it, or recompress it with xz or gzip"),
    (b"\xff\xfe", "it is UTF-16 text: save it as UTF-8"),
    (b"\xfe\xff", "it is UTF-16 text: save it as UTF-8"),
)


def _not_utf8_advice(path: Path) -> str:
    """How to fix a file that did not decode: a compressed file whose name does not say so (read
    as text, it fails on its first bytes) or UTF-16 text is named, as "save it as UTF-8" would
    mislead; for a file read through .xz/.gz the archive itself was fine, its text is not UTF-8."""
    if path.suffix.lower() not in (".xz", ".gz"):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(6)
            for magic, advice in _MAGIC_ADVICE:
                if head.startswith(magic):
                    return advice.format(name=path.name)
    return "save it as UTF-8"


def _base_suffix(path: Path) -> str:
    """The format suffix, under a compression suffix, in lower case (``QA.JSONL.GZ`` is JSONL)."""
    suffix = Path(path.stem).suffix if path.suffix.lower() in (".xz", ".gz") else path.suffix
    return suffix.lower()


def read_qa(path: str | Path, stats: LoadStats | None = None) -> list[Paragraph]:
    """Paragraphs from SQuAD JSON (``data[].paragraphs[]``) or JSONL ``{context, question,
    answers}`` (rows sharing a context are grouped into one paragraph). Skipped records are
    counted in ``stats``; without one, the counts are logged here, since no caller would report
    them (an evaluation would otherwise quietly run on fewer questions than the file holds)."""
    path, own_stats = Path(path), stats is None
    stats = stats or LoadStats()
    paragraphs = _read_qa_jsonl(path, stats) if _base_suffix(path) == ".jsonl" else _read_squad_json(path, stats)
    if own_stats and stats.skipped:
        logger.warning("%s: skipped %s", path, stats.skipped)
    return paragraphs


class _UniqueIds:
    """Where each question id was read, so that a repeated one is refused naming both records:
    evaluation caches predictions by id, so a second question of the same id would be scored
    with the first one's answer."""

    def __init__(self, path: Path, unnamed: str):
        self.path, self.unnamed, self.seen = path, unnamed, {}

    def claim(self, qa_id: str, where: str) -> None:
        if qa_id in self.seen:
            raise DataError(f"{self.path}: question id {qa_id!r} of {where} repeats that of {self.seen[qa_id]}: ids "
                            f"must be unique, as predictions are cached and scored by id ({self.unnamed})")
        self.seen[qa_id] = where


def _read_qa_jsonl(path: Path, stats: LoadStats) -> list[Paragraph]:
    paragraphs: dict[str, Paragraph] = {}
    ids = _UniqueIds(path, "a row without an 'id' is named by its line number")
    with open_text(path) as f, _read_errors(path):
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                context, question, answers = row["context"], row["question"], row["answers"]
            except KeyError as err:
                raise DataError(f"{path}:{line_no}: the row has no {err} field (QA JSONL rows are "
                                "{\"context\", \"question\", \"answers\"} objects)") from err
            except (ValueError, TypeError) as err:
                raise DataError(f"{path}:{line_no}: expected JSON with context, question, answers ({err})") from err
            answers = [answers] if isinstance(answers, str) else answers
            where = f"{path}:{line_no}: 'answers'"
            for answer in _expect(answers, list, where, "a string or a list of strings"):
                _expect(answer, str, where, "a string or a list of strings")
            _text_or_none(context, f"{path}:{line_no}: 'context'")
            _text_or_none(question, f"{path}:{line_no}: 'question'")
            if not _has_text(context, stats):
                continue
            start = row.get("answer_start", -1)
            qa_id = row.get("id")
            item = _qa_item(question, answers, f"{line_no}" if qa_id in (None, "") else qa_id, stats,
                            start if isinstance(start, int) and not isinstance(start, bool) else -1)
            if item is None:
                continue
            ids.claim(item.id, f"line {line_no}")
            title = str(row.get("title") or "")
            paragraphs.setdefault(context, Paragraph(context, [], title)).questions.append(item)
    return list(paragraphs.values())


def _read_squad_json(path: Path, stats: LoadStats) -> list[Paragraph]:
    try:
        with open_text(path) as f, _read_errors(path):
            data = json.load(f)["data"]
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        hint = ("; a file of one JSON object per line is read as QA JSONL when its name ends in .jsonl"
                if isinstance(err, json.JSONDecodeError) and err.msg == "Extra data" else "")
        raise DataError(f"{path}: not SQuAD JSON (expected a top-level 'data' list): {err}{hint}") from err
    _expect(data, list, f"{path}: 'data'", "a list of articles")
    ids = _UniqueIds(path, "a question without an 'id' is named by its place, data[i].paragraphs[j].qas[k]")
    out = []
    for i, article in enumerate(data):
        where = f"{path}: data[{i}]"
        _expect(article, dict, where, "an article object")
        _require(article, "paragraphs", where)
        for j, para in enumerate(_expect(article["paragraphs"], list, f"{where}.paragraphs", "a list")):
            _expect(para, dict, f"{where}.paragraphs[{j}]", "a paragraph object")
            _require(para, "context", f"{where}.paragraphs[{j}]")
            _require(para, "qas", f"{where}.paragraphs[{j}]")
            _text_or_none(para["context"], f"{where}.paragraphs[{j}].context")
            if not _has_text(para["context"], stats):
                continue
            items = []
            for k, qa in enumerate(_expect(para["qas"], list, f"{where}.paragraphs[{j}].qas", "a list")):
                place = f"data[{i}].paragraphs[{j}].qas[{k}]"
                at = f"{path}: {place}"
                _expect(qa, dict, at, "a question object")
                answers = _expect(qa.get("answers", []), list, f"{at}.answers", "a list of {'text': ...} objects")
                texts = [_answer_text(a, f"{at}.answers[{n}]") for n, a in enumerate(answers)]
                _text_or_none(qa.get("question"), f"{at}.question")
                start = answers[0].get("answer_start", -1) if answers else -1
                qa_id = qa.get("id")
                item = _qa_item(qa.get("question"), texts, place if qa_id in (None, "") else qa_id, stats,
                                start if isinstance(start, int) and not isinstance(start, bool) else -1)
                if item is not None:
                    ids.claim(item.id, place)
                    items.append(item)
            if items:
                out.append(Paragraph(para["context"], items, str(article.get("title") or "")))
            elif not para["qas"]:
                stats.skip("paragraph without questions")
    return out


def _require(record: dict, key: str, where: str) -> None:
    """A SQuAD record lacking one of its keys is another layout (e.g. flat ``{context, question,
    answers}`` records under ``data``), which would otherwise read as nothing at all."""
    if key not in record:
        raise DataError(f"{where} has no {key!r}: SQuAD JSON is data[].paragraphs[].{{context, qas[].{{id, "
                        f"question, answers[].text}}}} (rows of {{context, question, answers}} are read from "
                        f".jsonl); its keys are {sorted(record)[:8]}")


def _answer_text(answer, where: str) -> str:
    """The text of a SQuAD answer object; one without a text is malformed (left out, it would
    quietly leave its question with fewer gold answers, or none)."""
    text = _text_or_none(_expect(answer, dict, where, "an object with a 'text'").get("text"), f"{where}.text")
    if text is None:
        raise DataError(f"{where} has no 'text' (SQuAD answers are {{\"text\": ..., \"answer_start\": ...}} "
                        f"objects); its keys are {sorted(answer)[:8]}")
    return text


def _expect(value, kind: type, where: str, what: str):
    """``value`` if it is a ``kind``; else a DataError naming the file, the record and what was expected."""
    if not isinstance(value, kind):
        raise DataError(f"{where} should be {what}, got {type(value).__name__} {value!r:.60}")
    return value


def _text_or_none(value, where: str):
    """A text field holds a string (or is missing): a number or an object there is a malformed record."""
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where} should be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _has_text(context, stats: LoadStats) -> bool:
    stats.read += 1
    if not isinstance(context, str) or not context.strip():
        stats.skip("empty context")
        return False
    return True


def _qa_item(question, answers, qa_id, stats: LoadStats, answer_start: int = -1) -> QAItem | None:
    usable = [a for a in answers if isinstance(a, str) and a.strip()]
    if not isinstance(question, str) or not question.strip():
        stats.skip("empty question")
        return None
    if not usable:
        stats.skip("no answer")
        return None
    if len(usable) < len(answers):  # counted: the official script would score against it too
        stats.skip("empty gold answer left out (its question kept)")
    # the start belongs to the first answer: kept only while that answer comes first
    start = answer_start if answers and usable[0] is answers[0] else -1
    return QAItem(question.strip(), usable, str(qa_id), start)


PRETRAIN_TEXT_SUFFIXES = (".txt", ".md")  # plain text: documents separated by blank lines
TEXT_FORMATS = ("a JSONL file of {\"text\": ...} rows (.jsonl) or a plain-text file of blank-line-separated "
                "documents (.txt, .md); either may be compressed (.xz, .gz)")


def check_text_format(path: str | Path) -> None:
    """Refuse a pretraining file that is neither JSONL nor plain text (e.g. a SQuAD .json, which
    would otherwise be trained on as raw JSON), naming the accepted formats."""
    path = Path(path)
    suffix = _base_suffix(path)
    if suffix != ".jsonl" and suffix not in PRETRAIN_TEXT_SUFFIXES:
        raise DataError(f"{path}: pretraining reads {TEXT_FORMATS}; got a {suffix or 'suffix-less'} file "
                        f"(QA data such as SQuAD JSON is for --stage finetune)")


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def iter_texts(path: str | Path, stats: LoadStats | None = None) -> Iterator[str]:
    """Plain texts for LM pretraining: JSONL with a ``text`` field, or a TXT/Markdown file whose
    paragraphs (separated by blank lines) are documents. Other formats are refused (see
    ``check_text_format``); JSONL rows whose text is empty are skipped and counted in ``stats``."""
    path, stats = Path(path), stats or LoadStats()
    check_text_format(path)
    with open_text(path) as f, _read_errors(path):
        if _base_suffix(path) == ".jsonl":
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from err
                stats.read += 1
                if isinstance(text, str) and text.strip():
                    yield text
                else:
                    stats.skip("empty text" if isinstance(text, str) or text is None else "text not a string")
        else:
            for block in _BLANK_LINES.split(f.read()):  # a line of spaces or tabs is blank too
                if block.strip():
                    stats.read += 1
                    yield block


@dataclass
class SplitReport:
    """What ``split_long_contexts`` did: contexts split, pieces kept (those holding a question),
    and questions skipped because no piece holds their answer."""

    contexts: int = 0
    pieces: int = 0
    questions_skipped: int = 0


def split_long_contexts(paragraphs: list[Paragraph], tokenizer, limit: int,
                        stats: LoadStats) -> tuple[list[Paragraph], SplitReport]:
    """Paragraphs whose context has at most ``limit`` tokens, in order: a longer context is split
    into overlapping pieces of at most ``limit`` tokens (exact substrings, cut between tokens, see
    ``chunking.split_document``), and each question goes with the first piece that holds its
    (first) answer, at its ``answer_start`` where that is known. A question whose answer no piece
    holds is skipped and counted in ``stats``; pieces keep the paragraph's title (so a held-out
    split by article stays one)."""
    from .chunking import split_document

    report, out = SplitReport(), []
    texts = [p.context for p in paragraphs]
    lengths = [len(ids) for start in range(0, len(texts), 256)
               for ids in text_ids(tokenizer, texts[start : start + 256])]
    overlap = min(limit // 4, 128)  # an answer shorter than this that a cut crosses is whole in the next piece
    for para, n_tokens in zip(paragraphs, lengths):
        if n_tokens <= limit:
            out.append(para)
            continue
        report.contexts += 1
        pieces = split_document(para.context, tokenizer, limit, overlap)
        held: list[list[QAItem]] = [[] for _ in pieces]
        for qa in para.questions:
            where = _piece_holding(qa, para.context, pieces)
            if where is None:
                stats.skip(f"answer in no piece of a context split at {limit} tokens")
                report.questions_skipped += 1
                continue
            located = _located(qa, para.context) and pieces[where].start_char >= 0
            start = qa.answer_start - pieces[where].start_char if located else -1
            held[where].append(QAItem(qa.question, qa.answers, qa.id, start))
        for piece, questions in zip(pieces, held):
            if questions:
                out.append(Paragraph(piece.text, questions, para.title))
                report.pieces += 1
    return out, report


def _located(qa: QAItem, context: str) -> bool:
    """Whether the question's ``answer_start`` points at its first answer in ``context``."""
    return qa.answer_start >= 0 and context[qa.answer_start : qa.answer_start + len(qa.answers[0])] == qa.answers[0]


def _piece_holding(qa: QAItem, context: str, pieces) -> int | None:
    """Index of the first piece holding the question's first answer: the occurrence at its
    ``answer_start`` when that is known (and the pieces' places are), else any occurrence."""
    answer = qa.answers[0]
    if _located(qa, context) and all(piece.start_char >= 0 for piece in pieces):
        end = qa.answer_start + len(answer)
        return next((i for i, piece in enumerate(pieces) if piece.start_char <= qa.answer_start
                     and end <= piece.end_char), None)
    return next((i for i, piece in enumerate(pieces) if answer in piece.text), None)


DEFAULT_HELD_OUT_FRACTION = 0.05  # of a QA file's articles: what ``python -m sac_rag.train`` holds out by default


def split_by_title(paragraphs: list[Paragraph], held_out_fraction: float) -> tuple[list[Paragraph], list[Paragraph]]:
    """Hold out the last ``held_out_fraction`` of articles (by title order of appearance), so no
    article is in both splits. Data with fewer than two titles (e.g. QA JSONL without a ``title``),
    or so few that one whole article is more than twice the share asked of the paragraphs (two
    articles and 5% would hold out half the data), is held out by paragraph instead, logged. At
    least one unit always stays for training (a single paragraph is trained on, and nothing is
    held out)."""

    def held_units(units: list[str]) -> set[str]:
        n_held = max(1, round(len(units) * held_out_fraction)) if held_out_fraction > 0 else 0
        n_held = max(0, min(n_held, len(units) - 1))
        return set(units[len(units) - n_held:]) if n_held else set()

    titles = list(dict.fromkeys(p.title for p in paragraphs))
    by_title = len(titles) >= 2
    if by_title:
        held = held_units(titles)
        share = sum(p.title in held for p in paragraphs) / len(paragraphs)
        if share > 2 * held_out_fraction:
            logger.warning("holding out whole articles would hold out %.0f%% of the paragraphs (%d article(s) of %d; "
                           "--held-out-fraction %g): holding out paragraphs instead, so the held-out questions "
                           "share articles with training (pass --eval-data for a split of your own)",
                           100 * share, len(held), len(titles), held_out_fraction)
            by_title = False
    if not by_title:
        units = list(dict.fromkeys(p.context for p in paragraphs))
        held = held_units(units)
        if held_out_fraction > 0 and len(units) == 1:
            logger.warning("only %d paragraph(s): nothing held out for evaluation (pass --eval-data)", len(units))
        elif held and len(titles) < 2:
            logger.info("the data has no article titles: holding out %d of %d paragraphs instead", len(held),
                        len(units))

    def unit(p: Paragraph) -> str:
        return p.title if by_title else p.context

    return [p for p in paragraphs if unit(p) not in held], [p for p in paragraphs if unit(p) in held]
