"""Specification of reading a user's corpus (``sac_rag.corpus``) where it goes wrong: folders
that cannot be listed, symlinked folders and loops, damaged compressed files, ``exclude`` values
and files of other types. Nothing may be left out silently; the reader tests of the common
cases are in test_precompress.py."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os

import pytest

from sac_rag.corpus import CorpusError, CorpusStats, read_corpus


def ids(corpus, **kwargs) -> list[str]:
    return [d.id for d in read_corpus(corpus, **kwargs)]


def test_a_folder_that_cannot_be_listed_is_skipped_and_counted_not_dropped_silently(tmp_path, monkeypatch, caplog):
    (tmp_path / "a.txt").write_text("readable words")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("words behind a permission")
    os.chmod(tmp_path / "locked", 0)
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder: refuse this one as the kernel refuses others
        if os.fspath(path) == str(tmp_path / "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = CorpusStats()
    try:
        with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
            assert ids(tmp_path, stats=stats) == ["a.txt"]
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert stats.skipped == {"unreadable folder (Permission denied)": 1}
    assert "skipping locked/: unreadable folder" in caplog.text


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path, caplog):
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "real").mkdir(parents=True)
    (outside / "deeper").mkdir(parents=True)
    (corpus / "real" / "r.txt").write_text("a file in the corpus")
    (outside / "o.txt").write_text("a file linked into the corpus")
    (outside / "deeper" / "d.md").write_text("deeper in the linked folder")
    (outside / "deeper" / "back").symlink_to(outside)  # a loop
    (corpus / "linked").symlink_to(outside)
    (corpus / "linked-again").symlink_to(outside)
    (corpus / "alias").symlink_to(corpus / "real")  # inside the corpus: read where it is
    (corpus / "up").symlink_to(corpus)  # a loop through the corpus itself
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        found = ids(corpus, stats=stats)
    assert found == ["linked/deeper/d.md", "linked/o.txt", "real/r.txt"]
    assert stats.skipped == {"a link to a folder already read": 2}  # linked-again, linked/deeper/back
    assert "linked-again/" in caplog.text and "alias" not in caplog.text


def test_a_truncated_compressed_jsonl_keeps_the_records_before_the_damage_and_counts_the_rest(tmp_path, caplog):
    whole = tmp_path / "whole.jsonl.gz"
    with gzip.open(whole, "wt", encoding="utf-8") as f:
        for i in range(3000):
            f.write(json.dumps({"id": f"r{i}", "text": f"record {i} of a download that was cut short"}) + "\n")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[:6000])
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        found = ids(cut, stats=stats)
    assert 0 < len(found) < 3000 and found == [f"r{i}" for i in range(len(found))]
    assert stats.skipped == {"damaged or truncated (the rest of the file)": 1}
    assert f"cut.jsonl.gz after line {len(found)} (" in caplog.text
    cut.write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="no usable document.*damaged or truncated"):
        ids(cut)


def test_exclude_takes_ids_glob_patterns_folders_and_paths_and_warns_about_values_that_match_nothing(
        tmp_path, monkeypatch, caplog):
    for name in ("a.txt", "questions.txt", "drafts/one.md", "drafts/two.md", "notes/x.md", "notes/y.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"the text of {name}")
    assert ids(tmp_path, exclude=["questions.txt", "drafts/"]) == ["a.txt", "notes/x.md", "notes/y.txt"]
    assert ids(tmp_path, exclude=["drafts", "notes/*.md"]) == ["a.txt", "notes/y.txt", "questions.txt"]
    assert ids(tmp_path, exclude="questions.txt") == ["a.txt", "drafts/one.md", "drafts/two.md", "notes/x.md",
                                                      "notes/y.txt"]  # one id, not its characters
    monkeypatch.chdir(tmp_path.parent)  # paths as a shell completes them: absolute or from here
    stats = CorpusStats()
    kept = ids(tmp_path, stats=stats, exclude=[str(tmp_path / "questions.txt"), f"{tmp_path.name}/notes",
                                               "./a.txt"])
    assert kept == ["drafts/one.md", "drafts/two.md"] and stats.excluded == 4
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        assert len(ids(tmp_path, exclude=["*.pdf", "questions.txt"])) == 5
    assert "excluded but not in the corpus" in caplog.text and "*.pdf" in caplog.text
    assert "questions.txt" not in caplog.text.split("excluded but not in the corpus")[1]


def test_a_folder_of_other_file_types_says_what_it_holds(tmp_path):
    for name in ("a.pdf", "b.pdf", "c.html", ".hidden.txt"):
        (tmp_path / name).write_text("not read")
    stats = CorpusStats()
    with pytest.raises(CorpusError, match=r"files of other types not read: 2 \.pdf, 1 \.html"):
        ids(tmp_path, stats=stats)
    assert stats.other_files == {".pdf": 2, ".html": 1}


def test_a_broken_symlink_is_named_as_such(tmp_path):
    (tmp_path / "ok.txt").write_text("kept")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    stats = CorpusStats()
    assert ids(tmp_path, stats=stats) == ["ok.txt"]
    assert stats.skipped == {"a broken symlink": 1}


def test_a_document_under_the_id_of_an_earlier_one_is_read_and_named_in_a_warning(tmp_path, caplog):
    # Chunk ids are "<doc id>#<index>": two documents of one id give different chunks the same ids.
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "text": "first text"}, {"id": "b", "text": "other text"},
        {"id": "a", "text": "first text"},  # the same document again: a duplicate, dropped
        {"id": "a", "text": "second text"}]) + "\n")
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="sac_rag.corpus"):
        docs = [(d.id, d.text) for d in read_corpus(corpus, stats)]
    assert docs == [("a", "first text"), ("b", "other text"), ("a", "second text")] and stats.duplicates == 1
    assert caplog.text.count("the id of an earlier document") == 1
    assert "a: the id of an earlier document with other text" in caplog.text and "named a#0, a#1" in caplog.text


def test_a_jsonl_record_without_an_id_or_with_an_empty_one_is_named_by_its_file_and_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [
        {"id": "", "text": "first text"}, {"text": "second text"}, {"id": 7, "text": "third text"}]) + "\n")
    assert [d.id for d in read_corpus(corpus)] == ["c.jsonl:1", "c.jsonl:2", "7"]
