"""benchmarks/costs.py: every method timed in one process on contexts of k paragraphs; rows carry
the ratios to full context and the command; bad input is refused before anything is timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCHMARKS, load_benchmark, save_tiny_compressor, write_squad_dev

from sac_rag.errors import InvalidInputError
from sac_rag.eval import Question

SCRIPT = BENCHMARKS / "costs.py"



COSTS = load_benchmark("costs")


def _question(i: int, context: str) -> Question:
    return Question(id=f"q{i}", question=f"question {i}?", answers=["a"], context=context)


def test_each_question_reads_its_own_paragraph_then_distinct_others_wrapping_around():
    pool = [_question(0, "A"), _question(1, "A"), _question(2, "B"), _question(3, "C"), _question(4, "D")]
    assert [q.context for q in COSTS.with_paragraphs(pool, 3, 1)] == ["A", "A", "B"]
    # question i starts looking at distinct paragraph i * k (A B C D), skipping its own
    assert [q.context for q in COSTS.with_paragraphs(pool, 3, 2)] == ["A\n\nB", "A\n\nC", "B\n\nA"]
    four = COSTS.with_paragraphs(pool, 5, 4)
    assert [len(set(q.context.split("\n\n"))) for q in four] == [4] * 5  # past the end: wrapped, still distinct
    assert [q.context.split("\n\n")[0] for q in four] == ["A", "A", "B", "C", "D"]
    assert [q.id for q in four] == [f"q{i}" for i in range(5)]


def test_contexts_of_more_paragraphs_than_the_data_holds_are_refused():
    pool = [_question(0, "A"), _question(1, "B")]
    with pytest.raises(InvalidInputError, match="contexts of 3 paragraphs need 3 distinct paragraphs, but the "
                                                "questions have 2"):
        COSTS.with_paragraphs(pool, 2, 3)


def test_ratios_are_to_full_context_at_the_same_length():
    rows = [{"method": "full-context", "paragraphs": 1, "ttft_s": 2.0, "decode_tokens_per_s": 10.0,
             "kv_bytes_per_query": 1000},
            {"method": "full-context", "paragraphs": 3, "ttft_s": 4.0, "decode_tokens_per_s": 5.0,
             "kv_bytes_per_query": 3000},
            {"method": "sac-5x", "paragraphs": 3, "ttft_s": 1.0, "decode_tokens_per_s": 10.0,
             "kv_bytes_per_query": 600},
            {"method": "no-context", "paragraphs": 1, "ttft_s": 0.5, "decode_tokens_per_s": 20.0,
             "kv_bytes_per_query": 0}]
    COSTS.add_ratios(rows)
    assert [(r["ttft_s_vs_full_context"], r["decode_tokens_per_s_vs_full_context"],
             r["kv_bytes_per_query_vs_full_context"]) for r in rows] == [
        (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.25, 2.0, 0.2), (0.25, 2.0, None)]


def test_a_method_is_compared_with_full_context_timed_just_before_and_after_it():
    """The machine's speed drifts over a run: a method timed late must not read slow against a
    reference timed first."""
    first = {1: {"ttft_s": 1.0, "decode_tokens_per_s": 10.0}}
    later = {1: {"ttft_s": 3.0, "decode_tokens_per_s": 6.0}}  # the machine has slowed down
    sac = COSTS.bracketed({1: {"ttft_s": 1.0, "decode_tokens_per_s": 4.0, "kv_bytes_per_query": 20}}, later, later)
    rows = [{"method": "full-context", "paragraphs": 1, **COSTS.reference_row_costs([first, later, later])[1],
             "kv_bytes_per_query": 100},
            {"method": "sac-5x", "paragraphs": 1, **sac[1]}]
    COSTS.add_ratios(rows)
    assert rows[0]["ttft_s"] == pytest.approx(7 / 3) and rows[0]["decode_tokens_per_s"] == pytest.approx(22 / 3)
    assert rows[0]["reference_spread"] == 3.0 and rows[0]["reference_timings"] == 3
    assert (rows[1]["reference_ttft_s"], rows[1]["reference_decode_tokens_per_s"]) == (3.0, 6.0)
    assert (rows[1]["ttft_s_vs_full_context"], rows[1]["decode_tokens_per_s_vs_full_context"],
            rows[1]["kv_bytes_per_query_vs_full_context"]) == pytest.approx((1 / 3, 4 / 6, 0.2))
    assert COSTS.bracketed({1: {"ttft_s": 2.0}}, first, later)[1]["reference_ttft_s"] == 2.0  # the mean around it


@pytest.fixture
def nothing_built(tmp_path, monkeypatch):
    """Paths of the test's own (never the committed results) and no model: an option the parser
    let through fails the test instead of timing the real models."""
    def build_method(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(COSTS, "build_method", build_method)
    return ["--results", str(tmp_path / "costs.jsonl"), "--data-root", str(tmp_path / "nowhere")]


@pytest.mark.parametrize("paragraphs", ["0", "1,,3", "3,3", "a", "-1"])
def test_context_lengths_that_are_not_distinct_counts_are_refused_by_the_parser(paragraphs, nothing_built, capsys):
    with pytest.raises(SystemExit) as exit_:
        COSTS.main([*nothing_built, "--paragraphs", paragraphs])
    assert exit_.value.code == 2 and "--paragraphs" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--samples", "0"], ["--threads", "0"], ["--dtype", "float64"]])
def test_other_out_of_range_options_are_refused_by_the_parser(option, nothing_built):
    with pytest.raises(SystemExit) as exit_:
        COSTS.main([*nothing_built, *option])
    assert exit_.value.code == 2


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Six questions on three paragraphs; the script's models replaced by the tiny Llama (saved as
    a folder) and a ratio-2 compressor of it (``build_method`` records what it builds)."""
    save_tiny_compressor(tmp_path)
    write_squad_dev(tmp_path, [
        {"context": f"Paris is the capital of France. Fact number {p} is {'long ' * p}here.",
         "qas": [{"id": f"p{p}q{i}", "question": "What is the capital?", "answers": [{"text": "Paris"}]}
                 for i in range(2)]} for p in range(3)])
    built = []
    real = COSTS.build_method

    def tiny_build_method(name, base_model, ratio, checkpoint, device, dtype, **kwargs):
        assert base_model == "smollm2-135m"
        built.append((name, dtype))
        checkpoint = str(tmp_path / "compressor") if name == "sac" else checkpoint
        return real(name, str(tmp_path / "tiny-model"), ratio, checkpoint, device, dtype, **kwargs)

    monkeypatch.setattr(COSTS, "build_method", tiny_build_method)
    return tmp_path, built


def _costs(tmp_path, *args):
    return COSTS.main(["--data-root", str(tmp_path / "data"), "--samples", "2", "--paragraphs", "1,2",
                       "--dtype", "fp32", "--results", str(tmp_path / "results" / "costs.jsonl"), *args])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_time_every_method_at_every_length_against_full_context(workspace):
    tmp_path, built = workspace
    assert _costs(tmp_path, "--methods", "no-context,kv-dropping-5x,sac-5x") == 0
    rows = _rows(tmp_path / "results" / "costs.jsonl")
    assert [(r["method"], r["paragraphs"]) for r in rows] == [
        (m, k) for m in ("full-context", "no-context", "sac-5x", "kv-dropping-5x") for k in (1, 2)]
    assert {name for name, _ in built} == {"full_context", "no_context", "sac", "kv_dropping"}
    assert {dtype for _, dtype in built} == {r["dtype"] for r in rows} == {"float32"}  # "fp32" as computed
    command = "python benchmarks/costs.py " + " ".join(["--data-root", str(tmp_path / "data"), "--samples", "2"])
    assert all(r["command"].startswith(command) and r["dataset"] == "squad-dev" and r["timing_samples"] == 2
               for r in rows)
    assert len({r["run"] for r in rows}) == 1 and "peak_rss_mb" not in rows[0]
    by = {(r["method"], r["paragraphs"]): r for r in rows}
    for k in (1, 2):
        assert by["full-context", k]["ttft_s_vs_full_context"] == 1.0
        assert by["full-context", k]["reference_timings"] == 4  # first, then after each of the three methods
        assert by["sac-5x", k]["ttft_s_vs_full_context"] == pytest.approx(
            by["sac-5x", k]["ttft_s"] / by["sac-5x", k]["reference_ttft_s"])
        assert by["kv-dropping-5x", k]["kv_bytes_per_query"] < by["full-context", k]["kv_bytes_per_query"]
        assert by["sac-5x", k]["ratio"] == by["kv-dropping-5x", k]["ratio"] == 5
        assert by["sac-5x", k]["kv_bytes_per_query_vs_full_context"] == pytest.approx(
            by["sac-5x", k]["kv_bytes_per_query"] / by["full-context", k]["kv_bytes_per_query"])
    assert by["full-context", 2]["context_tokens"] > by["full-context", 1]["context_tokens"]
    assert by["full-context", 2]["kv_bytes_per_query"] > by["full-context", 1]["kv_bytes_per_query"]


def test_rows_follow_a_row_cut_short_by_a_kill_on_lines_of_their_own(workspace):
    tmp_path, _ = workspace
    results = tmp_path / "results" / "costs.jsonl"
    results.parent.mkdir()
    results.write_text('{"method": "earlier", "n": 1}\n{"method": "cut sh')
    assert _costs(tmp_path, "--methods", "full-context", "--paragraphs", "1") == 0
    rows = _rows(results)
    assert [r["method"] for r in rows] == ["earlier", "full-context"]


@pytest.mark.parametrize("problem", ["results folder", "results of another kind", "no data"])
def test_bad_paths_are_refused_before_any_model_is_built(workspace, problem):
    tmp_path, built = workspace
    results = tmp_path / "results" / "costs.jsonl"
    results.parent.mkdir()
    args = []
    if problem == "results folder":
        results.mkdir()
    elif problem == "results of another kind":
        results.write_text("method,ttft\nsac,1.0\n")
    else:
        args = ["--data-root", str(tmp_path / "nowhere")]
    with pytest.raises(InvalidInputError, match="--results|does not exist: set --data-root"):
        _costs(tmp_path, *args)
    assert built == []


def test_the_full_ft_adapter_is_looked_for_before_anything_is_timed(workspace, monkeypatch):
    tmp_path, built = workspace
    monkeypatch.chdir(tmp_path)  # the adapter's path is relative to the repository's root
    with pytest.raises(InvalidInputError, match="full-ft-smollm2-135m-squad .* is not a folder here"):
        _costs(tmp_path, "--methods", "no-context,full-ft-merged")
    assert built == []


def test_a_missing_data_file_is_one_line_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--results",
                           str(tmp_path / "costs.jsonl")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ")
    assert len(done.stderr.strip().splitlines()) == 1 and "does not exist: set --data-root" in done.stderr
