"""benchmarks/chat_layouts.py: every way of asking writes a scored row with its command; a chat in the
compressor's layout (LlamaIndex's chat engine with the chat context template, LangChain's history chain
with chat_template="sac") answers a first question as the single-question path does; bad input is
refused before any model loads."""

import json

import pytest
from conftest import load_benchmark, save_tiny_compressor, write_squad_dev

from sac_rag.errors import InvalidInputError

CHAT = load_benchmark("chat_layouts")

PARAGRAPHS = [
    ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
    ("The tower was finished in 1889 by its builders.", "When was the tower finished?", "1889"),
    ("The quick brown fox jumps over the lazy dog.", "What does the fox jump over?", "the lazy dog"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A ratio-2 compressor of the tiny Llama (saved with it) and a SQuAD-format dev file."""
    root = tmp_path_factory.mktemp("chat")
    save_tiny_compressor(root)
    write_squad_dev(root, [{"context": context, "qas": [{"id": f"q{i}", "question": question,
                                                          "answers": [{"text": answer}]}]}
                           for i, (context, question, answer) in enumerate(PARAGRAPHS)])
    return root


def _main(workspace, results, *extra):
    CHAT.main(["--n", "3", "--data-root", str(workspace / "data"), "--compressor", str(workspace / "compressor"),
               "--results", str(results), *extra])


def test_every_way_writes_a_scored_row_with_its_command(workspace, tmp_path):
    results = tmp_path / "chat.jsonl"
    _main(workspace, results)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == [
        "llamaindex-chat-generic-layout", "llamaindex-chat-sac-layout", "llamaindex-chat-sac-layout+context-template",
        "llamaindex-query-engine", "langchain-history-as-written", "langchain-history-sac-layout",
        "langchain-stuff-chain"]
    for row in rows:
        assert row["n"] == 3 and row["ratio"] == 2 and row["dataset"] == "squad-dev" and row["dtype"] == "float32"
        assert 0 <= row["em"] <= row["f1"] <= 100 and 0 <= row["empty_answers"] <= 3
        assert row["f1_ci"][0] <= row["f1"] <= row["f1_ci"][1] <= 100
        assert row["command"].startswith("python benchmarks/chat_layouts.py --n 3")


def test_a_chat_in_the_compressors_layout_answers_a_first_question_as_the_single_question_path(workspace):
    from sac_rag.handles import SACEngine

    engine = SACEngine.shared(str(workspace / "compressor"), None, dtype="float32")
    retriever = CHAT.OwnParagraph()
    ways = CHAT.ways(engine, retriever)
    questions = [CHAT.Question(f"q{i}", question, [answer], context)
                 for i, (context, question, answer) in enumerate(PARAGRAPHS)]
    answers = {name: CHAT.answer_all(way, retriever, questions, name) for name, way in ways.items()}
    assert answers["llamaindex-chat-sac-layout+context-template"] == answers["llamaindex-query-engine"]
    assert answers["langchain-history-sac-layout"] == answers["langchain-stuff-chain"]
    assert answers["langchain-stuff-chain"] == answers["llamaindex-query-engine"]  # one layout in both frameworks


def test_a_missing_data_root_is_refused_before_any_model_loads(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(CHAT.SACEngine, "shared", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(InvalidInputError, match="does not exist: set --data-root"):
        CHAT.main(["--n", "3", "--data-root", str(tmp_path / "nowhere"), "--results", str(tmp_path / "r.jsonl")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(InvalidInputError, match="is a folder"):
        _main(workspace, tmp_path / "folder")
