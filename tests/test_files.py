import json

from sac_rag.files import append_jsonl, is_json_object


def test_results_are_appended_as_json_lines_into_a_new_folder_without_touching_earlier_rows(tmp_path):
    path = tmp_path / "new" / "results.jsonl"
    append_jsonl(path, [{"method": "sac", "f1": 41.2}])
    append_jsonl(path, [{"method": "full-ft", "f1": 61.9}, {"method": "kv-dropping", "f1": 6.6}])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sac", "full-ft", "kv-dropping"]
    assert rows[0] == {"method": "sac", "f1": 41.2}


def test_a_row_cut_short_by_a_kill_is_dropped_but_a_whole_row_without_its_newline_is_kept(tmp_path):
    """Every writer appends whole lines in one write, so a last line without a newline is a killed
    write; unless it is a whole row, which only lost its newline (in an editor, say)."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"row": 1}\n{"row": 2, "f1": 4')
    append_jsonl(path, [{"row": 3}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"row": 1}, {"row": 3}]
    path.write_text('{"row": 1}\n{"row": 2}')
    append_jsonl(path, [{"row": 3}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"row": 1}, {"row": 2}, {"row": 3}]


def test_readers_take_a_whole_last_row_without_its_newline_as_the_appender_keeps_it():
    from sac_rag.eval import json_lines

    rows, unfinished = json_lines('{"row": 1}\n{"row": 2}')
    assert [row for _, _, row in rows] == [{"row": 1}, {"row": 2}] and unfinished == ""
    rows, unfinished = json_lines('{"row": 1}\n{"row": 2, "f1": 4')
    assert [row for _, _, row in rows] == [{"row": 1}] and unfinished == '{"row": 2, "f1": 4'


def test_a_file_ending_in_a_line_too_long_to_be_a_row_is_refused_and_left_as_it_was(tmp_path):
    """Only the last 64 KiB are read to find the cut: a longer unfinished line is not sac_rag's."""
    import pytest

    from sac_rag.errors import InvalidInputError

    path = tmp_path / "rows.jsonl"
    before = b'{"row": 1}\n' + b"x" * (70 * 1024)
    path.write_bytes(before)
    with pytest.raises(InvalidInputError, match="ends in a line over 64 KiB long"):
        append_jsonl(path, [{"row": 2}])
    assert path.read_bytes() == before


def test_atomic_write_syncs_the_new_file_before_renaming_it_and_the_folder_after(tmp_path, monkeypatch):
    """A power cut, which a kill does not simulate, must find the old content or all of the new."""
    import os

    import sac_rag.files as files_module

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(files_module.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(files_module.os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b))[1])
    path = tmp_path / "manifest.json"
    files_module.atomic_write(path, b"{}")
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".manifest.json.")) and events[1][1] == str(path)
    assert events[2][1] == str(tmp_path) and path.read_bytes() == b"{}"


def test_only_a_whole_json_object_counts_as_a_row():
    assert is_json_object('{"row": 1}') and is_json_object(b'{"row": 1}')
    assert not any(is_json_object(line) for line in ('[1, 2]', '"row"', "3", "null", '{"row": 1', ""))
