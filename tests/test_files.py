import json

from sac_rag.files import append_jsonl


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
