"""benchmarks/followup_questions.py: follow-up questions are made by putting a pronoun where a question
names its article, after an earlier question of the same article; every way of asking them writes a
scored row with its retrieval recall, its differences from the other ways and its command."""

import json

import pytest
from conftest import CHATML, load_benchmark, save_tiny_compressor, write_squad_dev

FOLLOWUPS = load_benchmark("followup_questions")

PARAGRAPHS = [
    ("The lighthouse on Gull Point was built in 1874.",
     [("When was the lighthouse on Gull Point built?", "1874"), ("Gull Point is in which county?", "Kent")]),
    ("The keeper of Gull Point's lighthouse painted it red in 1902.",
     [("Who painted Gull Point's lighthouse red?", "The keeper"), ("When was it painted red?", "1902")]),
    ("The ferry to the Gull Point stops at midnight.", [("When does the ferry to the Gull Point stop?", "midnight")]),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("followups")
    save_tiny_compressor(root)
    tokenizer = AutoTokenizer.from_pretrained(root / "tiny-model")  # the tiny one has no chat template: ChatML
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(root / "tiny-model")
    write_squad_dev(root, [{"context": context, "qas": [{"id": f"q{i}-{j}", "question": question,
                                                          "answers": [{"text": answer}]}
                                                         for j, (question, answer) in enumerate(qas)]}
                           for i, (context, qas) in enumerate(PARAGRAPHS)], title="Gull_Point_(Kent)")
    return root


@pytest.mark.parametrize("question, followup", [
    ("When was the lighthouse on Gull Point built?", "When was the lighthouse on it built?"),
    ("Who painted Gull Point's lighthouse red?", "Who painted its lighthouse red?"),
    ("When does the ferry to the Gull Point stop?", "When does the ferry to it stop?"),
    ("Gull Point is in which county?", None),  # the name opens the question: no pronoun there
    ("When was it painted red?", None),
    ("What lies off gull point?", None),  # not as the article writes it
])
def test_the_articles_name_becomes_a_pronoun(question, followup):
    assert FOLLOWUPS.with_pronoun(question, FOLLOWUPS.title_name("Gull_Point_(Kent)")) == followup


def test_each_followup_comes_after_an_earlier_question_of_its_article(workspace):
    from sac_rag.data import read_qa

    paragraphs = read_qa(workspace / "data" / "squad-v1.1" / "dev-v1.1.json.xz")
    chats = FOLLOWUPS.conversations(paragraphs, 0, 0)
    assert sorted(c.followup for c in chats) == ["When does the ferry to it stop?", "Who painted its lighthouse red?"]
    for chat in chats:
        assert chat.paragraph == next(i for i, p in enumerate(paragraphs)
                                      if chat.question in [q.question for q in p.questions])
        assert chat.first != chat.question and "Gull Point" in chat.first
    assert FOLLOWUPS.conversations(paragraphs, 0, 0) == chats and len(FOLLOWUPS.conversations(paragraphs, 1, 0)) == 1


def test_every_way_writes_a_scored_row_with_its_recall_and_command(workspace, tmp_path):
    results = tmp_path / "followups.jsonl"
    FOLLOWUPS.main(["--n", "0", "--k", "1", "--data-root", str(workspace / "data"), "--max-tokens", "3",
                    "--compressor", str(workspace / "compressor"), "--threads", "1", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == list(FOLLOWUPS.WAYS)
    for row in rows:
        assert row["n"] == 2 and row["k"] == 1 and row["dataset"] == "squad-dev-followups"
        assert 0 <= row["em"] <= row["f1"] <= 100 and row["recall_at_k"] in (0, 50, 100)
        assert len(row["examples"]) == 2 and row["command"].startswith("python benchmarks/followup_questions.py --n 0")
        assert row["recall_ci"][0] <= row["recall_at_k"] <= row["recall_ci"][1]
        assert set(row["paired"]) == set(FOLLOWUPS.WAYS) - {row["method"]}
        for other in rows:  # each way against each other, on the same conversations
            if other is not row:
                gain, low, high = row["paired"][other["method"]]["recall"]
                assert gain == pytest.approx(row["recall_at_k"] - other["recall_at_k"]) and low <= gain <= high
    original = next(r for r in rows if r["method"] == "original-question")["examples"]  # searched with as it is
    assert sorted(e["query"] for e in original) == ["When does the ferry to the Gull Point stop?",
                                                    "Who painted Gull Point's lighthouse red?"]


def test_the_rewrite_in_the_chat_template_is_one_user_message_of_it(workspace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "tiny-model")
    assert FOLLOWUPS.in_chat_template(tokenizer)("Rewrite: who?") == (
        "<|im_start|>user\nRewrite: who?<|im_end|>\n<|im_start|>assistant\n")


def test_the_chat_template_ways_are_refused_for_a_tokenizer_without_one(tmp_path, capsys):
    root = tmp_path / "plain"
    save_tiny_compressor(root)
    write_squad_dev(root, [{"context": PARAGRAPHS[0][0], "qas": [{"id": "q", "question": "Who?",
                                                                   "answers": [{"text": "x"}]}]}])
    with pytest.raises(SystemExit):
        FOLLOWUPS.main(["--data-root", str(root / "data"), "--compressor", str(root / "compressor"),
                        "--results", str(tmp_path / "r.jsonl")])
    assert ("has no chat template: leave condensed-chat-template, langchain-rewrite-chat-template out of --ways"
            in capsys.readouterr().err)


def test_a_dataset_without_a_conversation_is_refused_saying_so(tmp_path, capsys):
    save_tiny_compressor(tmp_path)
    write_squad_dev(tmp_path, [{"context": PARAGRAPHS[0][0], "qas": [{"id": "q", "question": "Who?",
                                                                       "answers": [{"text": "x"}]}]}])
    with pytest.raises(SystemExit):
        FOLLOWUPS.main(["--data-root", str(tmp_path / "data"), "--compressor", str(tmp_path / "compressor"),
                        "--ways", "followup-as-asked", "--threads", "1", "--results", str(tmp_path / "r.jsonl")])
    assert "no conversation in" in capsys.readouterr().err


def test_scores_and_paired_f1_differences_by_hand(workspace, tmp_path, monkeypatch):
    """Two ways with known answers: "gold" answers every conversation with its gold answer (F1 and
    EM 100, its paragraph retrieved), "partial" with a word too many
    (F1 partly, EM 0). The paired F1 difference is the difference of the rows' F1, not of their EM."""
    def ways(engine, retriever, max_tokens):
        def answering(partial):
            def answer(conversation):
                retriever.last, retriever.last_query = [conversation.paragraph], conversation.followup
                gold = conversation.answers[0]
                return gold + " sharp" if partial else gold
            return answer
        return {"followup-as-asked": answering(False), "original-question": answering(True)}

    monkeypatch.setattr(FOLLOWUPS, "ways_of_asking", ways)
    results = tmp_path / "followups.jsonl"
    FOLLOWUPS.main(["--n", "0", "--k", "1", "--data-root", str(workspace / "data"), "--ways",
                    "followup-as-asked,original-question", "--compressor", str(workspace / "compressor"),
                    "--threads", "1", "--results", str(results)])
    gold, partial = [json.loads(line) for line in results.read_text().splitlines()]
    assert (gold["f1"], gold["em"], gold["recall_at_k"]) == (100.0, 100.0, 100.0)  # against its own gold answers
    assert partial["em"] < partial["f1"] < 100.0
    assert gold["paired"]["original-question"]["f1"][0] == pytest.approx(gold["f1"] - partial["f1"], abs=0.01)
