"""benchmarks/paired.py: which prediction files a command-line spec names."""

import runpy
from pathlib import Path

PAIRED = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "paired.py"))
run_paths = PAIRED["run_paths"]


def test_a_file_whose_name_holds_a_plus_is_read_as_that_file(tmp_path):
    named = tmp_path / "rag-text-truncate-5x+fullft-decoder.jsonl"
    named.write_text("")
    assert run_paths(str(named)) == [named]


def test_plus_joined_files_are_averaged_runs(tmp_path):
    first, second = tmp_path / "seed0.jsonl", tmp_path / "seed1.jsonl"
    for path in (first, second):
        path.write_text("")
    assert run_paths(f"{first}+{second}") == [first, second]
