"""sac_rag.data: QA files of the wrong shape are refused naming the file and record; held-out splits."""

import gzip
import json

import pytest

from sac_rag.data import DataError, LoadStats, Paragraph, QAItem, iter_texts, read_qa, split_by_title


def _squad(paragraph: dict) -> dict:
    return {"data": [{"title": "A", "paragraphs": [paragraph]}]}


@pytest.mark.parametrize("content, where", [
    ({"data": {"title": "A"}}, "'data' should be a list of articles"),
    ({"data": [["not", "an", "article"]]}, "data[0] should be an article object"),
    ({"data": [{"title": "A", "paragraphs": "text"}]}, "data[0].paragraphs should be a list"),
    ({"data": [{"title": "A", "paragraphs": ["text"]}]}, "data[0].paragraphs[0] should be a paragraph object"),
    (_squad({"context": "c", "qas": {"question": "q"}}), "data[0].paragraphs[0].qas should be a list"),
    (_squad({"context": "c", "qas": ["q?"]}), "data[0].paragraphs[0].qas[0] should be a question object"),
    (_squad({"context": "c", "qas": [{"question": "q?", "answers": 5}]}), "qas[0].answers should be a list"),
    (_squad({"context": "c", "qas": [{"question": "q?", "answers": ["x"]}]}), "qas[0].answers[0] should be an obj"),
])
def test_squad_json_of_the_wrong_shape_names_the_file_and_the_record(tmp_path, content, where):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match="squad.json") as err:
        read_qa(path)
    assert where in str(err.value)


@pytest.mark.parametrize("answers", [5, [{"text": "Paris"}], None])
def test_jsonl_answers_that_are_not_strings_name_the_line(tmp_path, answers):
    path = tmp_path / "qa.jsonl"
    good = {"context": "Paris is in France.", "question": "Where?", "answers": ["France"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"answers": answers}) + "\n")
    with pytest.raises(DataError, match=r"qa\.jsonl:2: 'answers' should be a string or a list of strings"):
        read_qa(path)


def test_a_directory_given_as_the_data_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="is a directory, not a data file"):
        read_qa(tmp_path)


def test_valid_records_without_text_are_skipped_and_counted(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"context": "c1", "question": "q", "answers": "a"}, {"context": "c2", "question": "q", "answers": [""]},
            {"context": " ", "question": "q", "answers": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = LoadStats()
    assert [p.context for p in read_qa(path, stats)] == ["c1"]
    assert stats.skipped == {"no answer": 1, "empty context": 1}


def _paragraphs(titles: list[str]) -> list[Paragraph]:
    return [Paragraph(f"context {i}", [QAItem("q", ["a"])], title) for i, title in enumerate(titles)]


def test_articles_are_held_out_whole_when_the_data_has_titles():
    train, held = split_by_title(_paragraphs(["A", "A", "B", "B", "C", "C", "D", "D"]), 0.25)
    assert [p.title for p in held] == ["D", "D"]
    assert {p.title for p in train} == {"A", "B", "C"}


def test_the_held_out_share_of_articles_is_rounded_to_the_nearest_whole_article():
    titles = [f"T{i:02d}" for i in range(30)]
    _, held = split_by_title(_paragraphs(titles), 0.05)  # 1.5 articles: 2, not 1
    assert [p.title for p in held] == ["T28", "T29"]


def test_articles_so_few_that_one_is_far_more_than_the_share_asked_are_held_out_by_paragraph(caplog):
    """Two articles and 5% asked: holding out one whole article would take half the data (and train on
    the other half), so paragraphs are held out instead, and the log says the splits share articles."""
    with caplog.at_level("WARNING", logger="sac_rag.data"):
        train, held = split_by_title(_paragraphs(["A", "A", "A", "B", "B", "B"]), 0.05)
    assert [p.context for p in held] == ["context 5"] and len(train) == 5
    assert "would hold out 50% of the paragraphs" in caplog.text and "share articles" in caplog.text


def test_data_without_titles_is_held_out_by_paragraph():
    train, held = split_by_title(_paragraphs([""] * 10), 0.2)
    assert [p.context for p in held] == ["context 8", "context 9"]
    assert len(train) == 8


def test_something_always_stays_for_training():
    # a fraction that would hold out every article leaves one; a single paragraph is only trained on
    train, held = split_by_title(_paragraphs(["A", "B"]), 0.9)
    assert ([p.title for p in train], [p.title for p in held]) == (["A"], ["B"])
    train, held = split_by_title(_paragraphs([""]), 0.05)
    assert (len(train), held) == (1, [])
    assert split_by_title(_paragraphs(["", ""]), 0.0) == (_paragraphs(["", ""]), [])


@pytest.mark.parametrize("name", ["squad.json", "notes.csv", "corpus", "rows.json.gz"])
def test_pretraining_text_of_another_format_is_refused_naming_the_accepted_ones(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b'{"data": []}') if name.endswith(".gz") else b'{"data": []}')
    with pytest.raises(DataError, match=r"pretraining reads a JSONL file .*\(\.jsonl\) or a plain-text file .*"
                                        r"\(\.txt, \.md\); either may be compressed \(\.xz, \.gz\)"):
        list(iter_texts(path))


def test_pretraining_text_in_txt_md_and_compressed_jsonl_is_read(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\n")
    (tmp_path / "a.md").write_text("# one\n\ntwo")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "one"}\n\n{"text": "two"}\n'))
    assert list(iter_texts(tmp_path / "a.txt")) == ["one", "two"]
    assert list(iter_texts(tmp_path / "a.md")) == ["# one", "two"]
    assert list(iter_texts(tmp_path / "a.jsonl.gz")) == ["one", "two"]
    (tmp_path / "b.txt").write_text("one\n  \ntwo\n\t\nthree")  # a line of spaces or a tab separates too
    assert list(iter_texts(tmp_path / "b.txt")) == ["one", "two", "three"]


def test_jsonl_rows_with_empty_text_are_skipped_and_counted(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "kept"}, {"text": ""}, {"text": "  "},
                                                              {"text": None}, {"text": 5}]))
    stats = LoadStats()
    assert list(iter_texts(path, stats)) == ["kept"]
    assert stats.read == 5 and stats.skipped == {"empty text": 3, "text not a string": 1}


# -- audit: damaged and mis-encoded files, text fields of another type, contexts split at a limit ----------


def _xz(data: bytes) -> bytes:
    import lzma

    return lzma.compress(data)


@pytest.mark.parametrize("name, content, message", [
    ("qa.json.xz", b"not xz at all", r"qa\.json\.xz: the \.xz archive is damaged or truncated \(LZMAError"),
    ("qa.json.xz", _xz(json.dumps(_squad({"context": "c", "qas": []})).encode())[:30],
     r"the \.xz archive is damaged or truncated \(EOFError"),
    ("qa.jsonl.gz", b"not gzip", r"qa\.jsonl\.gz: the \.gz archive is damaged or truncated \(BadGzipFile"),
    ("qa.jsonl", b'{"context": "caf\xe9", "question": "q?", "answers": ["a"]}\n', r"qa\.jsonl: not UTF-8 text"),
    ("qa.json", b'{"data": [{"title": "caf\xe9"}]}', r"qa\.json: not UTF-8 text"),
])
def test_a_damaged_or_mis_encoded_qa_file_is_a_data_error_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_qa(tmp_path / name)


@pytest.mark.parametrize("name, content", [("lm.txt", b"caf\xe9\n\nmore"), ("lm.jsonl.xz", b"garbage")])
def test_a_damaged_or_mis_encoded_text_file_is_a_data_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: (not UTF-8|the .xz archive is damaged)"):
        list(iter_texts(tmp_path / name))


def test_a_byte_order_mark_before_the_json_is_read_as_utf8(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "qa.json").write_bytes(bom + json.dumps(_squad({"context": "c", "qas": [
        {"question": "q?", "answers": [{"text": "c", "answer_start": 0}]}]})).encode())
    (tmp_path / "qa.jsonl").write_bytes(bom + b'{"context": "c", "question": "q?", "answers": "c"}\n')
    (tmp_path / "lm.jsonl").write_bytes(bom + b'{"text": "one"}\n')
    assert [p.context for p in read_qa(tmp_path / "qa.json")] == ["c"]
    assert [p.context for p in read_qa(tmp_path / "qa.jsonl")] == ["c"]
    assert list(iter_texts(tmp_path / "lm.jsonl")) == ["one"]


@pytest.mark.parametrize("name, content, where", [
    ("qa.jsonl", {"context": 5, "question": "q?", "answers": ["a"]}, r"qa\.jsonl:1: 'context' should be a string"),
    ("qa.jsonl", {"context": "c", "question": ["q?"], "answers": ["a"]}, r"qa\.jsonl:1: 'question' should be a str"),
    ("qa.json", _squad({"context": "c", "qas": [{"question": 7, "answers": [{"text": "a"}]}]}),
     r"qas\[0\]\.question should be a string, got int"),
    ("qa.json", _squad({"context": "c", "qas": [{"question": "q?", "answers": [{"text": 1889}]}]}),
     r"qas\[0\]\.answers\[0\]\.text should be a string, got int"),
    ("qa.json", _squad({"context": {"text": "c"}, "qas": []}), r"paragraphs\[0\]\.context should be a string"),
])
def test_a_text_field_holding_another_type_is_a_malformed_record_not_an_empty_one(tmp_path, name, content, where):
    (tmp_path / name).write_text(json.dumps(content) + "\n")
    with pytest.raises(DataError, match=where):
        read_qa(tmp_path / name)


@pytest.fixture
def tokenizer():
    from conftest import make_tiny_llama

    return make_tiny_llama()[1]


def test_a_long_context_is_split_and_each_question_kept_with_the_piece_holding_its_answer(tokenizer):
    from sac_rag.data import split_long_contexts

    sentences = [f"Sentence {i} says the tower was finished in {1800 + i}." for i in range(40)]
    context = " ".join(sentences)
    at = context.index("1837")
    questions = [QAItem("When, in sentence 37?", ["1837"], "late", at),
                 QAItem("When, first?", ["1800"], "early"),  # no answer_start: found by its text
                 QAItem("Who?", ["Gustave Eiffel"], "absent")]  # in no piece: skipped and counted
    short = Paragraph("Paris is in France.", [QAItem("Where?", ["France"])], "B")
    stats = LoadStats()
    kept, report = split_long_contexts([Paragraph(context, questions, "A"), short], tokenizer, 60, stats)
    assert (report.contexts, report.questions_skipped) == (1, 1)
    assert stats.skipped == {"answer in no piece of a context split at 60 tokens": 1}
    assert kept[-1] is short and len(kept) == 1 + report.pieces == 3
    by_id = {qa.id: (piece, qa) for piece in kept[:-1] for qa in piece.questions}
    for qa_id, answer in (("late", "1837"), ("early", "1800")):
        piece, qa = by_id[qa_id]
        assert piece.title == "A" and piece.context in context and answer in piece.context
        assert len(tokenizer(piece.context, add_special_tokens=False)["input_ids"]) <= 60
    piece, qa = by_id["late"]
    assert piece.context[qa.answer_start : qa.answer_start + 4] == "1837"  # its start moved into the piece


def test_qa_jsonl_named_json_is_refused_saying_how_it_would_be_read(tmp_path):
    row = {"context": "c", "question": "q?", "answers": ["c"]}
    (tmp_path / "qa.json").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"qa\.json: not SQuAD JSON .*Extra data.*; a file of one JSON object per line "
                                        r"is read as QA JSONL when its name ends in \.jsonl"):
        read_qa(tmp_path / "qa.json")


def test_a_split_context_keeps_each_question_with_the_occurrence_its_answer_start_points_at(tokenizer):
    """Unicode text (accents, CJK, an emoji: answer_start counts characters), an answer whose text occurs twice
    (its answer_start says which), one whose answer_start is wrong (found by its text instead) and one whose answer
    is in no piece."""
    from sac_rag.data import split_long_contexts

    sentences = [f"Phrase {i}: la tour fut achevée en {1800 + i} — 東京 🗼." for i in range(40)]
    sentences[3] += " Gustave Eiffel."
    sentences[36] += " Gustave Eiffel."
    context = " ".join(sentences)
    late = context.rindex("Gustave Eiffel")
    questions = [QAItem("Who, late?", ["Gustave Eiffel"], "late", late),
                 QAItem("Who, no start?", ["Gustave Eiffel"], "early"),
                 QAItem("When, wrong start?", ["1838"], "wrong", context.index("1801")),
                 QAItem("Who else?", ["Koechlin"], "absent", 5)]
    stats = LoadStats()
    kept, report = split_long_contexts([Paragraph(context, questions, "A")], tokenizer, 60, stats)
    assert report.contexts == 1 and report.questions_skipped == 1 and len(kept) == report.pieces
    by_id = {qa.id: (piece, qa) for piece in kept for qa in piece.questions}
    assert set(by_id) == {"late", "early", "wrong"}
    for piece, qa in by_id.values():
        assert piece.context in context and qa.answers[0] in piece.context
        assert len(tokenizer(piece.context, add_special_tokens=False)["input_ids"]) <= 60
    piece, qa = by_id["late"]
    assert piece.context[qa.answer_start : qa.answer_start + len("Gustave Eiffel")] == "Gustave Eiffel"
    assert context.index(piece.context) + qa.answer_start == late  # the occurrence it pointed at, not the first
    piece, qa = by_id["early"]  # without a start: the first piece holding the answer's text, its first occurrence
    first = context.index("Gustave Eiffel")
    assert context.index(piece.context) <= first < late and qa.answer_start == -1
    assert by_id["wrong"][1].answer_start == -1  # a start that points elsewhere is not carried over


def test_an_answer_absent_from_an_unsplit_context_is_kept_as_its_target(tokenizer):
    """Only a split context drops a question whose answer no piece holds; a context read whole keeps it (free-form
    answers are answers too), and the example's target is that answer and the end token."""
    from sac_rag.config import PromptTemplate
    from sac_rag.data import split_long_contexts
    from sac_rag.objectives import ExampleBuilder

    paragraph = Paragraph("Paris is in France.", [QAItem("Is it?", ["yes"])], "A")
    kept, report = split_long_contexts([paragraph], tokenizer, 60, LoadStats())
    assert kept == [paragraph] and report.questions_skipped == 0
    ((_, target),) = ExampleBuilder(tokenizer, PromptTemplate()).qa(paragraph, 0, kept).rows
    assert target == tokenizer("yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_duplicate_questions_are_read_as_separate_items_and_grouped_by_context(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"context": "Ünïcødé 東京 🗼 is here.", "question": "Where?", "answers": ["東京"]},
            {"context": "Ünïcødé 東京 🗼 is here.", "question": "Where?", "answers": ["東京 🗼"]},
            {"context": "Other.", "question": "Where?", "answers": "Other"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    first, second = read_qa(path)
    assert first.context == rows[0]["context"] and [qa.answers for qa in first.questions] == [["東京"], ["東京 🗼"]]
    assert second.questions[0].answers == ["Other"]


# -- audit: records read as nothing, ids, skipped answers, files compressed under another name ------------


@pytest.mark.parametrize("content, where", [
    # flat {context, question, answers} records under "data" (another layout) used to read as no paragraph at all
    ({"data": [{"context": "c", "question": "q?", "answers": {"text": ["c"], "answer_start": [0]}}]},
     r"data\[0\] has no 'paragraphs': SQuAD JSON is data\[\]\.paragraphs\[\]\..*read from \.jsonl.*'question'"),
    (_squad({"context": "c"}), r"data\[0\]\.paragraphs\[0\] has no 'qas'"),
    (_squad({"text": "c", "qas": []}), r"data\[0\]\.paragraphs\[0\] has no 'context'"),
    # an answer without a text used to be left out quietly (its question then had fewer gold answers, or none)
    (_squad({"context": "c", "qas": [{"id": "1", "question": "q?", "answers": [{"answer": "c"}]}]}),
     r"qas\[0\]\.answers\[0\] has no 'text' \(SQuAD answers are \{\"text\": \.\.\., \"answer_start\""),
])
def test_squad_json_missing_a_key_is_refused_not_read_as_nothing(tmp_path, content, where):
    (tmp_path / "qa.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=where):
        read_qa(tmp_path / "qa.json")


def test_a_jsonl_row_missing_a_field_names_it(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q?", "answers": "c"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:1: the row has no 'context' field \(QA JSONL rows are"):
        read_qa(tmp_path / "qa.jsonl")


def _qa(qa_id, question="q?"):
    return {"id": qa_id, "question": question, "answers": [{"text": "c", "answer_start": 0}]}


@pytest.mark.parametrize("name, content, message", [
    ("qa.json", {"data": [{"title": "A", "paragraphs": [{"context": "c", "qas": [_qa("x")]},
                                                        {"context": "d", "qas": [_qa("x", "other?")]}]}]},
     r"qa\.json: question id 'x' of data\[0\]\.paragraphs\[1\]\.qas\[0\] repeats that of data\[0\]\.paragraphs\[0\]"
     r"\.qas\[0\]: ids must be unique"),
    ("qa.jsonl", [{"id": "x", "context": "c", "question": "q?", "answers": "c"},
                  {"id": "x", "context": "d", "question": "other?", "answers": "d"}],
     r"qa\.jsonl: question id 'x' of line 2 repeats that of line 1: ids must be unique"),
    ("qa.jsonl", [{"id": "2", "context": "c", "question": "q?", "answers": "c"},
                  {"context": "c", "question": "other?", "answers": "c"}],
     r"repeats that of line 1.*a row without an 'id' is named by its line number"),
])
def test_a_repeated_question_id_is_refused_naming_both_records(tmp_path, name, content, message):
    """Evaluation caches predictions by id: the second question used to be scored with the first one's answer."""
    text = json.dumps(content) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in content)
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_qa(tmp_path / name)


def test_questions_without_an_id_are_named_by_their_place(tmp_path):
    """SQuAD questions without an id all used to get the id "" (and a JSONL "id": null the id "None"), so
    every one of them was scored with the first one's cached prediction."""
    (tmp_path / "qa.json").write_text(json.dumps(_squad({"context": "c", "qas": [
        {"question": "q?", "answers": [{"text": "c"}]}, {"id": "", "question": "r?", "answers": [{"text": "c"}]}]})))
    (tmp_path / "qa.jsonl").write_text('{"context": "c", "question": "q?", "answers": "c", "id": null}\n\n'
                                       '{"context": "c", "question": "r?", "answers": "c"}\n')
    assert [qa.id for qa in read_qa(tmp_path / "qa.json")[0].questions] == [
        "data[0].paragraphs[0].qas[0]", "data[0].paragraphs[0].qas[1]"]
    assert [qa.id for qa in read_qa(tmp_path / "qa.jsonl")[0].questions] == ["1", "3"]


def test_every_record_left_out_is_counted_and_logged_when_the_caller_takes_no_count(tmp_path, caplog):
    """A paragraph without questions, an empty gold answer beside a usable one and (JSONL) a row without
    an answer used to be left out uncounted; read_qa without stats (as the evaluation reads its
    questions) logged no skip at all, so an evaluation ran on fewer questions without a word."""
    (tmp_path / "qa.json").write_text(json.dumps({"data": [{"title": "A", "paragraphs": [
        {"context": "c", "qas": []},
        {"context": "d", "qas": [{"id": "1", "question": "q?", "answers": [{"text": " "}, {"text": "d"}]},
                                 {"id": "2", "question": "r?", "answers": [], "is_impossible": True}]}]}]}))
    stats = LoadStats()
    (paragraph,) = read_qa(tmp_path / "qa.json", stats)
    assert [qa.answers for qa in paragraph.questions] == [["d"]]
    assert stats.skipped == {"paragraph without questions": 1, "empty gold answer left out (its question kept)": 1,
                             "no answer": 1}
    (tmp_path / "qa.jsonl").write_text('{"context": "c", "question": "q?", "answers": "c"}\n'
                                       '{"context": "c", "question": "r?", "answers": []}\n')
    stats = LoadStats()
    read_qa(tmp_path / "qa.jsonl", stats)
    assert (stats.read, stats.skipped) == (2, {"no answer": 1})  # every row read is counted (was 1 of 2)
    with caplog.at_level("WARNING", logger="sac_rag.data"):
        read_qa(tmp_path / "qa.jsonl")
    assert "qa.jsonl: skipped {'no answer': 1}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sac_rag.data"):
        read_qa(tmp_path / "qa.jsonl", LoadStats())  # a caller that takes the counts reports them itself
    assert caplog.text == ""


@pytest.mark.parametrize("name, content, advice", [
    ("qa.json", gzip.compress(b'{"data": []}'), r"it is gzip-compressed: name it \*\.gz \(e\.g\. qa\.json\.gz\)"),
    ("qa.jsonl", _xz(b'{"context": "c"}\n'), r"it is xz-compressed: name it \*\.xz"),
    ("qa.json.bz2", __import__("bz2").compress(b'{"data": []}'), r"it is bzip2-compressed, which is not read"),
    ("qa.json", '{"data": []}'.encode("utf-16"), r"it is UTF-16 text: save it as UTF-8"),
    ("qa.json", b'{"data": "caf\xe9"}', r"not UTF-8 text \(.*\); save it as UTF-8$"),
], ids=["gzip", "xz", "bz2", "utf-16", "latin-1"])
def test_a_file_that_is_not_utf8_says_what_it_is_instead(tmp_path, name, content, advice):
    """It used to say "save it as UTF-8" of a compressed file whose name does not say so, too."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=advice):
        read_qa(tmp_path / name)


def test_compression_and_format_suffixes_are_read_in_any_case(tmp_path):
    row = b'{"context": "c", "question": "q?", "answers": "c"}\n'
    (tmp_path / "QA.JSONL.XZ").write_bytes(_xz(row))
    (tmp_path / "qa.jsonl.GZ").write_bytes(gzip.compress(row))
    assert [p.context for p in read_qa(tmp_path / "QA.JSONL.XZ")] == ["c"]  # was "not UTF-8 text"
    assert [p.context for p in read_qa(tmp_path / "qa.jsonl.GZ")] == ["c"]


def test_every_answer_of_a_split_context_is_kept_with_a_piece_wherever_the_cuts_fall(tokenizer):
    from sac_rag.data import split_long_contexts

    words = [f"w{i}x{i * 7 % 13}" for i in range(300)]
    context = " ".join(words)
    questions = []
    for i in range(0, len(words) - 1):  # every pair of neighbouring words: some pair is crossed by every cut
        answer = f"{words[i]} {words[i + 1]}"
        questions.append(QAItem(f"q{i}?", [answer], f"q{i}", context.index(answer)))
    stats = LoadStats()
    kept, report = split_long_contexts([Paragraph(context, questions, "A")], tokenizer, 60, stats)
    assert report.contexts == 1 and report.pieces > 2
    assert report.questions_skipped == 0 and not stats.skipped
    for piece in kept:
        for qa in piece.questions:
            assert piece.context[qa.answer_start : qa.answer_start + len(qa.answers[0])] == qa.answers[0]
