"""benchmarks/refine_cost.py: the same paragraphs compressed with and without refinement in one
process, each once; refinement's row says what it costs and what it buys."""

import json

from conftest import load_benchmark, save_tiny_compressor, write_squad_dev

REFINE_COST = load_benchmark("refine_cost")


def test_each_paragraph_is_compressed_both_ways_and_refinement_lowers_the_rereading_loss(tmp_path, capsys):
    compressor = save_tiny_compressor(tmp_path, chunk_len=16)
    text = "The lighthouse on Gull Point was built in 1874 and painted red in 1902 by its keeper."
    data = write_squad_dev(tmp_path, [
        {"context": f"{text} Fact {i}.", "qas": [{"id": f"q{i}-{j}", "question": "When?", "answers": [{"text": "1874"}]}
                                                  for j in range(2)]} for i in range(3)])
    assert REFINE_COST.main(["--compressor", str(compressor), "--data-root", str(data), "--n", "6", "--steps", "3",
                             "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["paragraphs"] == 3 and row["refine_steps"] == 3  # six questions, three distinct paragraphs
    assert row["refined_s_per_chunk"] > 0 and row["s_per_chunk"] > 0
    assert row["refined_rereading_loss"] < row["rereading_loss"]
