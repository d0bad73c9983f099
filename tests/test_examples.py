"""The runnable examples (examples/*.py), each on the demo corpus with its first questions and the
real packaged compressor: they answer from the caches without reading the context as text, and
they share one store that a rerun leaves as it is."""

from __future__ import annotations

import runpy
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

    return [c.key for doc in read_corpus(DEMO)
            for c in split_document(doc.text, compressor.tokenizer, compressor.config.chunk_len)]


def prompt_only_tokens(compressor, question: str, separators: int = 0) -> int:
    """Text tokens of the SAC prompt without any context text: the layout around the caches,
    the question, and ``separators`` "\\n\\n" between caches (LlamaIndex joins nodes so)."""
    template, tokenizer = compressor.config.prompt, compressor.tokenizer
    head = tokenizer(template.prefix + template.context_prefix, add_special_tokens=True)["input_ids"]
    tail = tokenizer(template.question.format(question=question), add_special_tokens=False)["input_ids"]
    return len(head) + len(tail) + separators * len(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def check_answers(results: list[dict], compressor, separators: int = 0) -> None:
    assert len(results) == 2
    assert results[0]["sources"][0] == "harbor_town.md"  # "Who built Verdmoor harbor?"
    for r in results:
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert isinstance(r["full_text_answer"], str) and r["full_text_answer"].strip()
        assert len(r["sources"]) == K and "questions.txt" not in r["sources"]
        # The LLM read the retrieved chunks only as cached K/V: no context token as text.
        assert r["text_tokens"] == prompt_only_tokens(compressor, r["question"], separators)
        assert 4 * r["cached_tokens"] <= r["chunk_tokens"] <= 6 * r["cached_tokens"]  # the 5x compressor
        # ... while the full-text run of the same chunks read all of them as text
        assert r["full_text_tokens"] >= r["text_tokens"] + r["chunk_tokens"] - K


def test_langchain_example_precompresses_each_chunk_once_and_answers_from_the_caches(
        langchain_run, store_path, compressor):
    from sac_rag.store import AnchorStore

    summary, results = langchain_run
    keys = demo_chunk_keys(compressor)
    assert summary.compressed == summary.chunks == len(keys) == len(set(keys))
    with AnchorStore.open(store_path, readonly=True) as store:
        assert sorted(store.keys()) == sorted(keys)
    check_answers(results, compressor)


def test_quickstart_reuses_the_store(langchain_run, store_path, monkeypatch, capsys):
    """What `make demo` runs; a rerun compresses nothing and writes nothing."""
    before = sorted((p.relative_to(store_path), p.stat().st_size) for p in store_path.rglob("*.shard"))
    monkeypatch.setattr(sys, "argv", ["quickstart.py", *argv(store_path, questions=1)])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "0 compressed now, 6 already stored" in out
    assert "Q: Who built Verdmoor harbor?\nA: " in out and "time to first token" in out
    assert sorted((p.relative_to(store_path), p.stat().st_size) for p in store_path.rglob("*.shard")) == before


def test_extractive_answers_of_both_framework_examples_quote_the_retrieved_chunks(langchain_run, store_path):
    import langchain_rag
    import llama_index_rag

    corpus = "\n".join(p.read_text() for p in DEMO.iterdir() if p.name != "questions.txt")
    for example in (langchain_rag, llama_index_rag):
        _, results = example.main([*argv(store_path), "--extractive"])
        assert all(r["answer"].strip() and r["answer"].strip() in corpus for r in results), results


def test_llama_index_example_answers_from_the_caches(langchain_run, store_path, compressor):
    import llama_index_rag

    summary, results = llama_index_rag.main(argv(store_path))
    assert summary.compressed == 0 and summary.already_stored == summary.chunks
    check_answers(results, compressor, separators=K - 1)


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
    assert store.name == f"{tmp_path.name}-{weights_hash[:8]}.store"
    assert default_store(tmp_path, "smollm2-135m-sac-15x") != store
