import json

from sac_rag.files import append_jsonl


def test_results_are_appended_as_json_lines_into_a_new_folder_without_touching_earlier_rows(tmp_path):
    path = tmp_path / "new" / "results.jsonl"
    append_jsonl(path, [{"method": "sac", "f1": 41.2}])
    append_jsonl(path, [{"method": "full-ft", "f1": 61.9}, {"method": "kv-dropping", "f1": 6.6}])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sac", "full-ft", "kv-dropping"]
    assert rows[0] == {"method": "sac", "f1": 41.2}
