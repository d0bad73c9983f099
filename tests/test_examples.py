"""The runnable examples (examples/*.py), each on the demo corpus with its first questions and the
real packaged compressor: they answer from the caches without reading the context as text, and
they share one store that a rerun leaves as it is."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO = EXAMPLES / "demo_corpus"
sys.path.insert(0, str(EXAMPLES))

pytestmark = [pytest.mark.real_model, requires_smollm2]

K = 3


def argv(store: Path, questions: int = 2) -> list[str]:
    return ["--docs", str(DEMO), "--store", str(store), "-k", str(K), "--max-questions", str(questions),
            "--max-tokens", "12"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the suite runs beside other jobs on few cores, where two spinning
    OpenMP threads make the many small ops of decoding from caches tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compressor():
    from _common import load_compressor

    return load_compressor()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return tmp_path_factory.mktemp("examples") / "demo.store"


@pytest.fixture(scope="module")
def langchain_run(store_path, compressor):
    """examples/langchain_rag.py on a fresh store: precompresses, then answers."""
    import langchain_rag

    return langchain_rag.main(argv(store_path))


def demo_chunk_keys(compressor) -> list[str]:
    from sac_rag.chunking import split_document
    from sac_rag.corpus import read_corpus

    return [c.key for doc in read_corpus(DEMO) if doc.id != "questions.txt"
            for c in split_document(doc.text, compressor.tokenizer, compressor.config.chunk_len)]


def prompt_only_tokens(compressor, question: str) -> int:
    """Text tokens of the SAC prompt without any context text: the layout around the caches and the
    question (the caches back to back, as the compressor's layout puts them, in LangChain's prompts
    and in LlamaIndex's, whose blank lines between nodes SACLLM drops)."""
    template, tokenizer = compressor.config.prompt, compressor.tokenizer
    head = tokenizer(template.prefix + template.context_prefix, add_special_tokens=True)["input_ids"]
    tail = tokenizer(template.question.format(question=question), add_special_tokens=False)["input_ids"]
    return len(head) + len(tail)


def check_answers(results: list[dict], compressor) -> None:
    assert len(results) == 2
    assert results[0]["sources"][0] == "harbor_town.md"  # "Who built Verdmoor harbor?"
    for r in results:
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert isinstance(r["full_text_answer"], str) and r["full_text_answer"].strip()
        assert len(r["sources"]) == K and "questions.txt" not in r["sources"]
        # The LLM read the retrieved chunks only as cached K/V: no context token as text.
        assert r["text_tokens"] == prompt_only_tokens(compressor, r["question"])
        assert 4 * r["cached_tokens"] <= r["chunk_tokens"] <= 6 * r["cached_tokens"]  # the 5x compressor
        # ... while the full-text run of the same chunks read all of them as text
        assert r["full_text_tokens"] >= r["text_tokens"] + r["chunk_tokens"] - K


def test_langchain_example_precompresses_each_chunk_once_and_answers_from_the_caches(
        langchain_run, store_path, compressor):
    from sac_rag.store import AnchorStore

    summary, results = langchain_run
    keys = demo_chunk_keys(compressor)  # the documents', not the questions file's
    assert summary.documents == len(list(DEMO.glob("*.md")))
    assert summary.compressed == summary.chunks == len(keys) == len(set(keys))
    with AnchorStore.open(store_path, readonly=True) as store:
        assert sorted(store.keys()) == sorted(keys)
    check_answers(results, compressor)


def test_quickstart_reuses_the_store_and_says_what_to_expect(langchain_run, store_path, monkeypatch, capsys):
    """What `make demo` runs; a rerun compresses nothing and writes nothing."""
    before = sorted((p.relative_to(store_path), p.stat().st_size) for p in store_path.rglob("*.shard"))
    monkeypatch.setattr(sys, "argv", ["quickstart.py", *argv(store_path, questions=1)])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "documents: 5 read" in out and "0 compressed now, 5 already stored" in out
    assert "often garbles names and numbers" in out and "ARGS=--extractive" in out
    # The shipped compressor's recommended beam search hands the answer out whole: the timing says so.
    assert "Q: Who built Verdmoor harbor?\nA: " in out and "time to the whole answer from the caches (8 beams" in out
    assert sorted((p.relative_to(store_path), p.stat().st_size) for p in store_path.rglob("*.shard")) == before


def test_extractive_answers_of_the_examples_quote_the_retrieved_chunks(langchain_run, store_path):
    import langchain_rag
    import llama_index_rag
    import precompress_and_serve

    corpus = "\n".join(p.read_text() for p in DEMO.iterdir() if p.name != "questions.txt")
    for example in (langchain_rag, llama_index_rag, precompress_and_serve):
        _, results = example.main([*argv(store_path), "--extractive"])
        assert all(r["answer"].strip() and r["answer"].strip() in corpus for r in results), results


def test_llama_index_example_answers_from_the_caches(langchain_run, store_path, compressor):
    import llama_index_rag

    summary, results = llama_index_rag.main(argv(store_path))
    assert summary.compressed == 0 and summary.already_stored == summary.chunks
    check_answers(results, compressor)


def test_precompress_and_serve_example_serves_from_the_store(langchain_run, store_path, compressor):
    import precompress_and_serve

    summary, results = precompress_and_serve.main(argv(store_path))
    assert summary.compressed == 0 and summary.entries == len(demo_chunk_keys(compressor))
    assert len(results) == 2
    for r in results:
        assert isinstance(r["answer"], str) and r["answer"].strip() and r["full_text_answer"].strip()
        assert len(set(r["keys"])) == K
    from sac_rag.store import AnchorStore

    with AnchorStore.open(store_path, readonly=True) as store:
        assert store.metadata(results[0]["keys"][0])["doc_id"] == "harbor_town.md"
        assert all(store.metadata(k)["doc_id"] != "questions.txt" for r in results for k in r["keys"])


def test_the_serving_example_warms_up_the_decoding_it_times(langchain_run, store_path, monkeypatch):
    """With --extractive, decoding first builds the vocabulary's byte trie: the warm-up does that, so
    the first question's time to first token does not include it (it doubled it on the demo)."""
    import precompress_and_serve

    from sac_rag import generation

    built, built_when_timed = [], []
    vocabulary, timed_stream = generation.Vocabulary, precompress_and_serve.timed_stream
    monkeypatch.setattr(generation, "Vocabulary", lambda *args: built.append(1) or vocabulary(*args))
    monkeypatch.setattr(precompress_and_serve, "timed_stream",
                        lambda pieces: built_when_timed.append(len(built)) or timed_stream(pieces))
    _, results = precompress_and_serve.main([*argv(store_path, questions=1), "--max-tokens", "2", "--extractive"])
    assert results and built_when_timed and built_when_timed[0] == 1 and len(built) == 1


def test_after_a_document_is_edited_its_old_chunks_stay_in_the_store_and_are_not_served(
        langchain_run, store_path, compressor, tmp_path, capsys):
    import precompress_and_serve

    from sac_rag.store import AnchorStore

    docs, store = tmp_path / "docs", tmp_path / "demo.store"
    shutil.copytree(DEMO, docs)
    shutil.copytree(store_path, store)  # the demo corpus, precompressed
    old_key = AnchorStore.key_for((docs / "harbor_town.md").read_text())
    (docs / "harbor_town.md").write_text("Verdmoor harbor was built by the guild of Ostra masons in 1712.\n")
    summary, results = precompress_and_serve.main(["--docs", str(docs), "--store", str(store), "-k", str(K),
                                                   "--max-questions", "1", "--max-tokens", "4"])
    assert summary.compressed == 1 and summary.entries == len(demo_chunk_keys(compressor)) + 1
    with AnchorStore.open(store, readonly=True) as opened:
        assert old_key in opened  # nothing deletes it ...
    assert old_key not in results[0]["keys"]  # ... but "Who built Verdmoor harbor?" is not served it
    assert "(1 others, not chunks of" in capsys.readouterr().out


def test_examples_have_help(capsys):
    import langchain_rag

    with pytest.raises(SystemExit) as exit_info:
        langchain_rag.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python examples/langchain_rag.py" in out and "--store" in out


def test_the_default_store_is_named_after_the_compressor(tmp_path):
    """A new default compressor gets a store of its own rather than one its fingerprint refuses."""
    from _common import default_store, parse_args

    from sac_rag.compressor import checkpoint_meta

    (tmp_path / "questions.txt").write_text("Who?\n")
    store = Path(parse_args("", ["--docs", str(tmp_path)]).store)
    weights_hash = checkpoint_meta("smollm2-135m-sac-5x")["fingerprint"].partition("/sac-")[2]
    assert store.name.startswith(f"{tmp_path.name}-") and store.name.endswith(f"-{weights_hash[:8]}.store")
    assert default_store(tmp_path, "smollm2-135m-sac-15x") != store


def test_two_corpus_folders_of_the_same_name_get_stores_of_their_own(tmp_path):
    from _common import default_store

    first, second = tmp_path / "x" / "docs1", tmp_path / "y" / "docs1"
    assert default_store(first) != default_store(second)
    assert default_store(first).name.startswith("docs1-")
    assert default_store(tmp_path / "x" / ".." / "x" / "docs1") == default_store(first)  # the resolved path


def test_an_example_given_a_folder_without_documents_exits_with_one_line_instead_of_a_traceback(
        tmp_path, monkeypatch, compressor):
    (tmp_path / "questions.txt").write_text("Who?\n")
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--docs", str(tmp_path), "--store", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    assert str(exited.value.code).startswith(f"error: no usable document in {tmp_path}")


def test_llama_index_chat_example_reads_each_new_question_after_the_conversation_so_far(
        langchain_run, store_path, compressor):
    """The chat engine's nodes are read only as caches; the text the model reads is the layout, each
    earlier question with its answer, then the new question (``PromptTemplate.conversation``)."""
    import llama_index_chat

    summary, results = llama_index_chat.main(argv(store_path, questions=3))
    assert summary.compressed == 0 and len(results) == 3
    assert results[0]["sources"][0] == "harbor_town.md"  # "Who built Verdmoor harbor?"
    template, tokenizer = compressor.config.prompt, compressor.tokenizer
    head = len(tokenizer(template.prefix + template.context_prefix, add_special_tokens=True)["input_ids"])
    tail = ""
    for r in results:
        assert r["answer"].strip() and len(r["sources"]) == K and "questions.txt" not in r["sources"]
        assert 4 * r["cached_tokens"] <= r["chunk_tokens"] <= 6 * r["cached_tokens"]  # the 5x compressor
        tail += template.question.format(question=r["question"])
        assert r["text_tokens"] == head + len(tokenizer(tail, add_special_tokens=False)["input_ids"])
        tail += r["answer"]


def test_a_questions_file_with_a_byte_order_mark_and_windows_line_endings_reads_as_its_questions(tmp_path):
    """Notepad saves UTF-8 with a BOM and CRLF: the BOM is no part of the first question (the model
    would read it as tokens, and the demo print it)."""
    from _common import parse_args

    (tmp_path / "doc.md").write_text("Verdmoor harbor was built in 1712.\n")
    (tmp_path / "questions.txt").write_bytes(b"\xef\xbb\xbfWho built it?\r\n\r\n  \r\nWhen?\r\n")
    assert parse_args("", ["--docs", str(tmp_path)]).question_list == ["Who built it?", "When?"]


@pytest.mark.parametrize("content, says", [
    (b"", "no question in"),
    (b"\r\n   \n\n", "no question in"),
    (b"Who built the caf\xe9?\n", "is not UTF-8"),
])
def test_a_questions_file_without_usable_questions_stops_with_one_line_before_the_model_loads(
        tmp_path, capsys, content, says):
    """An empty questions file answered nothing, silently, after loading the model and precompressing
    the corpus; a Latin-1 one ended there with a UnicodeDecodeError traceback."""
    from _common import parse_args

    (tmp_path / "doc.md").write_text("Verdmoor harbor was built in 1712.\n")
    (tmp_path / "q.txt").write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        parse_args("", ["--docs", str(tmp_path), "--questions", str(tmp_path / "q.txt")])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert says in message and str(tmp_path / "q.txt") in message and "one question per line" in message


def test_an_unreadable_questions_file_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """chmod 000 questions.txt (seen as root by an unprivileged user): a PermissionError traceback
    came after the model had loaded and the corpus been precompressed."""
    from _common import parse_args

    questions = tmp_path / "questions.txt"
    questions.write_text("Who?\n")
    read_text = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self == questions:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(SystemExit) as exited:
        parse_args("", ["--docs", str(tmp_path)])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot read the questions file {questions} (Permission denied)" in message


@pytest.mark.parametrize("option", ["-k", "--max-questions", "--max-tokens", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_that_are_not_positive_are_refused_by_the_command_line(tmp_path, capsys, option, value):
    """-k 0 ended in an AssertionError from FAISS after the corpus was precompressed;
    --max-questions 0 answered every question, -1 all but the last."""
    from _common import parse_args

    (tmp_path / "questions.txt").write_text("Who?\n")
    with pytest.raises(SystemExit) as exited:
        parse_args("", ["--docs", str(tmp_path), option, value])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert f"argument {option}: must be >= 1, got {value}" in message


def test_a_docs_folder_that_does_not_exist_is_named_as_such(tmp_path, capsys):
    """A mistyped DOCS said "no questions file DOCS/questions.txt: pass --questions FILE", which does not
    help: the folder itself is not there."""
    from _common import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args("", ["--docs", str(tmp_path / "typo")])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'typo'} does not exist" in message and "--questions" not in message


def test_question_files_in_the_corpus_folder_are_never_compressed_as_documents(tmp_path, caplog):
    """DOCS/questions.txt, the examples' own, even when --questions names another file; the
    --questions file if it lies in DOCS; a questions.txt that is a symlink out of DOCS; and no
    warning about a questions file the folder would not read as a document anyway."""
    from _common import parse_args, questions_doc_ids

    from sac_rag.corpus import read_corpus

    docs, elsewhere = tmp_path / "docs", tmp_path / "elsewhere"
    docs.mkdir()
    elsewhere.mkdir()
    (docs / "notes.md").write_text("The harbor was built in 1850.\n")
    (docs / "questions.txt").write_text("Who?\n")
    (docs / "mine.txt").write_text("When?\n")
    (docs / "mine.list").write_text("Where?\n")

    def documents(*options: str) -> list[str]:
        args = parse_args("", ["--docs", str(docs), *options])
        return [doc.id for doc in read_corpus(args.docs, exclude=questions_doc_ids(args))]

    with caplog.at_level("WARNING", logger="sac_rag.corpus"):
        assert documents() == ["mine.txt", "notes.md"]
        assert documents("--questions", str(docs / "mine.txt")) == ["notes.md"]
        assert documents("--questions", str(docs / "mine.list")) == ["mine.txt", "notes.md"]
    assert "excluded but not in the corpus" not in caplog.text
    (docs / "questions.txt").unlink()
    (elsewhere / "questions.txt").write_text("Who?\n")
    (docs / "questions.txt").symlink_to(elsewhere / "questions.txt")
    assert documents() == ["mine.txt", "notes.md"]


def test_documents_sharing_an_id_give_the_vector_store_chunks_of_their_own(tmp_path, compressor):
    """read_corpus warns and keeps both JSONL records; the examples' vector stores need distinct
    ids (FAISS refused the batch, LlamaIndex kept one of the two nodes)."""
    from _common import corpus_chunks, parse_args

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "faq", "text": "The Krell lighthouse was lit in 1902."}\n'
                      '{"id": "faq", "text": "The Zorbl bridge was built by Anna Vey."}\n')
    (tmp_path / "q.txt").write_text("Who built the Zorbl bridge?\n")
    chunks = corpus_chunks(parse_args("", ["--docs", str(corpus), "--questions", str(tmp_path / "q.txt")]), compressor)
    assert [c.id for c in chunks] == ["faq#0", "faq#0~2"] and [c.doc_id for c in chunks] == ["faq", "faq"]
    assert "Zorbl" in chunks[1].text


def test_the_examples_precompress_the_whole_corpus_under_a_launchers_rank_variables(tmp_path, monkeypatch,
                                                                                       compressor):
    """WORLD_SIZE/RANK (set by torchrun, Kubeflow...) would make precompress take one shard only."""
    from _common import parse_args, precompress_corpus

    from sac_rag.store import AnchorStore

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a", "b", "c"):
        (docs / f"{name}.md").write_text(f"Document {name} says the tower in {name} was finished.\n")
    (docs / "questions.txt").write_text("Who?\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = parse_args("", ["--docs", str(docs), "--store", str(tmp_path / "s.store")])
    summary = precompress_corpus(args, compressor)
    assert (summary.compressed, summary.other_shards, len(AnchorStore.open(args.store))) == (3, 0, 3)
